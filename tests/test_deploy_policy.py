"""Site policy of the deployment, attacked the way a malicious coordinator would (issue 13).

Every test drives the real :class:`~securefed.deploy.coordinator.Coordinator` and the real site
handlers (:func:`~securefed.deploy.node.dispatch`, what the Flower ClientApp calls) over an
in-process transport that can replay, rewrite or drop messages; no Flower process is started.
Each refusal names the field and the node-config key; each test fails on the code before the
policy (sites trusted whatever the coordinator sent).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from securefed.config import ExperimentConfig
from securefed.deploy.node import NodeOptions, PolicyError, Site, dispatch
from securefed.secagg.keys import load_identities
from securefed.secagg.masking import shamir
from securefed.secagg.masking.messages import RoundStart, Stage, UnmaskShares, decode_message
from tests.deploy_helpers import (
    PolicyNet,
    first_advertise,
    ledger_entries,
    policy_cfg,
    policy_coordinator,
    policy_sites,
    setup_content,
)

#: deployment tests (Flower processes, sites, the deploy protocol): in `make test`, left out
#: of `make test-unit`
pytestmark = pytest.mark.deploy


# ----------------------------------------------------------------------------- 1. replay


def test_a_round_is_trained_once_per_run(tmp_path: Path) -> None:
    """Attack: run round 1 with sites {0,1,2}, then round 1 again with {0,1} and the same
    global model; the difference of the two sums would be site 2's update. Every site refuses
    the second round 1 (recorded before its update left), so the round is abandoned."""
    sites = policy_sites(tmp_path, 3, min_threshold=Fraction(1, 2), min_cohort=2)
    net = PolicyNet(sites)
    coord = policy_coordinator(policy_cfg(secure_aggregation={"threshold": 0.5}), tmp_path, net)
    coord.start()
    first = coord.run_round(1)
    assert first["participants"] == [0, 1, 2]
    record = json.loads((tmp_path / "site0" / "site_runs.json").read_text())
    assert record["runs"][coord.run_id]["last_trained_round"] == 1
    ledger_before = ledger_entries(sites[100])
    # the same round again, without site 2
    coord.sites.pop(2)
    again = coord.run_round(1)
    assert again["participants"] == [] and "abandoned" in again
    for cid in (0, 1):
        reason = again["dropout_reasons"][str(cid)]
        assert "PolicyError: round: 1 is at or below this site's last trained round 1" in reason
    assert ledger_entries(sites[100]) == ledger_before  # it did not train again
    # a replay of the recorded round-1 message itself, straight to the site
    with pytest.raises(PolicyError, match=r"round: 1 is at or below .* last trained round 1"):
        dispatch(sites[100], "train.advertise_keys", first_advertise(net, 100))


# -------------------------------------------------------------------------- 2. run binding


def test_a_run_id_is_accepted_once_and_messages_of_other_runs_are_refused(
    tmp_path: Path,
) -> None:
    sites = policy_sites(tmp_path, 3)
    net = PolicyNet(sites)
    cfg = policy_cfg()
    old = policy_coordinator(cfg, tmp_path, net, "old")
    old.start()
    assert old.run_round(1)["participants"] == [0, 1, 2]
    site = sites[100]
    # a second setup re-using the run id (a coordinator replaying the run) is refused
    with pytest.raises(PolicyError, match=rf"run_id: '{old.run_id}' was already accepted"):
        site.setup(setup_content(cfg, old.run_id))
    # a new run: its setup is accepted; the old run's round-1 message is now refused
    new = policy_coordinator(cfg, tmp_path, PolicyNet(sites), "new")
    new.setup()
    assert new.run_id != old.run_id
    stale = first_advertise(net, 100)
    with pytest.raises(PolicyError, match=rf"run_id: '{old.run_id}' is not the run this site "
                                          rf"accepted at setup \('{new.run_id}'\)"):
        dispatch(site, "train.advertise_keys", stale)
    # as is a run id this site never accepted, at every stage
    forged = {**stale, "run_id": "0" * 32}
    with pytest.raises(PolicyError, match=r"run_id: '0{32}' is not the run"):
        dispatch(site, "train.advertise_keys", forged)
    with pytest.raises(PolicyError, match=r"run_id: '0{32}' is not the run"):
        dispatch(site, f"train.{Stage.SHARE_KEYS}", {**forged, "stage": Stage.SHARE_KEYS})
    # the old run id travels inside the masking protocol too: old signed messages fail there
    renamed = {**stale, "run_id": new.run_id}
    with pytest.raises(Exception, match=r"client 0: signature check failed"):
        dispatch(site, "train.advertise_keys", renamed)
    assert len(ledger_entries(site)) == 1  # nothing of the above trained


# ----------------------------------------------------------------- 3. threshold and cohort


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"secure_aggregation": {"threshold": 0.5}},
         r"secure_aggregation\.threshold: 0\.5 gives t=2 of the 3 share holders .* "
         r"min-threshold=2/3"),
        ({"secure_aggregation": {"threshold": 2}},
         r"secure_aggregation\.threshold: 2 gives t=2 of the 3 .*min-threshold"),
        # 0.6 is safe for a round of 4 (t=3) but not for a round of 3 (t=2)
        ({"secure_aggregation": {"threshold": 0.6}, "federation": {"num_clients": 4}},
         r"t=2 of the 3 share holders of a round of 3 sites"),
        ({"federation": {"fraction_fit": 0.67, "min_fit_clients": 2}},
         r"federation\.fraction_fit: 0\.67 .* selects 2 sites a round, below this site's "
         r"min-cohort 3"),
    ],
)
def test_site_refuses_a_low_threshold_or_cohort_at_setup(
    tmp_path: Path, overrides: dict[str, Any], match: str
) -> None:
    (site,) = policy_sites(tmp_path, 1).values()
    with pytest.raises(PolicyError, match=match):
        site.setup(setup_content(policy_cfg(**overrides), "ab" * 16))
    assert not (tmp_path / "site0" / "privacy_ledger.json").exists()
    # the site's own node config sets the floor
    lax = Site(dataclasses.replace(site.options, min_threshold=Fraction(1, 2), min_cohort=2))
    if "threshold" in str(overrides) and "0.6" not in str(overrides):
        assert lax.setup(setup_content(policy_cfg(**overrides), "cd" * 16))["run_id"] == "cd" * 16


def test_site_refuses_a_round_cohort_below_min_cohort(tmp_path: Path) -> None:
    """Attack: after an honest setup the coordinator starts a round with only sites 0 and 1
    (a sum of two: each learns the other's update, and so does a coordinator colluding with
    one). Both refuse before training."""
    from securefed.secagg.masking.server import MaskingServer

    sites = policy_sites(tmp_path, 3)
    ids = load_identities(tmp_path / "keys", 3)

    def two_only(message_type: str, node: int, content: Mapping[str, Any]) -> Any:
        if message_type != "train.advertise_keys":
            return content
        if node == 102:
            return None
        honest = decode_message(content["secagg"], node - 100, coord.params.session)
        assert isinstance(honest, RoundStart) and honest.participants == (0, 1, 2)
        server = MaskingServer(1, [0, 1], honest.vector_length, coord.params, ids.roster,
                               ids.server_key)
        return {**content, "secagg": server.start()[node - 100]}

    net = PolicyNet(sites, on_send=two_only)
    coord = policy_coordinator(policy_cfg(), tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1):
        assert ("PolicyError: round 1: a cohort of 2 sites [0, 1] is below this site's "
                "min-cohort 3 (--node-config min-cohort)") in line["dropout_reasons"][str(cid)]
        assert ledger_entries(sites[100 + cid]) == []  # refused before training


def test_site_refuses_to_unmask_a_survivor_set_below_min_cohort(tmp_path: Path) -> None:
    """Threshold 1/2 (the site allows it) with min-cohort 3: when site 2 vanishes after sharing
    its keys, the coordinator asks 0 and 1 to sign a survivor set of two; they refuse, so no
    share is revealed and the round is abandoned."""
    sites = policy_sites(tmp_path, 3, min_threshold=Fraction(1, 2))
    net = PolicyNet(sites, drop={2: Stage.MASKED_INPUT})
    coord = policy_coordinator(policy_cfg(secure_aggregation={"threshold": 0.5}), tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1):
        assert ("survivor set of 2 sites [0, 1] is below this site's min-cohort 3"
                in line["dropout_reasons"][str(cid)])
    assert not [m for m, _, _ in net.sent if m == f"train.{Stage.UNMASKING}"]


def test_client_level_site_refuses_a_clip_norm_above_its_plan(tmp_path: Path) -> None:
    """Client-level DP: a coordinator broadcasts a clip norm 10x the experiment's
    ``max_update_norm`` (so that a site's update passes at 10x the sensitivity its noise was
    planned for). Every site plans its own noise and refuses before training; nothing is
    charged, nothing leaves."""
    import torch

    from securefed.deploy.wire import encode_vector

    def inflate(message_type: str, node: int, content: Mapping[str, Any]) -> dict[str, Any]:
        if "broadcast.clip" in content:
            return {**content, "broadcast.clip": encode_vector(torch.tensor([5.0, 0.0]))}
        return dict(content)

    sites = policy_sites(tmp_path, 3)
    net = PolicyNet(sites, on_send=inflate)
    cfg = policy_cfg(dp={"level": "client", "max_update_norm": 0.5})
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1, 2):
        assert ("broadcast clip [5.0, 0.0] differs from this site's plan [0.5, 0.0]"
                in line["dropout_reasons"][str(cid)])
    for site in sites.values():
        assert ledger_entries(site) == []


def test_adaptive_clipping_site_refuses_an_inflated_clip_bit_scale(tmp_path: Path) -> None:
    """Adaptive clipping: the site takes the clip norm from the broadcast (its noise scales
    with it) but recomputes the clip bit's scale beta itself; a coordinator that inflates beta
    10x (the bit would then carry more than the noise was planned for) is refused."""
    import torch

    from securefed.deploy.wire import decode_vector, encode_vector

    def inflate(message_type: str, node: int, content: Mapping[str, Any]) -> dict[str, Any]:
        if "broadcast.clip" in content:
            s, beta = (float(v) for v in decode_vector(content["broadcast.clip"], 2, "t", "c"))
            return {**content, "broadcast.clip": encode_vector(torch.tensor([s, 10 * beta]))}
        return dict(content)

    sites = policy_sites(tmp_path, 3)
    net = PolicyNet(sites, on_send=inflate)
    cfg = policy_cfg(dp={"level": "client", "max_update_norm": 0.5, "adaptive_clipping": True})
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1, 2):
        assert "differs from this site's plan" in line["dropout_reasons"][str(cid)]
    for site in sites.values():
        assert ledger_entries(site) == []


# ------------------------------------------------------------------------ 4. DP plan pinned


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"client": {"batch_size": 400}}, "client.batch_size", 400),
        ({"dp": {"noise_multiplier": 0.5}}, "dp.noise_multiplier", 0.5),
        ({"client": {"local_steps": 20}}, "client.local_steps", 20),
        ({"dp": {"max_grad_norm": 5.0}}, "dp.max_grad_norm", 5.0),
        ({"federation": {"rounds": 50}}, "federation.rounds", 50),
    ],
)
def test_site_refuses_a_changed_dp_field(
    tmp_path: Path, overrides: dict[str, Any], field: str, value: Any
) -> None:
    """Attack: re-send the experiment with batch_size 400 instead of 16 (q = 1 instead of
    0.16) while the ledger keeps charging the planned q. The re-setup is refused."""
    (site,) = policy_sites(tmp_path, 1).values()
    site.setup(setup_content(policy_cfg(), "ab" * 16))
    pinned = json.loads((tmp_path / "site0" / "site_runs.json").read_text())["dp_plan"]
    assert pinned["client.batch_size"] == 16
    with pytest.raises(PolicyError, match=rf"{field}: {value!r} differs from the DP plan this "
                                          r"site pinned at its first setup"):
        site.setup(setup_content(policy_cfg(**overrides), "cd" * 16))
    record = json.loads((tmp_path / "site0" / "site_runs.json").read_text())
    assert record["current"] == "ab" * 16 and list(record["runs"]) == ["ab" * 16]
    assert "batch_size: 16" in (tmp_path / "site0" / "experiment.yaml").read_text()


# ------------------------------------------------------------- 5. fresh noise key per run


def _trained_vector(site: Site) -> np.ndarray:
    doc = json.loads((site.options.state_dir / "secagg" / "round.json").read_text())
    return np.frombuffer(bytes.fromhex(doc["vector"]), dtype="<f8")


def test_two_runs_of_a_site_draw_different_noise(tmp_path: Path) -> None:
    """Same site, same experiment (same seed), same global model, round 1 of two runs: the
    released updates differ because each run's DP noise key is fresh. With one key per state
    dir, every DP-SGD noise tensor was bit-identical across the two runs, so the difference of
    the two releases cancelled the noise while the ledger charged both."""
    sites = policy_sites(tmp_path, 2, min_cohort=2)
    cfg = policy_cfg(federation={"num_clients": 2})
    vectors = []
    for name in ("run-a", "run-b"):
        # every site vanishes after training: the round is abandoned, its state kept
        net = PolicyNet(sites, drop={0: Stage.SHARE_KEYS, 1: Stage.SHARE_KEYS})
        coord = policy_coordinator(cfg, tmp_path, net, name)
        coord.start()
        assert coord.run_round(1)["trained"] == [0, 1]
        vectors.append(_trained_vector(sites[100]))
    a, b = vectors
    assert a.shape == b.shape and np.all(np.isfinite(a))
    assert not np.array_equal(a, b)
    assert float(np.abs(a - b).max()) > 1e-4
    record = json.loads((tmp_path / "site0" / "site_runs.json").read_text())
    nonces = [r["noise_nonce"] for r in record["runs"].values()]
    assert len(nonces) == 2 and len(set(nonces)) == 2
    # both releases are charged, at the q and sigma actually used
    entries = ledger_entries(sites[100])
    assert [(e["round"], e["steps"]) for e in entries] == [(1, 2), (1, 2)]
    n = json.loads((tmp_path / "run-a" / "sites.json").read_text())["sites"]["0"]["num_examples"]
    assert all(e["sample_rate"] == 16 / n and e["noise_multiplier"] == 1.0 for e in entries)


def test_seeded_noise_is_refused_unless_the_site_opts_in(tmp_path: Path) -> None:
    (site,) = policy_sites(tmp_path, 1).values()
    seeded = policy_cfg(dp={"secure_noise": False})
    with pytest.raises(PolicyError, match=r"dp\.secure_noise: false .*allow-seeded-noise"):
        site.setup(setup_content(seeded, "ab" * 16))
    rehearsal = Site(dataclasses.replace(site.options, allow_seeded_noise=True))
    rehearsal.setup(setup_content(seeded, "ab" * 16))
    # even then, the same seed (hence the same noise) is never used by two runs
    with pytest.raises(PolicyError, match=r"seed: 5 was already used by run abab"):
        rehearsal.setup(setup_content(seeded, "cd" * 16))


# ------------------------------------------------------------------ 6. nothing raw leaves


@pytest.mark.parametrize("canaries", [False, True])
def test_a_site_sends_nothing_computed_from_its_data_in_the_clear(
    tmp_path: Path, canaries: bool
) -> None:
    """Every reply field of a round, by name: public facts, the masking protocol's signed
    messages, and the epsilon the public plan implies. No loss, no step count. With audit
    canaries (the site opted in) one field more: its signed canary scores (docs/deploy.md)."""
    sites = policy_sites(tmp_path, 3, allow_audit_canaries=canaries)
    net = PolicyNet(sites)
    coord = policy_coordinator(policy_cfg(canaries={"enabled": canaries, "m": 16}), tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [0, 1, 2]
    assert "mean_local_loss" not in line
    allowed = {
        "query.setup": {"version", "run_id", "client_id", "num_examples", "image_shape",
                        "num_classes", "roster_sha256", "epsilon"},
        "train.advertise_keys": {"status", "round", "run_id", "secagg", "vector_keys",
                                 "epsilon"} | ({"canary_scores"} if canaries else set()),
    }
    seen = set()
    for message_type, _, reply in net.replies:
        assert isinstance(reply, dict), reply
        keys = allowed.get(message_type, {"status", "round", "run_id", "secagg"})
        assert set(reply) == keys, (message_type, sorted(reply))
        seen.add(message_type)
    assert len(seen) == 6


# ----------------------------------------------------------------------- 7. a bad share


def test_a_bad_shamir_share_abandons_the_round_not_the_run(tmp_path: Path) -> None:
    """Site 2 returns a wrong share of site 0's self-mask seed (correctly signed: it is site 2's
    own message). With t = 3 of 3 no 3 correct shares remain: the round is abandoned with the
    reason, the run goes on, and the next round completes."""
    sites = policy_sites(tmp_path, 3)
    ids = load_identities(tmp_path / "keys", 3)
    cheated: list[int] = []

    def lie(message_type: str, node: int, reply: dict[str, Any]) -> dict[str, Any]:
        if message_type != f"train.{Stage.UNMASKING}" or node != 102 or cheated:
            return reply
        session = coord.params.session
        msg = decode_message(reply["secagg"], 2, session)
        assert isinstance(msg, UnmaskShares)
        (owner, share), *rest = msg.b_shares
        wrong = shamir.encode_share((shamir.decode_share(share) + 1) % shamir.PRIME)
        evil = dataclasses.replace(msg, b_shares=((owner, wrong), *rest))
        cheated.append(owner)
        return {**reply, "secagg": evil.signed_bytes(ids.client_keys[2])}

    net = PolicyNet(sites, on_reply=lie)
    coord = policy_coordinator(policy_cfg(federation={"rounds": 2}), tmp_path, net)
    res = coord.run()
    assert cheated == [0]
    first, second = res.metrics
    assert first["participants"] == []
    assert "client 0's self-mask seed cannot be reconstructed" in first["abandoned"]
    assert second["participants"] == [0, 1, 2]
    assert res.rounds_completed == 2


def test_an_experiment_changed_behind_the_sites_back_is_refused(tmp_path: Path) -> None:
    (site,) = policy_sites(tmp_path, 1).values()
    site.setup(setup_content(policy_cfg(), "ab" * 16))
    path = tmp_path / "site0" / "experiment.yaml"
    path.write_text(path.read_text().replace("batch_size: 16", "batch_size: 400"))
    with pytest.raises(PolicyError, match="the experiment changed since this site accepted run"):
        dispatch(site, f"train.{Stage.SHARE_KEYS}",
                 {"run_id": "ab" * 16, "round": 1, "secagg": b""})


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"min-threshold": 1.5}, r"min-threshold=1\.5: must be in \(0, 1\)"),
        ({"min-threshold": "two thirds"}, "min-threshold='two thirds': not a number"),
        ({"min-cohort": 1}, "min-cohort=1: must be >= 2"),
        ({"allow-seeded-noise": "maybe"}, "allow-seeded-noise='maybe': expected true or false"),
        ({"max-audit-canaries": "many"}, "max-audit-canaries='many': not an integer"),
        ({"allow-audit-canaries": "sure"}, "allow-audit-canaries='sure': expected true or false"),
    ],
)
def test_policy_knobs_are_validated(extra: dict[str, Any], match: str) -> None:
    from securefed.deploy.node import NodeConfigError

    with pytest.raises(NodeConfigError, match=match):
        NodeOptions.from_node_config({"state-dir": "/s", "keys-dir": "/k", "partition-id": 0,
                                      **extra})


def test_policy_defaults_and_fractions() -> None:
    base = {"state-dir": "/s", "keys-dir": "/k", "partition-id": 0}
    o = NodeOptions.from_node_config(base)
    assert (o.min_threshold, o.min_cohort, o.allow_seeded_noise) == (Fraction(2, 3), 3, False)
    o = NodeOptions.from_node_config({**base, "min-threshold": "3/4", "min-cohort": 5,
                                      "allow-seeded-noise": True})
    assert (o.min_threshold, o.min_cohort, o.allow_seeded_noise) == (Fraction(3, 4), 5, True)
    assert NodeOptions.from_node_config({**base, "min-threshold": 0.75}).min_threshold == (
        Fraction(3, 4)
    )
    assert (o.allow_audit_canaries, o.max_audit_canaries) == (False, 1000)
    o = NodeOptions.from_node_config({**base, "allow-audit-canaries": "true",
                                      "max-audit-canaries": 50})
    assert (o.allow_audit_canaries, o.max_audit_canaries) == (True, 50)


# ------------------------------------------------------------------------- audit canaries


def test_a_site_refuses_audit_canaries_unless_it_opted_in(tmp_path: Path) -> None:
    """Gradient canaries make a site send its canary scores (coordinates of its privatized
    gradient sums) on their own, outside secure aggregation: refused at setup by default,
    naming the field and the node-config key; nothing is planned or recorded."""
    site = policy_sites(tmp_path, 1)[100]
    cfg = policy_cfg(canaries={"enabled": True, "m": 64})
    with pytest.raises(PolicyError, match=r"canaries.enabled: .*allow-audit-canaries=true"):
        site.setup(setup_content(cfg, "cd" * 16))
    assert not (site.options.state_dir / "privacy_ledger.json").exists()
    # opted in, a round that assigns canaries the accepted experiment does not have is refused
    opted = Site(dataclasses.replace(site.options, allow_audit_canaries=True))
    opted.setup(setup_content(policy_cfg(), "ef" * 16))
    with pytest.raises(PolicyError, match=r"canaries\.enabled: False"):
        opted._canary_hook({"canaries": b"x"}, policy_cfg(), opted._record().run("ef" * 16), 1,
                           None, 100)  # type: ignore[arg-type]


def _forged_assignment(case: str, tmp: Path, cid: int, run_id: str, rnd: int) -> bytes:
    """A canary assignment a malicious coordinator signs with its own (roster) key."""
    from securefed.builders import build_model
    from securefed.deploy.canaries import encode_assignment
    from securefed.secagg.keys import load_server_key

    params = [p for p in build_model(policy_cfg(), (1, 8, 8), 10).parameters() if p.requires_grad]
    w = next(i for i, p in enumerate(params) if p.dim() >= 2)
    b = next(i for i, p in enumerate(params) if p.dim() == 1)
    idx, off = {
        "over the cap": ([w] * 5, [0, 1, 2, 3, 4]),
        "a bias coordinate": ([w, b], [0, 0]),
        "past the tensor": ([w], [params[w].numel()]),
        "a duplicate": ([w, w, w], [7, 3, 7]),
        "another round": ([w], [0]),
        "not the coordinator's signature": ([w], [0]),
        "moved": ([w], [5]),
    }[case]
    key = load_server_key(tmp / "keys")
    if case == "not the coordinator's signature":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
    m = len(idx)
    return encode_assignment(
        key, bytes.fromhex(run_id), rnd + (case == "another round"), cid, bytes(32),
        np.asarray(idx), np.asarray(off), np.ones(m), np.ones(m, dtype=bool),
    )


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("over the cap", r"assigns this site 5 canaries, above its cap 4 \(--node-config "
                         r"max-audit-canaries=4"),
        ("a bias coordinate", r"coordinate \(parameter \d+, offset 0\) is not an entry of a "
                              r"weight tensor"),
        ("past the tensor", r"is not an entry of a weight tensor"),
        ("a duplicate", r"1 duplicate coordinate"),
        ("another round", r"canaries: for round 2, site \d; expected round 1"),
        ("not the coordinator's signature", r"canaries: the signature does not verify"),
    ],
)
def test_a_site_refuses_a_forged_canary_assignment(
    tmp_path: Path, case: str, match: str
) -> None:
    """Attack: the coordinator assigns a site canaries of its choosing (say every coordinate,
    to read the site's whole update off its scores). The opted-in site refuses more than its
    ``max-audit-canaries``, anything but distinct coordinates of weight tensors, and anything
    not signed by the coordinator for this run, round and site, before it trains: nothing is
    charged, nothing leaves."""
    sites = policy_sites(tmp_path, 3, allow_audit_canaries=True, max_audit_canaries=4)

    def forge(message_type: str, node: int, content: Mapping[str, Any]) -> dict[str, Any]:
        if "canaries" not in content:
            return dict(content)
        blob = _forged_assignment(case, tmp_path, node - 100, content["run_id"],
                                  content["round"])
        return {**content, "canaries": blob}

    net = PolicyNet(sites, on_send=forge)
    coord = policy_coordinator(policy_cfg(canaries={"enabled": True, "m": 8}), tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1, 2):
        assert re.search(match, line["dropout_reasons"][str(cid)]), line["dropout_reasons"]
    for site in sites.values():
        assert ledger_entries(site) == []
    # the round's scores are committed (all zero: no site trained), as the simulation does
    scores = np.load(tmp_path / "run" / "canaries" / "gradient_rounds" / "round_00001.npy")
    assert scores.shape == (8,) and not scores.any()


def test_a_site_refuses_canaries_moved_between_rounds(tmp_path: Path) -> None:
    """Attack: within the per-round cap, move a site's canaries every round to read other
    coordinates of its gradients each time. A run's canaries are fixed (the honest coordinator
    sends the same set every round): the site pins the set of its first canary round and
    refuses another one later in the run, before training."""
    sites = policy_sites(tmp_path, 3, allow_audit_canaries=True)

    def move(message_type: str, node: int, content: Mapping[str, Any]) -> dict[str, Any]:
        if content.get("round") != 2 or "canaries" not in content:
            return dict(content)
        # a valid set on its own (one distinct weight coordinate), but not the round-1 set
        return {**content, "canaries": _forged_assignment(
            "moved", tmp_path, node - 100, content["run_id"], 2)}

    net = PolicyNet(sites, on_send=move)
    cfg = policy_cfg(canaries={"enabled": True, "m": 8}, federation={"rounds": 2})
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    assert coord.run_round(1)["participants"] == [0, 1, 2]
    line = coord.run_round(2)
    assert line["participants"] == [] and "abandoned" in line
    for cid in (0, 1, 2):
        assert "a canary set other than the one it trained with earlier" in (
            line["dropout_reasons"][str(cid)])
    for site in sites.values():
        assert [e["round"] for e in ledger_entries(site)] == [1]


def test_the_coordinator_keeps_only_scores_a_site_signed(tmp_path: Path) -> None:
    """Canary scores are signed by the site's roster key for this run, round and site: a
    reply whose scores do not verify (forged on the way, or a bit flipped) drops that site from
    the round and its canaries score 0; the other sites' scores are kept. A tampered
    assignment or scores message fails its signature at the wire level."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from securefed.deploy.canaries import (
        CanaryWireError,
        decode_assignment,
        decode_scores,
        encode_assignment,
        encode_scores,
    )

    sites = policy_sites(tmp_path, 3, allow_audit_canaries=True, min_cohort=2,
                         min_threshold=Fraction(1, 2))

    def forge(message_type: str, node: int, reply: dict[str, Any]) -> dict[str, Any]:
        if node == 100 and "canary_scores" in reply:
            m = (len(reply["canary_scores"]) - 25 - 64) // 8
            reply["canary_scores"] = encode_scores(
                Ed25519PrivateKey.generate(), bytes.fromhex(reply["run_id"]), 1, 0,
                np.full(m, 1e6))
        return reply

    net = PolicyNet(sites, on_reply=forge)
    cfg = policy_cfg(canaries={"enabled": True, "m": 32}, secure_aggregation={"threshold": 0.5})
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == [1, 2]
    assert "canaries: the signature does not verify" in line["dropout_reasons"]["0"]
    scores = np.load(tmp_path / "run" / "canaries" / "gradient_rounds" / "round_00001.npy")
    owners = np.load(tmp_path / "run" / "canaries" / "gradient.npz")["clients"]
    assert not scores[owners == 0].any() and scores[owners != 0].any()

    key = Ed25519PrivateKey.generate()
    one = np.ones(1)
    blob = encode_assignment(key, b"run", 1, 0, bytes(32), one.astype(int), one.astype(int),
                             one, one.astype(bool))
    assert len(decode_assignment(blob, key.public_key(), b"run", 1, 0)) == 1
    flipped = blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]
    with pytest.raises(CanaryWireError, match="signature does not verify"):
        decode_assignment(flipped, key.public_key(), b"run", 1, 0)
    with pytest.raises(CanaryWireError, match="signature does not verify"):
        decode_assignment(blob, key.public_key(), b"another run", 1, 0)
    with pytest.raises(CanaryWireError, match="not finite"):
        decode_scores(encode_scores(key, b"run", 1, 0, np.array([np.nan])), key.public_key(),
                      b"run", 1, 0, 1)
    with pytest.raises(CanaryWireError, match="2 scores, 1 canaries were assigned"):
        decode_scores(encode_scores(key, b"run", 1, 0, np.zeros(2)), key.public_key(),
                      b"run", 1, 0, 1)


# ------------------------------------------------------------------ FedDiffuse usplit


def _usplit(n: int, rounds: int) -> ExperimentConfig:
    return policy_cfg(federation={"num_clients": n, "rounds": rounds},
                      secure_aggregation={"threshold": 0.6},
                feddiffuse={"enabled": True, "variant": "usplit"})


def _pairing(cfg: ExperimentConfig, rnd: int) -> dict[int, tuple[str, ...]]:
    from securefed.seeds import Purpose, derive_seed
    from securefed.strategies.feddiffuse import pair_clients

    n = cfg.federation.num_clients
    return pair_clients(range(n), np.random.default_rng(derive_seed(cfg.seed, Purpose.USPLIT,
                                                                    rnd)))


def test_usplit_site_refuses_to_unmask_one_session_below_min_cohort(tmp_path: Path) -> None:
    """Five usplit sites (sessions of 3, min-cohort 3): a back-only site vanishes after sharing
    its keys, so the coordinator asks the back session to sign a survivor set of two. Both
    remaining back sites refuse that session (the odd site names ``secagg.back`` and
    ``min-cohort`` and goes on in ``front``): ``back`` is abandoned before any share of it is
    revealed, ``front`` completes."""
    cfg = _usplit(5, 1)
    pairs = _pairing(cfg, 1)
    back_only = sorted(c for c, s in pairs.items() if s == ("back",))
    (odd,) = [c for c, s in pairs.items() if len(s) == 2]
    front = sorted(c for c, s in pairs.items() if "front" in s)
    sites = policy_sites(tmp_path, 5, min_threshold=Fraction(1, 2))
    net = PolicyNet(sites, drop={back_only[0]: Stage.MASKED_INPUT})
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    line = coord.run_round(1)
    assert line["participants"] == front
    assert [w.split(":")[0] for w in line["cohorts_abandoned"]] == ["back"]
    why = line["dropout_reasons"][str(odd)]
    assert why.startswith("back: ") and "secagg.back" in why and "min-cohort 3" in why
    assert "survivor set of 2 sites" in line["dropout_reasons"][str(back_only[1])]
    # no back-session unmasking request was sent: no share of a back update was revealed
    unmask = [c for m, _, c in net.sent if m == f"train.{Stage.UNMASKING}"]
    assert unmask and all("secagg.back" not in c for c in unmask)


def test_usplit_site_refuses_a_forged_next_round_assignment(tmp_path: Path) -> None:
    """Keys ahead under usplit: round 1's unmasking request to one site carries round 2's
    start in the wrong session (its ``front`` start as ``next_secagg.back``). The site answers
    its round-1 shares, refuses the next start naming ``next_secagg`` and the pairing, and is
    not charged for round 2; the coordinator drops it from round 2, whose session with it
    falls below its threshold, while the other session completes. A training key broadcast
    whose client list is not the one the site's sessions were started with is refused too."""
    cfg = _usplit(4, 2)
    pairs2 = _pairing(cfg, 2)
    victim = next(c for c, s in pairs2.items() if s == ("front",))
    sites = policy_sites(tmp_path, 4, min_threshold=Fraction(1, 2), min_cohort=2)
    node = next(n for n, s in sites.items() if s.cid == victim)

    def forge(message_type: str, to: int, content: Mapping[str, Any]) -> Mapping[str, Any]:
        if message_type == f"train.{Stage.UNMASKING}" and to == node:
            out = {k: v for k, v in content.items() if k != "next_secagg.front"}
            out["next_secagg.back"] = content["next_secagg.front"]
            return out
        return content

    net = PolicyNet(sites, on_send=forge)
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    first, second = coord.run_round(1), coord.run_round(2)
    assert first["participants"] == [0, 1, 2, 3]
    refused = [r for m, n, r in net.replies
               if m == f"train.{Stage.UNMASKING}" and n == node and isinstance(r, dict)]
    assert "next_secagg: round 2 asks this site to send segment(s) ['back']" in (
        refused[0]["next_refused"])
    assert second["dropped_at"][str(victim)] == Stage.ADVERTISE_KEYS
    assert [w.split(":")[0] for w in second["cohorts_abandoned"]] == ["front"]
    assert second["participants"] == sorted(c for c, s in pairs2.items() if s == ("back",))
    assert [e["round"] for e in ledger_entries(sites[node])] == [1]


def test_usplit_site_refuses_a_key_broadcast_for_another_client_list(tmp_path: Path) -> None:
    """Keys ahead under usplit: round 2's training key broadcast to a site carries a client
    list other than the one its round-2 sessions were started (and signed) with, chosen so
    that the pairing still gives the site the same segment. The site refuses before training,
    naming ``round_clients``; it is not charged for round 2."""
    import itertools

    from securefed.seeds import Purpose, derive_seed
    from securefed.strategies.feddiffuse import pair_clients

    cfg = _usplit(4, 2)
    pairs2 = _pairing(cfg, 2)

    def pairing_of(clients: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
        rng = np.random.default_rng(derive_seed(cfg.seed, Purpose.USPLIT, 2))
        return pair_clients(clients, rng)

    victim, other = next(
        (c, list(sub)) for c in sorted(pairs2) for r in (2, 3)
        for sub in itertools.combinations(range(4), r)
        if c in sub and pairing_of(sub)[c] == pairs2[c]
    )
    sites = policy_sites(tmp_path, 4, min_threshold=Fraction(1, 2), min_cohort=2)
    node = next(n for n, s in sites.items() if s.cid == victim)

    def forge(message_type: str, to: int, content: Mapping[str, Any]) -> Mapping[str, Any]:
        if (message_type == f"train.{Stage.SHARE_KEYS}" and to == node
                and content["round"] == 2 and "broadcast_keys" in content):
            return {**content, "round_clients": other}
        return content

    net = PolicyNet(sites, on_send=forge)
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    coord.run_round(1)
    second = coord.run_round(2)
    why = second["dropout_reasons"][str(victim)]
    assert f"round_clients: round 2's client list {other} is not the one" in why
    assert [e["round"] for e in ledger_entries(sites[node])] == [1]


def test_a_usplit_site_sends_nothing_computed_from_its_data_in_the_clear(tmp_path: Path) -> None:
    """Every reply field of two usplit rounds (5 sites; round 2's keys ahead), by name: the
    one-session reply's fields with ``secagg`` / ``next_secagg`` keyed by the sessions the
    site is in (by the pairing of the round), and nothing else: no loss, no step count."""
    cfg = _usplit(5, 2)
    pairs = {1: _pairing(cfg, 1), 2: _pairing(cfg, 2)}
    sites = policy_sites(tmp_path, 5, min_threshold=Fraction(1, 2))
    net = PolicyNet(sites)
    coord = policy_coordinator(cfg, tmp_path, net)
    coord.start()
    lines = [coord.run_round(1), coord.run_round(2)]
    assert [line["participants"] for line in lines] == [[0, 1, 2, 3, 4]] * 2
    seen = set()
    for (message_type, node, reply), (_, _, content) in zip(net.replies, net.sent, strict=True):
        assert isinstance(reply, dict), reply
        if message_type == "query.setup":
            assert set(reply) == {"version", "run_id", "client_id", "num_examples",
                                  "image_shape", "num_classes", "roster_sha256", "epsilon"}
            continue
        cid, rnd = sites[node].cid, int(content["round"])
        keys = {"status", "round", "run_id"} | {f"secagg.{s}" for s in pairs[rnd][cid]}
        if "broadcast_keys" in content:  # the training stage
            keys |= {"vector_keys", "epsilon"}
        if "next_round" in content:
            keys |= {"next_round"} | {f"next_secagg.{s}" for s in pairs[rnd + 1][cid]}
        assert set(reply) == keys, (message_type, rnd, cid, sorted(reply))
        seen.add((rnd, message_type))
    assert len(seen) == 5 + 4  # round 2 trained at the key broadcast (keys ahead)
