"""End to end: run directory, exact resume, dropouts, CLI, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from securefed.artefacts.checkpoint import CheckpointError
from securefed.builders import prepare_data
from securefed.cli import main
from securefed.run import run_experiment
from tests.helpers import metrics_rows, tiny_config, tiny_raw


def test_run_directory_contents(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config()
    res = run_experiment(cfg, tmp_path / "run", progress=False)
    run = res.run_dir
    assert res.finished and res.rounds_completed == 3
    for name in [
        "config.yaml",
        "metrics.jsonl",
        "label_histogram.json",
        "model.json",
        "report.md",
        "curves.png",
        "label_histogram.png",
        "checkpoints/latest.json",
    ]:
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "holdout.png",  # real holdout images beside the grids (the report's first screen)
        "round_0001.png",
        "round_0002.png",
        "round_0003.png",
    ]
    lines = metrics_rows(run)
    assert [r["round"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["participants"] == [0, 1, 2]
        assert r["mean_local_loss"] > 0 and r["holdout_loss"] > 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert {"train", "aggregate", "eval_loss", "round_total"} <= set(r["seconds"])
    hist = json.loads((run / "label_histogram.json").read_text())
    assert sum(map(sum, hist["counts"])) == hist["members"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["federation"]["rounds"] == 3 and saved["secure_aggregation"]["protocol"] == "plain"
    assert "![samples]" in (run / "report.md").read_text()


def test_training_reduces_holdout_loss(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(federation__rounds=6, client__local_steps=10)
    rows = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False).metrics
    assert rows[-1]["holdout_loss"] < rows[0]["holdout_loss"]


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_resume_reproduces_uninterrupted_run(
    tmp_path: Path, cache_env: Path, strategy: str
) -> None:
    cfg = tiny_config(
        strategy__name=strategy,
        strategy__ema_decay=0.5,
        strategy__server_momentum=0.5,
        federation__dropout_prob=0.3,
        federation__rounds=4,
        federation__fraction_fit=0.7,
    )
    full = run_experiment(cfg, tmp_path / "full", progress=False, write_report=False)
    part = run_experiment(cfg, tmp_path / "part", progress=False, stop_after_round=2)
    assert not part.finished and part.rounds_completed == 2
    resumed = run_experiment(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed.finished
    assert torch.equal(resumed.final_params, full.final_params)
    a, b = metrics_rows(tmp_path / "full"), metrics_rows(tmp_path / "part")
    assert [r["round"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["participants"] == y["participants"] and x["holdout_loss"] == y["holdout_loss"]


def test_resume_drops_metrics_after_checkpoint(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(federation__rounds=3)
    run_experiment(cfg, tmp_path / "r", progress=False, stop_after_round=2)
    m = tmp_path / "r" / "metrics.jsonl"
    # a round that was logged but never checkpointed (killed in between) is replayed
    m.write_text(m.read_text() + json.dumps({"round": 3, "holdout_loss": 9.9}) + "\n")
    run_experiment(cfg, tmp_path / "r", resume=True, progress=False, write_report=False)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[-1]["holdout_loss"] != 9.9


def test_resume_refuses_changed_config_and_existing_dir(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(federation__rounds=2)
    run_experiment(cfg, tmp_path / "r", progress=False, stop_after_round=1)
    with pytest.raises(FileExistsError, match="--resume"):
        run_experiment(cfg, tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match="differs"):
        run_experiment(
            tiny_config(federation__rounds=2, seed=9), tmp_path / "r", resume=True, progress=False
        )
    with pytest.raises(CheckpointError, match=r"no config\.yaml"):
        run_experiment(cfg, tmp_path / "empty", resume=True, progress=False)


def test_dropouts_and_abandoned_rounds(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(federation__dropout_prob=0.9, federation__rounds=4)
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    rows = res.metrics
    assert any(r["dropped"] for r in rows)
    for r in rows:
        assert set(r["participants"]).isdisjoint(r["dropped"])
        if not r["participants"]:
            assert "abandoned" in r


def test_partition_covers_members_and_never_holdout(cache_env: Path) -> None:
    cfg = tiny_config(federation__num_clients=4)
    data = prepare_data(cfg)
    idx = torch.cat([torch.as_tensor(p) for p in data.parts])
    assert len(idx) == len(torch.unique(idx)) == len(data.members)
    assert len(data.holdout) == pytest.approx(0.25 * 400, abs=10)


def test_class_conditional_and_centralised(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(
        model__class_conditional=True,
        federation__num_clients=1,
        partition__kind="iid",
        federation__rounds=1,
    )
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    assert res.finished


def test_cli_run_sample_report(tmp_path: Path, cache_env: Path, capsys) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw()))
    run = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(cfg_path),
                "--out",
                str(run),
                "--no-progress",
                "--stop-after-round",
                "1",
                "--set",
                "federation.rounds=2",
            ]
        )
        == 0
    )
    assert "securefed run --resume" in capsys.readouterr().out
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "report:" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "-n", "9", "--out", str(out), "--steps", "3"]) == 0
    assert out.exists() and out.stat().st_size > 0
    assert main(["sample", str(run), "-n", "2", "--out", str(out), "--sampler", "ddpm"]) == 0
    assert main(["report", str(run)]) == 0
    # errors are one clear line and exit code 2, not a traceback
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["run", str(cfg_path), "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
