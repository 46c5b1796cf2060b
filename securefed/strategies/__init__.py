"""Federated strategies: the server role (plan rounds, aggregate SUMS), the client role
(ClientPolicy) and the server optimizer (lr, momentum, EMA)."""

from __future__ import annotations

from securefed.config import StrategyConfig
from securefed.strategies.base import (
    ClientPolicy,
    ClientPolicyWrapper,
    ClientUpdate,
    CohortSum,
    LocalObjective,
    RoundPlan,
    ServerOptimizer,
    Strategy,
    StrategyWrapper,
    pack_update,
    sample_clients,
    unpack_sum,
)
from securefed.strategies.fedavg import FedAvg
from securefed.strategies.fedprox import FedProx
from securefed.strategies.scaffold import Scaffold

__all__ = [
    "STRATEGIES",
    "ClientPolicy",
    "ClientPolicyWrapper",
    "ClientUpdate",
    "CohortSum",
    "FedAvg",
    "FedProx",
    "LocalObjective",
    "RoundPlan",
    "Scaffold",
    "ServerOptimizer",
    "Strategy",
    "StrategyWrapper",
    "build_strategy",
    "pack_update",
    "sample_clients",
    "unpack_sum",
]

STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold}


def build_strategy(cfg: StrategyConfig, num_clients: int, weight_scale: float = 1.0) -> Strategy:
    """Registry lookup by the name used in YAML (``strategy.name``)."""
    try:
        cls = STRATEGIES[cfg.name]
    except KeyError:
        raise ValueError(
            f"strategy.name: unknown strategy {cfg.name!r}; choose one of {sorted(STRATEGIES)}"
        ) from None
    return cls(cfg, num_clients, weight_scale)
