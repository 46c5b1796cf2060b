"""Helpers shared by the deployment tests (test_deploy, test_deploy_policy,
test_deploy_messages, test_flower_simulation): experiments, in-process sites and
transports, and the comparison of a deployed run with the simulation."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from securefed.config import ExperimentConfig, dump_config
from securefed.deploy.coordinator import (
    Coordinator,
    CoordinatorOptions,
    Reply,
    quantization_tolerance,
)
from securefed.deploy.node import NodeOptions, Site, dispatch
from securefed.deploy.wire import PROTOCOL_VERSION
from securefed.secagg.keys import init_identity_keys
from securefed.secagg.masking.messages import Stage
from tests.helpers import config_with, metrics_rows

# -------------------------------------------------- the deploy protocol's policy tests

POLICY_RAW: dict[str, Any] = {
    "name": "policy-test",
    "seed": 5,
    "device": "cpu",
    "data": {"name": "digits", "max_examples": 300, "holdout_fraction": 0.25},
    "partition": {"kind": "iid"},
    "model": {"base_channels": 8, "channel_mults": [1], "norm_groups": 4,
              "attention_levels": []},
    "diffusion": {"timesteps": 50},
    "federation": {"num_clients": 3, "rounds": 1, "fraction_fit": 1.0},
    "client": {"local_steps": 2, "batch_size": 16, "lr": 0.002},
    "strategy": {"name": "fedavg"},
    "secure_aggregation": {"protocol": "masking", "threshold": 0.67, "neighbours": "all",
                           "bits": 32, "clip_range": 1.0},
    # an explicit multiplier and a roomy budget: several runs of one site stay within it
    "dp": {"level": "record", "target_epsilon": 1000.0, "noise_multiplier": 1.0,
           "max_grad_norm": 1.0, "accountant": "rdp"},
    "evaluation": {"every": 100, "fid": False, "grid_samples": 4, "sampling_steps": 5,
                   "holdout_loss_examples": 32},
    "checkpoint": {"every": 1, "keep_last": 5},
}


Hook = Callable[[str, int, Mapping[str, Any]], Mapping[str, Any] | None]


def policy_cfg(**section_overrides: dict[str, Any]) -> ExperimentConfig:
    return config_with(POLICY_RAW, **section_overrides)


def policy_sites(tmp: Path, n: int, **policy: Any) -> dict[int, Site]:
    """``n`` sites (transport node id 100 + i) sharing one provisioned key folder."""
    keys = tmp / "keys"
    if not (keys / "roster.json").exists():
        init_identity_keys(keys, n)
    return {
        100 + i: Site(NodeOptions(tmp / f"site{i}", keys, i, partition_id=i, **policy))
        for i in range(n)
    }


class PolicyNet:
    """The coordinator's transport, in-process, as a malicious network/coordinator sees it.

    ``on_send(message_type, node, content)`` may rewrite a message (None: not delivered);
    ``on_reply(message_type, node, reply)`` may rewrite a site's reply; ``drop`` = {client:
    stage}: from that stage on the site does not answer. A handler that raises answers with the
    error text, as the Flower ClientApp does. Everything sent and answered is recorded.
    """

    def __init__(
        self,
        sites: dict[int, Site],
        *,
        drop: Mapping[int, str] | None = None,
        on_send: Hook | None = None,
        on_reply: Callable[[str, int, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.sites, self.drop = sites, dict(drop or {})
        self.on_send, self.on_reply = on_send, on_reply
        self.sent: list[tuple[str, int, Mapping[str, Any]]] = []
        self.replies: list[tuple[str, int, Reply]] = []

    def node_ids(self) -> list[int]:
        return sorted(self.sites)

    def exchange(self, message_type: str, contents: Mapping[int, Mapping[str, Any]], *,
                 timeout: float, group: str) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        stage = message_type.partition(".")[2]
        for node, content in contents.items():
            site = self.sites[node]
            at = self.drop.get(site.cid)
            if at is not None and stage in Stage.ORDER and Stage.index(stage) >= Stage.index(at):
                continue
            if self.on_send is not None:
                rewritten = self.on_send(message_type, node, content)
                if rewritten is None:
                    continue
                content = rewritten
            self.sent.append((message_type, node, content))
            reply = deliver(site, message_type, content)
            if self.on_reply is not None and isinstance(reply, dict):
                reply = self.on_reply(message_type, node, dict(reply))
            out[node] = reply
            self.replies.append((message_type, node, out[node]))
        return out


def deliver(site: Site, message_type: str, content: Mapping[str, Any]) -> Reply:
    """What the ClientApp does with one message: the handler's reply, or its error text."""
    try:
        return dispatch(site, message_type, content)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def policy_coordinator(
    cfg: ExperimentConfig, tmp: Path, net: PolicyNet, name: str = "run"
) -> Coordinator:
    opts = CoordinatorOptions(run_dir=tmp / name, keys_dir=tmp / "keys",
                              min_sites=len(net.sites))
    return Coordinator(cfg, opts, net)


def setup_content(cfg: ExperimentConfig, run_id: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "run_id": run_id, "experiment": dump_config(cfg)}


def ledger_entries(site: Site) -> list[dict[str, Any]]:
    return list(json.loads((site.options.state_dir / "privacy_ledger.json").read_text())
                ["entries"])


def first_advertise(net: PolicyNet, node: int) -> Mapping[str, Any]:
    """The first advertise_keys message sent to ``node``."""
    return next(c for t, n, c in net.sent if t == "train.advertise_keys" and n == node)


# ------------------------------------------------ deployed runs against the simulation

DEPLOY_RAW: dict[str, Any] = {
    "name": "deploy-test",
    "seed": 3,
    "device": "cpu",
    "data": {"name": "digits", "max_examples": 400, "holdout_fraction": 0.25},
    "partition": {"kind": "iid"},
    "model": {"base_channels": 8, "channel_mults": [1], "norm_groups": 4,
              "attention_levels": []},
    "diffusion": {"timesteps": 50},
    "federation": {"num_clients": 3, "rounds": 2, "fraction_fit": 1.0},
    "client": {"local_steps": 2, "batch_size": 16, "lr": 0.002},
    "strategy": {"name": "fedavg"},
    "secure_aggregation": {"protocol": "masking", "threshold": 0.5, "neighbours": "all",
                           "bits": 32, "clip_range": 1.0},
    # secure_noise false: the noise is seeded from (seed, round, client) on both paths, so the
    # deployed model can be compared with the simulation's (a rehearsal: the sites opt in with
    # --node-config allow-seeded-noise=true; threshold 0.5 with min-threshold 1/2, min-cohort 2
    # lets 3 sites survive a dropout)
    "dp": {"level": "record", "target_epsilon": 8.0, "max_grad_norm": 1.0,
           "accountant": "rdp", "secure_noise": False},
    "evaluation": {"every": 100, "fid": False, "grid_samples": 4, "sampling_steps": 5,
                   "holdout_loss_examples": 32},
    "checkpoint": {"every": 1, "keep_last": 5},
}


def deploy_cfg(**section_overrides: dict[str, Any]) -> ExperimentConfig:
    return config_with(DEPLOY_RAW, **section_overrides)


def write_cfg(path: Path, cfg: ExperimentConfig) -> Path:
    from securefed.config import dump_config

    path.write_text(dump_config(cfg))
    return path


def ckpt_params(run_dir: Path, rnd: int) -> torch.Tensor:
    payload = torch.load(run_dir / "checkpoints" / f"round_{rnd:04d}.pt", weights_only=True)
    return payload["global_params"]


def round_tolerance(line: Mapping[str, Any], init: torch.Tensor, new: torch.Tensor) -> float:
    """The masking grid's bound on one round's global model, plus float32 rounding (a round of
    several sessions, FedDiffuse usplit: the largest of its sessions' bounds, each session
    moving its own segment)."""
    info = line["protocol_info"]
    if "quantization_error_bound" not in info and "error_bound" not in info:
        return max(round_tolerance({"protocol_info": v}, init, new) for v in info.values())
    mean_delta = float((new - init).abs().max())
    # masking: the grid's bound on the sum; CKKS: its approximation + release rounding bound
    bound = info.get("quantization_error_bound", info.get("error_bound"))
    q = quantization_tolerance(bound, info["total_weight"], mean_delta)
    return q + 4 * float(torch.finfo(torch.float32).eps) * float(new.abs().max())


def assert_matches_simulation(
    cfg: ExperimentConfig, run_dir: Path, sim_dir: Path, sim_final: torch.Tensor,
    site_ledgers: list[Path], entries: int = 2, init: torch.Tensor | None = None,
) -> None:
    """A deployed (or Flower-simulated) 2-round run equals the in-process one: the global model
    within the masking grid of both rounds, and each site's ledger equals the simulation's plan
    and charges for that client (the released updates' digests aside)."""
    from securefed.builders import build_model
    from securefed.diffusion.params import get_flat

    rows = metrics_rows(run_dir)
    # round 1: same start, same seeded DP noise; only the two masking grids differ
    sim1, dep1 = ckpt_params(sim_dir, 1), ckpt_params(run_dir, 1)
    if init is None:  # the seeded initial model (public pre-training: pass the public model)
        init = get_flat(build_model(cfg, (1, 8, 8), 10))
    tol1 = 2 * round_tolerance(rows[0], init, sim1)
    # FedDDPM calibrates the summed model on the auxiliary set before it is checkpointed:
    # server-side training steps, which (like round 2's training below) amplify the sum's
    # error (the CKKS error is random: at 1x, 1 run in 4 exceeded it by up to 7%)
    room = 10.0 if cfg.fedddpm.enabled else 1.0
    assert float((dep1 - sim1).abs().max()) <= room * tol1
    assert float((dep1 - init).abs().max()) > 100 * room * tol1  # the model did move
    # round 2 trains from those (equal within tol1) models: the final models agree to the
    # grid bound of both rounds, with room for the training step's sensitivity to its start
    final = ckpt_params(run_dir, 2)
    tol2 = tol1 + 2 * round_tolerance(rows[1], sim1, sim_final)
    assert float((final - sim_final).abs().max()) <= 10 * tol2
    # ledgers: each site's own file holds exactly the simulation's plan and charges for it
    sim_ledger = json.loads((sim_dir / "privacy_ledger.json").read_text())
    for i, path in enumerate(site_ledgers):
        led = json.loads(path.read_text())
        assert list(led["clients"]) == [str(i)]
        assert led["clients"][str(i)] == sim_ledger["clients"][str(i)]
        mine = [e for e in sim_ledger["entries"] if e["client_id"] == i]
        assert len(led["entries"]) == len(mine) == entries
        # the released updates differ (masking grid, another process): so do their digests
        own = ("epsilon_after", "update_sha256")
        for a, b in zip(led["entries"], mine, strict=True):
            assert {k: v for k, v in a.items() if k not in own} == {
                k: v for k, v in b.items() if k not in own
            }
            assert len(a["update_sha256"]) == len(b["update_sha256"]) == 64
            assert a["epsilon_after"] == pytest.approx(b["epsilon_after"], rel=1e-9)
