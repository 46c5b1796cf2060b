"""PIA and PIAN: proximal initialisation attacks (Kong et al. 2024, "An Efficient Membership
Inference Attack for the Diffusion Model by Proximal Initialization", ICLR).

With ``eps0 = eps_theta(x_0, 0)`` (the model's own noise estimate at t = 0 used as the
initialisation) and ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps0``,
``R = || eps0 - eps_theta(x_t, t) ||_p`` (p = 4 in the paper); two queries per example, no noise.
PIAN first normalises ``eps0`` to zero mean and unit variance per example (so that it looks
like a draw of N(0, I)). Score = ``-R``. REFERENCES §5: t = 200 (T = 1000), CIFAR-10 AUC 0.885,
TPR@1% 13.7%.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.audit.attacks.base import Attack, AttackContext, AttackError, batched_scores
from securefed.audit.attacks.base import scaled_timestep as _scaled

__all__ = ["PIAAttack", "PIANAttack", "pia_distance"]


def pia_distance(
    model: nn.Module,
    x0: torch.Tensor,
    t: int,
    alpha_bar_t: float,
    y: torch.Tensor | None,
    p: float,
    normalize: bool,
) -> torch.Tensor:
    """``[B]`` PIA distance ``|| eps0 - eps_theta(sqrt(ab_t) x0 + sqrt(1 - ab_t) eps0, t) ||_p``
    for ``x0`` ``[B, C, H, W]``; ``normalize`` standardises ``eps0`` per example (PIAN)."""
    b = x0.shape[0]
    eps0 = model(x0, torch.zeros(b, dtype=torch.int64, device=x0.device), y)
    if normalize:
        flat = eps0.flatten(1)
        flat = (flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(
            1e-12
        )
        eps0 = flat.view_as(eps0)
    xt = math.sqrt(alpha_bar_t) * x0 + math.sqrt(1.0 - alpha_bar_t) * eps0
    eps_t = model(xt, torch.full((b,), t, dtype=torch.int64, device=x0.device), y)
    return (eps0 - eps_t).flatten(1).norm(p=p, dim=1)


class PIAAttack(Attack):
    """Smaller PIA distance = member.

    Args:
        ctx: the attack context.
        t: the attack timestep (default 200 rescaled to ``T``).
        p: the norm (default 4).
    """

    name = "pia"
    normalize = False

    def __init__(self, ctx: AttackContext, t: int | None = None, p: float = 4.0) -> None:
        super().__init__(ctx)
        T = ctx.schedule.timesteps
        self.t = _scaled(200, T) if t is None else int(t)
        if not 1 <= self.t < T:
            raise AttackError(f"{self.name}.t: must lie in 1..{T - 1}, got {self.t}")
        if not p >= 1:
            raise AttackError(f"{self.name}.p: the norm must be >= 1, got {p}")
        self.p = float(p)

    def score(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> np.ndarray:
        self._check(images, labels)
        ab = float(self.ctx.schedule.alphas_cumprod[self.t])

        def fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor | None, g: Any) -> torch.Tensor:
            return -pia_distance(m, x, self.t, ab, y, self.p, self.normalize)

        return batched_scores(self.ctx, model, images, labels, fn)

    def params(self) -> dict[str, Any]:
        return {"t": self.t, "p": self.p, "normalize": self.normalize}


class PIANAttack(PIAAttack):
    """PIA with ``eps_theta(x_0, 0)`` normalised per example (Kong et al. 2024, PIAN)."""

    name = "pian"
    normalize = True
