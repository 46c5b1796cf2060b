"""Deployment on Flower: credentials, site config, protocol state across processes, and two
loopback integration tests (SuperLink + 3 sites with TLS and node authentication).

The integration tests (marker ``deploy``) start real ``flower-superlink`` processes and, per
site, ``securefed supernode --isolation process`` + ``securefed site-worker`` on 127.0.0.1, and
kill them (and their children) in ``finally``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import time
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from securefed.client.runtime import build_trainer, local_round
from securefed.config import ExperimentConfig
from securefed.deploy.common import (
    DeployConfigError,
    check_deployable,
    cohort_session,
    masking_params,
)
from securefed.deploy.coordinator import (
    Coordinator,
    CoordinatorOptions,
    Reply,
)
from securefed.deploy.node import (
    NodeConfigError,
    NodeOptions,
    PolicyError,
    Site,
    dispatch,
)
from securefed.deploy.state import StateError, load_round_state, save_round_state
from securefed.deploy.tls import load_supernode_public_key, write_tls_material
from securefed.deploy.wire import PROTOCOL_VERSION, WireError, decode_vector, encode_vector
from securefed.diffusion import NoiseSchedule
from securefed.secagg.keys import init_identity_keys, load_identities
from securefed.secagg.masking.client import MaskingClient
from securefed.secagg.masking.messages import ProtocolError, RoundStart, Stage, decode_message
from securefed.secagg.masking.server import MaskingServer
from tests.deploy_helpers import (
    DEPLOY_RAW,
    assert_matches_simulation,
    ckpt_params,
    deploy_cfg,
    round_tolerance,
    write_cfg,
)
from tests.helpers import config_with, metrics_rows, one_cohort

#: deployment tests (Flower processes, sites, the deploy protocol): in `make test`, left out
#: of `make test-unit`
pytestmark = pytest.mark.deploy


#: rehearsal policy of the in-process sites: seeded noise (to compare with the simulation) and
#: floors low enough for a 3-site round to survive one dropout
REHEARSAL: dict[str, Any] = {
    "allow_seeded_noise": True, "min_threshold": Fraction(1, 2), "min_cohort": 2,
}


# ---------------------------------------------------------------------------------- TLS


def test_tls_material_is_a_valid_chain_with_private_keys_0600(tmp_path: Path) -> None:
    m = write_tls_material(tmp_path / "tls", ["superlink.example.org", "10.0.0.5"], 2)
    for p in (m.ca_key, m.superlink_key, *m.supernode_keys):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    ca = x509.load_pem_x509_certificate(m.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(m.superlink_cert.read_bytes())
    # the SuperLink certificate is signed by the CA and names both hosts
    ca_pub = ca.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    assert link.signature_hash_algorithm is not None
    ca_pub.verify(link.signature, link.tbs_certificate_bytes,
                  ec.ECDSA(link.signature_hash_algorithm))
    san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # SuperNode auth keys: EC (NIST) in OpenSSH format, public half matches the private key
    for priv, pub in zip(m.supernode_keys, m.supernode_public_keys, strict=True):
        key = serialization.load_ssh_private_key(priv.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        pk = load_supernode_public_key(pub)
        assert pk.public_numbers() == key.public_key().public_numbers()
        sig = key.sign(b"x", ec.ECDSA(hashes.SHA256()))
        pk.verify(sig, b"x", ec.ECDSA(hashes.SHA256()))
    manifest = json.loads(m.manifest.read_text())
    assert manifest["hosts"] == ["superlink.example.org", "10.0.0.5"]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_tls_material(tmp_path / "tls", ["localhost"], 1)
    with pytest.raises(ValueError, match="--host 'https://x'"):
        write_tls_material(tmp_path / "other", ["https://x"], 1)
    with pytest.raises(ValueError, match="--supernodes"):
        write_tls_material(tmp_path / "other", ["localhost"], 0)


def test_cli_keys_tls(tmp_path: Path) -> None:
    from securefed.cli import main

    out = tmp_path / "tls"
    assert main(["keys", "tls", "--out", str(out), "--host", "127.0.0.1", "--host",
                 "localhost", "--supernodes", "3"]) == 0
    assert sorted(p.name for p in out.glob("supernode_*.key")) == [
        "supernode_0.key", "supernode_1.key", "supernode_2.key"
    ]
    assert stat.S_IMODE((out / "superlink.key").stat().st_mode) == 0o600


# ---------------------------------------------------------------------------- site config


@pytest.mark.parametrize(
    ("node_config", "match"),
    [
        ({"keys-dir": "/k", "partition-id": 0}, "state-dir: required"),
        ({"state-dir": "/s", "partition-id": 0}, "keys-dir: required"),
        ({"state-dir": "/s", "keys-dir": "/k"}, "exactly one of data-path"),
        ({"state-dir": "/s", "keys-dir": "/k", "partition-id": 0, "data-path": "/d"},
         "exactly one of data-path"),
        ({"state-dir": "/s", "keys-dir": "/k", "data-path": "/d"}, "client-id: required"),
        ({"state-dir": "/s", "keys-dir": "/k", "partition-id": "zero"},
         "partition-id='zero': not an integer"),
        ({"state-dir": "/s", "keys-dir": "/k", "partition-id": 0, "device": "tpu"},
         "device='tpu'"),
        ({"state-dir": "/s", "keys-dir": "/k", "partition-id": 0, "max-epsilon": -1},
         "max-epsilon=-1.0: must be > 0"),
        ({"state-dir": "/s", "keys-dir": "/k", "partition-id": 0, "colour": "red"},
         r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_node_config_errors_name_the_key(node_config: dict[str, Any], match: str) -> None:
    with pytest.raises(NodeConfigError, match=match):
        NodeOptions.from_node_config(node_config)


def test_node_config_parses_and_defaults() -> None:
    o = NodeOptions.from_node_config({"state-dir": "/s", "keys-dir": "/k", "partition-id": 2})
    assert (o.client_id, o.partition_id, o.device, o.require_dp) == (2, 2, "cpu", True)
    o = NodeOptions.from_node_config(
        {"state-dir": "/s", "keys-dir": "/k", "data-path": "/d", "client-id": "4",
         "require-dp": "false", "max-epsilon": 3}
    )
    assert (o.client_id, o.data_path, o.require_dp, o.max_epsilon) == (4, Path("/d"), False, 3)


def test_deployment_refuses_what_it_does_not_implement() -> None:
    with pytest.raises(DeployConfigError, match=r"secure_aggregation\.protocol: 'plain'"):
        check_deployable(deploy_cfg(secure_aggregation={"protocol": "plain"}))
    with pytest.raises(DeployConfigError, match=r"federation\.dropout_prob"):
        check_deployable(deploy_cfg(federation={"dropout_prob": 0.1}))
    # usplit is deployed on masking (two sessions a round); on CKKS it is refused
    check_deployable(deploy_cfg(feddiffuse={"enabled": True, "variant": "usplit"}))
    with pytest.raises(DeployConfigError, match=r"feddiffuse.variant: 'usplit' .* masking only"):
        check_deployable(deploy_cfg(feddiffuse={"enabled": True, "variant": "usplit"},
                                    secure_aggregation={"protocol": "ckks",
                                                  "server_threat": "honest_but_curious"}))
    check_deployable(deploy_cfg())
    check_deployable(deploy_cfg(feddiffuse={"enabled": True, "variant": "udec"}))
    # audit canaries are deployed at both DP levels (record level: with each site's opt-in)
    check_deployable(deploy_cfg(canaries={"enabled": True}))
    check_deployable(deploy_cfg(canaries={"enabled": True},
                                dp={"level": "client", "max_update_norm": 0.5}))


def test_site_refuses_an_experiment_without_dp(tmp_path: Path) -> None:
    from securefed.config import dump_config
    from securefed.deploy.wire import PROTOCOL_VERSION

    init_identity_keys(tmp_path / "keys", 3)
    site = Site(NodeOptions(tmp_path / "s", tmp_path / "keys", 0, partition_id=0))
    no_dp = deploy_cfg(dp={"level": "none", "target_epsilon": None})
    run = {"version": PROTOCOL_VERSION, "run_id": "ab" * 16}
    with pytest.raises(DeployConfigError, match=r"dp\.level: 'none'.*require-dp"):
        site.setup({**run, "experiment": dump_config(no_dp)})
    strict = Site(NodeOptions(tmp_path / "s", tmp_path / "keys", 0, partition_id=0,
                              max_epsilon=4.0))
    with pytest.raises(DeployConfigError, match=r"exceeds this site's max-epsilon 4\.0"):
        strict.setup({**run, "experiment": dump_config(deploy_cfg())})
    with pytest.raises(WireError, match="coordinator speaks 'v0'"):
        site.setup({"version": "v0", "experiment": ""})
    assert not (tmp_path / "s" / "privacy_ledger.json").exists()


# ------------------------------------------------------------------------------ wire / state


def test_vectors_are_length_checked_before_use() -> None:
    t = torch.tensor([1.0, -2.5, 3.25])
    assert torch.equal(decode_vector(encode_vector(t), 3, "x", "f"), t)
    with pytest.raises(WireError, match="x: f: 8 bytes, expected 12"):
        decode_vector(encode_vector(t)[:8], 3, "x", "f")
    with pytest.raises(WireError, match="NaN or infinite"):
        decode_vector(encode_vector(torch.tensor([float("nan")])), 1, "x", "f")
    with pytest.raises(WireError, match="expected bytes"):
        decode_vector("abc", 1, "x", "f")  # type: ignore[arg-type]


def test_masking_round_survives_a_process_per_stage(tmp_path: Path) -> None:
    """Each stage rebuilds the client from its saved state (as a fresh ClientApp process
    does); a client that drops after sharing keys is recovered; the sum is the survivors'."""
    cfg = deploy_cfg()
    params = masking_params(cfg)
    init_identity_keys(tmp_path / "keys", 3)
    ids = load_identities(tmp_path / "keys", 3)
    rng = np.random.default_rng(0)
    inputs = {c: rng.uniform(-0.3, 0.3, 17) for c in range(3)}
    server = MaskingServer(5, [0, 1, 2], 17, params, ids.roster, ids.server_key)
    down = server.start()
    live = {0, 1, 2}
    for stage in Stage.ORDER:
        if stage == Stage.MASKED_INPUT:
            live.discard(2)  # site 2 crashes after sharing its keys
        for cid in sorted(live & set(down)):
            d = tmp_path / f"site{cid}"
            if stage == Stage.ADVERTISE_KEYS:
                client = MaskingClient(cid, 5, params, ids.client_keys[cid], ids.roster,
                                       inputs[cid])
            else:
                state, vec = load_round_state(d, cid, 5, params)
                client = MaskingClient(cid, 5, params, ids.client_keys[cid], ids.roster, vec)
                client.state = state
            reply = client.handle(down[cid])
            masked = Stage.index(stage) >= Stage.index(Stage.MASKED_INPUT)
            save_round_state(d, client.state, None if masked else inputs[cid])
            assert stat.S_IMODE((d / "secagg" / "round.json").stat().st_mode) == 0o600
            server.receive(cid, reply)
        down = server.close_stage()
    assert server.output is not None
    assert server.output.survivors == (0, 1)
    assert server.output.recovered == (2,)
    np.testing.assert_allclose(server.output.total, inputs[0] + inputs[1], atol=1e-8)
    # the stored state is bound to its client and round
    with pytest.raises(StateError, match="for client 0 round 5"):
        load_round_state(tmp_path / "site0", 0, 6, params)
    (tmp_path / "site1" / "secagg" / "round.json").write_text("{not json")
    with pytest.raises(StateError, match="corrupt"):
        load_round_state(tmp_path / "site1", 1, 5, params)


# ------------------------------------------------------------ expected results, recomputed


def _expected_round_one(
    cfg: ExperimentConfig, survivors: list[int], weight_scale: float, work: Path
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Round 1 recomputed in this process from the survivors' own data: the FedAvg of their
    updates (exact sums, no masking). Returns (initial, expected next global, total weight)."""
    from securefed.builders import build_model, build_privacy
    from securefed.diffusion.params import get_flat
    from securefed.federation.simulation import SimClient
    from securefed.strategies import build_strategy

    strategy = build_strategy(cfg.strategy, cfg.federation.num_clients, weight_scale=weight_scale)
    sums: dict[str, torch.Tensor] = {}
    total_weight = 0.0
    init = None
    for cid in survivors:
        site = Site(NodeOptions(work / f"re{cid}", work, cid, partition_id=cid))
        data = site.load_data(cfg)
        model = build_model(cfg, data.image_shape, data.num_classes)
        if init is None:
            init = get_flat(model)
        privacy = build_privacy(cfg, work / f"re{cid}", [SimClient(cid, data)], resume=False)
        out = local_round(
            cfg, strategy.client,
            build_trainer(
                cfg, model, NoiseSchedule.from_config(cfg.diffusion), torch.device("cpu")
            ),
            cid, data,
            strategy.broadcast(init), {}, 1, privacy,
        )
        assert out is not None
        update = out[0]
        for k, v in update.vectors.items():
            sums[k] = sums.get(k, torch.zeros(v.numel(), dtype=torch.float64)) + v.double()
        total_weight += update.weight
    assert init is not None
    nxt = strategy.aggregate(1, init, one_cohort(sums, total_weight, len(survivors)))
    nxt = nxt.to(torch.float32)
    return init, nxt, total_weight


class _InProcess:
    """The coordinator's transport, in-process: every message goes through the same
    ``dispatch`` the ClientApp uses. ``drop`` = {client: stage}: from that stage on, the site
    does not answer (a crash)."""

    def __init__(self, sites: dict[int, Site], drop: Mapping[int, str]) -> None:
        self.sites, self.drop = sites, dict(drop)

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                 timeout: float, group: str) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        stage = message_type.partition(".")[2]
        for node, content in contents.items():
            site = self.sites[node]
            at = self.drop.get(site.cid)
            if at is not None and stage in Stage.ORDER and (
                Stage.index(stage) >= Stage.index(at)
            ):
                continue
            out[node] = dispatch(site, message_type, content)
        return out


def test_coordinator_recovers_a_dropped_site_in_process(tmp_path: Path) -> None:
    """The deployment round (without Flower): site 2 vanishes after sharing its keys; the
    round completes with exactly the survivors' FedAvg, and every site's ledger is charged."""
    cfg = deploy_cfg(federation={"rounds": 1})
    init_identity_keys(tmp_path / "keys", 3)
    sites = {
        700 + i: Site(NodeOptions(tmp_path / f"site{i}", tmp_path / "keys", i, partition_id=i,
                                  **REHEARSAL))
        for i in range(3)
    }
    events: list[dict[str, Any]] = []
    res = Coordinator(
        cfg,
        CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=3),
        _InProcess(sites, {2: Stage.MASKED_INPUT}),
        on_event=events.append,
    ).run()
    line = res.metrics[0]
    assert line["participants"] == [0, 1]
    assert line["dropped_at"] == {"2": "masked_input"}
    assert line["protocol_info"]["recovered_clients"] == [2]
    assert [e["stage"] for e in events if e.get("state") == "sent"] == list(Stage.ORDER)
    n = json.loads((tmp_path / "run" / "sites.json").read_text())["sites"]
    scale = float(sum(s["num_examples"] for s in n.values()))
    init, expected, _ = _expected_round_one(cfg, [0, 1], scale, tmp_path / "re")
    got = ckpt_params(tmp_path / "run", 1)
    assert float((got - expected).abs().max()) <= round_tolerance(line, init, expected)
    assert float((got - init).abs().max()) > 100 * round_tolerance(line, init, expected)
    for i in range(3):  # charged before the update left the site, dropped or not
        ledger = json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())
        assert [(e["round"], e["steps"]) for e in ledger["entries"]] == [(1, 2)]
    assert not (tmp_path / "site0" / "secagg" / "round.json").exists()  # round state cleared


def _run_in_process(
    tmp_path: Path, cfg: ExperimentConfig, n: int = 3, **policy: Any
) -> tuple[Any, dict[int, Site]]:
    """The deployed run of ``cfg`` over the in-process transport: ``n`` sites (rehearsal policy
    plus ``policy``), keys in ``tmp_path/keys``, run dir ``tmp_path/run``. Returns (result,
    sites)."""
    init_identity_keys(tmp_path / "keys", n)
    sites = {
        700 + i: Site(NodeOptions(tmp_path / f"site{i}", tmp_path / "keys", i, partition_id=i,
                                  **{**REHEARSAL, **policy}))
        for i in range(n)
    }
    res = Coordinator(
        cfg,
        CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=n),
        _InProcess(sites, {}),
    ).run()
    return res, sites


@pytest.mark.parametrize(
    ("strategy", "server_threat"),
    [("fedavg", "honest_but_curious"), ("fedprox", "malicious"), ("scaffold", "malicious"),
     ("udec", "malicious"), ("ulatdec", "malicious")],
)
def test_in_process_deployment_matches_the_simulation_per_strategy(
    tmp_path: Path, strategy: str, server_threat: str
) -> None:
    """The deployment's round (coordinator and site handlers, without Flower; the keys of
    round 2 advertised with round 1's unmasking) equals the simulation for FedProx and SCAFFOLD
    (whose control variates stay on the sites and are committed only when the coordinator used
    the update), and for FedAvg without the consistency check: same model within the masking
    grid of both rounds, same ledgers. (FedAvg with every stage: the Flower test below.)
    FedDiffuse ``udec`` / ``ulatdec``: only the shared groups are summed; the local groups stay
    in each site's private state, equal to the simulated client's."""
    from securefed.run import run_experiment

    diffuse = strategy in ("udec", "ulatdec")
    cfg = deploy_cfg(strategy={"name": "fedavg" if diffuse else strategy, "mu": 0.1},
                     secure_aggregation={"server_threat": server_threat},
               feddiffuse={"enabled": diffuse, "variant": strategy if diffuse else "full"})
    res, _ = _run_in_process(tmp_path, cfg, allow_honest_but_curious_server=True)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    assert_matches_simulation(
        cfg, tmp_path / "run", tmp_path / "sim", sim.final_params,
        [tmp_path / f"site{i}" / "privacy_ledger.json" for i in range(3)],
    )
    if strategy == "scaffold":  # the control variate was committed on every site
        for i in range(3):
            assert (tmp_path / f"site{i}" / "client_state.pt").exists()
    if diffuse:  # the local groups stayed on each site (equal to the simulated client's) and
        # only the shared groups (plus the weight) were summed. A site commits a round's
        # private state when the next round tells it its update was used, so after the last
        # round the committed file holds round 1's and the pending one round 2's.
        for rnd, name in ((1, "client_state.pt"), (2, "client_state.pending.pt")):
            sim_clients = torch.load(tmp_path / "sim" / "checkpoints" / f"round_{rnd:04d}.pt",
                                     weights_only=True)["clients"]
            for i in range(3):
                local = torch.load(tmp_path / f"site{i}" / name,
                                   weights_only=True)["feddiffuse.local"]
                want = sim_clients[str(i)]["feddiffuse.local"]
                assert local.shape == want.shape and 0 < local.numel()
                assert float((local - want).abs().max()) < 1e-4, (rnd, i)
        d = int(ckpt_params(tmp_path / "run", 2).numel())
        for row in metrics_rows(tmp_path / "run"):
            assert row["exchange"]["params_up"] == 3 * (d - local.numel() + 1)


def _usplit_cfg(n: int) -> ExperimentConfig:
    """FedDiffuse usplit on ``n`` sites (threshold 0.6: t > n/2 in every session size)."""
    return deploy_cfg(federation={"num_clients": n}, secure_aggregation={"threshold": 0.6},
                      feddiffuse={"enabled": True, "variant": "usplit"})


@pytest.mark.parametrize("n", [4, 5])
def test_in_process_usplit_deployment_matches_the_simulation(tmp_path: Path, n: int) -> None:
    """FedDiffuse ``usplit`` deployed (record-level DP, node config min-cohort 2): the round's
    two sessions (``front``: encoder + bottleneck, ``back``: decoder) run in the same stage
    messages; the model equals the simulation's within each session's masking grid, every
    site is charged once per round (its ledger equals the simulation's), the pairing is the
    simulation's, and each session summed exactly its cohort. With 5 sites the odd one sends
    both segments (it is in both sessions)."""
    from securefed.run import run_experiment

    cfg = _usplit_cfg(n)
    messages: list[tuple[str, dict[int, Mapping[str, Any]]]] = []
    init_identity_keys(tmp_path / "keys", n)
    sites = {
        700 + i: Site(NodeOptions(tmp_path / f"site{i}", tmp_path / "keys", i, partition_id=i,
                                  **REHEARSAL))
        for i in range(n)
    }

    class _Recording(_InProcess):
        def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                     timeout: float, group: str) -> dict[int, Reply]:
            messages.append((message_type, dict(contents)))
            return super().exchange(message_type, contents, timeout=timeout, group=group)

    res = Coordinator(
        cfg,
        CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=n),
        _Recording(sites, {}),
    ).run()
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    assert [m["participants"] for m in res.metrics] == [list(range(n))] * 2
    for dep, want in zip(res.metrics, sim.metrics, strict=True):
        segs = dep["server"]["feddiffuse"]["segments"]
        assert segs == want["server"]["feddiffuse"]["segments"]  # the simulation's pairing
        both = [c for c, s in segs.items() if s == ["front", "back"]]
        assert len(both) == n % 2
        info = dep["protocol_info"]
        assert set(info) == {"front", "back"} and "cohorts_abandoned" not in dep
        for name in ("front", "back"):
            members = sorted(int(c) for c, s in segs.items() if name in s)
            assert info[name]["survivors"] == info[name]["participants"] == members
            assert len(members) == (n + 1) // 2
    assert_matches_simulation(
        cfg, tmp_path / "run", tmp_path / "sim", sim.final_params,
        [tmp_path / f"site{i}" / "privacy_ledger.json" for i in range(n)],
    )
    # the messages of a one-session round: one per site and stage, each carrying the site's
    # session payload(s) keyed by cohort (the odd site's: both); round 2's keys rode on round
    # 1's unmasking (next_secagg.<cohort>), so round 2 has no advertise_keys message and the
    # sites trained at its key broadcast
    stages = [t for t, _ in messages if t.startswith("train.")]
    assert stages == [f"train.{st}" for st in Stage.ORDER] + [
        f"train.{st}" for st in Stage.ORDER[1:]]
    segments = {m["round"]: m["server"]["feddiffuse"]["segments"] for m in res.metrics}
    for t, contents in messages:
        if not t.startswith("train."):
            continue
        for node, c in contents.items():
            cid = sites[node].cid
            segs = segments[c["round"]][str(cid)]
            assert sorted(k for k in c if k.startswith("secagg")) == sorted(
                f"secagg.{s}" for s in segs), (t, cid)
            if "next_round" in c:
                assert sorted(k for k in c if k.startswith("next_secagg")) == sorted(
                    f"next_secagg.{s}" for s in segments[2][str(cid)]), (t, cid)
            trains = "broadcast_keys" in c
            assert trains == (t == f"train.{Stage.ADVERTISE_KEYS}" if c["round"] == 1
                              else t == f"train.{Stage.SHARE_KEYS}"), (t, cid)
    assert sum("next_round" in c for t, cs in messages for c in cs.values()) == n
    d = int(ckpt_params(tmp_path / "run", 2).numel())
    for row in metrics_rows(tmp_path / "run"):  # each session: its segment plus the weight
        assert row["exchange"]["params_up"] == ((n + 1) // 2) * (d + 2)
    for i in range(n):  # every session's round state is gone after unmasking
        assert not list((tmp_path / f"site{i}" / "secagg").glob("round*.json"))


def test_in_process_usplit_session_abandoned_while_the_other_completes(tmp_path: Path) -> None:
    """Five usplit sites; the two sites that send only ``back`` crash after sharing their keys:
    the ``back`` session falls below its threshold and is abandoned (listed in
    ``cohorts_abandoned``, as the simulation lists it), the ``front`` session completes with
    its three sites, and only the front segment of the model moves."""
    import numpy as np

    from securefed.builders import build_model
    from securefed.diffusion.params import get_flat, param_slices
    from securefed.seeds import Purpose, derive_seed
    from securefed.strategies.feddiffuse import group_indices, pair_clients

    cfg = config_with(DEPLOY_RAW, federation={"num_clients": 5, "rounds": 1},
                      secure_aggregation={"threshold": 0.6},
                      feddiffuse={"enabled": True, "variant": "usplit"})
    segs = pair_clients(range(5), np.random.default_rng(derive_seed(cfg.seed, Purpose.USPLIT, 1)))
    back_only = sorted(c for c, s in segs.items() if s == ("back",))
    front = sorted(c for c, s in segs.items() if "front" in s)
    init_identity_keys(tmp_path / "keys", 5)
    sites = {
        700 + i: Site(NodeOptions(tmp_path / f"site{i}", tmp_path / "keys", i, partition_id=i,
                                  **REHEARSAL))
        for i in range(5)
    }
    res = Coordinator(
        cfg, CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys",
                                min_sites=5),
        _InProcess(sites, dict.fromkeys(back_only, Stage.MASKED_INPUT)),
    ).run()
    line = res.metrics[0]
    assert line.get("abandoned") is None
    assert line["participants"] == front
    assert set(line["protocol_info"]) == {"front"}
    (why,) = line["cohorts_abandoned"]
    assert why.startswith("back: ")
    assert line["dropped_at"] == dict.fromkeys((str(c) for c in back_only), "masked_input")
    model = build_model(cfg, (1, 8, 8), 10)
    groups = group_indices(param_slices(model), model.parameter_groups())
    init, new = get_flat(model), ckpt_params(tmp_path / "run", 1)
    moved = (new - init).abs()
    assert float(moved[groups["decoder"]].max()) == 0.0  # back: nobody's delta was released
    assert float(moved[torch.cat([groups["encoder"], groups["bottleneck"]])].max()) > 0
    for i in range(5):  # charged once each, whichever session was lost
        ledger = json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1]


def _usplit_round_start(tmp_path: Path) -> tuple[dict[int, Site], Coordinator, dict[int, Any]]:
    """Four usplit sites set up by a coordinator whose round 1 stops at its first stage: the
    sites' training messages of round 1, as the coordinator built them (not delivered)."""
    cfg = _usplit_cfg(4)
    init_identity_keys(tmp_path / "keys", 4)
    sites = {
        700 + i: Site(NodeOptions(tmp_path / f"site{i}", tmp_path / "keys", i, partition_id=i,
                                  **REHEARSAL))
        for i in range(4)
    }
    sent: dict[int, Any] = {}

    class _Stop(RuntimeError):
        pass

    class _Capture(_InProcess):
        def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                     timeout: float, group: str) -> dict[int, Reply]:
            if message_type.startswith("train."):
                sent.update(contents)
                raise _Stop
            return super().exchange(message_type, contents, timeout=timeout, group=group)

    coord = Coordinator(
        cfg, CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys",
                                min_sites=4),
        _Capture(sites, {}),
    )
    with pytest.raises(_Stop):
        coord.run()
    return sites, coord, sent


def test_a_usplit_site_refuses_a_forged_assignment_and_a_replayed_session(
    tmp_path: Path,
) -> None:
    """A usplit site recomputes its segments from the round's signed client list and the
    experiment's seed: told to send ``back`` when the pairing says ``front`` (the session
    payload moved to the other key), it refuses naming ``secagg``; a ``front`` RoundStart
    replayed as the ``back`` session's payload does not verify (the cohort is bound into the
    session); a client list other than the signed one fails verification too; a round of 4
    sites (sessions of 2) is refused by a site with min-cohort 3, naming ``min-cohort``.
    Nothing was charged."""
    sites, _coord, sent = _usplit_round_start(tmp_path)
    node, content = next((n, c) for n, c in sorted(sent.items()) if "secagg.front" in c)
    site = sites[node]
    other = next(c for c in sent.values() if "secagg.back" in c)
    mtype = f"train.{Stage.ADVERTISE_KEYS}"
    ledger = tmp_path / f"site{site.cid}" / "privacy_ledger.json"
    before = ledger.read_text()
    forged = {k: v for k, v in content.items() if k != "secagg.front"}
    forged["secagg.back"] = content["secagg.front"]
    with pytest.raises(PolicyError, match=r"secagg: round 1 asks this site to send segment\(s\) "
                                          r"\['back'\].*assigns it \['front'\]"):
        dispatch(site, mtype, forged)
    # replay across sessions: a RoundStart for the back site, signed by the coordinator's
    # key for this run and round with the back cohort, but in the FRONT session, put in the
    # back site's secagg.back: it does not verify (the cohort is bound into every signature)
    back_node = next(n for n, c in sent.items() if c is other)
    back = sites[back_node]
    clients = list(other["round_clients"])
    start = decode_message(other["secagg.back"], back.cid,
                           cohort_session(other["run_id"], "back", clients))
    assert isinstance(start, RoundStart)
    ids = load_identities(tmp_path / "keys", 4)
    front = dataclasses.replace(masking_params(_usplit_cfg(4)),
                                session=cohort_session(other["run_id"], "front", clients))
    replayed = MaskingServer(1, list(start.participants), start.vector_length, front,
                             ids.roster, ids.server_key).start()[back.cid]
    with pytest.raises(ProtocolError, match="does not verify in session 'back'"):
        dispatch(back, mtype, {**other, "secagg.back": replayed})
    # the genuine back RoundStart verifies in its session (what the replay is checked against)
    assert dispatch(back, mtype, other)["status"] == "trained"
    # another round client list than the one the coordinator signed: no session verifies
    fewer = [c for c in clients if c != next(c for c in clients if c not in (site.cid,))]
    with pytest.raises((ProtocolError, PolicyError)):
        dispatch(site, mtype, {**content, "round_clients": fewer})
    strict = Site(dataclasses.replace(site.options, min_cohort=3))
    with pytest.raises(PolicyError, match=r"secagg.front \(session 'front'\).*min-cohort 3"):
        dispatch(strict, mtype, content)
    assert ledger.read_text() == before  # refused before anything was spent


def test_usplit_min_cohort_arithmetic_at_setup(tmp_path: Path) -> None:
    """A usplit round is two sessions of about half the round: with 3 sites and the default
    min-cohort 3 a site refuses the experiment at setup, naming min-cohort."""
    from securefed.config import dump_config

    init_identity_keys(tmp_path / "keys", 3)
    site = Site(NodeOptions(tmp_path / "s", tmp_path / "keys", 0, partition_id=0,
                            allow_seeded_noise=True, min_threshold=Fraction(1, 2)))
    content = {"version": PROTOCOL_VERSION, "run_id": "cd" * 16,
               "experiment": dump_config(_usplit_cfg(3))}
    with pytest.raises(PolicyError, match=r"feddiffuse.variant: 'usplit' splits a round of 3 "
                                          r"sites .* of 2 sites each, below this site's "
                                          r"min-cohort 3"):
        site.setup(content)
    init_identity_keys(tmp_path / "keys5", 5)
    five = Site(NodeOptions(tmp_path / "s5", tmp_path / "keys5", 0, partition_id=0,
                            allow_seeded_noise=True, min_threshold=Fraction(1, 2)))
    out = five.setup({**content, "experiment": dump_config(_usplit_cfg(5))})
    assert out["client_id"] == 0  # 5 sites: sessions of 3, min-cohort 3 is met


@pytest.mark.parametrize(
    ("variant", "upload"),
    [("fedddpm", "samples"), ("fedddpm_plus", "samples"), ("fedddpm", "model")],
)
def test_in_process_fedddpm_deployment_matches_the_simulation(
    tmp_path: Path, variant: str, upload: str
) -> None:
    """FedDDPM / FedDDPM+ deployed: phase 0 as a message (each site pre-trains under DP-SGD,
    charged to its own ledger, and uploads its share of the DP synthetic images), the uploads
    kept under ``received/`` (0600) and as the auxiliary set, then the server's calibration
    after each aggregation. Same auxiliary set, same models within the grid, same ledgers as
    the simulation."""
    import stat

    import numpy as np

    from securefed.federation.auxiliary import load_auxiliary
    from securefed.run import run_experiment

    cfg = deploy_cfg(fedddpm={"enabled": True, "variant": variant, "upload": upload,
                        "pretrain_epochs": 1.0,
                        "aux_total": 24, "calibration_steps": 2, "server_batch_size": 8,
                        "aux_sampling_steps": 4, "detector_window": 1,
                        "detector_threshold": 0.5, "correction_steps": 2})
    res, sites = _run_in_process(tmp_path, cfg, allow_individual_uploads=True)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    dep_aux, meta = load_auxiliary(tmp_path / "run")
    sim_aux, _ = load_auxiliary(tmp_path / "sim")
    assert meta["deployment"] is True and len(dep_aux) == len(sim_aux) == 24
    assert torch.equal(dep_aux.client, sim_aux.client)
    assert float((dep_aux.images - sim_aux.images).abs().max()) < 1e-4
    for i in range(3):
        if upload == "model":  # the DP model as received (the audit's `received` target)
            path = tmp_path / "run" / "received" / f"client_{i}.pt"
            got = torch.load(path, weights_only=True)["params"]
            want = torch.load(tmp_path / "sim" / "received" / f"client_{i}.pt",
                              weights_only=True)["params"]
            assert float((got - want).abs().max()) < 1e-5
        else:
            path = tmp_path / "run" / "received" / f"client_{i}_samples.npz"
            with np.load(path) as z:
                assert z["images"].shape[0] == int((sim_aux.client == i).sum())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # no statistic of the site's data outside DP: no pre-training loss in what it sent
        assert "pretrain_loss" not in json.dumps(meta["clients"][str(i)])
    assert_matches_simulation(
        cfg, tmp_path / "run", tmp_path / "sim", sim.final_params,
        [tmp_path / f"site{i}" / "privacy_ledger.json" for i in range(3)],
        entries=3,  # phase 0 + two rounds
    )
    if variant == "fedddpm":  # the server calibrated after each aggregation, as simulated
        assert [r["server"]["server_steps"] for r in res.metrics] == [
            r["server"]["server_steps"] for r in sim.metrics] == [2, 2]
        # a replayed phase 0 (a second DP release of the run's pre-training) is refused
        from securefed.deploy.wire import MESSAGE_PHASE0

        run_id = json.loads((tmp_path / "run" / "sites.json").read_text())["run_id"]
        again = {"round": 0, "run_id": run_id, "aux_images": 8, "image_shape": [1, 8, 8],
                 "num_classes": 10, "broadcast.params": encode_vector(sim.final_params)}
        before = (tmp_path / "site0" / "privacy_ledger.json").read_text()
        with pytest.raises(PolicyError, match="phase 0: already run in run"):
            dispatch(sites[700], MESSAGE_PHASE0, again)
        assert (tmp_path / "site0" / "privacy_ledger.json").read_text() == before


def test_in_process_deployment_with_public_pretraining_matches_the_simulation(
    tmp_path: Path, cache_env: Path
) -> None:
    """``pretrain.enabled`` deployed: the coordinator trains (or loads) the public model and
    starts round 1 from it, as the simulation does; each site checked the public set against
    its own data at setup. Before, the coordinator started from a random model."""
    from securefed.run import run_experiment

    cfg = deploy_cfg(pretrain={"enabled": True, "steps": 5, "batch_size": 32,
                         "data": {"name": "mnist5k", "mnist5k_layout": "uci_digits",
                                  "max_examples": 200}})
    _run_in_process(tmp_path, cfg)
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    doc = json.loads((tmp_path / "run" / "public_pretrain.json").read_text())
    assert doc["steps"] == 5 and "each site checked" in doc["relation"]
    # round 1 of both starts from the same public model (not the random init)
    assert_matches_simulation(
        cfg, tmp_path / "run", tmp_path / "sim", sim.final_params,
        [tmp_path / f"site{i}" / "privacy_ledger.json" for i in range(3)],
        init=torch.load(doc["cache_file"], weights_only=True)["params"],
    )


def test_a_site_refuses_a_public_set_that_holds_its_own_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 'public' set that contains one of the site's own images (bit for bit): the site finds
    it at setup and refuses (the coordinator cannot check: it has no private data)."""
    from securefed.config import dump_config
    from securefed.data import ImageDataset
    from securefed.federation import public_pretrain as pp

    init_identity_keys(tmp_path / "keys", 1)
    site = Site(NodeOptions(tmp_path / "site0", tmp_path / "keys", 0, partition_id=0,
                            **REHEARSAL))
    cfg = deploy_cfg(pretrain={"enabled": True})
    own = site.load_data(cfg)

    def leaky(pt: Any, shape: tuple[int, int, int]) -> ImageDataset:
        x = torch.rand(20, *shape) * 2 - 1
        x[7] = own.images[3]
        return ImageDataset(x, torch.zeros(20, dtype=torch.long), 10, "leaky",
                            tuple(str(c) for c in range(10)))

    monkeypatch.setattr(pp, "load_public", leaky)
    with pytest.raises(pp.PublicDataError, match=r"1 of 20 public images"):
        site.setup({"version": PROTOCOL_VERSION, "run_id": "cd" * 16,
                    "experiment": dump_config(cfg)})
    assert not (tmp_path / "site0" / "privacy_ledger.json").exists()


def test_a_site_refuses_fedddpm_uploads_unless_it_opted_in(tmp_path: Path) -> None:
    """FedDDPM's phase-0 upload leaves the site on its own (outside secure aggregation): the
    default policy refuses it at setup, naming the field and the node-config key."""
    init_identity_keys(tmp_path / "keys", 1)
    site = Site(NodeOptions(tmp_path / "site0", tmp_path / "keys", 0, partition_id=0,
                            **REHEARSAL))
    from securefed.config import dump_config

    cfg = deploy_cfg(fedddpm={"enabled": True})
    with pytest.raises(PolicyError, match=r"fedddpm.enabled: .*allow-individual-uploads=true"):
        site.setup({"version": PROTOCOL_VERSION, "run_id": "ab" * 16,
                    "experiment": dump_config(cfg)})


def test_in_process_adaptive_clipping_deployment(tmp_path: Path) -> None:
    """Client-level DP with adaptive clipping deployed: the coordinator moves the clip norm by
    the noised unclipped count; each site takes the round's norm from the broadcast (recorded
    when the round starts), checks the clip-bit scale against its own plan, noises at that
    norm and charges the same multiplier as the simulation (the charge does not depend on the
    norm). Keys ahead are off (the next norm follows this round's sum)."""
    from securefed.run import run_experiment

    cfg = deploy_cfg(federation={"rounds": 3},
                     dp={"level": "client", "target_epsilon": 8.0, "max_update_norm": 0.5,
                   "adaptive_clipping": True, "secure_noise": True})
    res, sites = _run_in_process(tmp_path, cfg)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 3
    run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    sim_ledger = json.loads((tmp_path / "sim" / "privacy_ledger.json").read_text())
    keep = ("phase", "round", "steps", "sample_rate")
    for i in range(3):
        led = json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())
        mine = [e for e in sim_ledger["entries"] if e["client_id"] == i]
        assert [{k: e[k] for k in keep} for e in led["entries"]] == [
            {k: e[k] for k in keep} for e in mine
        ]
        # the multiplier is the same whatever the norm (up to float rounding of S / S)
        assert [e["noise_multiplier"] for e in led["entries"]] == pytest.approx(
            [e["noise_multiplier"] for e in mine], rel=1e-9)
    # the clip norm moved, and every site planned each round at the norm the coordinator used
    clips = [float(torch.load(tmp_path / "run" / "checkpoints" / f"round_{r:04d}.pt",
                              weights_only=True)["strategy"]["client_dp.clip"][0])
             for r in (1, 2)]
    assert clips[0] != 0.5
    for site in sites.values():
        runs = json.loads((site.options.state_dir / "site_runs.json").read_text())["runs"]
        (rec,) = runs.values()
        assert rec["round_clips"] == {"2": pytest.approx(clips[0], rel=1e-6),
                                      "3": pytest.approx(clips[1], rel=1e-6)}


class _ReplayedShares:
    """Stands in for a fresh-key ``SecureGaussian()`` (the client-level DP shares of the CKKS
    paths only): the i-th share drawn is keyed by ``i``, so a deployment and a simulation that
    draw in the same order (round by round, sites in id order) add the same noise, and their
    sums (hence their adaptive clip norms) can be compared. Reset ``draws`` between runs."""

    draws = 0

    def normal(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        import hashlib

        from securefed.privacy import SecureGaussian

        key = hashlib.sha256(f"share {_ReplayedShares.draws}".encode()).digest()
        _ReplayedShares.draws += 1
        return SecureGaussian(key=key).normal(*args, **kwargs)


@pytest.mark.parametrize(
    "feature",
    ["fedavg", "feddiffuse_udec", "fedddpm", "client_dp", "client_dp_adaptive", "canaries"],
)
def test_in_process_ckks_deployment_matches_the_simulation(
    tmp_path: Path, feature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CKKS deployed (honest-but-curious coordinator, every site opted in): two messages a
    round. The coordinator holds only the public context (its key folder), each site the shared
    secret one (its own key folder, 0600); the lowest surviving site decrypts the aggregate.
    Same models within the CKKS bound, same ledgers as the simulation; the key holder refuses
    a second decryption of a round (a decryption oracle). Also with FedDiffuse ``udec`` (only
    the shared groups encrypted and summed; the local groups stay on the sites) and with
    FedDDPM (phase 0 as a message before the CKKS rounds; its uploads opted in). With
    client-level DP each site plans the round's noise itself and adds its Gaussian share before
    encrypting: the ledgers equal the simulation's, the models differ by the noise only, and
    the coordinator's canary clients (on the decrypted sum) are sampled as the simulation's.
    With gradient canaries (``canaries``) the sites' signed scores ride on the CKKS upload and
    the canary files equal the simulation's.
    With adaptive clipping the coordinator moves the clip norm by the decrypted unclipped
    count; each site takes the round's norm from the broadcast, packs its clip bit at the beta
    it computes itself, and the key holder derives the next norm from the sum it decrypted
    (and refuses any other): with the same noise shares on both paths, the per-round clip
    norms equal the simulation's (float32 on the wire, plus the CKKS error of the bit's sum),
    the models agree within the CKKS bound and the ledgers are the simulation's."""
    import shutil

    from securefed.deploy.wire import MESSAGE_CKKS_DECRYPT
    from securefed.run import run_experiment
    from securefed.secagg.ckks import PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE, init_ckks_keys

    extra: dict[str, Any] = {}
    if feature == "feddiffuse_udec":
        extra["feddiffuse"] = {"enabled": True, "variant": "udec"}
    if feature == "fedddpm":
        extra["fedddpm"] = {"enabled": True, "variant": "fedddpm", "pretrain_epochs": 1.0,
                            "aux_total": 24, "calibration_steps": 2, "server_batch_size": 8,
                            "aux_sampling_steps": 4}
    if feature in ("client_dp", "client_dp_adaptive"):
        extra["dp"] = {"level": "client", "target_epsilon": 8.0, "max_update_norm": 0.5,
                       "adaptive_clipping": feature == "client_dp_adaptive",
                       "secure_noise": True}
    if feature == "client_dp_adaptive":  # the same shares on both paths (see _ReplayedShares)
        monkeypatch.setattr("securefed.deploy.node.SecureGaussian", _ReplayedShares)
        monkeypatch.setattr("securefed.secagg.ckks.protocol.SecureGaussian", _ReplayedShares)
    if feature in ("client_dp", "canaries"):
        extra["canaries"] = {"enabled": True, "m": 64}
        _fixed_canary_key(monkeypatch, bytes(range(2, 34)))
    cfg = deploy_cfg(secure_aggregation={"protocol": "ckks", "threshold": 0.67,
                                   "server_threat": "honest_but_curious"}, **extra)
    init_identity_keys(tmp_path / "keys", 3)
    secret, public = init_ckks_keys(tmp_path / "ckks")
    shutil.copy(public, tmp_path / "keys" / PUBLIC_CONTEXT_FILE)
    site_keys = tmp_path / "site_keys"
    shutil.copytree(tmp_path / "keys", site_keys)
    (site_keys / "server.key").unlink()
    (site_keys / PUBLIC_CONTEXT_FILE).unlink()
    shutil.copy(secret, site_keys / SECRET_CONTEXT_FILE)
    (site_keys / SECRET_CONTEXT_FILE).chmod(0o600)
    sites = {
        700 + i: Site(NodeOptions(tmp_path / f"site{i}", site_keys, i, partition_id=i,
                                  allow_ckks=True, allow_honest_but_curious_server=True,
                                  allow_individual_uploads=feature == "fedddpm",
                                  allow_audit_canaries=feature == "canaries",
                                  **REHEARSAL))
        for i in range(3)
    }
    sent: list[str] = []
    uploads: list[Mapping[str, Any]] = []
    all_uploads: list[Mapping[int, Mapping[str, Any]]] = []

    class Recording(_InProcess):
        def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                     timeout: float, group: str) -> dict[int, Reply]:
            sent.append(message_type)
            if message_type == "train.ckks_upload":
                uploads.append(dict(contents[700]))
                all_uploads.append({n: dict(c) for n, c in contents.items()})
            return super().exchange(message_type, contents, timeout=timeout, group=group)

    res = Coordinator(
        cfg,
        CoordinatorOptions(run_dir=tmp_path / "run", keys_dir=tmp_path / "keys", min_sites=3),
        Recording(sites, {}),
    ).run()
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    assert [m["protocol"] for m in res.metrics] == ["ckks", "ckks"]
    assert [m["protocol_info"]["key_holder"] for m in res.metrics] == [0, 0]
    assert sent.count("train.ckks_upload") == sent.count(MESSAGE_CKKS_DECRYPT) == 2
    _ReplayedShares.draws = 0  # the simulation draws the deployment's shares again
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    if feature == "client_dp_adaptive":
        _assert_ckks_adaptive_matches(cfg, tmp_path, res, sim, sites, all_uploads)
        return
    if feature == "client_dp":
        _assert_client_level_matches(cfg, tmp_path, res, sim, ckks=True)
        # a coordinator naming a cohort larger than the federation (so that each site's share
        # would be scaled for sites that do not exist) is refused before anything is trained
        forged = {**uploads[-1], "round": 3, "participants": [0, 1, 2, 3]}
        with pytest.raises(PolicyError, match="cohort of 4 sites exceeds the federation's 3"):
            dispatch(sites[700], "train.ckks_upload", forged)
        for rnd in (1, 2):  # canary clients on the decrypted sum, sampled as simulated
            name = f"client_rounds/round_{rnd:05d}.npz"
            with (np.load(tmp_path / "run" / "canaries" / name) as got,
                  np.load(tmp_path / "sim" / "canaries" / name) as ref):
                assert np.array_equal(got["sampled"], ref["sampled"]) and got["sampled"].any()
                assert np.all(np.isfinite(got["scores"])) and got["scores"].any()
        return
    if feature == "canaries":
        _assert_gradient_canaries_match(tmp_path, 64)
    assert_matches_simulation(
        cfg, tmp_path / "run", tmp_path / "sim", sim.final_params,
        [tmp_path / f"site{i}" / "privacy_ledger.json" for i in range(3)],
        entries=3 if feature == "fedddpm" else 2,  # + the phase-0 pre-training charge
    )
    if feature == "feddiffuse_udec":  # the local groups stayed on the sites, as simulated
        sim_clients = torch.load(tmp_path / "sim" / "checkpoints" / "round_0001.pt",
                                 weights_only=True)["clients"]
        for i in range(3):
            local = torch.load(tmp_path / f"site{i}" / "client_state.pt",
                               weights_only=True)["feddiffuse.local"]
            want = sim_clients[str(i)]["feddiffuse.local"]
            assert local.shape == want.shape and 0 < local.numel()
            assert float((local - want).abs().max()) < 1e-4, i
    run_id = json.loads((tmp_path / "run" / "sites.json").read_text())["run_id"]
    with pytest.raises(PolicyError, match="already decrypted round 2"):
        dispatch(sites[700], MESSAGE_CKKS_DECRYPT,
                 {"round": 2, "run_id": run_id, "aggregate": b"", "length": 8,
                  "contributors": [0, 1, 2]})


def _assert_ckks_adaptive_matches(
    cfg: ExperimentConfig, tmp_path: Path, res: Any, sim: Any, sites: Mapping[int, Site],
    uploads: list[Mapping[int, Mapping[str, Any]]],
) -> None:
    """CKKS + client-level DP + adaptive clipping, deployed (``run/``, sites ``site<i>/``)
    with the simulation's noise shares (``sim/``): per-round clip norms, ledgers and models
    agree; the key holder refuses a next round whose clip norm is not the one it derived, and
    every site an inflated clip-bit scale."""
    from securefed.builders import build_model, client_level_dp
    from securefed.deploy.wire import decode_vector, encode_vector
    from securefed.diffusion.params import get_flat
    from securefed.strategies import build_strategy

    def clips(where: str) -> list[float]:  # S of rounds 2 and 3 (moved by rounds 1 and 2)
        return [float(torch.load(tmp_path / where / "checkpoints" / f"round_{r:04d}.pt",
                                 weights_only=True)["strategy"]["client_dp.clip"][0])
                for r in (1, 2)]

    rows = metrics_rows(tmp_path / "run")
    dep, simc = clips("run"), clips("sim")
    assert dep[0] != 0.5 and dep[1] != dep[0]  # the clip norm moved
    # the deployed sum's bit entry differs from the simulation's by the CKKS error only: S
    # moves by exp(-lr * bit / beta / n), so its relative gap is at most lr * bound / beta / n
    d = int(sim.final_params.numel())
    layer = client_level_dp(cfg, build_strategy(cfg.strategy, 3, weight_scale=1.0))
    rel = []
    for s, row in zip([0.5, *dep[:-1]], rows, strict=True):
        layer.clip = s
        beta = layer.round_noise(3, d + 2).bit_scale
        rel.append(cfg.dp.clip_learning_rate * row["protocol_info"]["error_bound"] / beta / 3)
    for r in (0, 1):  # rel[1] also covers round 1's gap carried into round 2's S
        assert dep[r] == pytest.approx(simc[r], rel=sum(rel[: r + 1]) + 1e-6), (r, dep, simc)
    # every site planned round 2 at the coordinator's S (float32 on the wire); the key holder
    # (site 0, both rounds) derived rounds 2 and 3's S from the sums it decrypted
    for site in sites.values():
        rec = next(iter(json.loads(
            (site.options.state_dir / "site_runs.json").read_text())["runs"].values()))
        assert rec["round_clips"] == {"1": 0.5, "2": pytest.approx(dep[0], rel=1e-6)}
        if site.cid == 0:
            assert rec["derived_clips"] == {"2": pytest.approx(dep[0], rel=1e-6),
                                            "3": pytest.approx(dep[1], rel=1e-6)}
        else:
            assert rec["derived_clips"] == {}
    # ledgers: the simulation's plan and charges (the multiplier does not depend on S)
    sim_ledger = json.loads((tmp_path / "sim" / "privacy_ledger.json").read_text())
    keep = ("phase", "round", "steps", "sample_rate")
    for i in range(3):
        led = json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())
        mine = [e for e in sim_ledger["entries"] if e["client_id"] == i]
        assert len(mine) == 2 and [{k: e[k] for k in keep} for e in led["entries"]] == [
            {k: e[k] for k in keep} for e in mine
        ]
        assert [e["noise_multiplier"] for e in led["entries"]] == pytest.approx(
            [e["noise_multiplier"] for e in mine], rel=1e-9)
        assert res.metrics[-1]["epsilon"][str(i)] == pytest.approx(
            sim.metrics[-1]["epsilon"][str(i)], rel=1e-9)
    # models: the same noise, so only the CKKS error (and float32 S) separates them
    init = get_flat(build_model(cfg, (1, 8, 8), 10))
    sim1, dep1 = ckpt_params(tmp_path / "sim", 1), ckpt_params(tmp_path / "run", 1)
    tol1 = 2 * round_tolerance(rows[0], init, sim1)
    assert float((dep1 - sim1).abs().max()) <= tol1
    assert float((dep1 - init).abs().max()) > 100 * tol1
    tol2 = tol1 + 2 * round_tolerance(rows[1], sim1, sim.final_params)
    assert float((ckpt_params(tmp_path / "run", 2) - sim.final_params).abs().max()) <= 10 * tol2

    # a round 3 whose broadcast clip norm is not the one the key holder derived: refused,
    # before anything is trained or charged
    def forged(node: int, scale_s: float, scale_beta: float) -> dict[str, Any]:
        content = {**uploads[-1][node], "round": 3}
        s, beta = (float(v) for v in decode_vector(content["broadcast.clip"], 2, "t", "c"))
        if scale_s != 1.0:  # beta scales with S: the forged pair is self-consistent
            s, beta = dep[1] * scale_s, beta * dep[1] * scale_s / s
        content["broadcast.clip"] = encode_vector(torch.tensor([s, beta * scale_beta]))
        return content

    before = [(tmp_path / f"site{i}" / "privacy_ledger.json").read_text() for i in range(3)]
    with pytest.raises(PolicyError, match=r"round 3: broadcast\.clip: clip norm .* derived"):
        dispatch(sites[700], "train.ckks_upload", forged(700, 2.0, 1.0))
    # another site takes S from the coordinator, but recomputes beta: an inflated one is refused
    with pytest.raises(PolicyError, match=r"round 3: broadcast clip .* differs from this site"):
        dispatch(sites[701], "train.ckks_upload", forged(701, 1.0, 10.0))
    after = [(tmp_path / f"site{i}" / "privacy_ledger.json").read_text() for i in range(3)]
    assert after == before
    # round 2's own S stays acceptable to the key holder (round 2 abandoned after decryption):
    # past the clip checks, the site stops at its budget (planned for 2 rounds)
    reply = dispatch(sites[700], "train.ckks_upload", forged(700, 1.0, 1.0))
    assert reply["status"] == "budget_exhausted"
    rec = next(iter(json.loads((tmp_path / "site0" / "site_runs.json").read_text())["runs"]
                    .values()))
    assert rec["round_clips"]["3"] == pytest.approx(dep[0], rel=1e-6)


def test_a_site_refuses_ckks_unless_it_opted_in(tmp_path: Path) -> None:
    """CKKS shares one secret key among all sites: a site refuses it by default, naming the
    field and the node-config key; the deployment refuses it under a malicious-server model."""
    from securefed.config import dump_config

    init_identity_keys(tmp_path / "keys", 1)
    site = Site(NodeOptions(tmp_path / "site0", tmp_path / "keys", 0, partition_id=0,
                            allow_honest_but_curious_server=True,
                            **REHEARSAL))
    cfg = deploy_cfg(secure_aggregation={"protocol": "ckks", "server_threat": "honest_but_curious"})
    with pytest.raises(PolicyError, match=r"protocol: 'ckks' .*allow-ckks=true"):
        site.setup({"version": PROTOCOL_VERSION, "run_id": "ef" * 16,
                    "experiment": dump_config(cfg)})
    with pytest.raises(DeployConfigError, match=r"'ckks' defends against an honest-but-curious"):
        check_deployable(deploy_cfg(secure_aggregation={"protocol": "ckks"}))


def _fixed_canary_key(monkeypatch: pytest.MonkeyPatch, key: bytes) -> None:
    """Draw every canary set of this test from ``key`` (the run's secret is os.urandom
    otherwise), so a deployed run and its simulated twin hold the same canaries."""
    from securefed.privacy.canaries import GradientCanaries

    draw = GradientCanaries.draw.__func__  # type: ignore[attr-defined]

    def fixed(cls: Any, model: Any, m: int, num_clients: int, **_: Any) -> Any:
        return draw(cls, model, m, num_clients, key=key)

    monkeypatch.setattr(GradientCanaries, "draw", classmethod(fixed))


def _assert_gradient_canaries_match(tmp_path: Path, m: int) -> None:
    """The deployed run's gradient canary files (``run/canaries``) against the simulation's
    (``sim/canaries``) drawn from the same key: equal canaries, files 0600, both rounds
    committed with finite scores, round 1's equal (same model, seeded noise, same per-step
    sampling), round 2's within the effect of the secure sum's error on the broadcast model;
    and what ``securefed audit`` reads for its canary section loads them."""
    from securefed.privacy.canaries import GradientCanaries, load_gradient_scores

    dep_dir, sim_dir = tmp_path / "run" / "canaries", tmp_path / "sim" / "canaries"
    dep, want = GradientCanaries.load(dep_dir), GradientCanaries.load(sim_dir)
    assert dep is not None and want is not None and len(dep) == m
    for f in ("param_index", "offset", "signs", "included", "clients"):
        assert np.array_equal(getattr(dep, f), getattr(want, f)), f
    assert set(np.unique(dep.clients)) == {0, 1, 2}
    for path in [dep_dir / "canary.key", dep_dir / "gradient.npz",
                 *sorted((dep_dir / "gradient_rounds").glob("*.npy"))]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert sorted(p.name for p in (dep_dir / "gradient_rounds").iterdir()) == [
        "round_00001.npy", "round_00002.npy"]
    for rnd in (1, 2):
        got = np.load(dep_dir / "gradient_rounds" / f"round_{rnd:05d}.npy")
        ref = np.load(sim_dir / "gradient_rounds" / f"round_{rnd:05d}.npy")
        assert got.shape == (m,) and np.all(np.isfinite(got)) and np.any(got != 0)
        tol = 0.0 if rnd == 1 else 1e-5 * float(np.abs(ref).max())
        assert float(np.abs(got - ref).max()) <= tol, (rnd, got, ref)
    # what `securefed audit` reads for its canary section (audit.targets)
    loaded = load_gradient_scores(dep_dir, 2)
    assert loaded is not None
    _, scores, rounds = loaded
    assert rounds == [1, 2] and scores.shape == (m,)
    sim_scores = load_gradient_scores(sim_dir, 2)
    assert sim_scores is not None and np.allclose(scores, sim_scores[1], rtol=0, atol=1e-4)


def test_in_process_record_canaries_match_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradient canaries deployed (``canaries.enabled``, record-level DP, sites opted in with
    allow-audit-canaries): the coordinator draws and keeps them as the simulation does
    (``canaries/``, 0600), sends each site its own with the round's sampling key (signed), and
    commits every round's ``[m]`` scores from the sites' signed replies. With the same canary
    key and the rehearsal's seeded noise, the files equal the simulation's: the canaries
    exactly, round 1's scores exactly (same model, same noise, same per-step sampling), round 2's
    within the masking grid's effect on the broadcast model; and the audit reads them."""
    from securefed.run import run_experiment

    _fixed_canary_key(monkeypatch, bytes(range(32)))
    cfg = deploy_cfg(canaries={"enabled": True, "m": 64}, client={"local_steps": 4})
    res, _ = _run_in_process(tmp_path, cfg, allow_audit_canaries=True)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    assert sim.final_params is not None
    _assert_gradient_canaries_match(tmp_path, 64)
    # `securefed audit RUN_DIR` opens both run directories alike: the same canary source, the
    # same scores and coins, the same one-run bound (what its epsilon section computes)
    from securefed.audit.epsilon import one_run_audit
    from securefed.audit.targets import load_audit_run

    dep_run, sim_run = load_audit_run(tmp_path / "run"), load_audit_run(tmp_path / "sim")
    assert list(dep_run.canary_scores) == list(sim_run.canary_scores) != []
    for name, (scores, inc) in dep_run.canary_scores.items():
        ref, ref_inc = sim_run.canary_scores[name]
        assert np.array_equal(inc, ref_inc) and np.allclose(scores, ref, rtol=0, atol=1e-4)
        assert one_run_audit(scores, inc, 1e-6).eps_lb == one_run_audit(ref, ref_inc,
                                                                          1e-6).eps_lb
    # the coordinator never sent a site another site's canaries or the key
    assert not any((tmp_path / f"site{i}" / "canaries").exists() for i in range(3))


def test_in_process_client_level_dp_deployment_matches_the_simulation(tmp_path: Path) -> None:
    """``dp.level: client`` deployed: each site plans its own noise (multiplier from the pinned
    experiment, the round's cohort from the signed start), adds its discrete Gaussian share in
    the masking client and charges its own ledger. The ledgers equal the simulation's exactly;
    the models differ only by the two runs' independent noise (and the grid)."""
    from securefed.run import run_experiment

    cfg = deploy_cfg(dp={"level": "client", "target_epsilon": 8.0, "max_update_norm": 0.5,
                   "adaptive_clipping": False, "secure_noise": True})
    res, _ = _run_in_process(tmp_path, cfg)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    _assert_client_level_matches(cfg, tmp_path, res, sim, ckks=False)


def test_in_process_canary_clients_match_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Canary clients deployed (``canaries.enabled``, ``dp.level: client``): entirely on the
    coordinator, which adds the sampled included canaries' ``S u_i`` to the round's noised sum
    of clipped deltas and scores them on it (the same :class:`ClientCanaryRound` as the
    simulation). With the same canary key the canaries, each round's sampling, clip norm and
    charged multiplier equal the simulation's; the scores differ by the two runs' independent
    noise; every round is committed and the audit's reader loads them."""
    from securefed.privacy.canaries import CanaryClients, load_client_scores
    from securefed.run import run_experiment

    _fixed_canary_key(monkeypatch, bytes(range(1, 33)))
    cfg = deploy_cfg(canaries={"enabled": True, "m": 64},
                     dp={"level": "client", "target_epsilon": 8.0, "max_update_norm": 0.5,
                   "adaptive_clipping": False, "secure_noise": True})
    res, _ = _run_in_process(tmp_path, cfg)
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 2
    run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    dep_dir, sim_dir = tmp_path / "run" / "canaries", tmp_path / "sim" / "canaries"
    dep, want = CanaryClients.load(dep_dir), CanaryClients.load(sim_dir)
    assert dep is not None and want is not None and len(dep) == 64
    for f in ("param_index", "offset", "flat", "signs", "included"):
        assert np.array_equal(getattr(dep, f), getattr(want, f)), f
    for rnd in (1, 2):
        path = dep_dir / "client_rounds" / f"round_{rnd:05d}.npz"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with np.load(path) as got, np.load(sim_dir / "client_rounds" / path.name) as ref:
            assert np.array_equal(got["sampled"], ref["sampled"]) and got["sampled"].any()
            assert float(got["clip"]) == float(ref["clip"]) == 0.5
            assert float(got["charged_multiplier"]) == float(ref["charged_multiplier"]) > 0
            s = got["scores"]
            assert np.all(np.isfinite(s)) and not s[~got["sampled"]].any()
            assert np.all(s[got["sampled"]] != 0) and not np.array_equal(s, ref["scores"])
    rec = load_client_scores(dep_dir, 2)
    assert rec is not None and rec.rounds == [1, 2] and rec.statistic.shape == (64,)
    # the scores are read off the sum the model moved by (FedAvg, server lr 1: the new model is
    # the old plus the noised delta sum over 3 contributors), so S u_i reached the model too
    from securefed.builders import build_model
    from securefed.diffusion.params import get_flat

    prev = get_flat(build_model(cfg, (1, 8, 8), 10)).double()
    for rnd in (1, 2):
        cur = ckpt_params(tmp_path / "run", rnd).double()
        with np.load(dep_dir / "client_rounds" / f"round_{rnd:05d}.npz") as z:
            on = z["sampled"]
            moved = dep.signs * (3 * (cur - prev)).numpy()[dep.flat] / 0.5
            assert np.allclose(z["scores"][on], moved[on], rtol=0, atol=1e-4), rnd
        prev = cur


def _assert_client_level_matches(
    cfg: ExperimentConfig, tmp_path: Path, res: Any, sim: Any, *, ckks: bool
) -> None:
    """A deployed client-level run (``run/``, sites ``site<i>/``) against the simulation
    (``sim/``): equal ledgers; models that differ by the two runs' independent noise only."""
    sim_ledger = json.loads((tmp_path / "sim" / "privacy_ledger.json").read_text())
    for i in range(3):
        led = json.loads((tmp_path / f"site{i}" / "privacy_ledger.json").read_text())
        assert led["clients"][str(i)] == sim_ledger["clients"][str(i)]
        mine = [e for e in sim_ledger["entries"] if e["client_id"] == i]
        keep = ("phase", "round", "steps", "noise_multiplier", "sample_rate")
        assert [{k: e[k] for k in keep} for e in led["entries"]] == [
            {k: e[k] for k in keep} for e in mine
        ]
        assert len(mine) == 2 and mine[0]["sample_rate"] == 1.0
        assert res.metrics[-1]["epsilon"][str(i)] == pytest.approx(
            sim.metrics[-1]["epsilon"][str(i)], rel=1e-9
        )
    # the noise: each round's sum carries N(0, std^2) per coordinate, divided by 3 contributors;
    # two independent runs differ by at most ~6.5 std/3 over 10k coordinates (8 std/3 allowed)
    d = int(sim.final_params.numel())
    if ckks:  # real-valued Gaussian shares, no masking grid
        from securefed.builders import client_level_dp
        from securefed.strategies import build_strategy

        base = build_strategy(cfg.strategy, 3, weight_scale=1.0)
        std = client_level_dp(cfg, base).round_noise(3, d + 1).noise().std
    else:
        from securefed.deploy.common import round_masking_params

        std = round_masking_params(cfg, "ab" * 16, 3, d + 1).noise_std
    for rnd in (1, 2):
        gap = float((ckpt_params(tmp_path / "run", rnd) - ckpt_params(tmp_path / "sim", rnd))
                    .abs().max())
        assert 0 < gap <= rnd * 8 * std / 3 + 1e-3, (rnd, gap, std)
    # the deployed sites' shares add up to the planned noise: round 1's update is the mean of
    # three clipped deltas (norm <= 0.5 over 10k coordinates: ~0.005 each) plus N(0, (std/3)^2)
    from securefed.builders import build_model
    from securefed.diffusion.params import get_flat

    init = get_flat(build_model(cfg, (1, 8, 8), 10))
    for where in ("run", "sim"):
        spread = float((ckpt_params(tmp_path / where, 1) - init).std())
        assert spread == pytest.approx(std / 3, rel=0.05), (where, spread, std / 3)


# ------------------------------------------------------------------ Flower integration tests


def _federation(tmp_path: Path, **policy: Any) -> Any:
    """3 loopback sites; ``policy``: extra --node-config entries of every site."""
    pytest.importorskip("flwr")
    from securefed.deploy.loopback import LoopbackFederation

    node_config = {i: {"partition-id": i, "allow-seeded-noise": True, **policy}
                   for i in range(3)}
    return LoopbackFederation(tmp_path / "fed", 3, node_config=node_config)


def _check_site_processes(fed: Any, rounds: int) -> None:
    """Each site ran the patched SuperNode in process isolation, and its one worker served
    every message of the run with the auth secret on: setup, the five stages of round 1, and
    four stages of every later round (its keys came with the last round's unmasking)."""
    import httpx

    from securefed.deploy.worker import SiteWorker

    for i in range(fed.num_sites):
        log = (fed.work / "logs" / f"site_{i}.log").read_text()
        assert "idle poll 0.1 s growing to 3 s" in log and "(flwr 1.41 poll patch)" in log
        served = (fed.work / "logs" / f"site_{i}_worker.log").read_text()
        assert served.count("(query.setup) completed") == 1, served[-3000:]
        for stage in Stage.ORDER:
            expected = 1 if stage == Stage.ADVERTISE_KEYS else rounds
            assert served.count(f"(train.{stage}) completed") == expected, (i, stage)
    # the Runtime API's auth secret is on: a wrong secret (or none) gets no task
    with pytest.raises(httpx.HTTPStatusError) as err:
        SiteWorker(fed.runtime_address(0), b"not the secret, 32 bytes long..").acquire()
    assert err.value.response.status_code == 401


def _wait_status(run_dir: Path, pred: Any, timeout: float, fed: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run = fed.procs["flwr-run"].popen
    while time.monotonic() < deadline:
        if run.poll() is not None:
            raise AssertionError(f"the deployed run ended early\n{fed.logs()}")
        p = run_dir / "status.json"
        if p.exists():
            try:
                doc = json.loads(p.read_text())
            except ValueError:
                doc = {}
            if pred(doc):
                return dict(doc)
        time.sleep(0.1)
    raise AssertionError(f"status never reached the expected state\n{fed.logs()}")


@pytest.mark.deploy
@pytest.mark.timeout(1200)
def test_deployed_run_matches_the_simulation(tmp_path: Path) -> None:
    """2 rounds of FedAvg + record-level DP + masking over flower-superlink and 3
    flower-supernodes (TLS, registered node keys): the global model equals the simulation's
    within the masking grid, and each site's ledger equals the simulation's for that client."""
    from securefed.run import run_experiment

    # the sites' default floors (min-threshold 2/3, min-cohort 3): t = 3 of 3
    cfg = deploy_cfg(secure_aggregation={"threshold": 0.67})
    exp = write_cfg(tmp_path / "experiment.yaml", cfg)
    fed = _federation(tmp_path)
    run_dir = tmp_path / "deployed"
    try:
        t0 = time.monotonic()
        fed.start()
        started = time.monotonic() - t0
        fed.start_intruder()  # an unregistered SuperNode key, claiming site 0's data
        fed.flwr_run(exp, run_dir, {"stage-timeout": 120.0, "train-timeout": 240.0},
                     wait=False)
        # meanwhile, the simulation of the same config and seed, in this process
        t1 = time.monotonic()
        sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
        sim_seconds = time.monotonic() - t1
        fed.wait_finished(run_dir, timeout=900)
        deployed_seconds = time.monotonic() - t0
        _check_site_processes(fed, rounds=2)
    except BaseException:
        print(fed.logs())
        raise
    finally:
        fed.stop()
    rows, sim_rows = metrics_rows(run_dir), sim.metrics
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["participants"] == [0, 1, 2] and r["dropped"] == [], r
    # the SuperNodes that took part are exactly the registered (authenticated) ones
    # node authentication: exactly the registered SuperNodes took part, the intruder never
    # reached the coordinator (admitted, it would have claimed client 0 or been refused)
    doc = json.loads((run_dir / "sites.json").read_text())
    assert {int(c): s["node_id"] for c, s in doc["sites"].items()} == fed.node_ids
    assert doc["refused"] == {}
    assert "Failed to activate SuperNode" in (fed.work / "logs" / "intruder.log").read_text()
    # TLS: the SuperLink served https only
    assert "Uvicorn running on https://127.0.0.1" in (fed.work / "logs" / "superlink.log"
                                                         ).read_text()
    assert_matches_simulation(
        cfg, run_dir, tmp_path / "sim", sim.final_params,
        [fed.site_dir(i) / "state" / "privacy_ledger.json" for i in range(3)],
    )
    for i in range(3):
        assert rows[-1]["epsilon"][str(i)] == pytest.approx(sim_rows[-1]["epsilon"][str(i)],
                                                            abs=1e-6)
    timing = {
        "federation_start_s": round(started, 1),
        "deployed_total_s": round(deployed_seconds, 1),
        "deployed_round_s": [r["seconds"]["round_total"] for r in rows],
        "simulated_total_s": round(sim_seconds, 1),
        "simulated_round_s": [r["seconds"]["round_total"] for r in sim_rows],
        "bytes_up_per_site": rows[0]["bytes_up_clients"],
    }
    print("deploy timing:", json.dumps(timing))


@pytest.mark.deploy
@pytest.mark.timeout(900)
def test_killed_supernode_round_completes_with_the_survivors_sum(tmp_path: Path) -> None:
    """SIGKILL one SuperNode right after the coordinator asked for masked inputs: the round
    completes with the two survivors (its masks removed through its s-key shares) and the new
    global model is the survivors' FedAvg."""
    cfg = deploy_cfg(federation={"rounds": 1})
    exp = write_cfg(tmp_path / "experiment.yaml", cfg)
    fed = _federation(tmp_path, **{"min-threshold": "1/2", "min-cohort": 2})
    run_dir = tmp_path / "deployed"
    try:
        fed.start()
        # a warm site answers a stage in about a second (30 s: room for a loaded machine);
        # the killed one costs the round at most this timeout at masked_input
        fed.flwr_run(exp, run_dir, {"stage-timeout": 30.0, "train-timeout": 240.0},
                     wait=False)
        _wait_status(
            run_dir,
            lambda d: d.get("round") == 1 and d.get("stage") == Stage.MASKED_INPUT
            and d.get("state") == "sent",
            timeout=600, fed=fed,
        )
        fed.kill_site(2)
        killed_at = time.monotonic()
        fed.wait_finished(run_dir, timeout=600)
    except BaseException:
        print(fed.logs())
        raise
    finally:
        fed.stop()
    assert time.monotonic() - killed_at < 600
    (line,) = metrics_rows(run_dir)
    assert line["participants"] == [0, 1]
    assert line["dropped_at"] == {"2": "masked_input"}
    assert line["protocol_info"]["recovered_clients"] == [2]
    # detected by the stage timeout or, sooner, by Flower's heartbeat (an error reply)
    reason = line["dropout_reasons"]["2"]
    assert "no reply within" in reason or "Node Unavailable" in reason, reason
    sites = json.loads((run_dir / "sites.json").read_text())["sites"]
    scale = float(sum(s["num_examples"] for s in sites.values()))
    init, expected, total_weight = _expected_round_one(cfg, [0, 1], scale, tmp_path / "re")
    assert line["protocol_info"]["total_weight"] == pytest.approx(total_weight, abs=1e-6)
    got = ckpt_params(run_dir, 1)
    tol = round_tolerance(line, init, expected)
    assert float((got - expected).abs().max()) <= tol
    assert float((got - init).abs().max()) > 100 * tol
    # the killed site had charged its ledger before its keys (and nothing else) left it
    led = json.loads((fed.site_dir(2) / "state" / "privacy_ledger.json").read_text())
    assert [(e["round"], e["steps"]) for e in led["entries"]] == [(1, 2)]
    assert os.path.exists(fed.site_dir(2) / "state" / "secagg" / "round.json")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["federation"]["rounds"] == 1


# ------------------------------------------------------------- resume of a deployed run


class _Crash(RuntimeError):
    """The coordinator's process dies (raised from the channel)."""


class _CrashAfterTraining(_InProcess):
    """:class:`_InProcess` whose coordinator dies right after the sites trained round ``at``
    (the exchange that carried the round's model): the sites charged and recorded the round,
    the coordinator neither aggregated nor checkpointed it."""

    def __init__(self, sites: dict[int, Site], at: int) -> None:
        super().__init__(sites, {})
        self.at = at

    def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                 timeout: float, group: str) -> dict[int, Reply]:
        out = super().exchange(message_type, contents, timeout=timeout, group=group)
        if group == str(self.at) and any("broadcast_keys" in c for c in contents.values()):
            raise _Crash(f"coordinator killed after the sites trained round {self.at}")
        return out


class _Answering(_InProcess):
    """:class:`_InProcess` whose sites answer a refusal with its text, as the ClientApp does."""

    def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                 timeout: float, group: str) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        for node, content in contents.items():
            try:
                out[node] = dispatch(self.sites[node], message_type, content)
            except Exception as exc:
                out[node] = f"site error: {type(exc).__name__}: {exc}"
        return out


def _resume_sites(root: Path) -> dict[int, Site]:
    """3 rehearsal sites under ``root`` (their state dirs and keys outlive the coordinator)."""
    if not (root / "keys" / "roster.json").exists():
        init_identity_keys(root / "keys", 3)
    return {
        700 + i: Site(NodeOptions(root / f"site{i}", root / "keys", i, partition_id=i,
                                  **REHEARSAL))
        for i in range(3)
    }


def _resume_options(root: Path, resume: bool = False) -> CoordinatorOptions:
    return CoordinatorOptions(run_dir=root / "run", keys_dir=root / "keys", min_sites=3,
                              resume=resume)


def _ledger_rounds(root: Path, i: int) -> list[int]:
    """The rounds site ``i``'s ledger charged, in order."""
    led = json.loads((root / f"site{i}" / "privacy_ledger.json").read_text())
    return [int(e["round"]) for e in led["entries"]]


def _site_runs(root: Path, i: int) -> dict[str, Any]:
    return dict(json.loads((root / f"site{i}" / "site_runs.json").read_text())["runs"])


def _scaffold_state(root: Path, i: int, name: str = "client_state.pt") -> dict[str, torch.Tensor]:
    return dict(torch.load(root / f"site{i}" / name, weights_only=True))


def _masking_tolerance_of_rounds(cfg: ExperimentConfig, run_dir: Path, rounds: int) -> float:
    """Twice the masking tolerance summed over a run's first ``rounds`` rounds: two deployed
    runs draw their masking grids independently, so their models may differ by each one's."""
    from securefed.builders import build_model
    from securefed.diffusion.params import get_flat

    rows = metrics_rows(run_dir)
    tol, prev = 0.0, get_flat(build_model(cfg, (1, 8, 8), 10))
    for r in range(1, rounds + 1):
        tol += 2 * round_tolerance(rows[r - 1], prev, ckpt_params(run_dir, r))
        prev = ckpt_params(run_dir, r)
    return tol

def test_in_process_resume_after_a_checkpoint_matches_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """The coordinator dies after round 1's checkpoint and resumes with the same run dir (the
    sites keep running): the run continues under its run id at round 2, no round is lost, and
    the final model equals an uninterrupted deployed run's of the same seed within the masking
    grid. SCAFFOLD: round 2 must tell each site that its round-1 update was used (checkpoint 1
    holds it), so its control variate is committed as in the uninterrupted run. Every ledger
    holds exactly one charge per trained round."""
    cfg = deploy_cfg(federation={"rounds": 3}, strategy={"name": "scaffold"})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = Coordinator(cfg, _resume_options(whole), _InProcess(_resume_sites(whole), {})).run()
    assert ref.rounds_completed == 3

    sites = _resume_sites(cut)
    first = Coordinator(cfg, _resume_options(cut), _InProcess(sites, {})).run(stop_after_round=1)
    assert first.rounds_completed == 1
    run_id = json.loads((cut / "run" / "sites.json").read_text())["run_id"]
    events: list[dict[str, Any]] = []
    res = Coordinator(cfg, _resume_options(cut, resume=True), _InProcess(sites, {}),
                      on_event=events.append).run()
    assert res.rounds_completed == 3
    assert [m["round"] for m in res.metrics] == [1, 2, 3]
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2]] * 3
    assert not any("abandoned" in m for m in res.metrics)
    assert [m["round"] for m in metrics_rows(cut / "run")] == [1, 2, 3]
    (resumed,) = [e for e in events if e["stage"] == "resumed"]
    assert (resumed["checkpoint"], resumed["first_round"], resumed["lost_rounds"]) == (1, 2, [])
    facts = json.loads((cut / "run" / "sites.json").read_text())
    assert facts["run_id"] == run_id and facts["resumes"][0]["first_round"] == 2
    for i in range(3):  # one run, continued; one charge per trained round, none twice
        assert list(_site_runs(cut, i)) == [run_id]
        assert _site_runs(cut, i)[run_id]["last_trained_round"] == 3
        assert _ledger_rounds(cut, i) == _ledger_rounds(whole, i) == [1, 2, 3]
    # the final model: the uninterrupted run's, within the masking grid of its three rounds
    # (the two runs' grids are drawn independently), with room for training's sensitivity
    tol = _masking_tolerance_of_rounds(cfg, whole / "run", 3)
    gap = float((res.final_params - ref.final_params).abs().max())
    assert gap <= 10 * tol, (gap, tol)
    moved = float((res.final_params - ckpt_params(cut / "run", 1)).abs().max())
    assert moved > 100 * tol
    # SCAFFOLD's control variates: committed on every site as in the uninterrupted run (round
    # 2's, committed by round 3; round 3's pending)
    for i in range(3):
        for name in ("client_state.pt", "client_state.pending.pt"):
            a, b = _scaffold_state(whole, i, name), _scaffold_state(cut, i, name)
            assert a.keys() == b.keys() and a
            for k in a:
                assert float((a[k] - b[k]).abs().max()) <= 1e-3 * float(a[k].abs().max()), (
                    i, name, k)


def test_in_process_resume_after_sites_trained_an_unrecorded_round(tmp_path: Path) -> None:
    """The coordinator dies after the sites trained round 2 but before it checkpointed it
    (checkpoint 1). The resumed run starts at round 3 (a site trains no round twice); round 2
    is recorded as lost (abandoned, the model round 1's), the sites refuse nothing, each ledger
    keeps its round-2 charge and never charges a round twice, and SCAFFOLD's pending state of
    round 2 is dropped, not committed (its update was never used). A second interruption after
    round 3 and a second resume finish the run."""
    cfg = deploy_cfg(federation={"rounds": 4}, strategy={"name": "scaffold"})
    root = tmp_path
    sites = _resume_sites(root)
    with pytest.raises(_Crash):
        Coordinator(cfg, _resume_options(root), _CrashAfterTraining(sites, 2)).run()
    run_id = json.loads((root / "run" / "sites.json").read_text())["run_id"]
    for i in range(3):
        assert _site_runs(root, i)[run_id]["last_trained_round"] == 2
        assert _ledger_rounds(root, i) == [1, 2]
    assert [m["round"] for m in metrics_rows(root / "run")] == [1]
    committed = {i: (root / f"site{i}" / "client_state.pt").read_bytes() for i in range(3)}
    pending = {i: (root / f"site{i}" / "client_state.pending.pt").read_bytes() for i in range(3)}

    events: list[dict[str, Any]] = []
    res = Coordinator(cfg, _resume_options(root, resume=True), _InProcess(sites, {}),
                      on_event=events.append).run(stop_after_round=3)
    assert res.rounds_completed == 3
    (resumed,) = [e for e in events if e["stage"] == "resumed"]
    assert (resumed["checkpoint"], resumed["first_round"], resumed["lost_rounds"]) == (1, 3, [2])
    assert events[-1]["stage"] == "interrupted"
    one, lost, three = res.metrics
    assert lost["round"] == 2 and lost["participants"] == []
    assert lost["abandoned"].startswith("lost: the coordinator stopped after checkpointing round 1")
    assert three["participants"] == [0, 1, 2] and "dropout_reasons" not in three
    assert one == metrics_rows(root / "run")[0]
    # the lost round left the model as round 1 made it
    assert torch.equal(ckpt_params(root / "run", 2), ckpt_params(root / "run", 1))
    for i in range(3):
        assert _ledger_rounds(root, i) == [1, 2, 3]  # round 2's charge stands, none twice
        # round 3 said "not used" for round 2: its pending state was dropped, the committed
        # state is still round 1's; round 3's state is pending now
        assert (root / f"site{i}" / "client_state.pt").read_bytes() == committed[i]
        now = (root / f"site{i}" / "client_state.pending.pt").read_bytes()
        assert now != pending[i]
    facts = json.loads((root / "run" / "sites.json").read_text())
    assert facts["resumes"][0]["lost_rounds"] == [2]
    assert {v["last_trained_round"] for v in facts["resumes"][0]["sites"].values()} == {2}

    # a second resume, from checkpoint 3 where every site trained round 3 and was used
    res = Coordinator(cfg, _resume_options(root, resume=True), _InProcess(sites, {})).run()
    assert res.rounds_completed == 4
    assert [m["round"] for m in res.metrics] == [1, 2, 3, 4]
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2], [], [0, 1, 2], [0, 1, 2]]
    for i in range(3):
        assert _ledger_rounds(root, i) == [1, 2, 3, 4]
        assert list(_site_runs(root, i)) == [run_id]
        # round 4 committed round 3's state (checkpoint 3 holds the site's round-3 update)
        assert (root / f"site{i}" / "client_state.pt").read_bytes() != committed[i]
    # the run is finished: a further resume is refused, naming why
    with pytest.raises(DeployConfigError, match=r"resume=true: .* finished: its latest "
                       r"checkpoint is round 4 of federation.rounds=4"):
        Coordinator(cfg, _resume_options(root, resume=True), _InProcess(sites, {})).run()


@pytest.mark.parametrize(
    ("section", "change", "field"),
    [("client", {"batch_size": 8}, "client.batch_size: 8 (accepted: 16)"),
     ("dp", {"max_grad_norm": 2.0}, "dp.max_grad_norm: 2.0 (accepted: 1.0)")],
)
def test_resume_refusals_name_the_field(
    tmp_path: Path, section: str, change: dict[str, Any], field: str
) -> None:
    """A site accepts a resume only for a run id it accepted, with the very experiment it
    accepted for it; the coordinator refuses an experiment other than the run's config.yaml
    and a run dir without resume=true. Each refusal names the field."""
    from securefed.config import dump_config

    cfg = deploy_cfg(federation={"rounds": 2})
    sites = _resume_sites(tmp_path)
    Coordinator(cfg, _resume_options(tmp_path), _InProcess(sites, {})).run(stop_after_round=1)
    run_id = json.loads((tmp_path / "run" / "sites.json").read_text())["run_id"]
    site = sites[700]
    changed = deploy_cfg(federation={"rounds": 2}, **{section: change})

    def setup(c: ExperimentConfig, rid: str) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, "run_id": rid, "experiment": dump_config(c),
                "resume": 1}

    # the site: a run id it never accepted; a changed experiment (both values named)
    with pytest.raises(PolicyError, match=r"run_id: 'cdcd.*' is not a run this site accepted"):
        site.setup(setup(cfg, "cd" * 16))
    with pytest.raises(PolicyError, match=re.escape(field) + f".*resume of run {run_id}"):
        site.setup(setup(changed, run_id))
    # without resume the run id is still never accepted twice
    with pytest.raises(PolicyError, match="was already accepted by this site"):
        site.setup({**setup(cfg, run_id), "resume": 0})
    assert _site_runs(tmp_path, 0)[run_id]["last_trained_round"] == 1
    # a resume the site accepts answers with its last trained round
    assert site.setup(setup(cfg, run_id))["last_trained_round"] == 1

    # the coordinator: a changed experiment, and a run dir reused without resume=true
    with pytest.raises(DeployConfigError, match=rf"differs from the run's config.yaml in "
                       rf"\['{re.escape(field.split(':')[0])}'\]"):
        Coordinator(changed, _resume_options(tmp_path, resume=True), _InProcess(sites, {})).run()
    with pytest.raises(FileExistsError, match="resume=true to continue"):
        Coordinator(cfg, _resume_options(tmp_path), _InProcess(sites, {})).run()
    # a run id no site accepted (sites.json edited): every site refuses, the error names it
    facts = json.loads((tmp_path / "run" / "sites.json").read_text())
    atomic = {**facts, "run_id": "ef" * 16}
    (tmp_path / "run" / "sites.json").write_text(json.dumps(atomic))
    with pytest.raises(DeployConfigError, match=r"0 site\(s\) accepted .*run_id: 'efef"):
        Coordinator(cfg, _resume_options(tmp_path, resume=True), _Answering(sites, {})).run()
    for i in range(3):  # nothing was trained or charged by the refused resumes
        assert _ledger_rounds(tmp_path, i) == [1]


def test_in_process_resume_after_an_aggregated_but_unsaved_round_keeps_canaries_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator dies while writing round 2's checkpoint: round 2 was trained,
    aggregated, scored (its gradient canary scores committed) and written to ``metrics.jsonl``,
    but checkpoint 1 is the latest. The resume drops round 2's metrics line and canary scores
    (the released model never held its sum), records it as lost, keeps the run's canaries
    (same files, same key) and commits round 3's scores afresh; the audit reads rounds 1 and 3."""
    import securefed.federation.engine as engine_mod
    from securefed.privacy.canaries import GradientCanaries, load_gradient_scores

    cfg = deploy_cfg(federation={"rounds": 3}, canaries={"enabled": True, "m": 16})
    sites = {
        node: Site(dataclasses.replace(s.options, allow_audit_canaries=True))
        for node, s in _resume_sites(tmp_path).items()
    }
    save = engine_mod.save_checkpoint

    def dies_at_round_2(ckpt_dir: Path, ckpt: Any, keep_last: int = 2) -> Path:
        if ckpt.round == 2:
            raise _Crash("coordinator killed while checkpointing round 2")
        return save(ckpt_dir, ckpt, keep_last)

    monkeypatch.setattr(engine_mod, "save_checkpoint", dies_at_round_2)
    with pytest.raises(_Crash):
        Coordinator(cfg, _resume_options(tmp_path), _InProcess(sites, {})).run()
    monkeypatch.setattr(engine_mod, "save_checkpoint", save)
    canary_dir = tmp_path / "run" / "canaries"
    assert [m["round"] for m in metrics_rows(tmp_path / "run")] == [1, 2]
    assert sorted(p.name for p in (canary_dir / "gradient_rounds").iterdir()) == [
        "round_00001.npy", "round_00002.npy"]
    before = GradientCanaries.load(canary_dir)
    round1 = np.load(canary_dir / "gradient_rounds" / "round_00001.npy")

    res = Coordinator(cfg, _resume_options(tmp_path, resume=True), _InProcess(sites, {})).run()
    assert res.rounds_completed == 3
    assert [(m["round"], m["participants"]) for m in res.metrics] == [
        (1, [0, 1, 2]), (2, []), (3, [0, 1, 2])]
    assert res.metrics[1]["abandoned"].startswith("lost:")
    after = GradientCanaries.load(canary_dir)
    assert before is not None and after is not None and before.key == after.key
    assert np.array_equal(before.param_index, after.param_index)
    assert sorted(p.name for p in (canary_dir / "gradient_rounds").iterdir()) == [
        "round_00001.npy", "round_00003.npy"]
    assert np.array_equal(np.load(canary_dir / "gradient_rounds" / "round_00001.npy"), round1)
    loaded = load_gradient_scores(canary_dir, 3)
    assert loaded is not None and loaded[2] == [1, 3]
    facts = json.loads((tmp_path / "run" / "sites.json").read_text())
    assert facts["resumes"][0]["canary_rounds_deleted"] == [2]
    for i in range(3):
        assert _ledger_rounds(tmp_path, i) == [1, 2, 3]


def test_run_config_resume_flag_and_default_experiment(tmp_path: Path) -> None:
    """``resume`` in the ServerApp's run config (default false; a bad value names the key);
    with ``resume=true`` and no ``experiment`` the run's own config.yaml is loaded."""
    from securefed.deploy.server_app import experiment_path, options_from_run_config

    rc = {"run-dir": str(tmp_path / "run"), "keys-dir": str(tmp_path / "keys")}
    assert options_from_run_config(rc, 3).resume is False
    assert options_from_run_config({**rc, "resume": True}, 3).resume is True
    assert options_from_run_config({**rc, "resume": "true"}, 3).resume is True
    with pytest.raises(ValueError, match="run config resume='maybe': expected true or false"):
        options_from_run_config({**rc, "resume": "maybe"}, 3)
    assert experiment_path({**rc, "resume": True}) == tmp_path / "run" / "config.yaml"
    assert experiment_path({**rc, "experiment": "/x/e.yaml", "resume": True}) == Path("/x/e.yaml")
    with pytest.raises(ValueError, match="run config experiment: required"):
        experiment_path(rc)


def test_in_process_resume_when_the_last_round_is_lost_finishes_the_run(tmp_path: Path) -> None:
    """The coordinator dies after the sites trained the LAST round: no round remains above
    their last trained round, so the resume records it as lost, checkpoints round 1's model as
    the final one and finishes (status ``finished``) without sending a training message."""
    cfg = deploy_cfg(federation={"rounds": 2})
    sites = _resume_sites(tmp_path)
    with pytest.raises(_Crash):
        Coordinator(cfg, _resume_options(tmp_path), _CrashAfterTraining(sites, 2)).run()
    net = _Answering(sites, {})
    sent: list[str] = []
    exchange = net.exchange

    def record(message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
               timeout: float, group: str) -> dict[int, Reply]:
        sent.append(message_type)
        return exchange(message_type, contents, timeout=timeout, group=group)

    net.exchange = record  # type: ignore[method-assign]
    events: list[dict[str, Any]] = []
    res = Coordinator(cfg, _resume_options(tmp_path, resume=True), net,
                      on_event=events.append).run()
    assert sent == ["query.setup"]
    assert res.rounds_completed == 2 and events[-1]["stage"] == "finished"
    assert [(m["round"], m["participants"]) for m in res.metrics] == [(1, [0, 1, 2]), (2, [])]
    assert torch.equal(res.final_params, ckpt_params(tmp_path / "run", 1))
    assert torch.equal(ckpt_params(tmp_path / "run", 2), ckpt_params(tmp_path / "run", 1))
    for i in range(3):
        assert _ledger_rounds(tmp_path, i) == [1, 2]


class _SkipsTraining(_InProcess):
    """:class:`_InProcess` in which site ``cid`` gets no training message in round ``rnd``
    (it is offline then): it sits that round out and trains again in the next."""

    def __init__(self, sites: dict[int, Site], cid: int, rnd: int) -> None:
        super().__init__(sites, {})
        self.cid, self.rnd = cid, rnd

    def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                 timeout: float, group: str) -> dict[int, Reply]:
        keep = {
            node: c for node, c in contents.items()
            if not (group == str(self.rnd) and self.sites[node].cid == self.cid
                    and "broadcast_keys" in c)
        }
        return super().exchange(message_type, keep, timeout=timeout, group=group)


def test_in_process_resume_commits_the_state_of_a_site_that_sat_out_the_checkpointed_round(
    tmp_path: Path,
) -> None:
    """Site 2 sits out round 2; the coordinator dies after round 2's checkpoint (c = 2, site
    2's last trained round t = 1 < c). Its round-1 update was used (round 1's participants), so
    the first round it trains after the resume must commit its pending SCAFFOLD state, as the
    uninterrupted run does: the final model and every site's control variates equal the
    uninterrupted run's (dropping it instead changes both)."""

    cfg = deploy_cfg(federation={"rounds": 3}, strategy={"name": "scaffold"})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = Coordinator(cfg, _resume_options(whole),
                      _SkipsTraining(_resume_sites(whole), 2, 2)).run()
    sites = _resume_sites(cut)
    Coordinator(cfg, _resume_options(cut), _SkipsTraining(sites, 2, 2)).run(stop_after_round=2)
    assert [m["participants"] for m in metrics_rows(cut / "run")] == [[0, 1, 2], [0, 1]]
    assert _site_runs(cut, 2)[json.loads((cut / "run" / "sites.json").read_text())["run_id"]][
        "last_trained_round"] == 1
    res = Coordinator(cfg, _resume_options(cut, resume=True), _InProcess(sites, {})).run()
    assert [m["participants"] for m in res.metrics] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert [m["participants"] for m in ref.metrics] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    tol = _masking_tolerance_of_rounds(cfg, whole / "run", 3)
    gap = float((res.final_params - ref.final_params).abs().max())
    assert gap <= 10 * tol, (gap, tol)
    for i in range(3):
        assert _ledger_rounds(cut, i) == _ledger_rounds(whole, i) == ([1, 3] if i == 2 else
                                                                      [1, 2, 3])
        for name in ("client_state.pt", "client_state.pending.pt"):
            a, b = _scaffold_state(whole, i, name), _scaffold_state(cut, i, name)
            for k in a:
                assert float((a[k] - b[k]).abs().max()) <= 1e-3 * float(a[k].abs().max()), (
                    i, name, k)


def test_a_new_run_does_not_start_from_a_previous_runs_private_state(tmp_path: Path) -> None:
    """A site's state dir outlives a run. Before: a new SCAFFOLD run on it trained round 1 with
    the control variate the PREVIOUS run had committed (``client_state.pt`` was never reset), so
    the deployed run no longer equalled the simulation (whose clients start from zero)."""
    import shutil

    from securefed.run import run_experiment

    cfg = deploy_cfg(strategy={"name": "scaffold"})
    _run_in_process(tmp_path / "a", cfg)  # run A leaves round 1's committed control variates
    for i in range(3):
        left = tmp_path / "a" / f"site{i}" / "client_state.pt"
        state = torch.load(left, weights_only=True)
        assert state and all(float(v.abs().max()) > 0 for v in state.values())
        (tmp_path / "b" / f"site{i}").mkdir(parents=True)
        shutil.copy2(left, tmp_path / "b" / f"site{i}" / "client_state.pt")
    _run_in_process(tmp_path / "b", cfg)  # run B on the same sites' state
    sim = run_experiment(cfg, tmp_path / "sim", progress=False, write_report=False)
    assert_matches_simulation(
        cfg, tmp_path / "b" / "run", tmp_path / "sim", sim.final_params,
        [tmp_path / "b" / f"site{i}" / "privacy_ledger.json" for i in range(3)],
    )
