"""Shared test helpers, in one place (issue 16): tiny experiment configs, the audit tests' config,
a section-override builder for the deployment tests' raw configs, a reader of a run's
``metrics.jsonl``, the secure-aggregation tests' random inputs, and a loader of the scripts under
``experiments/``. Fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from securefed.config import ExperimentConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_raw(**overrides: Any) -> dict[str, Any]:
    """A config that trains in seconds: 400 digits, a 20k-parameter UNet, T=50.

    ``overrides`` use ``__`` for nesting: ``tiny_raw(dp__level="record")`` sets
    ``raw["dp"]["level"]``."""
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
    """:func:`tiny_raw`, parsed and validated."""
    return parse_config(tiny_raw(**overrides))


def audit_config(
    max_examples: int,
    holdout_fraction: float,
    *,
    batch_size: int = 32,
    lr: float = 0.003,
    dp: dict[str, Any] | None = None,
    seed: int = 1,
) -> ExperimentConfig:
    """The audit tests' config: tiny UNet on 8x8 digits, T = 100, one client holding every
    member, one round (the harness trains it centrally)."""
    return parse_config(
        {
            "name": "audit-test",
            "seed": seed,
            "data": {
                "name": "digits",
                "max_examples": max_examples,
                "holdout_fraction": holdout_fraction,
            },
            "partition": {"kind": "iid"},
            "model": {"base_channels": 8, "channel_mults": [1, 2], "norm_groups": 4},
            "diffusion": {"timesteps": 100},
            "federation": {"num_clients": 1, "rounds": 1},
            "client": {"local_steps": 1, "batch_size": batch_size, "lr": lr},
            "dp": dp or {"level": "none"},
            "evaluation": {"fid": False},
        }
    )


def config_with(
    raw: Mapping[str, Any], **section_overrides: Mapping[str, Any]
) -> ExperimentConfig:
    """``raw`` (left untouched) with each named section updated key by key (a missing section
    is created), parsed: ``config_with(RAW, dp={"level": "none"})``."""
    out = copy.deepcopy(dict(raw))
    for section, values in section_overrides.items():
        out.setdefault(section, {}).update(values)
    return parse_config(out)


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``run_dir/metrics.jsonl``, parsed (a missing file is an error)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def uniform_inputs(n: int, d: int, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    """Client vectors for the aggregation tests: ``{0..n-1: U(-scale, scale)^d}``."""
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-scale, scale, d) for i in range(n)}


def load_script(name: str) -> ModuleType:
    """``experiments/<name>.py`` imported as module ``name`` (the scripts are not a package;
    registered in ``sys.modules`` so that its dataclasses and pickling work)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"experiments/{name}.py cannot be loaded")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def one_cohort(sums: dict[str, Any], total_weight: float, n: int) -> dict[str, Any]:
    """The single upload cohort ``"all"`` a strategy's ``aggregate`` receives."""
    from securefed.strategies import CohortSum

    return {"all": CohortSum(sums, total_weight, n)}
