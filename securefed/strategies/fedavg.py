"""FedAvg (McMahan et al. 2017): ``w <- w + eta * sum_i n_i (w_i - w) / sum_i n_i``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from securefed.strategies.base import Strategy

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Sample-count weighted model averaging, computed from the SUM of weighted deltas."""

    name = "fedavg"

    def aggregate(
        self,
        rnd: int,
        global_params: torch.Tensor,
        sums: Mapping[str, torch.Tensor],
        total_weight: float,
        num_contributors: int,
    ) -> torch.Tensor:
        if total_weight <= 0 or num_contributors == 0:
            raise ValueError(f"round {rnd}: nothing to aggregate (total weight {total_weight})")
        return self.apply_server_update(global_params, sums["delta"] / total_weight)
