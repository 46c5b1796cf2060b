"""FedDiffuse: what leaves the client, per-segment aggregation, exchange counts, resume."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import securefed.run as run_mod
from securefed.builders import build_model, prepare_data
from securefed.config import ConfigError
from securefed.diffusion.params import param_slices
from securefed.run import run_experiment
from securefed.secagg import AggregationProtocol, build_protocol
from securefed.secagg.base import AggregationResult
from securefed.strategies.feddiffuse import group_indices, pair_clients, shared_groups
from tests.helpers import tiny_config


class _Recording(AggregationProtocol):
    """Wraps the configured protocol and records every input vector it is handed."""

    name = "recording"

    def __init__(self, inner: AggregationProtocol, log: list[dict[int, np.ndarray]]) -> None:
        self.inner = inner
        self.log = log
        self.dropout_stages = inner.dropout_stages  # type: ignore[misc]

    def aggregate(
        self,
        round_id: int,
        inputs: Mapping[int, np.ndarray],
        dropouts: Mapping[int, str] | None = None,
        *,
        noise: Any = None,
    ) -> AggregationResult:
        self.log.append({c: v.copy() for c, v in inputs.items()})
        return self.inner.aggregate(round_id, inputs, dropouts, noise=noise)


def _record(monkeypatch: pytest.MonkeyPatch) -> list[dict[int, np.ndarray]]:
    log: list[dict[int, np.ndarray]] = []

    def build(cfg: Any, n: int) -> AggregationProtocol:
        return _Recording(build_protocol(cfg, n), log)

    monkeypatch.setattr(run_mod, "build_protocol", build)
    return log


def _groups(variant: str = "udec") -> tuple[dict[str, torch.Tensor], int]:
    cfg = tiny_config()
    model = build_model(cfg, (1, 8, 8), 10)
    g = group_indices(param_slices(model), model.parameter_groups())
    return g, sum(p.numel() for p in model.parameters())


def test_groups_partition_the_parameter_vector() -> None:
    g, d = _groups()
    allidx = torch.sort(torch.cat(list(g.values()))).values
    assert torch.equal(allidx, torch.arange(d))
    assert shared_groups("udec") == ("decoder",)
    assert shared_groups("ulatdec") == ("bottleneck", "decoder")
    with pytest.raises(ValueError, match=r"feddiffuse\.variant"):
        shared_groups("nope")


def test_pairing_is_random_and_covers_every_client() -> None:
    seen = set()
    for seed in range(6):
        a = pair_clients([0, 1, 2, 3, 4], np.random.default_rng(seed))
        assert sorted(a) == [0, 1, 2, 3, 4]
        segs = [s for v in a.values() for s in v]
        assert segs.count("front") == 3 and segs.count("back") == 3  # odd one sends both
        seen.add(tuple(sorted(c for c, v in a.items() if v == ("front",))))
    assert len(seen) > 1


@pytest.mark.parametrize("variant", ["udec", "ulatdec"])
def test_local_groups_never_reach_the_protocol(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _record(monkeypatch)
    cfg = tiny_config(
        feddiffuse__enabled=True, feddiffuse__variant=variant, federation__rounds=2,
        secure_aggregation__protocol="masking", secure_aggregation__threshold=2,
    )
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    g, d = _groups()
    shared = sum(g[k].numel() for k in shared_groups(variant))
    local_idx = torch.cat([g[k] for k in ("encoder", "bottleneck", "decoder")
                           if k not in shared_groups(variant)])
    assert len(log) == 2
    for inputs in log:
        assert sorted(inputs) == [0, 1, 2]
        assert all(v.shape == (shared + 1,) for v in inputs.values())  # shared + weight only
    init = build_model(cfg, (1, 8, 8), 10)
    init_flat = torch.cat([p.detach().reshape(-1) for p in init.parameters()])
    # the server's copy of the local groups never moved; every client's own copy did
    assert torch.equal(res.final_params[local_idx], init_flat[local_idx])
    for r in res.metrics:
        assert r["exchange"]["params_up"] == 3 * (shared + 1)
    assert res.metrics[0]["exchange"]["params_down"] == 3 * d  # first contact: whole model
    assert res.metrics[1]["exchange"]["params_down"] == 3 * shared
    assert set(res.metrics[-1]["holdout_loss_clients"]) == {"0", "1", "2"}


def test_usplit_runs_one_session_per_half(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = _record(monkeypatch)
    cfg = tiny_config(
        feddiffuse__enabled=True, feddiffuse__variant="usplit", federation__num_clients=4,
        federation__rounds=2,
    )
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    g, d = _groups()
    front = g["encoder"].numel() + g["bottleneck"].numel()
    back = g["decoder"].numel()
    assert len(log) == 4  # two sessions per round
    for rnd in range(2):
        sessions = log[2 * rnd : 2 * rnd + 2]
        lengths = sorted({v.shape[0] for s in sessions for v in s.values()})
        assert lengths == sorted([front + 1, back + 1])
        members = [sorted(s) for s in sessions]
        assert sorted(members[0] + members[1]) == [0, 1, 2, 3]  # each client sends one half
        assert res.metrics[rnd]["exchange"]["params_up"] == 2 * (front + 1) + 2 * (back + 1)
        assert res.metrics[rnd]["exchange"]["params_down"] == 4 * d


def test_full_variant_equals_fedavg(tmp_path: Path) -> None:
    a = run_experiment(tiny_config(federation__rounds=2), tmp_path / "a", progress=False,
                       write_report=False)
    b = run_experiment(
        tiny_config(federation__rounds=2, feddiffuse__enabled=True, feddiffuse__variant="full"),
        tmp_path / "b", progress=False, write_report=False,
    )
    assert torch.equal(a.final_params, b.final_params)
    assert [r["exchange"] for r in a.metrics] == [r["exchange"] for r in b.metrics]


def test_resume_keeps_local_parts_exact(tmp_path: Path) -> None:
    kw = {"feddiffuse__enabled": True, "feddiffuse__variant": "udec", "federation__rounds": 3}
    full = run_experiment(tiny_config(**kw), tmp_path / "f", progress=False, write_report=False)
    run = tmp_path / "p"
    run_experiment(tiny_config(**kw), run, progress=False, write_report=False,
                   stop_after_round=1)
    res = run_experiment(tiny_config(**kw), run, resume=True, progress=False,
                         write_report=False)
    assert torch.equal(full.final_params, res.final_params)
    assert full.metrics[-1]["holdout_loss_clients"] == res.metrics[-1]["holdout_loss_clients"]
    assert len(prepare_data(tiny_config(**kw)).parts) == 3


def test_personal_quality_reports_mean_and_worst(tmp_path: Path) -> None:
    from securefed.federation.simulation import SimulationEvaluation

    fids = {0: 10.0, 1: 30.0, 2: 20.0}

    class _S:
        def evaluate_quality(self, rnd: int, p: torch.Tensor) -> dict[str, Any]:
            c = int(p[0])
            return {"fid": fids[c], "precision": 0.1 * c, "note": "x"}

    out = SimulationEvaluation._personal_quality(
        _S(), 1, {c: torch.tensor([float(c)]) for c in fids}  # type: ignore[arg-type]
    )
    assert out["fid"] == pytest.approx(20.0) and out["fid_worst"] == 30.0
    assert out["precision"] == pytest.approx(0.1) and "note" not in out
    assert out["fid_clients"] == {"0": 10.0, "1": 30.0, "2": 20.0}


def test_config_refusals() -> None:
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        tiny_config(feddiffuse__enabled=True, strategy__name="scaffold")
    with pytest.raises(ConfigError, match="enable only one"):
        tiny_config(feddiffuse__enabled=True, fedddpm__enabled=True)
    with pytest.raises(ConfigError, match="variant"):
        tiny_config(feddiffuse__variant="half")
