"""Loss attack (Matsumoto, Miura & Yanai 2023, "Membership Inference Attacks against Diffusion
Models"): members have a lower denoising loss at intermediate timesteps.

``score(x) = - mean_{t in timesteps} mean_{k < K} || eps_k - eps_theta(sqrt(ab_t) x
+ sqrt(1 - ab_t) eps_k, t) ||^2 / (C H W)``, with ``eps_k ~ N(0, I)`` drawn from the attack's
generator. REFERENCES §5: CIFAR-10 DDPM, AUC 0.80, TPR@1%FPR 5.7%.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.audit.attacks.base import Attack, AttackContext, AttackError, batched_scores
from securefed.audit.attacks.base import scaled_timestep as _scaled
from securefed.diffusion import denoising_loss_at

__all__ = ["LossAttack", "denoising_losses"]


def denoising_losses(
    model: nn.Module,
    ctx: AttackContext,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    timesteps: Sequence[int],
    num_draws: int,
) -> np.ndarray:
    """``[N]`` mean denoising loss over ``timesteps`` x ``num_draws`` noise draws per example.

    The noise is drawn batch by batch from one generator seeded with ``ctx.seed``, in the order
    (batch, timestep, draw), so equal inputs get equal noise under any model.
    """

    def fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor | None, g: torch.Generator) -> Any:
        total = torch.zeros(x.shape[0], device=x.device)
        for t in timesteps:
            for _ in range(num_draws):
                total += denoising_loss_at(m, ctx.schedule, x, int(t), y, generator=g)
        return total / (len(timesteps) * num_draws)

    return batched_scores(ctx, model, images, labels, fn)


class LossAttack(Attack):
    """Lower denoising loss = member.

    Args:
        ctx: the attack context.
        timesteps: timesteps to average over (default: 100, 200, 300 rescaled to ``T``).
        num_draws: noise draws per timestep and example.
    """

    name = "loss"

    def __init__(
        self, ctx: AttackContext, timesteps: Sequence[int] | None = None, num_draws: int = 4
    ) -> None:
        super().__init__(ctx)
        T = ctx.schedule.timesteps
        ts = (
            [_scaled(100, T), _scaled(200, T), _scaled(300, T)]
            if timesteps is None
            else [int(t) for t in timesteps]
        )
        if not ts or any(not 0 <= t < T for t in ts):
            raise AttackError(f"loss.timesteps: each must lie in 0..{T - 1}, got {ts}")
        if num_draws < 1:
            raise AttackError(f"loss.num_draws: must be >= 1, got {num_draws}")
        self.timesteps = sorted(set(ts))
        self.num_draws = int(num_draws)

    def score(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> np.ndarray:
        self._check(images, labels)
        return -denoising_losses(
            model, self.ctx, images, labels, self.timesteps, self.num_draws
        )

    def params(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps, "num_draws": self.num_draws}
