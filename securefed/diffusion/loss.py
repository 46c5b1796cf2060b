"""Per-example epsilon-prediction losses (Ho et al. 2020, eq. 14, "L_simple").

Every function returns one loss per example (``[B]``), never a batch mean, so that DP-SGD can
clip per-example gradients and audits can score single examples. All randomness comes from an
explicit ``torch.Generator`` that must live on ``x0``'s device.

Draw order (fixed, so results can be reproduced draw by draw): first the timesteps
``t ~ Uniform{0..T-1}`` of shape ``[K, B]``, then the noise ``eps ~ N(0, I)`` of shape
``[K, B, C, H, W]`` (see :func:`draw_timesteps_and_noise`).
"""

from __future__ import annotations

import torch
from torch import nn

from securefed.diffusion.schedule import NoiseSchedule, q_sample

__all__ = [
    "denoising_loss_at",
    "diffusion_loss",
    "diffusion_loss_from_draws",
    "draw_timesteps_and_noise",
]


def draw_timesteps_and_noise(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    num_draws: int,
    *,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of :func:`diffusion_loss`, in its order.

    Args:
        schedule: gives ``T``.
        x0: ``[B, C, H, W]`` clean data (only its shape, dtype and device are used).
        num_draws: ``K >= 1`` independent (timestep, noise) pairs per example.
        generator: on ``x0``'s device.

    Returns:
        ``t`` ``[K, B]`` int64 uniform on ``0 .. T-1``, then ``noise`` ``[K, B, C, H, W]``.
    """
    if num_draws < 1:
        raise ValueError(f"diffusion_loss: num_draws must be >= 1, got {num_draws}")
    b = x0.shape[0]
    t = torch.randint(0, schedule.timesteps, (num_draws, b), generator=generator, device=x0.device)
    noise = torch.randn(
        (num_draws, *x0.shape), generator=generator, device=x0.device, dtype=x0.dtype
    )
    return t, noise


def diffusion_loss_from_draws(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    per_row: bool = False,
) -> torch.Tensor:
    """Per-example ``mean_k || eps_k - eps_theta(x_{t_k}, t_k, y) ||^2 / (C H W)`` for given draws.

    The ``K`` draws are evaluated in one forward pass on a batch of ``K * B`` rows laid out
    draw-major (row ``k * B + b`` is draw ``k`` of example ``b``), then averaged per example
    (noise multiplicity, Dockhorn et al. 2022, "Differentially Private Diffusion Models").

    Args:
        model: ``eps_theta(x, t, y)``, ``[N, C, H, W], [N], [N] -> [N, C, H, W]``.
        schedule: the noise schedule.
        x0: ``[B, C, H, W]`` clean data.
        t: ``[K, B]`` (or ``[B]`` for ``K = 1``) int64 timesteps.
        noise: ``[K, B, C, H, W]`` (or ``[B, C, H, W]``) standard normal noise.
        y: ``[B]`` int64 labels or ``None``.

        per_row: return the ``[K * B]`` undivided row losses instead; example ``b``'s loss is
            the MEAN of its rows ``b, B + b, ..., (K-1) B + b``, which is how the DP-SGD
            engines (``dp_sgd_step``, ``opacus_dp_step``) reduce per-row losses before clipping
            the per-EXAMPLE gradient. (Dividing here as well would shrink every per-example
            gradient K-fold relative to the noise.)

    Returns:
        ``[B]`` per-example loss (``[K * B]`` row losses with ``per_row``).
    """
    if t.dim() == 1:
        t, noise = t[None], noise[None]
    k, b = t.shape
    if b != x0.shape[0] or noise.shape != (k, *x0.shape):
        raise ValueError(
            f"diffusion_loss: expected t [K, {x0.shape[0]}] and noise [K, *{tuple(x0.shape)}], "
            f"got {tuple(t.shape)} and {tuple(noise.shape)}"
        )
    t_flat = t.reshape(k * b)
    noise_flat = noise.reshape(k * b, *x0.shape[1:])
    x0_rep = x0.repeat(k, *([1] * (x0.dim() - 1)))
    y_rep = None if y is None else y.repeat(k)
    x_t = q_sample(schedule, x0_rep, t_flat, noise_flat)
    err = (model(x_t, t_flat, y_rep) - noise_flat).pow(2).flatten(1).mean(dim=1)
    if per_row:
        return err
    return err.reshape(k, b).mean(dim=0)


def diffusion_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    num_draws: int = 1,
) -> torch.Tensor:
    """Per-example simplified DDPM loss (Ho et al. 2020, eq. 14) with noise multiplicity.

    ``L_b = mean_k mean_{c,h,w} (eps_k - eps_theta(sqrt(ab_t) x0_b + sqrt(1 - ab_t) eps_k, t_k))^2``
    with ``t_k ~ Uniform{0..T-1}``, ``eps_k ~ N(0, I)`` drawn independently for each of the
    ``K = num_draws`` draws of each example (Dockhorn et al. 2022 use ``K > 1`` to reduce the
    variance of DP-SGD gradients at no privacy cost).

    Args:
        model: ``eps_theta(x, t, y)``.
        schedule: the noise schedule.
        x0: ``[B, C, H, W]`` clean data in ``[-1, 1]``.
        y: ``[B]`` int64 labels or ``None``.
        generator: the only source of randomness, on ``x0``'s device.
        num_draws: ``K >= 1``.

    Returns:
        ``[B]`` per-example loss (differentiable).
    """
    t, noise = draw_timesteps_and_noise(schedule, x0, num_draws, generator=generator)
    return diffusion_loss_from_draws(model, schedule, x0, t, noise, y)


def denoising_loss_at(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: int | torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per-example epsilon-prediction MSE at fixed timestep(s) (Ho et al. 2020, eq. 14).

    Used for holdout losses and loss-based membership-inference scores (e.g. Carlini et al.
    2023, "Extracting Training Data from Diffusion Models"). Call under ``torch.no_grad()``
    when no gradient is needed.

    Args:
        model: ``eps_theta(x, t, y)``.
        schedule: the noise schedule.
        x0: ``[B, C, H, W]`` clean data.
        t: a timestep in ``0 .. T-1`` for all examples (int or 0-d tensor) or ``[B]`` int64.
        y: ``[B]`` int64 labels or ``None``.
        generator: draws the noise ``[B, C, H, W]``, on ``x0``'s device.

    Returns:
        ``[B]`` per-example loss.
    """
    b = x0.shape[0]
    t_b = torch.as_tensor(t, dtype=torch.int64, device=x0.device)
    if t_b.dim() == 0:
        t_b = t_b.expand(b)
    if t_b.shape != (b,):
        raise ValueError(f"denoising_loss_at: t must be an int or [{b}], got {tuple(t_b.shape)}")
    lo, hi = (int(t_b.min()), int(t_b.max())) if b else (0, 0)
    if lo < 0 or hi >= schedule.timesteps:
        raise ValueError(
            f"denoising_loss_at: timesteps must lie in 0..{schedule.timesteps - 1}, "
            f"got range {lo}..{hi}"
        )
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return diffusion_loss_from_draws(model, schedule, x0, t_b, noise, y)
