"""Exponential moving average of model weights (Polyak & Juditsky 1992; used by Ho et al. 2020).

``shadow <- decay * shadow + (1 - decay) * theta`` after every :meth:`EMA.update`. The shadow
covers every floating-point ``state_dict`` entry (for :class:`~securefed.diffusion.unet.UNet`:
exactly its parameters); other entries (e.g. integer counters) are copied as they are.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Shadow copy of a model's weights, updated as an exponential moving average.

    Args:
        model: the model to track; the shadow starts as a copy of its current weights (on the
            same device and dtype).
        decay: ``0 <= decay <= 1`` (``0``: shadow = latest weights, ``1``: frozen).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }

    def _check_keys(self, keys: set[str], what: str) -> None:
        if keys != set(self.shadow):
            missing = sorted(set(self.shadow) - keys)[:5]
            extra = sorted(keys - set(self.shadow))[:5]
            raise KeyError(f"EMA.{what}: keys differ (missing {missing}, unexpected {extra})")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``shadow = decay * shadow + (1 - decay) * theta`` for the weights of ``model``."""
        state = model.state_dict()
        self._check_keys(set(state), "update")
        for k, v in state.items():
            s = self.shadow[k]
            v = v.detach().to(device=s.device)
            if s.is_floating_point():
                s.mul_(self.decay).add_(v.to(s.dtype), alpha=1.0 - self.decay)
            else:
                s.copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the shadow (in place; devices may differ)."""
        state = model.state_dict()
        self._check_keys(set(state), "copy_to")
        for k, v in state.items():
            v.copy_(self.shadow[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the shadow weights, keyed like ``model.state_dict()``."""
        return {k: v.detach().clone() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore shadow weights saved by :meth:`state_dict` (same keys and shapes)."""
        self._check_keys(set(sd), "load_state_dict")
        for k, v in sd.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(
                    f"EMA.load_state_dict: {k} has shape {tuple(v.shape)}, "
                    f"expected {tuple(self.shadow[k].shape)}"
                )
            self.shadow[k].copy_(v)
