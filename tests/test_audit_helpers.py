"""Shared small configurations for the audit tests (tiny UNets on 8x8 digits, T = 100)."""

from __future__ import annotations

from typing import Any

from securefed.config import ExperimentConfig, parse_config


def audit_config(
    max_examples: int,
    holdout_fraction: float,
    *,
    batch_size: int = 32,
    lr: float = 0.003,
    dp: dict[str, Any] | None = None,
    seed: int = 1,
) -> ExperimentConfig:
    """One client holding every member, one round (the harness trains it centrally)."""
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
