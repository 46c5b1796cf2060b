"""SCAFFOLD (Karimireddy et al. 2020), control variates sent as sums.

Local step: ``g <- g - c_i + c``. After K local steps the client's new control variate is, with
``strategy.scaffold_control``:

- ``gradients`` (default): ``c_i+ = mean_k g_k``, the mean of the raw (uncorrected) minibatch
  gradients of the K local steps (under DP the privatized ones, so it is post-processing).
  Under plain SGD (no momentum, weight decay or clipping) ``y = x - lr sum_k (g_k + c - c_i)``,
  so this equals option II exactly; under Adam it stays in gradient units, where option II
  does not.
- ``option2``: ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (the paper's eq. 4). Under Adam
  ``(x - y) / (K lr)`` is the mean *normalised* step (magnitude ~1 per coordinate), orders of
  magnitude larger than the gradients it is added to; measured on digits 8x8 it made SCAFFOLD's
  FID 2.7x FedAvg's (docs/results.md, comparison).

The client sends ``w_i (y_i - x)`` and
``(c_i+ - c_i) / N`` (pre-divided by the number of clients N, so the server needs only the sum and
the summed values stay small for quantisation); the server applies
``x <- x + eta * sum w_i dy_i / sum w_i`` and ``c <- c + sum (dc_i / N)``.
With all control variates zero the local step and the model update equal FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from securefed.config import StrategyConfig
from securefed.strategies.base import (
    ClientPolicy,
    ClientUpdate,
    CohortSum,
    LocalObjective,
    Strategy,
    only_cohort,
)

__all__ = ["Scaffold", "ScaffoldClient", "scaffold_control_update"]


def scaffold_control_update(
    c_i: torch.Tensor, c: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    """Option II of Karimireddy et al. 2020, eq. (4): ``c_i - c + (x - y) / (K lr)``.

    Shapes: all ``[D]``. Returns the new client control variate ``[D]``.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"SCAFFOLD needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    return c_i - c + (x - y) / (steps * lr)


class ScaffoldClient(ClientPolicy):
    """SCAFFOLD's client: the corrected local step and the new control variate ``c_i``."""

    def __init__(self, cfg: StrategyConfig, num_clients: int, weight_scale: float) -> None:
        super().__init__(weight_scale)
        self.cfg = cfg
        self.num_clients = num_clients

    def local_objective(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> LocalObjective:
        c = broadcast["control"]
        c_i = client_state.get("control", torch.zeros_like(c))
        return LocalObjective(
            grad_correction=c - c_i, track_mean_grad=self.cfg.scaffold_control == "gradients"
        )

    def client_update(
        self,
        cid: int,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        x, c = broadcast["params"], broadcast["control"]
        c_i = client_state.get("control", torch.zeros_like(c))
        if self.cfg.scaffold_control == "option2":
            c_new = scaffold_control_update(c_i, c, x, local_params, local_steps, lr)
        elif mean_grad is None:
            raise ValueError(
                "SCAFFOLD with strategy.scaffold_control: gradients needs the trainer's "
                "LocalResult.mean_grad (requested by local_objective); pass it as mean_grad="
            )
        else:
            c_new = mean_grad.to(torch.float32)
        weight = num_examples / self.weight_scale
        return ClientUpdate(
            vectors={
                "delta": (local_params - x) * weight,
                "control_delta": (c_new - c_i) / self.num_clients,
            },
            weight=weight,
            new_state={"control": c_new},
        )



class Scaffold(Strategy):
    """SCAFFOLD's server: the control variate ``c`` updated from the SUM of ``c_i`` changes."""

    name = "scaffold"

    def __init__(self, cfg: StrategyConfig, num_clients: int, weight_scale: float = 1.0) -> None:
        super().__init__(cfg, num_clients, weight_scale)
        self.control: torch.Tensor | None = None  # server control variate c, [D]

    def make_client_policy(self) -> ClientPolicy:
        return ScaffoldClient(self.cfg, self.num_clients, self.weight_scale)

    def broadcast(self, global_params: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.control is None:
            self.control = torch.zeros_like(global_params)
        return {"params": global_params, "control": self.control}

    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        r = only_cohort(rnd, results)
        if self.control is None:
            self.control = torch.zeros_like(global_params)
        self.control = self.control + r.sums["control_delta"]
        return self.server_opt.step(global_params, r.sums["delta"] / r.total_weight)

    def own_state(self) -> dict[str, torch.Tensor]:
        return {} if self.control is None else {"control": self.control}

    def load_own_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.control = state.get("control")
