"""Exact per-example gradient norms without materialising per-example gradients.

DP-SGD (Abadi et al. 2016) clips every example's gradient to ``max_grad_norm`` before summing.
Opacus' hooks materialise one gradient per example and parameter (``[B, *param.shape]``), which
costs memory and time. For the layers of :class:`securefed.diffusion.unet.UNet` the norms can be
computed exactly from what backpropagation already has at hand: the layer input ``a`` (saved in
a forward hook) and the gradient ``g`` w.r.t. the layer output (obtained in the backward pass).

For a layer whose output at position ``p`` is ``W a_p (+ b)`` (``Linear`` over a token
sequence, ``Conv2d`` over the ``P`` spatial positions of its unfolded input), the gradient of
example ``i`` is ``G_i = sum_p g_{i,p} a_{i,p}^T`` and (Goodfellow 2015; Li et al. 2022,
"Large Language Models Can Be Strong Differentially Private Learners", "ghost clipping";
Bu et al. 2022, "Scalable and Efficient Training of Large Convolutional Neural Networks with
Differential Privacy")::

    ||G_i||_F^2 = sum_{p,q} (a_{i,p} . a_{i,q}) (g_{i,p} . g_{i,q})        ("ghost" / Gram form)
                = ||a_i^T g_i||_F^2  with a_i [P, D], g_i [P, O]            ("materialise")

The Gram form costs ``~2 P^2 (D + O)`` multiply-adds per example, materialising one per-example
gradient ``~2 P D O``; :class:`PerSampleGradNorms` picks the cheaper one per layer (and per
convolution group). A stride-1 convolution's per-example gradients can also be formed without
unfolding its input, one batched GEMM per kernel tap on the zero-padded, flattened input
(:func:`_conv_tap_grads`; e.g. the UNet's output convolution, ``Cout = 1``, ~3x faster than its
Gram form), and are then kept for the clipped sum when small. The bias gradient
``sum_p g_{i,p}``, the affine ``GroupNorm`` gradients and ``Embedding`` gradients are small
and are formed per example directly.

Example groups (noise multiplicity, Dockhorn et al. 2023, "Differentially Private Diffusion
Models"): with ``group_size = K`` the model sees ``K * B`` rows laid out draw-major, row
``k * B + b`` being draw ``k`` of example ``b`` (see :func:`securefed.diffusion.loss.
diffusion_loss_from_draws`). The gradient of example ``b`` is the sum of its ``K`` rows'
gradients (when the loss averages the ``K`` draws, the ``1/K`` is already inside ``g``), so the
``K`` rows' positions are concatenated (``P -> K P``) and the example's whole gradient is
clipped, never a single row's.

Pass 2 of DP-SGD ("book-keeping", Bu et al. 2023, "Differentially Private Optimization on Large
Model at Small Cost"): once every example's clip weight ``w_i = min(1, C / (||g_i|| + 1e-6))``
is known, :meth:`PerSampleGradNorms.weighted_grads` forms ``sum_i w_i G_i`` from the same stored
activations and output gradients, one ordinary weight-gradient kernel per layer with the output
gradient rows scaled by ``w``, so no second backward pass is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "SUPPORTED_LAYERS",
    "NormStrategy",
    "PerSampleGradNorms",
    "trainable_layers",
]

#: Layer types whose per-example gradient norms are supported.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)

#: ``auto``: per layer the cheaper of the two exact forms; ``ghost``: always the Gram form;
#: ``materialise``: always form per-example weight gradients (in chunks of examples).
NormStrategy = Literal["auto", "ghost", "materialise"]

# Cost model used by ``strategy="auto"``, in units of one multiply-add inside a Gram GEMM, per
# example: a multiply-add of a per-example-gradient GEMM (short inner dimension) costs
# ``_MATERIALISE_GEMM``, an element of a memory-bound pass (shifted adds, squares, copies)
# ``_MEM_COST`` and an element written by ``F.unfold`` ``_UNFOLD_COST``. Fitted to per-layer
# timings of both forms on one AVX2 core (default UNet, batch 128, K = 1 and 4); the constants
# only steer the choice, never the result.
_MATERIALISE_GEMM = 2.0
_MEM_COST = 25.0
_UNFOLD_COST = 80.0
# Elements per chunk of per-example intermediates (Gram matrices or per-example gradients):
# 2^17 float32 (512 KiB per array; a chunk's 4-5 live arrays stay in a 2 MiB per-core L2).
# With 2^20 the ghost norms of the default UNet at batch 128 took ~1.4x longer (issue 14).
_CHUNK_ELEMENTS = 1 << 17
# A layer whose per-example weight gradients are materialised for its norms keeps them (for the
# clipped sum ``w @ G``, instead of a second weight-gradient kernel) when all of them together
# have at most this many elements (4 MiB of float32); larger ones are recomputed per chunk.
_KEEP_ELEMENTS = 1 << 20


def _layer_kind_error(name: str, module: nn.Module) -> str | None:
    """Why ``module`` (named ``name``) cannot be handled, or ``None`` if it can."""
    label = f"layer {name!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (
            f"{label} cannot be made differentially private: per-example gradients are not "
            "defined for batch statistics; use GroupNorm"
        )
    if not isinstance(module, SUPPORTED_LAYERS):
        return (
            f"{label} cannot be made differentially private: per-example gradient norms are "
            "implemented for Conv2d, Linear, GroupNorm and Embedding only; replace the layer or "
            "freeze its parameters (requires_grad=False)"
        )
    base = next(t for t in SUPPORTED_LAYERS if isinstance(module, t))
    if type(module).forward is not base.forward:
        return (
            f"{label} cannot be made differentially private: it overrides {base.__name__}."
            "forward, so its per-example gradients cannot be derived from the layer's input "
            "and output gradient"
        )
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return (
            f"{label} cannot be made differentially private: scale_grad_by_freq makes one "
            "example's gradient depend on the other examples of the batch"
        )
    return None


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that own trainable parameters, checked to be supported.

    Args:
        model: any module tree.

    Returns:
        ``(qualified name, module)`` in ``named_modules()`` order, for every module with at least
        one own parameter that requires grad.

    Raises:
        ValueError: naming the first layer whose per-example gradients cannot be computed (e.g.
            ``"layer 'down.0.bn' (BatchNorm2d) cannot be made differentially private: ..."``).
            Batch normalisation is refused even without trainable parameters, since its batch
            statistics couple the examples.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if not owns and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        err = _layer_kind_error(name or "<root>", module)
        if err is not None:
            raise ValueError(err)
        if owns:
            layers.append((name or "<root>", module))
    return layers


@dataclass
class _Call:
    """One forward call of a layer: its input, output and (after backward) output gradient."""

    inp: Tensor  # detached layer input, [N, ...]
    out: Tensor  # layer output as it sits in the autograd graph, [N, ...]
    versions: tuple[int, int]  # (inp._version, out._version) when recorded
    grad: Tensor | None = None  # d(loss)/d(out), [N, ...]


@dataclass
class _Layer:
    name: str
    module: nn.Module
    calls: list[_Call] = field(default_factory=list)
    # per-example gradients [B, *param.shape], filled by norms(): the small parameters (bias,
    # GroupNorm affine) and, where the norm materialised them, the weight (<= _KEEP_ELEMENTS)
    small: dict[str, Tensor] = field(default_factory=dict)
    sq_norm: Tensor | None = None  # [B]
    choice: str = ""


def _outer_choice(t: int, d: int, o: int, strategy: NormStrategy) -> str:
    """``ghost`` or ``materialise`` for ``||a^T g||_F^2`` with ``a [T, D]``, ``g [T, O]``."""
    if strategy != "auto":
        return strategy
    ghost = t * t * (d + o) + _MEM_COST * t * t
    mat = _MATERIALISE_GEMM * t * d * o + _MEM_COST * d * o
    return "ghost" if ghost <= mat else "materialise"


def _conv_choice(
    mod: nn.Conv2d, hw_in: tuple[int, int], hw_out: tuple[int, int], k: int,
    strategy: NormStrategy,
) -> str:
    """``ghost`` (input-Gram form, :func:`_conv_ghost_sq`), ``materialise`` (unfold + GEMM) or
    ``taps`` (per-tap GEMMs on the padded input, :func:`_conv_tap_grads`; stride 1 only).

    ``strategy="materialise"`` picks the cheaper of the two materialising forms.
    """
    if strategy == "ghost":
        return "ghost"
    kh, kw = mod.kernel_size
    cg, og = mod.in_channels // mod.groups, mod.out_channels // mod.groups
    hin, win = hw_in
    ho, wo = hw_out
    p = ho * wo
    dg = cg * kh * kw
    mat: float = _MATERIALISE_GEMM * k * p * dg * og + _MEM_COST * dg * og
    if not _conv_is_pointwise(mod):
        mat += _UNFOLD_COST * k * p * dg * (1 if k == 1 else 2)  # unfold (+ regroup copy)
    elif k > 1:
        mat += _MEM_COST * k * p * dg  # regroup copy
    form = "materialise"
    if _conv_is_tapwise(mod):
        hp, wp = _conv_tap_geometry(mod, hw_out)[:2]
        taps = _MATERIALISE_GEMM * k * ho * wp * dg * og
        taps += _MEM_COST * (dg * og + k * (cg * hp * wp + og * ho * wp))  # output, pad copies
        if taps < mat:
            form, mat = "taps", taps
    if strategy == "materialise":
        return form
    ghost: float = k * k * ((hin * win) ** 2 * cg + p * p * og)
    ghost += _MEM_COST * k * k * ((kh + 1) * (ho * win) ** 2 + (kw + 1) * p * p + p * p)
    return "ghost" if ghost <= mat else form


def _sum_outer_sq(a: Tensor, g: Tensor, choice: str) -> Tensor:
    """``||a_m^T g_m||_F^2`` for every ``m``, without forming all ``a_m^T g_m`` at once.

    Args:
        a: ``[M, T, D]`` inputs at ``T`` positions (any strides).
        g: ``[M, T, O]`` output gradients at the same positions.
        choice: ``ghost`` (``sum_{p,q} (a_p . a_q)(g_p . g_q)``) or ``materialise``.

    Returns:
        ``[M]`` squared Frobenius norms (float32 or the inputs' dtype).
    """
    m, t, d = a.shape
    o = g.shape[2]
    if t == 1:
        return a.reshape(m, d).square().sum(1) * g.reshape(m, o).square().sum(1)
    per = t * t if choice == "ghost" else d * o
    chunk = max(1, _CHUNK_ELEMENTS // max(per, 1))
    out = []
    for s in range(0, m, chunk):
        ac, gc = a[s : s + chunk], g[s : s + chunk]
        if choice == "ghost":
            ga = torch.bmm(ac, ac.transpose(1, 2))
            gg = torch.bmm(gc, gc.transpose(1, 2))
            out.append((ga * gg).sum((1, 2)))
        else:
            out.append(torch.bmm(ac.transpose(1, 2), gc).square().sum((1, 2)))
    return torch.cat(out) if out else a.new_zeros(0)


def _outer_grads_sq(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor] | None:
    """All ``a_m^T g_m`` at once and their squared norms, or ``None`` if that is too large.

    Args:
        a: ``[M, T, D]``; g: ``[M, T, O]`` (as in :func:`_sum_outer_sq`).

    Returns:
        ``([M, D, O] per-example gradients, [M] squared Frobenius norms)`` when
        ``M * D * O <= _KEEP_ELEMENTS`` (then the clipped sum reuses them), else ``None``.
    """
    m, _, d = a.shape
    o = g.shape[2]
    if m * d * o > _KEEP_ELEMENTS:
        return None
    grads = torch.bmm(a.transpose(1, 2), g)
    return grads, grads.reshape(m, -1).square().sum(1)


def _group_rows(x: Tensor, k: int) -> Tensor:
    """``[K*B, *rest] -> [B, K, *rest]`` (row ``k*B + b`` is draw ``k`` of example ``b``)."""
    b = x.shape[0] // k
    return x.reshape(k, b, *x.shape[1:]).transpose(0, 1)


def _example_sum(x: Tensor, k: int) -> Tensor:
    """Per-example sums of per-row tensors: ``[K*B, *rest] -> [B, *rest]``."""
    if k == 1:
        return x
    return x.reshape(k, x.shape[0] // k, *x.shape[1:]).sum(0)


def _conv_input(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The input as the convolution sees it, plus the zero padding still to apply.

    Non-zero padding modes and string paddings (``same`` may be asymmetric) are applied
    explicitly with ``F.pad`` so that unfold and the weight-gradient kernel agree with
    ``nn.Conv2d.forward``.
    """
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        pads = list(module._reversed_padding_repeated_twice)
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pads, mode=mode)
        return x, (0, 0)
    pad = module.padding
    return x, (int(pad[0]), int(pad[1]))


def _conv_is_pointwise(module: nn.Conv2d) -> bool:
    """A 1x1, stride-1, unpadded convolution (its unfolded input is the input itself)."""
    return (
        module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and not any(module._reversed_padding_repeated_twice)
    )


def _conv_unfold(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Unfolded input ``[N, Cin * kh * kw, P]`` (channel-major, as ``F.unfold``)."""
    if _conv_is_pointwise(module):
        return x.flatten(2)
    xp, pad = _conv_input(module, x)
    k = module.kernel_size
    return F.unfold(xp, k, dilation=module.dilation, padding=pad, stride=module.stride)


def _conv_is_tapwise(module: nn.Conv2d) -> bool:
    """A stride-1 convolution with a kernel larger than 1x1 (see :func:`_conv_tap_grads`)."""
    return module.stride == (1, 1) and module.kernel_size != (1, 1)


def _conv_tap_geometry(module: nn.Conv2d, hw_out: tuple[int, int]) -> tuple[int, int, list[int]]:
    """``(Hp, Wp, offsets)`` of the flattened layout of :func:`_conv_tap_grads` (stride 1).

    The padded input has ``Wp = Wo + (kw - 1) dw`` columns and ``Hp = Ho + (kh - 1) dh + 1``
    rows (one spare zero row at the bottom, so that every tap's window stays inside); output
    position ``(h, w)`` sits at flat index ``h Wp + w``, and kernel tap ``(i, j)`` reads the
    input at ``h Wp + w + offsets[i kw + j]``, ``offsets[i kw + j] = i dh Wp + j dw``.
    """
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    ho, wo = hw_out
    wp = wo + (kw - 1) * dw
    hp = ho + (kh - 1) * dh + 1
    return hp, wp, [i * dh * wp + j * dw for i in range(kh) for j in range(kw)]


def _conv_tap_grads(
    module: nn.Conv2d, x: Tensor, g: Tensor, k: int, lo: int, hi: int
) -> Tensor:
    """Per-example weight gradients of a stride-1 convolution, one batched GEMM per kernel tap.

    No unfolded input is formed: the input is zero-padded to ``Hp x Wp`` and flattened, the
    output gradient padded with ``Wp - Wo = (kw - 1) dw`` zero columns to ``Ho x Wp`` and
    flattened (length ``L = Ho Wp``). Then the window of the flattened input starting at the
    tap's offset (see :func:`_conv_tap_geometry`) lines up with the output positions: the
    gradient of tap ``(i, j)`` is ``g_flat [Og, L] @ x_flat[:, off : off + L]^T [L, Cg]``
    (the padded columns of ``g`` are zero, so the windows' wrap-around entries drop out), a
    strided view that the GEMM reads in place. Example ``b``'s gradient sums its ``K`` rows'.

    Args:
        module: a convolution with ``stride == (1, 1)`` (any padding, padding mode, dilation,
            groups).
        x: ``[K*B, Cin, H, W]`` layer input; g: ``[K*B, Cout, Ho, Wo]`` output gradient.
        k: rows per example; lo, hi: the examples ``lo <= b < hi`` to compute.

    Returns:
        ``[kh * kw, (hi - lo) * G, Og, Cg]``: entry ``[i kw + j, b G + gi, o, c]`` is
        ``d loss_b / d weight[gi Og + o, c, i, j]``.
    """
    xp, pad = _conv_input(module, x)
    n, cin, hin, win = xp.shape
    b, groups = n // k, module.groups
    cg, og = cin // groups, module.out_channels // groups
    ho, wo = g.shape[2], g.shape[3]
    hp, wp, offsets = _conv_tap_geometry(module, (ho, wo))
    if (hin + 2 * pad[0] + 1, win + 2 * pad[1]) != (hp, wp):  # pragma: no cover - invariant
        raise RuntimeError(f"_conv_tap_grads: padded input {hin}x{win} does not match {hp}x{wp}")
    length = ho * wp
    m = (hi - lo) * groups
    out = xp.new_empty(len(offsets), m, og, cg)
    for r in range(k):
        rows = slice(r * b + lo, r * b + hi)
        xf = F.pad(xp[rows], (pad[1], pad[1], pad[0], pad[0] + 1)).reshape(m, cg, hp * wp)
        gf = F.pad(g[rows], (0, wp - wo)).reshape(m, og, length)
        for t, off in enumerate(offsets):
            window = xf[:, :, off : off + length].transpose(1, 2)  # [M, L, Cg], read in place
            if r == 0:
                torch.bmm(gf, window, out=out[t])
            else:
                out[t].baddbmm_(gf, window)
    return out


def _cat3(xs: list[Tensor]) -> Tensor:
    """Concatenate along dim 3 without copying a single tensor."""
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=3)


def _cat1(xs: list[Tensor]) -> Tensor:
    """Concatenate along dim 1 without copying a single tensor."""
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)


def _tap_ranges(
    size_in: int, size_out: int, taps: int, dil: int, stride: int, pad: int
) -> list[tuple[int, int, int]]:
    """For each kernel tap ``i``: ``(p_lo, p_hi, u_lo)`` such that output positions
    ``p_lo <= p < p_hi`` read input position ``u = u_lo + (p - p_lo) * stride`` (inside the
    unpadded input); positions that read padding are left out (their input is zero)."""
    out = []
    for i in range(taps):
        off = i * dil - pad  # u = p * stride + off
        p_lo = max(0, -(off // stride) if off < 0 else 0)
        while p_lo * stride + off < 0:
            p_lo += 1
        p_hi = min(size_out, (size_in - 1 - off) // stride + 1) if size_in - 1 - off >= 0 else 0
        if p_hi > p_lo:
            out.append((p_lo, p_hi, p_lo * stride + off))
    return out


def _shift_sum(
    gram: Tensor,
    dims: tuple[int, int],
    ranges: list[tuple[int, int, int]],
    size_out: int,
    stride: int,
) -> Tensor:
    """``S[.., p, .., q, ..] = sum_i gram[.., u_i(p), .., u_i(q), ..]`` over kernel taps ``i``.

    ``gram`` holds input products at positions ``u, v`` along one spatial axis in dims
    ``dims``; tap ``i`` at output positions ``p, q`` reads ``u_i(p), u_i(q)`` (see
    :func:`_tap_ranges`). The result has ``size_out`` in both dims.
    """
    dp, dq = dims
    if len(ranges) == 1 and ranges[0] == (0, size_out, 0) and stride == 1 and (
        gram.shape[dp] == size_out
    ):
        return gram  # a single tap reading every position (1x1, stride 1, no padding)

    def src(u_lo: int, count: int) -> Tensor:
        idx: list[slice] = [slice(None)] * gram.dim()
        idx[dp] = idx[dq] = slice(u_lo, u_lo + (count - 1) * stride + 1, stride)
        return gram[tuple(idx)]

    # start from a tap that covers every output position (the centre tap of a "same" conv)
    full = next((r for r in ranges if r[0] == 0 and r[1] == size_out), None)
    if full is not None:
        acc = src(full[2], size_out).clone(memory_format=torch.contiguous_format)
    else:
        shape = list(gram.shape)
        shape[dp] = shape[dq] = size_out
        acc = gram.new_zeros(shape)
    for r in ranges:
        if r is full:
            continue
        p_lo, p_hi, u_lo = r
        dst_idx: list[slice] = [slice(None)] * gram.dim()
        dst_idx[dp] = dst_idx[dq] = slice(p_lo, p_hi)
        acc[tuple(dst_idx)] += src(u_lo, p_hi - p_lo)
    return acc


def _conv_ghost_sq(mod: nn.Conv2d, x: Tensor, g: Tensor, k: int) -> Tensor:
    """Per-example ``||grad W||_F^2`` of a Conv2d in Gram form, without unfolding the input.

    For unfolded patches ``a_p`` the Gram ``a_p . a_q = sum_{c,i,j} x[c, p+(i,j)] x[c, q+(i,j)]``
    is a sum over kernel taps of the (zero-padded) input Gram ``X^T X`` over pixel pairs,
    shifted by the tap offset (the ghost norm of Li et al. 2022 / Bu et al. 2022, computed here
    from ``(H W)^2`` input Gram entries instead of a ``kh kw``-times larger unfolded input).
    The tap sum is separable: first over the row taps, then over the column taps. Then
    ``||G||^2 = sum_{p,q} (a_p . a_q)(g_p . g_q)`` per example and group.

    Args:
        mod: the convolution (any stride, padding, padding mode, dilation, groups).
        x: ``[K*B, Cin, H, W]`` layer input.
        g: ``[K*B, Cout, Ho, Wo]`` gradient w.r.t. the layer output.
        k: rows per example.

    Returns:
        ``[B]`` squared norms of the weight gradient.
    """
    xp, pad = _conv_input(mod, x)
    n, cin, hin, win = xp.shape
    b, groups = n // k, mod.groups
    cg, og = cin // groups, mod.out_channels // groups
    ho, wo = g.shape[2], g.shape[3]
    m = b * groups
    if m == 0:
        return xp.new_zeros(b)
    rows = _tap_ranges(hin, ho, mod.kernel_size[0], mod.dilation[0], mod.stride[0], pad[0])
    cols = _tap_ranges(win, wo, mod.kernel_size[1], mod.dilation[1], mod.stride[1], pad[1])
    if k == 1:
        a = xp.reshape(m, cg, hin * win)  # [M, cg, HW]
        gg = g.reshape(m, og, ho * wo)
    else:
        a = xp.reshape(k, b, groups, cg, hin * win).permute(1, 2, 3, 0, 4).reshape(
            m, cg, k * hin * win)
        gg = g.reshape(k, b, groups, og, ho * wo).permute(1, 2, 3, 0, 4).reshape(
            m, og, k * ho * wo)
    per = max((k * hin * win) ** 2, 1)
    chunk = max(1, _CHUNK_ELEMENTS // per)
    out = []
    for s in range(0, m, chunk):
        ac, gc = a[s : s + chunk], gg[s : s + chunk]
        mc = ac.shape[0]
        gram_x = torch.bmm(ac.transpose(1, 2), ac).view(mc, k, hin, win, k, hin, win)
        s_h = _shift_sum(gram_x, (2, 5), rows, ho, mod.stride[0])  # [mc, K, Ho, W, K, Ho, W]
        s_hw = _shift_sum(s_h, (3, 6), cols, wo, mod.stride[1])  # [mc, K, Ho, Wo, K, Ho, Wo]
        gram_g = torch.bmm(gc.transpose(1, 2), gc)  # [mc, K*Ho*Wo, K*Ho*Wo]
        out.append((s_hw.reshape(mc, -1) * gram_g.reshape(mc, -1)).sum(1))
    sq = torch.cat(out) if len(out) > 1 else out[0]
    return sq.reshape(b, groups).sum(1)


class PerSampleGradNorms:
    """Exact per-example gradient norms of a model's trainable parameters.

    Registers a forward hook on every layer that owns trainable parameters (``Conv2d`` with any
    stride, padding, padding mode, dilation and groups; ``Linear`` on inputs of any leading shape
    ``[N, *, D]``; affine ``GroupNorm``; ``Embedding``) that stores the layer's input and output;
    in the default mode a tensor hook on the output stores ``d loss / d output`` during
    ``loss.backward()`` (the ``grad_output`` a full backward hook would see). A layer called
    several times per forward (weight sharing) is handled: its calls' positions are
    concatenated.

    Usage::

        with PerSampleGradNorms(model, group_size=K) as psn:
            loss_rows = per_row_losses(model, batch)   # [K * B] (or per-example [B])
            loss_rows.sum().backward()                 # the SUM over rows (or examples)
            norms = psn.norms()                        # [B]

    Args:
        model: the model; every module owning a trainable parameter must be supported.
        group_size: ``K``: rows ``k * B + b`` (``k < K``) belong to example ``b``; the
            per-example gradient is the sum of its rows' gradients.
        strategy: ``auto`` picks, per layer, the cheaper of the Gram ("ghost") and
            materialised forms (by multiply-add count); ``ghost``/``materialise`` force one.
        capture_grads: record output gradients with tensor hooks during ``loss.backward()``.
            With ``False`` call :meth:`backward` instead (DP-SGD's fast path), which computes
            only the gradients w.r.t. layer outputs and leaves every ``.grad`` untouched.

    Raises:
        ValueError: ``group_size < 1``, an unknown strategy, or an unsupported layer (see
            :func:`trainable_layers`).
    """

    def __init__(
        self,
        model: nn.Module,
        group_size: int = 1,
        *,
        strategy: NormStrategy = "auto",
        capture_grads: bool = True,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"PerSampleGradNorms: group_size must be >= 1, got {group_size}")
        if strategy not in ("auto", "ghost", "materialise"):
            raise ValueError(
                f"PerSampleGradNorms: strategy must be 'auto', 'ghost' or 'materialise', "
                f"got {strategy!r}"
            )
        self.model = model
        self.group_size = group_size
        self.strategy: NormStrategy = strategy
        self.capture_grads = capture_grads
        self._layers = [_Layer(name, mod) for name, mod in trainable_layers(model)]
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_hook(self._make_hook(layer)) for layer in self._layers
        ]
        self._rows: int | None = None

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, layer: _Layer) -> Callable[[nn.Module, tuple[object, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: Tensor) -> None:
            if not (
                torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad
            ):
                return
            if not inputs or not isinstance(inputs[0], Tensor):
                raise ValueError(
                    f"PerSampleGradNorms: layer {layer.name!r} must be called with its input "
                    "tensor as the first positional argument"
                )
            inp = inputs[0]
            rows = inp.shape[0] if inp.dim() > 0 else 1
            if self._rows is None:
                self._rows = rows
            elif rows != self._rows:
                raise ValueError(
                    f"PerSampleGradNorms: layer {layer.name!r} saw {rows} rows but an earlier "
                    f"layer saw {self._rows}; every layer must see the same batch (call clear() "
                    "between batches)"
                )
            call = _Call(inp.detach(), output, (inp._version, output._version))
            layer.calls.append(call)
            if self.capture_grads:

                def grad_hook(grad: Tensor, call: _Call = call) -> None:
                    call.grad = grad if call.grad is None else call.grad + grad

                output.register_hook(grad_hook)

        return hook

    def __enter__(self) -> PerSampleGradNorms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Unregister every hook and drop the stored tensors."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Forget stored activations and gradients (start a new batch)."""
        for layer in self._layers:
            layer.calls = []
            layer.small = {}
            layer.sq_norm = None
            layer.choice = ""
        self._rows = None

    # --------------------------------------------------------------- backward
    @property
    def num_rows(self) -> int:
        """Rows ``N = K * B`` seen by the layers in the recorded forward (0 if none)."""
        return self._rows or 0

    @property
    def batch_size(self) -> int:
        """Examples ``B = N / K`` in the recorded forward."""
        n = self.num_rows
        if n % self.group_size:
            raise ValueError(
                f"PerSampleGradNorms: {n} rows is not a multiple of group_size "
                f"{self.group_size}; rows k*B+b must belong to example b"
            )
        return n // self.group_size

    def _all_calls(self) -> list[_Call]:
        return [c for layer in self._layers for c in layer.calls]

    def backward(self, loss: Tensor, *, retain_graph: bool = False) -> None:
        """Backpropagate a scalar ``loss`` to the recorded layer outputs only.

        Computes ``d loss / d output`` of every recorded layer call with one
        ``torch.autograd.grad`` call (no parameter gradient is formed and no ``.grad`` is
        written), for :meth:`norms` and :meth:`weighted_grads`.

        Args:
            loss: scalar; the SUM of the per-example (or per-row) losses.
            retain_graph: keep the graph (e.g. for a second, reweighted backward pass).
        """
        calls = self._all_calls()
        if not calls:
            return
        grads = torch.autograd.grad(
            loss, [c.out for c in calls], allow_unused=True, retain_graph=retain_graph
        )
        for c, g in zip(calls, grads, strict=True):
            c.grad = g

    # ------------------------------------------------------------------ norms
    def _check_versions(self, layer: _Layer) -> None:
        for c in layer.calls:
            if (c.inp._version, c.out._version) != c.versions:
                raise RuntimeError(
                    f"PerSampleGradNorms: the input or output of layer {layer.name!r} was "
                    "modified in place after the forward hook ran; per-example gradients would "
                    "be wrong (avoid inplace=True right after a trainable layer)"
                )

    def norms(self) -> Tensor:
        """Per-example norms of the whole gradient (all trainable parameters).

        Call after ``loss.backward()`` (or :meth:`backward`) of the SUM over rows/examples.

        Returns:
            ``[B]`` float tensor, ``||grad_b||_2`` over every trainable parameter, where
            ``grad_b`` sums the gradients of example ``b``'s ``K`` rows.
        """
        return self.layer_sq_norms_total().sqrt()

    def layer_sq_norms_total(self) -> Tensor:
        """``[B]`` sum over layers of the per-example squared gradient norms."""
        b = self.batch_size
        total: Tensor | None = None
        for layer in self._layers:
            sq = self._layer_sq_norm(layer, b)
            total = sq if total is None else total + sq
        if total is None:
            return torch.zeros(b)
        return total

    def layer_norms(self) -> dict[str, Tensor]:
        """Per-layer per-example gradient norms ``{layer name: [B]}`` (e.g. for gradient audits)."""
        b = self.batch_size
        return {layer.name: self._layer_sq_norm(layer, b).sqrt() for layer in self._layers}

    def layer_choices(self) -> dict[str, str]:
        """How each layer's weight norm was computed: ``ghost``, ``materialise`` (unfold + GEMM),
        ``taps`` (per-tap GEMMs, stride-1 convolutions) or ``direct``."""
        b = self.batch_size
        for layer in self._layers:
            self._layer_sq_norm(layer, b)
        return {layer.name: layer.choice for layer in self._layers}

    def _grads(self, layer: _Layer) -> list[tuple[Tensor, Tensor]]:
        """``(input, output grad)`` of the calls that reached the loss."""
        return [(c.inp, c.grad) for c in layer.calls if c.grad is not None]

    def _layer_sq_norm(self, layer: _Layer, b: int) -> Tensor:
        if layer.sq_norm is not None:
            return layer.sq_norm
        self._check_versions(layer)
        mod = layer.module
        pairs = self._grads(layer)
        if not pairs:
            dev = next(mod.parameters()).device
            layer.sq_norm = torch.zeros(b, device=dev)
            layer.choice = "unused"
            return layer.sq_norm
        if isinstance(mod, nn.Conv2d):
            sq = self._conv_sq(layer, mod, pairs, b)
        elif isinstance(mod, nn.Linear):
            sq = self._linear_sq(layer, mod, pairs, b)
        elif isinstance(mod, nn.GroupNorm):
            sq = self._groupnorm_sq(layer, mod, pairs)
        elif isinstance(mod, nn.Embedding):
            sq = self._embedding_sq(layer, mod, pairs, b)
        else:  # pragma: no cover - only supported layers are hooked
            raise TypeError(f"per-sample norms: unsupported layer {type(mod).__name__}")
        layer.sq_norm = sq
        return sq

    def _positions(self, x: Tensor, b: int) -> Tensor:
        """``[K*B, T, F] -> [B, K*T, F]`` (positions of an example's rows concatenated)."""
        k = self.group_size
        if k == 1:
            return x
        return _group_rows(x, k).reshape(b, k * x.shape[1], x.shape[2])

    def _linear_sq(
        self, layer: _Layer, mod: nn.Linear, pairs: list[tuple[Tensor, Tensor]], b: int
    ) -> Tensor:
        k = self.group_size
        n = b * k
        a = _cat1([x.reshape(n, -1, mod.in_features) for x, _ in pairs])
        g = _cat1([gr.reshape(n, -1, mod.out_features) for _, gr in pairs])
        sq = a.new_zeros(b)
        if mod.bias is not None and mod.bias.requires_grad:
            gb = _example_sum(g.sum(1), k)  # [B, O]
            layer.small["bias"] = gb
            sq = sq + gb.square().sum(1)
        if mod.weight.requires_grad:
            a3, g3 = self._positions(a, b), self._positions(g, b)
            t = a3.shape[1]
            choice = _outer_choice(t, mod.in_features, mod.out_features, self.strategy)
            layer.choice = "direct" if t == 1 else choice
            kept = _outer_grads_sq(a3, g3) if t > 1 and choice == "materialise" else None
            if kept is not None:  # [B, D, O] -> per-example weight gradients [B, O, D]
                layer.small["weight"] = kept[0].transpose(1, 2)
                sq = sq + kept[1]
            else:
                sq = sq + _sum_outer_sq(a3, g3, choice)
        return sq

    def _conv_sq(
        self, layer: _Layer, mod: nn.Conv2d, pairs: list[tuple[Tensor, Tensor]], b: int
    ) -> Tensor:
        k, groups = self.group_size, mod.groups
        n = b * k
        o = mod.out_channels
        sq = pairs[0][1].new_zeros(b)
        if mod.bias is not None and mod.bias.requires_grad:
            gb = _example_sum(torch.stack([gr.sum((2, 3)) for _, gr in pairs]).sum(0), k)  # [B, O]
            layer.small["bias"] = gb
            sq = sq + gb.square().sum(1)
        if not mod.weight.requires_grad:
            return sq
        dg = (mod.in_channels // groups) * mod.kernel_size[0] * mod.kernel_size[1]
        og = o // groups
        t = k * sum(gr.shape[2] * gr.shape[3] for _, gr in pairs)
        if len(pairs) == 1:
            x0, g0 = pairs[0]
            choice = _conv_choice(
                mod, (x0.shape[2], x0.shape[3]), (g0.shape[2], g0.shape[3]), k, self.strategy
            )
            if choice == "ghost":
                layer.choice = "ghost"
                return sq + _conv_ghost_sq(mod, x0, g0, k)
            if choice == "taps":
                layer.choice = "taps"
                return sq + self._conv_tap_sq(layer, mod, x0, g0, b)
        else:
            # several calls (weight sharing): Gram form over the unfolded, concatenated positions
            choice = _outer_choice(t, dg, og, self.strategy)
        # a: [N, G, Dg, P], g: [N, G, Og, P]; positions of all calls concatenated
        a = _cat3(
            [_conv_unfold(mod, x).reshape(n, groups, dg, gr.shape[2] * gr.shape[3])
             for x, gr in pairs]
        )
        g = _cat3([gr.reshape(n, groups, og, -1) for _, gr in pairs])
        p = a.shape[3]
        if k > 1:
            # [K, B, G, F, P] -> [B, G, F, K, P] -> [B, G, F, K*P]
            a = a.reshape(k, b, groups, dg, p).permute(1, 2, 3, 0, 4).reshape(b, groups, dg, k * p)
            g = g.reshape(k, b, groups, og, p).permute(1, 2, 3, 0, 4).reshape(b, groups, og, k * p)
        layer.choice = choice
        a_m = a.reshape(b * groups, dg, t).transpose(1, 2)  # [B*G, T, Dg]
        g_m = g.reshape(b * groups, og, t).transpose(1, 2)  # [B*G, T, Og]
        kept = _outer_grads_sq(a_m, g_m) if choice == "materialise" else None
        if kept is not None:  # [B*G, Dg, Og] -> per-example weight gradients [B, O, Dg]
            layer.small["weight"] = (
                kept[0].reshape(b, groups, dg, og).transpose(2, 3).reshape(b, *mod.weight.shape)
            )
            return sq + kept[1].reshape(b, groups).sum(1)
        return sq + _sum_outer_sq(a_m, g_m, choice).reshape(b, groups).sum(1)

    def _conv_tap_sq(self, layer: _Layer, mod: nn.Conv2d, x: Tensor, g: Tensor, b: int) -> Tensor:
        """Weight part of :meth:`_conv_sq` by per-example gradients from :func:`_conv_tap_grads`:
        all at once and kept for the clipped sum when ``B * |weight| <= _KEEP_ELEMENTS``,
        otherwise in chunks of examples (``_CHUNK_ELEMENTS``), norms only."""
        k, groups = self.group_size, mod.groups
        per = mod.weight.numel()  # elements of one example's weight gradient
        if b * per <= _KEEP_ELEMENTS:
            grads = _conv_tap_grads(mod, x, g, k, 0, b)  # [T, B*G, Og, Cg]
            kh, kw = mod.kernel_size
            og, cg = grads.shape[2], grads.shape[3]
            layer.small["weight"] = (
                grads.view(kh, kw, b, groups, og, cg).permute(2, 3, 4, 5, 0, 1)
                .reshape(b, *mod.weight.shape)
            )
            return grads.square().sum((0, 2, 3)).reshape(b, groups).sum(1)
        chunk = max(1, _CHUNK_ELEMENTS // per)
        parts = [
            _conv_tap_grads(mod, x, g, k, lo, min(b, lo + chunk)).square().sum((0, 2, 3))
            for lo in range(0, b, chunk)
        ]
        return torch.cat(parts).reshape(b, groups).sum(1)

    def _groupnorm_sq(
        self, layer: _Layer, mod: nn.GroupNorm, pairs: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        k = self.group_size
        gw: Tensor | None = None
        gb: Tensor | None = None
        for x, gr in pairs:
            n, c = gr.shape[0], gr.shape[1]
            g2 = gr.reshape(n, c, -1)
            if mod.weight is not None and mod.weight.requires_grad:
                xhat = F.group_norm(x, mod.num_groups, None, None, mod.eps).reshape(n, c, -1)
                w_rows = (g2 * xhat).sum(2)
                gw = w_rows if gw is None else gw + w_rows
            if mod.bias is not None and mod.bias.requires_grad:
                b_rows = g2.sum(2)
                gb = b_rows if gb is None else gb + b_rows
        layer.choice = "direct"
        sq: Tensor | None = None
        for key, rows in (("weight", gw), ("bias", gb)):
            if rows is not None:
                per_ex = _example_sum(rows, k)
                layer.small[key] = per_ex
                s = per_ex.square().sum(1)
                sq = s if sq is None else sq + s
        if sq is None:
            raise RuntimeError(
                f"PerSampleGradNorms: layer {layer.name!r} has no trainable parameter"
            )
        return sq

    def _embedding_sq(
        self, layer: _Layer, mod: nn.Embedding, pairs: list[tuple[Tensor, Tensor]], b: int
    ) -> Tensor:
        k = self.group_size
        n = b * k
        e = mod.embedding_dim
        idx = _cat1([x.reshape(n, -1) for x, _ in pairs])  # [N, L]
        g = _cat1([gr.reshape(n, -1, e) for _, gr in pairs])  # [N, L, E]
        if mod.padding_idx is not None:
            g = g * (idx != mod.padding_idx).unsqueeze(2).to(g.dtype)
        idx3 = self._positions(idx.unsqueeze(2), b).squeeze(2)  # [B, T]
        g3 = self._positions(g, b)  # [B, T, E]
        layer.choice = "direct"
        if idx3.shape[1] == 1:
            return g3.reshape(b, e).square().sum(1)
        same = (idx3.unsqueeze(2) == idx3.unsqueeze(1)).to(g3.dtype)  # [B, T, T]
        return (torch.bmm(g3, g3.transpose(1, 2)) * same).sum((1, 2))

    # ------------------------------------------------------- weighted gradient
    def weighted_grads(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        """``sum_b weights[b] * grad_b`` for every trainable parameter (book-keeping pass).

        With ``weights = min(1, C / (norms + 1e-6))`` this is DP-SGD's clipped-gradient sum,
        formed from the stored activations and output gradients (Bu et al. 2023) with one
        weight-gradient kernel per layer call, no second backward pass. Where :meth:`norms`
        materialised a layer's per-example weight gradients ``G`` (and kept them, see
        ``_KEEP_ELEMENTS``), the sum is ``w @ G`` instead of a kernel over the activations.

        Args:
            weights: ``[B]`` per-example weights.

        Returns:
            ``{parameter: tensor of its shape}`` for every trainable parameter of the supported
            layers (zeros for layers that did not reach the loss).
        """
        b = self.batch_size
        if weights.shape != (b,):
            raise ValueError(
                f"weighted_grads: expected weights of shape [{b}], got {tuple(weights.shape)}"
            )
        w_rows = weights.repeat(self.group_size) if self.group_size > 1 else weights
        out: dict[nn.Parameter, Tensor] = {}
        for layer in self._layers:
            self._layer_sq_norm(layer, b)
            mod = layer.module
            pairs = self._grads(layer)
            for pname, param in mod.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if not pairs:
                    out[param] = torch.zeros_like(param)
                elif pname in layer.small:
                    per_ex = layer.small[pname].to(weights.dtype)
                    out[param] = (weights @ per_ex.reshape(b, -1)).reshape(param.shape)
                else:
                    out[param] = self._weighted_weight(mod, pairs, w_rows)
        return out

    def _weighted_weight(
        self, mod: nn.Module, pairs: Sequence[tuple[Tensor, Tensor]], w_rows: Tensor
    ) -> Tensor:
        """``sum_rows w_row * grad_row`` of ``mod.weight`` for Linear, Conv2d, Embedding."""
        acc: Tensor | None = None
        for x, gr in pairs:
            shape = (-1,) + (1,) * (gr.dim() - 1)
            gs = gr * w_rows.reshape(shape).to(gr.dtype)
            if isinstance(mod, nn.Linear):
                gw = torch.mm(gs.reshape(-1, mod.out_features).t(), x.reshape(-1, mod.in_features))
            elif isinstance(mod, nn.Conv2d):
                xp, pad = _conv_input(mod, x)
                gw = torch.ops.aten.convolution_backward(
                    gs, xp, mod.weight, None, list(mod.stride), list(pad), list(mod.dilation),
                    False, [0, 0], mod.groups, [False, True, False],
                )[1]
            elif isinstance(mod, nn.Embedding):
                gflat = gs.reshape(-1, mod.embedding_dim)
                idx = x.reshape(-1)
                if mod.padding_idx is not None:
                    gflat = gflat * (idx != mod.padding_idx).unsqueeze(1).to(gflat.dtype)
                gw = torch.zeros_like(mod.weight).index_add_(0, idx, gflat)
            else:
                raise TypeError(f"weighted_grads: unexpected layer type {type(mod).__name__}")
            acc = gw if acc is None else acc + gw
        if acc is None:
            raise RuntimeError("weighted_grads: no recorded call")
        return acc
