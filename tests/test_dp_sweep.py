"""experiments/dp_sweep.py: seeds and the DP-lever configs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from securefed.config import load_config
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep() -> Any:
    return load_script("dp_sweep")


def test_seed_overrides_the_run_seed_and_names_the_run_dir(
    sweep: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(sweep, "run_experiment", lambda cfg, run_dir: seen.append((cfg, run_dir)))
    cfg_path = ROOT / "experiments" / "dp_sweep_pretrain.yaml"
    d = sweep.run_point(tmp_path, 10.0, cfg_path, seed=2)
    assert d == tmp_path / "eps_10_s2"
    assert seen[0][0].seed == 2 and seen[0][0].dp.target_epsilon == 10.0
    d = sweep.run_point(tmp_path, math.inf, cfg_path)  # no seed: the config's, old layout
    assert d == tmp_path / "eps_inf" and seen[1][0].seed == 0
    assert seen[1][0].dp.level == "none"


@pytest.mark.parametrize(
    ("name", "section", "key", "value"),
    [
        ("lr1e3", "client", "lr", 0.001),
        ("b128", "client", "batch_size", 128),
        ("k4", "dp", "noise_multiplicity", 4),
    ],
)
def test_each_lever_config_changes_one_knob(name: str, section: str, key: str, value: Any) -> None:
    base = load_config(ROOT / "experiments" / "dp_sweep_pretrain.yaml")
    lever = load_config(ROOT / "experiments" / f"dp_sweep_pretrain_{name}.yaml")
    assert getattr(getattr(lever, section), key) == value != getattr(getattr(base, section), key)
    same = lever.model_copy(update={section: getattr(base, section), "name": base.name})
    assert same == base
