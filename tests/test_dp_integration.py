"""Record-level DP inside the round loop: ledger, budget refusal, resume without under-count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from securefed.cli import main
from securefed.config import ClientConfig, DPConfig
from securefed.diffusion import NoiseSchedule
from securefed.privacy import PrivacyLedger, epsilon_of
from securefed.run import run_experiment
from tests.helpers import metrics_rows, tiny_config

DP = {"dp__level": "record", "dp__secure_noise": False, "dp__noise_multiplicity": 2}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_run_ledger_matches_independent_accountant(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(dp__target_epsilon=10.0, federation__rounds=3, **DP)
    res = run_experiment(cfg, tmp_path / "r", progress=False)
    assert res.finished
    ledger = PrivacyLedger.load(tmp_path / "r" / "privacy_ledger.json")
    rows = metrics_rows(tmp_path / "r")
    for cid in ledger.clients:
        plan = ledger.get_plan(cid)
        steps = sum(e.steps for e in ledger.entries if e.client_id == cid)
        assert cfg.client.local_steps is not None
        assert steps == 3 * cfg.client.local_steps  # every round charged exactly once
        independent = epsilon_of([(plan.noise_multiplier, plan.sample_rate, steps)], plan.delta)
        assert ledger.epsilon(cid) == pytest.approx(independent, rel=1e-6)
        assert ledger.epsilon(cid) <= 10.0 + 1e-6
        eps = [r["epsilon"][str(cid)] for r in rows]
        assert eps == sorted(eps) and eps[-1] == pytest.approx(ledger.epsilon(cid))
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Differential privacy" in report and (tmp_path / "r" / "privacy.png").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_budget_exhaustion_stops_cleanly(tmp_path: Path, cache_env: Path) -> None:
    # an explicit (small) noise multiplier spends a small budget within a couple of rounds
    cfg = tiny_config(dp__target_epsilon=3.0, dp__noise_multiplier=0.6, federation__rounds=8, **DP)
    res = run_experiment(cfg, tmp_path / "r", progress=False)
    assert res.finished and res.rounds_completed < 8
    stopped = json.loads((tmp_path / "r" / "stopped.json").read_text())
    assert "exhausted" in stopped["reason"]
    ledger = PrivacyLedger.load(tmp_path / "r" / "privacy_ledger.json")
    for cid in ledger.clients:
        assert ledger.epsilon(cid) <= 3.0 + 1e-6  # never over the budget
    rows = metrics_rows(tmp_path / "r")
    assert any(r.get("budget_exhausted") for r in rows) or res.rounds_completed < 8


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_resume_neither_double_counts_nor_forgets(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(dp__target_epsilon=8.0, federation__rounds=3, **DP)
    full = run_experiment(cfg, tmp_path / "full", progress=False, write_report=False)
    run_experiment(cfg, tmp_path / "part", progress=False, stop_after_round=1)
    # a crash after round 2 was charged but before its checkpoint: the charge is on disk
    resumed = run_experiment(cfg, tmp_path / "part", resume=True, progress=False)
    a = PrivacyLedger.load(tmp_path / "full" / "privacy_ledger.json")
    b = PrivacyLedger.load(tmp_path / "part" / "privacy_ledger.json")
    for cid in a.clients:
        assert b.epsilon(cid) == pytest.approx(a.epsilon(cid), rel=1e-9)
        assert b.history(cid) == a.history(cid)
    assert torch.equal(resumed.final_params, full.final_params)


def test_secure_noise_run_and_key_file(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(dp__level="record", dp__target_epsilon=10.0, federation__rounds=1)
    assert run_experiment(cfg, tmp_path / "r", progress=False, write_report=False).finished
    key = tmp_path / "r" / "secrets" / "dp_noise.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dp_training_decreases_holdout_loss(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(dp__target_epsilon=10.0, federation__rounds=5, client__local_steps=8,
                      client__batch_size=32, federation__num_clients=2, **DP)
    rows = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False).metrics
    assert rows[-1]["holdout_loss"] < 0.8 * rows[0]["holdout_loss"]


def test_batchnorm_model_is_refused_naming_the_layer() -> None:
    from securefed.client.dp import DPLocalTrainer

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    sched = NoiseSchedule.from_config(tiny_config().diffusion)
    for engine in ("fast", "opacus"):
        dp = DPConfig(level="record", target_epsilon=1.0, engine=engine)
        with pytest.raises(Exception, match=r"(?i)batchnorm|'1'"):
            DPLocalTrainer(model, sched, ClientConfig(local_steps=1), dp, torch.device("cpu"))


def test_budget_cli(tmp_path: Path, cache_env: Path, capsys) -> None:
    assert main(["budget", "--target-epsilon", "4", "--delta", "1e-5", "--sample-rate", "0.1",
                 "--steps", "500"]) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("noise multiplier ")[1].split()[0])
    assert main(["budget", "--noise-multiplier", str(sigma), "--delta", "1e-5", "--sample-rate",
                 "0.1", "--steps", "500"]) == 0
    eps = float(capsys.readouterr().out.split("epsilon ")[1].split()[0])
    assert eps == pytest.approx(4.0, abs=0.05)
    cfg = tiny_config(dp__level="record", dp__target_epsilon=10.0, federation__rounds=1)
    run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    assert main(["budget", str(tmp_path / "r")]) == 0
    assert "client" in capsys.readouterr().out.lower()
    assert main(["budget", str(tmp_path)]) == 2
