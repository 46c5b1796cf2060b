"""Noise schedules and the closed-form forward process q(x_t | x_0).

Betas are computed in float64 (numpy) and stored as float32 tensors. Timesteps are 0-based:
``t = 0`` is the first (least noisy) step and ``t = T - 1`` the last.

References:
    Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models" (linear schedule,
    eq. 4 for q(x_t | x_0)).
    Nichol & Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models" (cosine
    schedule, eq. 17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from securefed.config import DiffusionConfig

__all__ = ["NoiseSchedule", "cosine_betas", "linear_betas", "q_sample"]


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Linearly spaced betas (Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over T = 1000).

    Args:
        timesteps: ``T >= 2``.
        beta_start: ``beta_0`` in (0, 1).
        beta_end: ``beta_{T-1}`` in (beta_start, 1).

    Returns:
        ``[T]`` float64, ``betas[0] == beta_start`` and ``betas[-1] == beta_end``.
    """
    if timesteps < 2:
        raise ValueError(f"diffusion.timesteps: must be >= 2, got {timesteps}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            "diffusion.beta_start/beta_end: need 0 < beta_start < beta_end < 1, "
            f"got {beta_start} and {beta_end}"
        )
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ``alpha_bar(t) = f(t) / f(0)`` with ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2`` and
    ``beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)`` for ``t = 0 .. T-1``.

    Args:
        timesteps: ``T >= 2``.
        s: small offset that keeps ``beta_0`` from being too small.
        max_beta: clip to avoid the singularity at ``t = T``.

    Returns:
        ``[T]`` float64 betas in ``(0, max_beta]``.
    """
    if timesteps < 2:
        raise ValueError(f"diffusion.timesteps: must be >= 2, got {timesteps}")
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"cosine_betas: max_beta must be in (0, 1), got {max_beta}")
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1.0 + s) * math.pi / 2.0) ** 2
    alpha_bar = f / f[0]
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0.0, max_beta)


@dataclass(frozen=True)
class NoiseSchedule:
    """Precomputed per-timestep constants of the forward process, each ``[T]`` float32.

    Attributes:
        betas: ``beta_t``.
        alphas_cumprod: ``alpha_bar_t = prod_{s <= t} (1 - beta_s)`` (strictly decreasing).
        sqrt_alphas_cumprod: ``sqrt(alpha_bar_t)``.
        sqrt_one_minus_alphas_cumprod: ``sqrt(1 - alpha_bar_t)``.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {
            name: tuple(getattr(self, name).shape)
            for name in (
                "betas",
                "alphas_cumprod",
                "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod",
            )
        }
        if len(set(shapes.values())) != 1 or len(shapes["betas"]) != 1:
            raise ValueError(f"NoiseSchedule: all fields must be [T] tensors, got {shapes}")

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> NoiseSchedule:
        """Build from ``[T]`` betas in (0, 1); products and roots are taken in float64."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.size < 2:
            raise ValueError(f"NoiseSchedule: betas must be a [T] array with T >= 2, got {b.shape}")
        if not (np.all(b > 0.0) and np.all(b < 1.0)):
            raise ValueError("NoiseSchedule: every beta must lie in (0, 1)")
        ab = np.cumprod(1.0 - b)

        def f32(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.float32))

        return cls(
            betas=f32(b),
            alphas_cumprod=f32(ab),
            sqrt_alphas_cumprod=f32(np.sqrt(ab)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ab)),
        )

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        """The schedule named by ``cfg.schedule`` (``linear`` or ``cosine``) with ``cfg.timesteps``.

        ``beta_start``/``beta_end`` are used by the linear schedule only.
        """
        if cfg.schedule == "linear":
            return cls.from_betas(linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end))
        if cfg.schedule == "cosine":
            return cls.from_betas(cosine_betas(cfg.timesteps))
        raise ValueError(
            f"diffusion.schedule: unknown schedule {cfg.schedule!r}; choose linear or cosine"
        )

    @property
    def timesteps(self) -> int:
        """``T``, the number of diffusion steps."""
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        return self.betas.device

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy with every tensor on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.betas.device == device:
            return self
        return NoiseSchedule(
            betas=self.betas.to(device),
            alphas_cumprod=self.alphas_cumprod.to(device),
            sqrt_alphas_cumprod=self.sqrt_alphas_cumprod.to(device),
            sqrt_one_minus_alphas_cumprod=self.sqrt_one_minus_alphas_cumprod.to(device),
        )


def _per_example(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` as ``[B, 1, ..., 1]`` broadcastable against ``like`` ``[B, ...]``."""
    v = values.to(device=like.device)[t].to(like.dtype)
    return v.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Draw ``x_t ~ q(x_t | x_0)`` with given noise (Ho et al. 2020, eq. 4).

    ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise``.

    Args:
        schedule: the noise schedule (any device; constants are moved to ``x0``'s device).
        x0: ``[B, C, H, W]`` clean data.
        t: ``[B]`` int64 timesteps in ``0 .. T-1``.
        noise: ``[B, C, H, W]`` standard normal noise.

    Returns:
        ``[B, C, H, W]`` noisy data ``x_t``.
    """
    if t.dim() != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"q_sample: t must be [B] with B = {x0.shape[0]}, got {tuple(t.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(
            f"q_sample: noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}"
        )
    return (
        _per_example(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )
