"""Shared fixtures: tiny, fast experiment configs on the embedded digits dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from securefed.config import ExperimentConfig, parse_config

torch.set_num_threads(1)


def tiny_raw(**overrides: Any) -> dict[str, Any]:
    """A config that trains in seconds: 400 digits, a 20k-parameter UNet, T=50."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "data": {"name": "digits", "max_examples": 400, "holdout_fraction": 0.25},
        "partition": {"kind": "dirichlet", "alpha": 1.0},
        "model": {
            "base_channels": 8,
            "channel_mults": [1, 2],
            "norm_groups": 4,
            "attention_levels": [1],
        },
        "diffusion": {"timesteps": 50},
        "federation": {"num_clients": 3, "rounds": 3},
        "client": {"local_steps": 3, "batch_size": 16, "lr": 0.002},
        "strategy": {"name": "fedavg"},
        "evaluation": {
            "every": 1,
            "fid": False,
            "grid_samples": 4,
            "sampling_steps": 5,
            "holdout_loss_examples": 32,
        },
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def tiny_config(**overrides: Any) -> ExperimentConfig:
    return parse_config(tiny_raw(**overrides))


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SECUREFED_CACHE", str(d))
    return d


def one_cohort(sums: dict[str, torch.Tensor], total_weight: float, n: int) -> dict[str, Any]:
    """The single upload cohort ``"all"`` a strategy's ``aggregate`` receives."""
    from securefed.strategies import CohortSum

    return {"all": CohortSum(sums, total_weight, n)}
