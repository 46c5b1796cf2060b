"""LiRA on the denoising loss (Carlini et al. 2022, "Membership Inference Attacks From First
Principles", IEEE S&P), with shadow models trained by the project's own trainer.

Statistic ``phi(x) = -log L(x)`` with ``L`` the loss attack's averaged denoising loss (fixed
timesteps, the same noise for an example under every model). Shadow models are trained on
random halves (fair coins) of a pool:

- offline: the pool is the reference data only, so every shadow is OUT for the targets;
  ``score = (phi_target(x) - mu_out(x)) / sigma_out`` (the one-sided test of Carlini et al.,
  §VI-C, as a monotone score);
- online: the pool is reference + targets, so each target is IN about half the shadows;
  ``score = log N(phi; mu_in(x), sigma_in^2) - log N(phi; mu_out(x), sigma_out^2)``.

With fewer than 32 shadows the variances are global (pooled over examples), as the paper
advises (REFERENCES §5).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from securefed.audit.attacks.base import Attack, AttackContext, AttackError
from securefed.audit.attacks.loss import LossAttack
from securefed.data import ImageDataset

__all__ = ["LiRAAttack", "ShadowTrainer", "lira_offline_scores", "lira_online_scores"]

log = logging.getLogger(__name__)

#: trains a model on a dataset with a seed: ``(data, seed) -> trained nn.Module``
ShadowTrainer = Callable[[ImageDataset, int], nn.Module]

GLOBAL_VARIANCE_BELOW = 32


def _row_keys(images: torch.Tensor) -> list[bytes]:
    flat = images.detach().to("cpu", torch.float32).contiguous().reshape(images.shape[0], -1)
    return [hashlib.sha256(r.numpy().tobytes()).digest() for r in flat]


def lira_offline_scores(
    phi: np.ndarray, phi_out: np.ndarray, global_variance: bool
) -> np.ndarray:
    """``[N]`` offline LiRA scores ``(phi - mu_out) / sigma_out``.

    Args:
        phi: ``[N]`` target statistic; phi_out: ``[S, N]`` OUT-shadow statistics (NaN where a
            shadow is not OUT for the example).
        global_variance: pool the variance over examples (fewer than 32 shadows).
    """
    mu = np.nanmean(phi_out, axis=0)
    if global_variance or phi_out.shape[0] < 2:
        sd = np.full_like(mu, float(np.nanstd(phi_out - mu[None, :])))
    else:
        sd = np.nanstd(phi_out, axis=0)
    return (phi - mu) / np.maximum(sd, 1e-12)


def lira_online_scores(
    phi: np.ndarray, phi_in: np.ndarray, phi_out: np.ndarray, global_variance: bool
) -> np.ndarray:
    """``[N]`` online LiRA log-likelihood ratios.

    Args:
        phi: ``[N]``; phi_in / phi_out: ``[S, N]`` shadow statistics with NaN where the shadow
            is not IN / not OUT for the example. An example without any IN (OUT) shadow gets
            ``mu_out + mean shift`` (``mu_in - mean shift``) from the other examples.
    """
    with warnings.catch_warnings():  # all-NaN columns are handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        mu_in = np.nanmean(phi_in, axis=0)
        mu_out = np.nanmean(phi_out, axis=0)
    both = np.isfinite(mu_in) & np.isfinite(mu_out)
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(np.isfinite(mu_in), mu_in, mu_out + shift)
    mu_out = np.where(np.isfinite(mu_out), mu_out, mu_in - shift)
    if global_variance:
        sd_in = np.full_like(mu_in, float(np.nanstd(phi_in - mu_in[None, :])))
        sd_out = np.full_like(mu_out, float(np.nanstd(phi_out - mu_out[None, :])))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sd_in, sd_out = np.nanstd(phi_in, axis=0), np.nanstd(phi_out, axis=0)
    sd_in = np.where(np.isfinite(sd_in) & (sd_in > 1e-12), sd_in, 1e-12)
    sd_out = np.where(np.isfinite(sd_out) & (sd_out > 1e-12), sd_out, 1e-12)
    ll_in = -0.5 * ((phi - mu_in) / sd_in) ** 2 - np.log(sd_in)
    ll_out = -0.5 * ((phi - mu_out) / sd_out) ** 2 - np.log(sd_out)
    return ll_in - ll_out


class LiRAAttack(Attack):
    """LiRA with shadow models (offline or online).

    Args:
        ctx: the attack context.
        train_shadow: trains one shadow model ``(data, seed) -> model``; use the run's own
            trainer (:func:`securefed.audit.targets.make_shadow_trainer`).
        num_shadows: shadow models to train.
        online: train shadows with the targets in the pool (IN and OUT shadows).
        timesteps / num_draws: the loss statistic's settings.
        progress: show a bar over shadow models.
    """

    needs_fit = True

    def __init__(
        self,
        ctx: AttackContext,
        train_shadow: ShadowTrainer | None = None,
        num_shadows: int = 8,
        online: bool = False,
        timesteps: Sequence[int] | None = None,
        num_draws: int = 4,
        progress: bool = True,
    ) -> None:
        super().__init__(ctx)
        if num_shadows < 2:
            raise AttackError(f"lira.num_shadows: need at least 2 shadow models, got {num_shadows}")
        if train_shadow is None:
            raise AttackError("lira: needs train_shadow (the trainer that builds shadow models)")
        self.train_shadow = train_shadow
        self.num_shadows = int(num_shadows)
        self.online = bool(online)
        self.name = "lira_online" if online else "lira_offline"
        self.stat = LossAttack(ctx, timesteps, num_draws)
        self.progress = progress
        self._shadows: list[nn.Module] = []
        self._masks: np.ndarray | None = None  # [S, P] bool: pool example in shadow s
        self._keys: dict[bytes, int] = {}

    def fit(self, reference: ImageDataset, *, targets: ImageDataset | None = None) -> None:
        if self.online and targets is None:
            raise AttackError("lira_online.fit: pass targets (the candidates to be scored)")
        pool = reference
        if self.online and targets is not None:
            pool = ImageDataset(
                images=torch.cat([reference.images, targets.images]),
                labels=torch.cat([reference.labels, targets.labels]),
                num_classes=reference.num_classes,
                name=reference.name,
                class_names=reference.class_names,
            )
        rng = np.random.default_rng(self.ctx.seed)
        masks = rng.random((self.num_shadows, len(pool))) < 0.5
        self._keys = {k: i for i, k in enumerate(_row_keys(pool.images))}
        self._shadows = []
        bar = tqdm(range(self.num_shadows), desc=f"{self.name} shadows", disable=not self.progress)
        for s in bar:
            idx = np.flatnonzero(masks[s])
            if idx.size == 0:
                idx = np.array([0])
                masks[s, 0] = True
            seed = int(rng.integers(0, 2**62))
            self._shadows.append(self.train_shadow(pool.subset(idx), seed))
        self._masks = masks

    def _phi(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> Any:
        loss = -self.stat.score(model, images, labels)
        return -np.log(np.maximum(loss, 1e-12))

    def score(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> np.ndarray:
        self._check(images, labels)
        if self._masks is None:
            raise AttackError(f"{self.name}.score: call fit(reference[, targets]) first")
        phi = self._phi(model, images, labels)
        phis = np.stack([self._phi(sm, images, labels) for sm in self._shadows])  # [S, N]
        pos = np.array([self._keys.get(k, -1) for k in _row_keys(images)])
        in_mask = np.zeros_like(phis, dtype=bool)
        known = pos >= 0
        in_mask[:, known] = self._masks[:, pos[known]]
        glob = self.num_shadows < GLOBAL_VARIANCE_BELOW
        phi_out = np.where(~in_mask, phis, np.nan)
        if not self.online:
            return lira_offline_scores(phi, phi_out, glob)
        phi_in = np.where(in_mask, phis, np.nan)
        return lira_online_scores(phi, phi_in, phi_out, glob)

    def params(self) -> dict[str, Any]:
        return {
            "num_shadows": self.num_shadows,
            "online": self.online,
            "global_variance": self.num_shadows < GLOBAL_VARIANCE_BELOW,
            **self.stat.params(),
        }
