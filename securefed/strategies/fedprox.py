"""FedProx (Li et al. 2020): FedAvg aggregation, local loss + (mu/2) ||w - w_global||^2."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from securefed.strategies.base import LocalObjective
from securefed.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    """Adds the proximal term's gradient ``mu (w - w_global)`` to every local step."""

    name = "fedprox"

    def local_objective(
        self, broadcast: Mapping[str, torch.Tensor], client_state: Mapping[str, torch.Tensor]
    ) -> LocalObjective:
        return LocalObjective(prox_mu=self.cfg.mu)
