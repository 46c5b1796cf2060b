"""FedDDPM / FedDDPM+: apportionment, auxiliary set, calibration wrapper, detector, DP, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.builders import prepare_data
from securefed.config import ConfigError, FedDDPMConfig, StrategyConfig
from securefed.privacy import PrivacyLedger
from securefed.run import run_experiment
from securefed.strategies import FedAvg, Scaffold
from securefed.strategies.fedddpm import CalibrationResult, FedDDPM, allocate_proportional
from securefed.strategies.fedddpm_plus import (
    FedDDPMPlus,
    SlowLearningDetector,
    drive,
    relative_improvement,
)
from tests.helpers import one_cohort, tiny_config

D64 = torch.float64


def _fd(**kw: Any) -> dict[str, Any]:
    base = {
        "fedddpm__enabled": True,
        "fedddpm__aux_total": 48,
        "fedddpm__pretrain_epochs": 0.3,
        "fedddpm__aux_sampling_steps": 3,
        "fedddpm__calibration_steps": 2,
        "fedddpm__server_batch_size": 16,
        "fedddpm__allow_non_dp_uploads": True,
        "federation__rounds": 2,
    }
    base.update(kw)
    return base


# ---------------------------------------------------------------- pure maths
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=500), min_size=1, max_size=12).filter(
        lambda w: sum(w) > 0
    ),
    st.integers(min_value=0, max_value=5000),
)
def test_allocate_proportional_is_exact_and_within_one_of_quota(w: list[int], total: int) -> None:
    n = allocate_proportional(w, total)
    assert n.sum() == total and (n >= 0).all()
    quota = np.asarray(w, dtype=float) / sum(w) * total
    assert np.all(np.abs(n - quota) < 1.0)
    assert np.all(n[np.asarray(w) == 0] == 0)


def test_allocate_proportional_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        allocate_proportional([0, 0], 5)
    with pytest.raises(ValueError, match="weights"):
        allocate_proportional([1, -1], 5)


def test_detector_fires_only_on_slow_learning() -> None:
    det = SlowLearningDetector(window=2, threshold=0.05, max_corrections=2)
    # improving 10% per 2 rounds, then flat: fires at the 6th loss, history restarts
    losses = [1.0, 0.95, 0.90, 0.86, 0.85, 0.849, 0.848, 0.847, 0.846]
    fired = [d.fire for d in drive(det, losses)]
    assert fired == [False, False, False, False, False, True, False, False, True]
    assert det.corrections == 2
    # a third plateau: max_corrections reached, never fires again
    assert not any(d.fire for d in drive(det, [0.846] * 5))
    assert relative_improvement(2.0, 1.0) == 0.5 and relative_improvement(0.0, 1.0) == 0.0


def test_detector_state_round_trip() -> None:
    a = SlowLearningDetector(window=3, threshold=0.01)
    drive(a, [1.0, 0.9, 0.8])
    b = SlowLearningDetector(window=3, threshold=0.01)
    b.load(a.state())
    assert [x.fire for x in drive(a, [0.79, 0.79])] == [x.fire for x in drive(b, [0.79, 0.79])]


# ---------------------------------------------------------------- wrapper, scripted calibrator
class _ScriptedCalibrator:
    """Stands in for ServerCalibrator: scripted holdout losses, records calibrations."""

    def __init__(self, losses: list[float]) -> None:
        self.losses = list(losses)
        self.calls: list[tuple[int, int]] = []

    def holdout_loss(self, params: torch.Tensor) -> float:
        return self.losses.pop(0)

    def calibrate(
        self, params: torch.Tensor, steps: int, rnd: int, *, use_all: bool = False
    ) -> CalibrationResult:
        self.calls.append((rnd, steps))
        return CalibrationResult(params + 1.0, steps, 0.5, 0.01)


def _sums(d: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"delta": torch.randn(d, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("base_cls", [FedAvg, Scaffold])
def test_wrapper_with_zero_calibration_steps_is_the_base_aggregation(base_cls: Any) -> None:
    scfg = StrategyConfig(ema_decay=0.5, server_momentum=0.3)
    plain, base = base_cls(scfg, 4, 10.0), base_cls(scfg, 4, 10.0)
    cal = _ScriptedCalibrator([])
    wrapped = FedDDPM(base, FedDDPMConfig(enabled=True, calibration_steps=0), cal)  # type: ignore[arg-type]
    x_a = x_b = torch.zeros(7)
    for rnd in (1, 2, 3):
        sums = _sums(7, rnd)
        if base_cls is Scaffold:
            sums["control_delta"] = _sums(7, 100 + rnd)["delta"]
            plain.broadcast(x_a), wrapped.broadcast(x_b)
        x_a = plain.aggregate(rnd, x_a, one_cohort(sums, 0.8, 3))
        x_b = wrapped.aggregate(rnd, x_b, one_cohort(sums, 0.8, 3))
        assert torch.equal(x_a, x_b)
        assert torch.equal(plain.eval_params(x_a), wrapped.eval_params(x_b))
    assert cal.calls == [] and wrapped.round_metrics()["server_steps_total"] == 0


def test_wrapper_calibrates_every_round_and_keeps_ema_consistent() -> None:
    scfg = StrategyConfig(ema_decay=0.5)
    cal = _ScriptedCalibrator([])
    w = FedDDPM(FedAvg(scfg, 3), FedDDPMConfig(enabled=True, calibration_steps=7), cal)  # type: ignore[arg-type]
    x = w.aggregate(1, torch.zeros(4), one_cohort({"delta": torch.ones(4, dtype=D64)}, 1.0, 2))
    x = x.float()
    assert torch.allclose(x, torch.full((4,), 2.0))  # base step (+1) then the calibration (+1)
    assert cal.calls == [(1, 7)]
    assert torch.allclose(w.eval_params(x).float(), x)  # EMA starts at the calibrated model
    x = w.aggregate(2, x, one_cohort({"delta": torch.zeros(4, dtype=D64)}, 1.0, 2)).float()
    assert cal.calls == [(1, 7), (2, 7)] and w.round_metrics()["server_steps_total"] == 14
    assert torch.allclose(w.eval_params(x).float(), torch.full((4,), 2.5))  # 0.5*2 + 0.5*3


def test_fedddpm_plus_corrects_only_when_the_detector_fires() -> None:
    # window 1, threshold 2%: plateaus at rounds 4 and 6 (round 5 refills the window)
    losses = [1.0, 0.8, 0.6, 0.595, 0.59, 0.589, 0.3]
    cal = _ScriptedCalibrator(losses)
    cfg = FedDDPMConfig(
        enabled=True, variant="fedddpm_plus", detector_window=1, detector_threshold=0.02,
        correction_steps=11, calibration_steps=5, max_corrections=2,
    )
    w = FedDDPMPlus(FedAvg(StrategyConfig(), 3), cfg, cal)  # type: ignore[arg-type]
    x = torch.zeros(3)
    infos = []
    for rnd in range(1, 8):
        x = w.aggregate(rnd, x, one_cohort({"delta": torch.zeros(3, dtype=D64)}, 1.0, 2))
        infos.append(w.round_metrics())
    assert cal.calls == [(4, 11), (6, 11)]
    fired = [bool(i["detector"]["fired"]) for i in infos]  # type: ignore[index]
    assert fired == [False, False, False, True, False, True, False]
    assert "corrected" in infos[3] and "corrected" not in infos[2]
    assert infos[-1]["server_steps_saved_vs_fedddpm"] == 7 * 5 - 22


# ---------------------------------------------------------------- config
def test_model_upload_without_dp_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"fedddpm\.upload.*allow_non_dp_uploads"):
        tiny_config(fedddpm__enabled=True, fedddpm__upload="model")
    tiny_config(fedddpm__enabled=True, fedddpm__upload="model", fedddpm__allow_non_dp_uploads=True)
    tiny_config(fedddpm__enabled=True, fedddpm__upload="samples")  # allowed, warned at run time
    tiny_config(
        fedddpm__enabled=True, fedddpm__upload="model", dp__level="record", dp__target_epsilon=8
    )
    with pytest.raises(ConfigError, match=r"fedddpm\.calibration_steps"):
        tiny_config(fedddpm__calibration_steps=-1)
    with pytest.raises(ConfigError, match=r"fedddpm\.bogus: unknown key"):
        tiny_config(fedddpm__bogus=1)


# ---------------------------------------------------------------- end to end
def test_aux_set_follows_client_sizes_and_is_stored(tmp_path: Path) -> None:
    cfg = tiny_config(**_fd(fedddpm__aux_total=50))
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=True)
    aux_dir = res.run_dir / "auxiliary"
    with np.load(aux_dir / "auxiliary.npz") as z:
        images, labels, client = z["images"], z["labels"], z["client"]
    sizes = [len(p) for p in prepare_data(cfg).parts]
    expected = allocate_proportional(sizes, 50)
    assert np.bincount(client, minlength=3).tolist() == expected.tolist()
    assert images.dtype == np.float32 and images.shape == (50, 1, 8, 8)
    assert labels.dtype == np.int64 and client.dtype == np.int64
    assert images.min() >= -1 and images.max() <= 1
    assert (aux_dir / "grid.png").exists()
    meta = json.loads((aux_dir / "meta.json").read_text())
    assert [meta["clients"][str(c)]["aux_images"] for c in range(3)] == expected.tolist()
    for r in res.metrics:
        assert r["server"]["server_steps"] == 2 and r["server"]["server_seconds"] > 0
    assert "auxiliary/grid.png" in (res.run_dir / "report.md").read_text()


def test_calibration_zero_run_equals_plain_fedavg_run(tmp_path: Path) -> None:
    plain = run_experiment(
        tiny_config(federation__rounds=2), tmp_path / "a", progress=False, write_report=False
    )
    wrapped = run_experiment(
        tiny_config(**_fd(fedddpm__calibration_steps=0)),
        tmp_path / "b", progress=False, write_report=False,
    )
    assert torch.equal(plain.final_params, wrapped.final_params)
    assert all(r["server"]["server_steps"] == 0 for r in wrapped.metrics)


def test_fedddpm_plus_that_never_fires_is_plain_fedavg(tmp_path: Path) -> None:
    """FedDDPM+ without a correction changes nothing: phase 0 restores the initial model, the
    detector's aux-holdout evaluation touches neither the global model, the EMA nor any seed
    stream, so the final and evaluated parameters are bit-identical to FedAvg's (the hetero
    FedDDPM+ vs FedAvg gap in docs/results.md came from comparing runs of different code
    versions)."""
    plain = run_experiment(
        tiny_config(federation__rounds=2, strategy__ema_decay=0.5), tmp_path / "a",
        progress=False, write_report=False,
    )
    plus = run_experiment(
        tiny_config(**_fd(fedddpm__variant="fedddpm_plus", fedddpm__detector_window=5,
                          strategy__ema_decay=0.5)),
        tmp_path / "b", progress=False, write_report=False,
    )
    assert torch.equal(plain.final_params, plus.final_params)
    assert all(r["server"]["server_steps"] == 0 for r in plus.metrics)
    assert all(not r["server"]["detector"]["fired"] for r in plus.metrics)
    for a, b in zip(plain.metrics, plus.metrics, strict=True):
        assert a["mean_local_loss"] == b["mean_local_loss"]
        assert a.get("holdout_loss") == b.get("holdout_loss")  # the EMA model, evaluated


def test_pretrain_is_charged_and_planned(tmp_path: Path) -> None:
    dp = {"dp__level": "record", "dp__target_epsilon": 8.0, "dp__secure_noise": False}
    res = run_experiment(
        tiny_config(**_fd(**dp)), tmp_path / "r", progress=False, write_report=False
    )
    ledger = PrivacyLedger.load(res.run_dir / "privacy_ledger.json")
    cfg = tiny_config(**_fd(**dp))
    from securefed.federation.auxiliary import pretrain_steps_for

    for cid, idx in enumerate(prepare_data(cfg).parts):
        pre = [e for e in ledger.entries if e.client_id == cid and e.phase == "pretrain"]
        steps = pretrain_steps_for(cfg, len(idx))
        assert len(pre) == 1 and pre[0].round == 0 and pre[0].steps == steps
        plan = ledger.get_plan(cid)
        assert plan.planned_steps == steps + 2 * 3  # pretrain + rounds x local steps
        assert ledger.epsilon(cid) <= 8.0
    # the calibration covers the pretrain: a higher noise multiplier than rounds alone
    from securefed.client.dp import sample_rate_for
    from securefed.privacy import calibrate_noise_multiplier

    n0 = len(prepare_data(cfg).parts[0])
    rounds_only = calibrate_noise_multiplier(
        8.0, ledger.get_plan(0).delta, sample_rate_for(cfg.client, n0), 2 * 3, "prv"
    )
    assert ledger.get_plan(0).noise_multiplier > rounds_only


def test_class_conditional_histogram_release_is_charged(tmp_path: Path) -> None:
    kw = _fd(
        dp__level="record", dp__target_epsilon=8.0, dp__secure_noise=False,
        model__class_conditional=True, federation__rounds=1,
    )
    res = run_experiment(tiny_config(**kw), tmp_path / "r", progress=False, write_report=False)
    ledger = PrivacyLedger.load(res.run_dir / "privacy_ledger.json")
    hist = [e for e in ledger.entries if e.phase == "histogram"]
    assert len(hist) == 3 and all(e.sample_rate == 1.0 and e.noise_multiplier == 10.0
                                  for e in hist)
    meta = json.loads((res.run_dir / "auxiliary" / "meta.json").read_text())
    for c in meta["clients"].values():
        assert sum(c["class_counts"]) == c["aux_images"]
    assert all(ledger.epsilon(c) <= 8.0 for c in range(3))


def test_resume_is_exact_and_reloads_the_aux_set(tmp_path: Path) -> None:
    kw = _fd(
        federation__rounds=2, fedddpm__variant="fedddpm_plus", fedddpm__detector_window=1,
        fedddpm__detector_threshold=0.5, fedddpm__correction_steps=3,
    )
    full = run_experiment(tiny_config(**kw), tmp_path / "full", progress=False,
                          write_report=False)
    run = tmp_path / "part"
    run_experiment(tiny_config(**kw), run, progress=False, write_report=False,
                   stop_after_round=1)
    stamp = (run / "auxiliary" / "auxiliary.npz").stat().st_mtime_ns
    resumed = run_experiment(tiny_config(**kw), run, resume=True, progress=False,
                             write_report=False)
    assert (run / "auxiliary" / "auxiliary.npz").stat().st_mtime_ns == stamp  # not rebuilt
    assert torch.equal(full.final_params, resumed.final_params)
    def steps(rows: list[dict[str, Any]]) -> list[Any]:
        return [{k: v for k, v in r["server"].items() if "seconds" not in k} for r in rows]

    assert steps(full.metrics) == steps(resumed.metrics)
    (run / "auxiliary" / "auxiliary.npz").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum"):
        run_experiment(tiny_config(**kw), run, resume=True, progress=False, write_report=False)


# ---------------------------------------------------------------- persistent server optimizer
def _real_calibrator(state: str, seed: int = 0) -> Any:
    from securefed.builders import build_model
    from securefed.diffusion import NoiseSchedule
    from securefed.seeds import Purpose, derive_seed
    from securefed.strategies.fedddpm import ServerCalibrator, split_holdout

    cfg = tiny_config()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    tr, ho = split_holdout(40, 0.2, 1)
    fd = FedDDPMConfig(
        enabled=True, server_batch_size=8, server_lr=1e-3, server_optimizer_state=state
    )
    return ServerCalibrator(
        build_model(cfg, (1, 8, 8), 10), NoiseSchedule.from_config(cfg.diffusion), images,
        torch.zeros(40, dtype=torch.long), tr, ho, fd, torch.device("cpu"), seed, False,
        derive=derive_seed, purpose_calibrate=Purpose.CALIBRATE, purpose_eval=Purpose.AUX_EVAL,
    )


def test_persistent_server_optimizer_state_resumes_exactly() -> None:
    from securefed.diffusion.params import get_flat

    a = _real_calibrator("persistent")
    p0 = get_flat(a.model).clone()
    p1 = a.calibrate(p0, 3, rnd=1).params
    p2 = a.calibrate(p1, 3, rnd=2).params
    assert float(a.optimizer_state()["0.step"]) == 6  # one optimizer across both rounds

    b = _real_calibrator("persistent")  # "killed" after round 1 ...
    b1 = b.calibrate(p0, 3, rnd=1).params
    saved = {k: v.clone() for k, v in b.optimizer_state().items()}
    assert float(saved["0.step"]) == 3 and torch.equal(b1, p1)
    c = _real_calibrator("persistent")  # ... and resumed in a new process
    c.load_optimizer_state(saved)
    assert torch.equal(c.calibrate(b1, 3, rnd=2).params, p2)

    fresh = _real_calibrator("fresh")  # the ablation: a new Adam every round
    f1 = fresh.calibrate(p0, 3, rnd=1).params
    assert torch.equal(f1, p1) and fresh.optimizer_state() == {}
    assert not torch.equal(fresh.calibrate(f1, 3, rnd=2).params, p2)
    with pytest.raises(ValueError, match="parameters the model does not have"):
        c.load_optimizer_state({"9999.step": torch.tensor(1.0)})
    bad = dict(saved)
    bad["0.exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"0\.exp_avg has shape \(3,\)"):
        c.load_optimizer_state(bad)


def test_calibration_budget_as_a_fraction_of_client_compute() -> None:
    cal = _ScriptedCalibrator([])
    fd = FedDDPMConfig(enabled=True, calibration_fraction=0.25, server_batch_size=16)
    w = FedDDPM(FedAvg(StrategyConfig(), 3), fd, cal, client_examples_per_round=640)  # type: ignore[arg-type]
    assert w.steps_per_round == 10  # 0.25 x 640 examples / 16 per server step
    x = torch.zeros(3)
    for rnd in (1, 2):
        x = w.aggregate(rnd, x, one_cohort({"delta": torch.zeros(3, dtype=D64)}, 1.0, 2))
    assert cal.calls == [(1, 10), (2, 10)]
    m = w.round_metrics()
    assert m["server_examples_total"] == 320 and m["server_vs_client_examples"] == 0.25
    with pytest.raises(ValueError, match="calibration_fraction"):
        FedDDPM(FedAvg(StrategyConfig(), 3), fd, cal)  # type: ignore[arg-type]


def test_resume_with_persistent_server_optimizer_is_exact(tmp_path: Path) -> None:
    from securefed.artefacts.checkpoint import load_latest

    kw = _fd(federation__rounds=3, fedddpm__calibration_fraction=0.5)
    full = run_experiment(tiny_config(**kw), tmp_path / "full", progress=False,
                          write_report=False)
    run = tmp_path / "part"
    run_experiment(tiny_config(**kw), run, progress=False, write_report=False,
                   stop_after_round=1)
    ckpt = load_latest(run / "checkpoints")
    assert any(k.startswith("fedddpm.opt.") for k in ckpt.strategy)  # Adam moments saved
    resumed = run_experiment(tiny_config(**kw), run, resume=True, progress=False,
                             write_report=False)
    assert torch.equal(full.final_params, resumed.final_params)
    last = full.metrics[-1]["server"]
    # 3 clients x 3 steps x batch 16 = 144 client examples per round; round(0.5 x 144 / 16) = 4
    # server steps of 16: 64 / 144 of the client compute (the integer step rounds the fraction)
    assert last["server_vs_client_examples"] == pytest.approx(64 / 144, abs=1e-4)
    assert last["server_steps_total"] == 12
