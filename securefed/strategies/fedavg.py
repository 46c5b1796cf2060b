"""FedAvg (McMahan et al. 2017): ``w <- w + eta * sum_i n_i (w_i - w) / sum_i n_i``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from securefed.strategies.base import CohortSum, Strategy, only_cohort

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Sample-count weighted model averaging, computed from the SUM of weighted deltas."""

    name = "fedavg"

    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        r = only_cohort(rnd, results)
        return self.server_opt.step(global_params, r.sums["delta"] / r.total_weight)
