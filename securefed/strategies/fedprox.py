"""FedProx (Li et al. 2020): FedAvg aggregation, local loss + (mu/2) ||w - w_global||^2."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from securefed.config import StrategyConfig
from securefed.strategies.base import ClientPolicy, LocalObjective
from securefed.strategies.fedavg import FedAvg

__all__ = ["FedProx", "FedProxClient"]


class FedProxClient(ClientPolicy):
    """FedAvg's client with the proximal term's gradient ``mu (w - w_global)`` in every step."""

    def __init__(self, cfg: StrategyConfig, weight_scale: float) -> None:
        super().__init__(weight_scale)
        self.mu = cfg.mu

    def local_objective(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> LocalObjective:
        return LocalObjective(prox_mu=self.mu)


class FedProx(FedAvg):
    """FedAvg's server with :class:`FedProxClient` clients."""

    name = "fedprox"

    def make_client_policy(self) -> ClientPolicy:
        return FedProxClient(self.cfg, self.weight_scale)
