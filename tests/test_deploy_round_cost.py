"""experiments/benchmarks/deploy_round_cost.py: the stage timeline read from the workers' logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import load_script

W = "INFO securefed.deploy.worker"


def _log(path: Path, events: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"2026-12-02 10:00:{t} {W}: {e}\n" for t, e in events)
                    + f"2026-12-02 10:00:09,000 {W}: securefed site worker: unrelated\n")


def test_stage_timeline_splits_a_stage_into_task_and_gap(tmp_path: Path) -> None:
    mod = load_script("benchmarks/deploy_round_cost")
    # two sites, a setup query (not a training stage) then two training stages; site 1 is the
    # last to reply to stage 1 (at 02.300) and site 0 the first to take stage 2 (at 02.500)
    _log(tmp_path / "site_0_worker.log", [
        ("00,000", "task 1 acquired"),
        ("00,500", "task 1 (query.setup) completed in 0.500 s (steps 0.1 0.3 0.05 0.05)"),
        ("02,000", "task 2 acquired"),
        ("02,100", "task 2 (train.share_keys) completed in 0.100 s (steps 0.04 0.03 0.02 0.01)"),
        ("02,500", "task 3 acquired"),
        ("02,600", "task 3 (train.masked_input) completed in 0.100 s (steps 0.04 0.03 0.02 0.01)"),
    ])
    _log(tmp_path / "site_1_worker.log", [
        ("00,000", "task 7 acquired"),
        ("00,400", "task 7 (query.setup) completed in 0.400 s (steps 0.1 0.2 0.05 0.05)"),
        ("02,000", "task 8 acquired"),
        ("02,300", "task 8 (train.share_keys) completed in 0.300 s (steps 0.2 0.05 0.04 0.01)"),
        ("02,600", "task 9 acquired"),
        ("02,700", "task 9 (train.masked_input) completed in 0.100 s (steps 0.04 0.03 0.02 0.01)"),
    ])
    got = mod.stage_timeline(tmp_path)
    assert got["stages"] == 2
    assert got["gap"] == pytest.approx(0.2, abs=1e-6)  # 02.500 - 02.300
    assert got["task"] == pytest.approx(0.1)  # median of 0.1, 0.1, 0.3, 0.1
    assert got["pull"] == pytest.approx(0.04) and got["push"] == pytest.approx(0.02)


def test_stage_timeline_is_empty_without_two_training_stages(tmp_path: Path) -> None:
    mod = load_script("benchmarks/deploy_round_cost")
    _log(tmp_path / "site_0_worker.log", [
        ("00,000", "task 1 acquired"),
        ("00,500", "task 1 (query.setup) completed in 0.500 s (steps 0.1 0.3 0.05 0.05)"),
    ])
    assert mod.stage_timeline(tmp_path) == {}
