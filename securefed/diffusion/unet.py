"""A small residual UNet epsilon-predictor (Ho et al. 2020), built to be Opacus-compatible.

Only ``nn.Conv2d``, ``nn.Linear``, ``nn.GroupNorm`` and ``nn.Embedding`` hold parameters (all have
per-sample-gradient support in Opacus); there is no BatchNorm, no ``nn.MultiheadAttention``, no
``ConvTranspose2d`` and no registered buffer, so ``state_dict().keys()`` equals the names of
``named_parameters()``.

Layout (``L = len(channel_mults)`` levels, widths ``w_i = base_channels * channel_mults[i]``)::

    encoder:    time (+ class) embedding, input conv -> w_0,
                for each level i: num_res_blocks x [ResBlock (+ attention)], then a stride-2
                conv (all but the last level); every output is kept as a skip connection
    bottleneck: ResBlock, self-attention, ResBlock at the lowest resolution
    decoder:    for each level i (reversed): (num_res_blocks + 1) x [concat skip, ResBlock
                (+ attention)], then nearest-neighbour x2 upsampling + conv (all but level 0);
                GroupNorm, SiLU, zero-initialised 3x3 conv back to the input channels
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from securefed.config import ModelConfig

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (integer) timesteps (Vaswani et al. 2017; Ho et al. 2020).

    Args:
        t: ``[B]`` timesteps (any numeric dtype).
        dim: embedding width.
        max_period: the lowest frequency is ``1 / max_period``.

    Returns:
        ``[B, dim]`` float32 ``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period^(-k/half)``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add projected time embedding, GroupNorm-SiLU-dropout-conv, + skip.

    ``[B, in_ch, H, W], [B, emb_dim] -> [B, out_ch, H, W]``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = _zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = F.silu(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.conv2(h)
        return h + (x if self.skip is None else self.skip(x))


class _Attention(nn.Module):
    """Multi-head self-attention over spatial positions, residual (Vaswani et al. 2017).

    Built from GroupNorm + 1x1 convs (not ``nn.MultiheadAttention``). Heads of width 32 when the
    channel count is a multiple of 32, otherwise a single head. ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.heads = channels // 32 if channels % 32 == 0 else 1
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        scale = (c // self.heads) ** -0.5
        attn = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q * scale, k), dim=-1)
        out = torch.einsum("bhnm,bhdm->bhdn", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class _Downsample(nn.Module):
    """Stride-2 3x3 conv: ``[B, C, H, W] -> [B, C, H/2, W/2]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: ``[B, C, H, W] -> [B, C, 2H, 2W]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """Optional ResBlock, optional attention, optional resampling, applied in that order."""

    def __init__(
        self,
        res: _ResBlock | None = None,
        attn: _Attention | None = None,
        resample: nn.Module | None = None,
    ):
        super().__init__()
        self.res = res
        self.attn = attn
        self.resample = resample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.resample is not None:
            x = self.resample(x)
        return x


#: top-level child module -> parameter group of :meth:`UNet.parameter_groups`
_GROUP_OF = {
    "time_embed": "encoder",
    "class_embed": "encoder",
    "input_conv": "encoder",
    "down": "encoder",
    "middle": "bottleneck",
    "up": "decoder",
    "out_norm": "decoder",
    "out_conv": "decoder",
}


class UNet(nn.Module):
    """Epsilon-prediction UNet ``eps_theta(x_t, t[, y])`` (Ho et al. 2020, Appendix B).

    Args:
        cfg: widths, depth, attention levels, GroupNorm groups, dropout, conditioning.
        in_channels: image channels ``C`` (output has the same count).
        image_size: side length ``H = W``; must be divisible by ``2 ** (len(channel_mults) - 1)``.
        num_classes: number of labels; required when ``cfg.class_conditional``.

    Attributes:
        class_conditional: whether ``forward`` needs labels ``y``.
        num_classes: label count (``None`` for an unconditional model).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        in_channels: int,
        image_size: int,
        num_classes: int | None = None,
    ):
        super().__init__()
        levels = len(cfg.channel_mults)
        factor = 2 ** (levels - 1)
        if in_channels < 1:
            raise ValueError(f"UNet: in_channels must be >= 1, got {in_channels}")
        if image_size < 1 or image_size % factor:
            raise ValueError(
                f"model.channel_mults: {levels} levels downsample by {factor}, which must divide "
                f"data.image_size ({image_size}); use fewer channel_mults or another image_size"
            )
        if cfg.class_conditional and (num_classes is None or num_classes < 1):
            raise ValueError(
                "model.class_conditional: a class-conditional UNet needs num_classes >= 1, "
                f"got {num_classes}"
            )
        self.cfg = cfg
        self.in_channels = in_channels
        self.image_size = image_size
        self.class_conditional = cfg.class_conditional
        self.num_classes = num_classes if cfg.class_conditional else None
        self._factor = factor

        groups = cfg.norm_groups
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        emb_dim = cfg.base_channels * cfg.time_embed_mult
        attn_levels = set(cfg.attention_levels)

        def res(i: int, o: int) -> _ResBlock:
            return _ResBlock(i, o, emb_dim, groups, cfg.dropout)

        def attn(level: int, ch: int) -> _Attention | None:
            return _Attention(ch, groups) if level in attn_levels else None

        self.time_embed = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = (
            nn.Embedding(num_classes, emb_dim)
            if cfg.class_conditional and num_classes is not None
            else None
        )
        self.input_conv = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [widths[0]]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(_Stage(res(ch, width), attn(level, width)))
                ch = width
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(_Stage(resample=_Downsample(ch)))
                skip_channels.append(ch)

        self.middle = nn.ModuleList(
            [_Stage(res(ch, ch), _Attention(ch, groups)), _Stage(res(ch, ch))]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            width = widths[level]
            for j in range(cfg.num_res_blocks + 1):
                upsample = _Upsample(width) if level and j == cfg.num_res_blocks else None
                self.up.append(
                    _Stage(res(ch + skip_channels.pop(), width), attn(level, width), upsample)
                )
                ch = width

        self.out_norm = nn.GroupNorm(groups, ch)
        self.out_conv = _zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the noise in ``x``.

        Args:
            x: ``[B, C, H, W]`` noisy images ``x_t`` (H, W divisible by the downsampling factor).
            t: ``[B]`` int64 timesteps (a 0-d tensor is broadcast to the batch).
            y: ``[B]`` int64 labels in ``0 .. num_classes-1``; required by a class-conditional
                model, ignored by an unconditional one.

        Returns:
            ``[B, C, H, W]`` predicted noise ``eps_theta(x_t, t, y)``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet: expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[2] % self._factor or x.shape[3] % self._factor:
            raise ValueError(
                f"UNet: H and W must be divisible by {self._factor}, got {tuple(x.shape[2:])}"
            )
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        if self.class_embed is not None:
            if y is None:
                raise ValueError(
                    "UNet: this model is class-conditional (model.class_conditional); pass labels y"
                )
            emb = emb + self.class_embed(y)

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        for stage in self.middle:
            h = stage(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))

    def parameter_groups(self) -> dict[str, list[str]]:
        """Partition of ``named_parameters()`` names for partial exchange (FedDiffuse).

        Returns:
            ``{"encoder": [...], "bottleneck": [...], "decoder": [...]}``: the time/class
            embedding, input conv and down path; the middle blocks; the up path and output
            norm/conv. Every parameter name appears in exactly one list, in registration order.
        """
        groups: dict[str, list[str]] = {"encoder": [], "bottleneck": [], "decoder": []}
        for name, _ in self.named_parameters():
            top = name.split(".", 1)[0]
            if top not in _GROUP_OF:
                raise RuntimeError(f"UNet.parameter_groups: parameter {name!r} has no group")
            groups[_GROUP_OF[top]].append(name)
        return groups
