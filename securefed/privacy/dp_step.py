"""One DP-SGD gradient computation with exact per-example clipping in a single backward pass.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1) with Poisson
sampling at rate ``q`` replaces the gradient by::

    g~ = ( sum_i clip_C(g_i) + N(0, sigma^2 C^2 I) ) / (q n),   clip_C(g) = g min(1, C / ||g||)

dividing by the EXPECTED batch size ``q n`` as Opacus does for Poisson sampling (the realised
batch size is itself random and must not leak). Here ``g_i`` is the gradient of example ``i``'s
loss over ALL parameters; with noise multiplicity (Dockhorn et al. 2023) example ``i``'s loss
averages ``K`` (timestep, noise) draws that the model sees as ``K`` rows, and the whole
per-example gradient is clipped, so the sensitivity is ``C`` whatever ``K``.

Cost (:class:`~securefed.privacy.per_sample_norms.PerSampleGradNorms`): one forward, one
backward pass that computes only the gradients w.r.t. layer outputs (no weight gradients),
exact per-example norms (ghost/Gram form or per-example gradients, whichever is cheaper per
layer; Li et al. 2022, Bu et al. 2022), then the clipped sum formed per layer from the stored
activations and output gradients with the per-example clip weights (book-keeping, Bu et al.
2023), i.e. one weight-gradient kernel per layer as in a plain step. No second backward
(Lee & Kifer 2021 need one) and no ``[B, *param.shape]`` buffers kept across layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from securefed.privacy.per_sample_norms import NormStrategy, PerSampleGradNorms

__all__ = ["DPStepStats", "GaussianNoiseSource", "dp_sgd_step", "draw_noise"]

#: Added to the norm in the clip factor ``min(1, C / (||g_i|| + eps))`` (Opacus' convention).
CLIP_EPS = 1e-6


class GaussianNoiseSource(Protocol):
    """Anything that draws i.i.d. Gaussian noise (e.g. the AES-CTR-backed SecureGaussian)."""

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device) -> Tensor:
        """``shape`` i.i.d. ``N(0, std^2)`` float32 samples on ``device``."""
        ...


@dataclass(frozen=True)
class DPStepStats:
    """What one :func:`dp_sgd_step` saw (all of it is private data: do not release as is).

    Attributes:
        mean_loss: mean per-example loss over the realised batch (0.0 for an empty batch).
        batch_size: realised number of examples ``B`` (Poisson: random).
        clipped_fraction: share of examples with ``||g_i|| > C``.
        mean_norm: mean per-example gradient norm before clipping.
    """

    mean_loss: float
    batch_size: int
    clipped_fraction: float
    mean_norm: float


def _example_losses(
    loss: Tensor, rows: int, group_size: int, reduction: Literal["mean", "sum"]
) -> Tensor:
    """Per-example losses ``[B]`` from per-row ``[K*B]`` or per-example ``[B]`` losses."""
    if loss.dim() != 1:
        raise ValueError(
            f"dp_sgd_step: per_row_loss_fn must return a 1-d tensor of losses, got shape "
            f"{tuple(loss.shape)}"
        )
    b = rows // group_size
    if loss.shape[0] == rows:
        if group_size == 1:
            return loss
        per = loss.reshape(group_size, b)
        return per.mean(0) if reduction == "mean" else per.sum(0)
    if loss.shape[0] == b:
        return loss
    raise ValueError(
        f"dp_sgd_step: the model saw {rows} rows (group_size {group_size}, so {b} examples) "
        f"but per_row_loss_fn returned {loss.shape[0]} losses; return [K*B] per-row or [B] "
        "per-example losses"
    )


def dp_sgd_step(
    model: nn.Module,
    per_row_loss_fn: Callable[[], Tensor | None],
    *,
    batch_size_expected: float,
    max_grad_norm: float,
    noise_multiplier: float,
    noise_source: GaussianNoiseSource,
    group_size: int = 1,
    row_reduction: Literal["mean", "sum"] = "mean",
    strategy: NormStrategy = "auto",
    extra_sum: Mapping[int, Tensor] | None = None,
) -> DPStepStats:
    """Compute one DP-SGD gradient and leave it in ``p.grad`` of every trainable parameter.

    ``p.grad = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / batch_size_expected`` (overwritten,
    not accumulated), where ``g_i`` is example ``i``'s gradient over all trainable parameters.

    Args:
        model: a model whose trainable layers are all supported by
            :class:`~securefed.privacy.per_sample_norms.PerSampleGradNorms`.
        per_row_loss_fn: runs the forward pass and returns the per-row losses ``[K*B]``
            (row ``k*B + b`` is draw ``k`` of example ``b``; reduced per example with
            ``row_reduction``) or the per-example losses ``[B]`` (e.g. ``diffusion_loss(...,
            num_draws=K)``, which already averages the ``K`` draws). It may return ``None``
            or an empty tensor for an empty Poisson batch (then ``p.grad`` is noise only).
        batch_size_expected: ``q * n`` (Poisson rate times dataset size), ``> 0``.
        max_grad_norm: clipping norm ``C > 0``.
        noise_multiplier: ``sigma >= 0`` (0: no noise is drawn; for tests only).
        noise_source: ``.normal(shape, std, device)``; called once per trainable parameter in
            ``model.parameters()`` order with ``std = sigma * C``.
        group_size: ``K`` rows per example (noise multiplicity).
        row_reduction: how per-row losses combine into an example's loss (``mean``: DPDM).
        strategy: per-layer norm method (see :class:`PerSampleGradNorms`).
        extra_sum: audit canaries: trainable-parameter index (``model.parameters()`` order,
            ``requires_grad`` only) -> ``[param.shape]`` contributions added to the clipped sum
            BEFORE the noise, each already clipped (gradient canaries,
            :mod:`securefed.privacy.canaries`).

    Returns:
        :class:`DPStepStats` of the realised batch.

    Raises:
        ValueError: bad arguments, unsupported layers, or a loss of the wrong length.
    """
    if not batch_size_expected > 0:
        raise ValueError(f"dp_sgd_step: batch_size_expected must be > 0, got {batch_size_expected}")
    if not max_grad_norm > 0:
        raise ValueError(f"dp_sgd_step: max_grad_norm must be > 0, got {max_grad_norm}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"dp_sgd_step: noise_multiplier must be >= 0, got {noise_multiplier}")
    params = [p for p in model.parameters() if p.requires_grad]
    grads: dict[nn.Parameter, Tensor] = {}
    stats = DPStepStats(mean_loss=0.0, batch_size=0, clipped_fraction=0.0, mean_norm=0.0)
    with PerSampleGradNorms(
        model, group_size, strategy=strategy, capture_grads=False
    ) as psn:
        loss = per_row_loss_fn()
        if loss is not None and loss.numel() > 0:
            ex_loss = _example_losses(loss, psn.num_rows, group_size, row_reduction)
            psn.backward(ex_loss.sum())
            norms = psn.norms()
            weights = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
            grads = psn.weighted_grads(weights)
            stats = DPStepStats(
                mean_loss=float(ex_loss.detach().mean()),
                batch_size=int(ex_loss.shape[0]),
                clipped_fraction=float((norms > max_grad_norm).float().mean()),
                mean_norm=float(norms.mean()),
            )
    std = noise_multiplier * max_grad_norm
    noise = draw_noise(noise_source, params, std)
    for i, (p, z) in enumerate(zip(params, noise, strict=True)):
        g = grads.get(p)
        g = torch.zeros_like(p) if g is None else g.to(p.dtype)
        if extra_sum is not None and i in extra_sum:  # audit canaries, before the noise
            g = g + extra_sum[i].to(device=p.device, dtype=p.dtype)
        if z is not None:
            g = g + z.to(p.dtype)
        p.grad = g / batch_size_expected
    return stats


def draw_noise(
    noise_source: GaussianNoiseSource, params: list[nn.Parameter], std: float
) -> list[Tensor | None]:
    """``N(0, std^2 I)`` noise for every parameter, in order (``None`` each when ``std == 0``).

    A source with ``normal_many`` (e.g. ``SecureGaussian``) draws the whole model in one pass
    when the parameters share a device and dtype (identical values to per-parameter calls);
    otherwise ``normal(shape, std, device)`` is called once per parameter.
    """
    if not std > 0:
        return [None] * len(params)
    many = getattr(noise_source, "normal_many", None)
    if many is not None and params and len({(p.device, p.dtype) for p in params}) == 1:
        out: list[Tensor] = many([tuple(p.shape) for p in params], std, params[0].device,
                                 params[0].dtype)
        return list(out)
    return [noise_source.normal(tuple(p.shape), std, p.device) for p in params]
