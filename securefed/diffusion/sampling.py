"""Reverse-process samplers: DDPM ancestral sampling and DDIM.

Both predict ``x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` from the model's noise
prediction, clamp it to ``[-1, 1]`` at every step, and return images in ``[-1, 1]``. All noise
comes from an explicit ``torch.Generator`` on ``device``. Schedule constants are read as Python
floats (float64) once per call, so the loops cause no device synchronisation.

References:
    Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models", Algorithm 2, eq. 7.
    Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12 and eq. 16.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from securefed.diffusion.schedule import NoiseSchedule

__all__ = ["ddim_sample", "ddim_step", "ddim_timesteps", "ddpm_sample", "ddpm_step", "sample"]


def _alphas_cumprod(schedule: NoiseSchedule) -> list[float]:
    return schedule.alphas_cumprod.detach().to("cpu", torch.float64).tolist()


def _predict_x0(x: torch.Tensor, eps: torch.Tensor, ab: float) -> torch.Tensor:
    """Clamped ``x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` (Ho et al. 2020, eq. 15)."""
    return ((x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)).clamp(-1.0, 1.0)


def _labels(y: torch.Tensor | None, n: int, device: torch.device | str) -> torch.Tensor | None:
    if y is None:
        return None
    if y.shape != (n,):
        raise ValueError(f"sampling: y must be [{n}] int64 labels, got {tuple(y.shape)}")
    return y.to(device=device, dtype=torch.int64)


def ddpm_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    alphas_cumprod: list[float],
    generator: torch.Generator,
) -> torch.Tensor:
    """One ancestral step ``x_t -> x_{t-1}`` (Ho et al. 2020, Algorithm 2 with clipped x0_hat).

    ``x_{t-1} = mu_tilde(x_t, x0_hat) + sigma_t z`` with the posterior mean and variance of
    ``q(x_{t-1} | x_t, x_0)`` (eq. 7): ``mu_tilde = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0_hat
    + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t``, ``sigma_t^2 = beta_tilde_t
    = (1 - ab_{t-1}) / (1 - ab_t) beta_t``, and no noise at ``t = 0``.

    Args:
        x: ``[B, C, H, W]`` current ``x_t``.
        eps: ``[B, C, H, W]`` predicted noise.
        t: current timestep.
        alphas_cumprod: ``[T]`` ``alpha_bar`` as floats.
        generator: draws ``z`` ``[B, C, H, W]`` on ``x``'s device (not used at ``t = 0``).

    Returns:
        ``[B, C, H, W]`` ``x_{t-1}`` (at ``t = 0``: the clamped ``x0_hat``).
    """
    ab = alphas_cumprod[t]
    ab_prev = alphas_cumprod[t - 1] if t > 0 else 1.0
    alpha = ab / ab_prev
    beta = 1.0 - alpha
    x0 = _predict_x0(x, eps, ab)
    mean = (math.sqrt(ab_prev) * beta / (1.0 - ab)) * x0 + (
        math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab)
    ) * x
    if t == 0:
        return mean
    var = beta * (1.0 - ab_prev) / (1.0 - ab)
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + math.sqrt(var) * z


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: list[float],
    eta: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12 with sigma from eq. 16).

    ``x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps' + sigma z`` with
    ``sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)``, where ``x0_hat`` is
    clamped and ``eps'`` is the noise consistent with the clamped ``x0_hat``. ``t_prev = -1``
    means ``ab_prev = 1`` (the final step returns ``x0_hat``).

    Args:
        x: ``[B, C, H, W]`` current ``x_t``.
        eps: ``[B, C, H, W]`` predicted noise.
        t: current timestep.
        t_prev: next (smaller) timestep, or ``-1``.
        alphas_cumprod: ``[T]`` ``alpha_bar`` as floats.
        eta: 0 for deterministic DDIM, 1 for DDPM-like stochasticity.
        generator: draws ``z`` when ``sigma > 0``.

    Returns:
        ``[B, C, H, W]`` ``x_{t_prev}``.
    """
    ab = alphas_cumprod[t]
    ab_prev = alphas_cumprod[t_prev] if t_prev >= 0 else 1.0
    x0 = _predict_x0(x, eps, ab)
    eps = (x - math.sqrt(ab) * x0) / math.sqrt(1.0 - ab)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
    if sigma > 0.0:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        out = out + sigma * z
    return out


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``T - 1`` down to 0 (distinct, descending).

    Raises:
        ValueError: unless ``1 <= steps <= timesteps``.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(
            f"evaluation.sampling_steps: DDIM needs 1 <= steps <= diffusion.timesteps "
            f"({timesteps}), got {steps}"
        )
    return [int(v) for v in np.round(np.linspace(timesteps - 1, 0, steps))]


def _num_classes(model: nn.Module) -> int | None:
    """``model.num_classes`` if the (possibly wrapped) model is class-conditional, else None.

    Looks through wrappers that keep the model as ``_module`` (Opacus ``GradSampleModule``) or
    ``module`` (``DataParallel``), which do not forward plain attributes.
    """
    m: Any = model
    for _ in range(8):
        if hasattr(m, "class_conditional"):
            return getattr(m, "num_classes", None) if m.class_conditional else None
        inner = getattr(m, "_module", None) or getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        m = inner
    return None


def _timestep_batch(t: int, n: int, device: torch.device | str) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.int64, device=device)


@torch.no_grad()
def ddpm_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int, int],
    *,
    y: torch.Tensor | None = None,
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """Ancestral sampling over all ``T`` steps (Ho et al. 2020, Algorithm 2).

    Draws ``x_T ~ N(0, I)`` then one ``z`` per step (``T - 1`` in all) from ``generator``. Does
    not change the model's train/eval mode (see :func:`sample`).

    Args:
        model: ``eps_theta(x, t, y)``.
        schedule: the noise schedule.
        shape: ``(B, C, H, W)``.
        y: ``[B]`` int64 labels or ``None``.
        generator: on ``device``.
        device: where the sampling runs.

    Returns:
        ``[B, C, H, W]`` samples in ``[-1, 1]``.
    """
    ab = _alphas_cumprod(schedule)
    y = _labels(y, shape[0], device)
    x = torch.randn(shape, generator=generator, device=device)
    for t in reversed(range(len(ab))):
        eps = model(x, _timestep_batch(t, shape[0], device), y)
        x = ddpm_step(x, eps, t, ab, generator)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int, int],
    *,
    steps: int,
    eta: float = 0.0,
    y: torch.Tensor | None = None,
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """DDIM sampling on ``steps`` evenly spaced timesteps (Song et al. 2021, eq. 12).

    With ``eta = 0`` the only random draw is ``x_T ~ N(0, I)`` (deterministic map from noise to
    image). Does not change the model's train/eval mode (see :func:`sample`).

    Args:
        model: ``eps_theta(x, t, y)``.
        schedule: the noise schedule.
        shape: ``(B, C, H, W)``.
        steps: number of model evaluations, ``1 <= steps <= T`` (see :func:`ddim_timesteps`).
        eta: stochasticity, ``>= 0``.
        y: ``[B]`` int64 labels or ``None``.
        generator: on ``device``.
        device: where the sampling runs.

    Returns:
        ``[B, C, H, W]`` samples in ``[-1, 1]``.
    """
    if eta < 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
    ab = _alphas_cumprod(schedule)
    ts = ddim_timesteps(len(ab), steps)
    y = _labels(y, shape[0], device)
    x = torch.randn(shape, generator=generator, device=device)
    for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
        eps = model(x, _timestep_batch(t, shape[0], device), y)
        x = ddim_step(x, eps, t, t_prev, ab, eta, generator)
    return x.clamp(-1.0, 1.0)


def sample(
    model: nn.Module,
    schedule: NoiseSchedule,
    n: int,
    image_shape: tuple[int, int, int],
    *,
    sampler: Literal["ddpm", "ddim"] = "ddim",
    steps: int = 50,
    y: torch.Tensor | None = None,
    generator: torch.Generator,
    device: torch.device | str,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``n`` images in batches, with the model in eval mode (its mode is restored after).

    For a class-conditional model (``model.class_conditional``, also found inside an Opacus
    ``GradSampleModule`` or ``DataParallel`` wrapper) with ``y=None``, labels are drawn uniformly
    from ``generator`` first, before any noise. ``steps`` is ignored by ``ddpm`` (which
    always takes ``T`` steps).

    Args:
        model: ``eps_theta(x, t, y)`` (already on ``device``).
        schedule: the noise schedule (moved to ``device`` as needed).
        n: number of images.
        image_shape: ``(C, H, W)``.
        sampler: ``"ddim"`` (eta = 0) or ``"ddpm"``.
        steps: DDIM steps.
        y: ``[n]`` int64 labels or ``None``.
        generator: on ``device``.
        device: where the sampling runs.
        batch_size: images per model call.
        progress: show a tqdm bar over images.

    Returns:
        ``[n, C, H, W]`` samples in ``[-1, 1]`` on ``device``.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"evaluation.sampler: unknown sampler {sampler!r}; choose ddpm or ddim")
    if n < 0 or batch_size < 1:
        raise ValueError(f"sample: need n >= 0 and batch_size >= 1, got {n} and {batch_size}")
    if sampler == "ddim":
        ddim_timesteps(schedule.timesteps, steps)  # validate before any work
    num_classes = _num_classes(model)
    if y is None and num_classes:
        y = torch.randint(0, num_classes, (n,), generator=generator, device=device)
    y = _labels(y, n, device)
    schedule = schedule.to(device)

    bar = None
    if progress:
        bar = tqdm(total=n, desc=f"sampling ({sampler})", unit="img")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            shape = (b, *image_shape)
            y_b = None if y is None else y[start : start + b]
            if sampler == "ddpm":
                out.append(
                    ddpm_sample(model, schedule, shape, y=y_b, generator=generator, device=device)
                )
            else:
                out.append(
                    ddim_sample(
                        model,
                        schedule,
                        shape,
                        steps=steps,
                        y=y_b,
                        generator=generator,
                        device=device,
                    )
                )
            if bar is not None:
                bar.update(b)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if not out:
        return torch.empty((0, *image_shape), device=device)
    return torch.cat(out)
