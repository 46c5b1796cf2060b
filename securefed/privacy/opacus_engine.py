"""The reference DP-SGD step through Opacus' per-sample gradient hooks (``dp.engine: opacus``).

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1): for a
Poisson-sampled batch, compute every example's gradient ``g_b``, clip it to norm ``C``
(``g_b * min(1, C / ||g_b||)``), sum, add ``N(0, (sigma C)^2 I)`` and divide by the *expected*
batch size ``q n`` (the sum's sensitivity is ``C`` whatever the realised batch size, so dividing by
the realised size would leak it; Opacus does the same).

Noise multiplicity (DPDM, Dockhorn et al. 2023, "Differentially Private Diffusion Models"): each
example's diffusion loss is averaged over ``K`` independent (timestep, noise) draws BEFORE
clipping, which lowers the gradient variance at unchanged sensitivity. The forward pass evaluates
``K * B`` rows laid out draw-major (row ``k * B + b`` is draw ``k`` of example ``b``, as in
:func:`securefed.diffusion.diffusion_loss_from_draws`); Opacus' hooks give one gradient per row;
the ``K`` rows of each example are averaged (the gradient of the example's mean loss) before
the norm is taken.

Opacus computes per-sample gradients with module hooks (Yousefpour et al. 2021, "Opacus:
User-Friendly Differential Privacy Library in PyTorch"). Every row must depend on one example
only: layers that mix examples (BatchNorm) break per-example sensitivity and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from securefed.errors import SecurefedError
from securefed.noise.secure_noise import NoiseSource
from securefed.privacy.dp_step import draw_noise

__all__ = [
    "DPModelError",
    "OpacusStepResult",
    "clip_factors",
    "make_private_module",
    "opacus_dp_step",
]

#: Opacus' clipping denominator guard: factor = min(1, C / (||g|| + 1e-6))
_CLIP_EPS = 1e-6


class DPModelError(SecurefedError, ValueError):
    """The model contains layers that per-example DP-SGD cannot handle."""


@dataclass(frozen=True)
class OpacusStepResult:
    """Diagnostics of one DP-SGD step (computed before noise; not private, keep local).

    Attributes:
        batch_size: realised number of examples ``B`` (Poisson sampling varies it).
        mean_loss: mean per-example loss (each example's loss averaged over its ``K`` rows).
        clipped_fraction: fraction of examples whose gradient norm exceeded ``C``.
        mean_norm: mean per-example gradient norm before clipping.
    """

    batch_size: int
    mean_loss: float
    clipped_fraction: float
    mean_norm: float


def _offending_layers(model: nn.Module) -> list[str]:
    problems: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(
                f"{name or '<model>'} ({type(module).__name__}): batch normalisation mixes the "
                "examples of a batch; use GroupNorm (opacus.validators.ModuleValidator.fix)"
            )
    seen = {p.split(" ", 1)[0] for p in problems}
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if list(module.buffers(recurse=False)):
            errors = [*errors, "a trainable layer with buffers is not supported by Opacus"]
        label = name or "<model>"
        if errors and label not in seen:
            problems.append(
                f"{label} ({type(module).__name__}): "
                + "; ".join(str(e).split(". ")[0] for e in errors)
            )
    return problems


def make_private_module(model: nn.Module) -> GradSampleModule:
    """Wrap ``model`` for per-example gradients (Opacus hooks, ``loss_reduction="sum"``).

    Puts the model in training mode, checks it with
    ``opacus.validators.ModuleValidator.validate(model, strict=False)`` and refuses any batch
    normalisation layer (also non-affine ones, which Opacus' validator does not flag).

    Raises:
        DPModelError: naming every offending layer, e.g. ``bn (BatchNorm2d): ...``.
    """
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    problems = _offending_layers(model)
    if errors and not problems:  # a validator error we could not attribute to a layer
        problems = [str(e) for e in errors]
    if problems:
        raise DPModelError(
            "model cannot be trained with per-example DP-SGD: " + " | ".join(problems)
        )
    try:
        return GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    except NotImplementedError as exc:
        raise DPModelError(f"model cannot be trained with per-example DP-SGD: {exc}") from None


def _reset_hook_state(gsm: GradSampleModule, params: list[nn.Parameter]) -> None:
    """Clear per-sample gradients and Opacus' per-forward bookkeeping (not ``p.grad``).

    A forward pass without backward (e.g. an evaluation in training mode) leaves activations and
    ``_forward_counter`` behind, which would silently stop the next step's per-sample gradients
    from being promoted to ``p.grad_sample``.
    """
    for module in gsm.modules():
        if isinstance(getattr(module, "activations", None), list):
            module.activations.clear()
        if hasattr(module, "max_batch_len"):
            del module.max_batch_len
    for p in params:
        p.grad_sample = None  # type: ignore[attr-defined]
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0
        if hasattr(p, "_current_grad_sample"):
            del p._current_grad_sample


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """``[B]`` per-example factors ``min(1, C / (||g_b|| + 1e-6))`` (Opacus' formula).

    ``||factor_b * g_b|| <= C`` for every example (strictly below when clipped).
    """
    return (max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)


def opacus_dp_step(
    gsm: GradSampleModule,
    per_row_loss_fn: Callable[[], torch.Tensor | None],
    *,
    expected_batch_size: float,
    max_grad_norm: float,
    noise_multiplier: float,
    noise_source: NoiseSource,
    group_size: int = 1,
    extra_sum: Mapping[int, torch.Tensor] | None = None,
) -> OpacusStepResult:
    """One DP-SGD gradient: sets ``p.grad`` of every trainable parameter; the caller steps.

    ``p.grad = (sum_b clip_C(g_b) + N(0, (noise_multiplier * C)^2 I)) / expected_batch_size``
    with ``g_b = (1/K) sum_k grad(row_{kB+b})``, the gradient of example ``b``'s loss averaged
    over its ``K`` rows (Abadi et al. 2016; noise multiplicity of Dockhorn et al. 2023). Noise is
    added to every trainable parameter, including ones the batch did not reach; an empty batch
    (possible under Poisson sampling) releases noise only.

    Args:
        gsm: from :func:`make_private_module`.
        per_row_loss_fn: runs the forward pass through ``gsm`` on ``K * B`` rows laid out
            draw-major (row ``k * B + b`` is draw ``k`` of example ``b``) and returns either the
            ``[K * B]`` per-row losses (example ``b``'s loss is the mean of its rows) or the
            ``[B]`` per-example losses (rows already averaged, e.g. ``diffusion_loss(...,
            num_draws=K)``). ``None`` or an empty tensor: empty Poisson batch. Rows must not
            interact.
        expected_batch_size: ``q * n`` (Poisson rate times dataset size), > 0.
        max_grad_norm: clipping norm ``C`` > 0.
        noise_multiplier: ``sigma`` >= 0 (0 only for tests: no privacy).
        noise_source: e.g. :class:`~securefed.noise.secure_noise.SecureGaussian`; called once
            per trainable parameter, in ``gsm.parameters()`` order, with ``std = sigma * C``.
        group_size: ``K`` >= 1.

    Returns:
        diagnostics (not privatised: must not leave the client).
    """
    if group_size < 1:
        raise ValueError(f"group_size: the noise multiplicity K must be >= 1, got {group_size}")
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size: must be > 0, got {expected_batch_size}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm: must be finite and > 0, got {max_grad_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier: must be finite and >= 0, got {noise_multiplier}")
    params = [p for p in gsm.parameters() if p.requires_grad]
    _reset_hook_state(gsm, params)
    for p in params:
        p.grad = None

    loss = per_row_loss_fn()
    summed = [torch.zeros_like(p) for p in params]
    b, mean_loss, clipped, mean_norm = 0, 0.0, 0.0, 0.0
    if loss is not None and loss.numel() > 0:
        if loss.dim() != 1:
            raise ValueError(
                f"per_row_loss_fn: expected [K * B] or [B] losses, got shape {tuple(loss.shape)}"
            )
        loss.sum().backward()
        grad_samples = [_grad_sample(p) for p in params]
        rows = {gs.shape[0] for gs in grad_samples if gs is not None}
        if not rows:
            raise RuntimeError(
                "opacus_dp_step: no per-sample gradients (was the forward pass run through the "
                "GradSampleModule?)"
            )
        if len(rows) != 1:
            raise RuntimeError(f"opacus_dp_step: inconsistent per-sample batch sizes {rows}")
        (num_rows,) = rows
        if num_rows % group_size:
            raise ValueError(
                f"per_row_loss_fn: the forward pass evaluated {num_rows} rows, not a multiple of "
                f"K = {group_size}"
            )
        b = num_rows // group_size
        if loss.numel() == num_rows:  # per-row losses: the example's loss is their mean
            scale = 1.0 / group_size
            ex_loss = loss.detach().reshape(group_size, b).mean(dim=0)
        elif loss.numel() == b:  # per-example losses: rows already averaged
            scale = 1.0
            ex_loss = loss.detach()
        else:
            raise ValueError(
                f"per_row_loss_fn: returned {loss.numel()} losses for a forward pass of "
                f"{num_rows} rows with K = {group_size}: expected K * B = {num_rows} or B = {b}"
            )
        per_example = [
            None if gs is None else gs.reshape(group_size, b, *p.shape).sum(dim=0).mul_(scale)
            for p, gs in zip(params, grad_samples, strict=True)
        ]
        sq = torch.zeros(b, dtype=torch.float64, device=loss.device)
        for g in per_example:
            if g is not None:
                sq += g.reshape(b, -1).double().pow(2).sum(dim=1).to(sq.device)
        norms = sq.sqrt()
        factors = clip_factors(norms, max_grad_norm)
        for i, g in enumerate(per_example):
            if g is not None:
                f = factors.to(device=g.device, dtype=g.dtype)
                summed[i] = torch.einsum("b,b...->...", f, g)
        mean_loss = float(ex_loss.mean())
        clipped = float((norms > max_grad_norm).double().mean())
        mean_norm = float(norms.mean())
    std = noise_multiplier * max_grad_norm
    with torch.no_grad():
        noise = draw_noise(noise_source, params, std)
        for i, (p, s, z) in enumerate(zip(params, summed, noise, strict=True)):
            if extra_sum is not None and i in extra_sum:  # audit canaries, before the noise
                s = s + extra_sum[i].to(device=s.device, dtype=s.dtype)
            p.grad = (s if z is None else s + z.to(p.dtype)).div_(expected_batch_size)
    _reset_hook_state(gsm, params)
    return OpacusStepResult(
        batch_size=b, mean_loss=mean_loss, clipped_fraction=clipped, mean_norm=mean_norm
    )


def _grad_sample(p: nn.Parameter) -> torch.Tensor | None:
    """``p.grad_sample`` ``[rows, *p.shape]``, or ``None`` for a parameter the forward skipped."""
    gs = getattr(p, "grad_sample", None)
    if isinstance(gs, list):  # several backward passes accumulated: not ours
        raise RuntimeError("opacus_dp_step: a parameter has several grad_sample entries")
    if gs is None and p.grad is not None and bool(p.grad.any()):
        raise RuntimeError(
            "opacus_dp_step: a parameter received a gradient but no per-sample gradient (was "
            "the forward pass run through the GradSampleModule?)"
        )
    return gs
