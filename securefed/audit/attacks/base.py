"""The attack interface: optional ``fit`` on reference data, then ``score`` per example.

Every attack maps a model and images ``[N, C, H, W]`` (float32 in [-1, 1]) to ``[N]`` float64
scores, HIGHER = MORE LIKELY A MEMBER. All randomness (diffusion noise) comes from a
``torch.Generator`` seeded from ``AttackContext.seed`` at every ``score`` call, drawn batch by
batch in order, so scoring the same images twice (or with two models, as LiRA does) uses the
same noise for each example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from securefed.data import ImageDataset
from securefed.diffusion import NoiseSchedule
from securefed.errors import SecurefedError

__all__ = ["Attack", "AttackContext", "AttackError", "batched_scores", "scaled_timestep"]


class AttackError(SecurefedError, ValueError):
    """An attack was configured or called with invalid arguments."""


@dataclass(frozen=True)
class AttackContext:
    """What every attack needs besides the model.

    Attributes:
        schedule: the target's noise schedule.
        device: where the model runs.
        seed: seeds the attack's noise generator (fresh at every ``score`` call).
        batch_size: images per model call.
        conditional: the model is class-conditional (labels are then passed to it).
    """

    schedule: NoiseSchedule
    device: torch.device
    seed: int = 0
    batch_size: int = 256
    conditional: bool = False

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)


def scaled_timestep(t_at_1000: int, timesteps: int) -> int:
    """A timestep quoted for ``T = 1000`` in the papers, rescaled to ``T`` (at least 1)."""
    return max(1, min(timesteps - 1, round(t_at_1000 * timesteps / 1000)))


class Attack(ABC):
    """A membership-inference attack on a diffusion model.

    Subclasses set ``name`` and implement :meth:`score`; attacks that need reference data
    (LiRA's shadow models) override :meth:`fit`.
    """

    name: str = "attack"
    needs_fit: bool = False

    def __init__(self, ctx: AttackContext) -> None:
        self.ctx = ctx

    def fit(
        self, reference: ImageDataset, *, targets: ImageDataset | None = None
    ) -> None:
        """Prepare on reference (population) data; ``targets`` are the candidates to be scored
        later (online LiRA trains shadows on them). Default: nothing to fit."""
        return None

    @abstractmethod
    def score(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> np.ndarray:
        """``[N]`` float64 membership scores of ``images`` ``[N, C, H, W]`` under ``model``."""

    def params(self) -> dict[str, Any]:
        """The attack's settings (recorded in the report)."""
        return {}

    def _check(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise AttackError(
                f"{self.name}.score: images must be a [N, C, H, W] tensor, got "
                f"{type(images).__name__} {getattr(images, 'shape', '')}"
            )
        if labels is not None and labels.shape != (images.shape[0],):
            raise AttackError(
                f"{self.name}.score: labels must be [N={images.shape[0]}], got "
                f"{tuple(labels.shape)}"
            )
        if self.ctx.conditional and labels is None:
            raise AttackError(
                f"{self.name}.score: the model is class-conditional; pass the examples' labels"
            )


def batched_scores(
    ctx: AttackContext,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    fn: Callable[[nn.Module, torch.Tensor, torch.Tensor | None, torch.Generator], torch.Tensor],
) -> np.ndarray:
    """Apply ``fn(model, x [B,C,H,W], y [B] | None, generator) -> [B]`` batch by batch in eval
    mode, without gradients, with one generator for all batches; returns ``[N]`` float64."""
    gen = ctx.generator()
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], ctx.batch_size):
                x = images[i : i + ctx.batch_size].to(ctx.device)
                y = None
                if ctx.conditional and labels is not None:
                    y = labels[i : i + ctx.batch_size].to(ctx.device)
                out.append(fn(model, x, y, gen).detach().to("cpu", torch.float64))
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0)
    scores = torch.cat(out).numpy()
    if not np.isfinite(scores).all():
        raise AttackError("attack produced non-finite scores (the model outputs NaN or inf)")
    return scores
