"""Sample grids as PNG (no torchvision: importing it costs ~1.3 s of every CLI start)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from securefed.io import atomic_write_bytes

__all__ = ["make_grid", "save_grid", "to_grid_image"]


def make_grid(
    images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0
) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[C, rows (H + p) + p, cols (W + p) + p]``: the images row-major,
    ``nrow`` per row, ``padding`` pixels of ``pad_value`` around each (the layout of
    ``torchvision.utils.make_grid``, without its 1 -> 3 channel expansion; like it, a single
    image is returned as it is, unpadded)."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]
    cols = min(nrow, n)
    rows = -(-n // cols)
    cell_h, cell_w = h + padding, w + padding
    grid = images.new_full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value)
    for k in range(n):
        r, q = divmod(k, cols)
        top, left = r * cell_h + padding, q * cell_w + padding
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def to_grid_image(images: torch.Tensor, nrow: int | None = None, min_cell: int = 48) -> Image.Image:
    """``[N,C,H,W]`` in [-1,1] -> a PIL grid, upscaled (nearest) so each cell is >= min_cell px."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N,C,H,W], got shape {tuple(images.shape)}")
    n = images.shape[0]
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    x = (images.detach().cpu().float().clamp(-1, 1) + 1) / 2
    scale = max(1, int(np.ceil(min_cell / images.shape[-1])))
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[2] == 1 or np.allclose(arr[..., 0], arr[..., 1]):
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a PNG grid atomically and return its path."""
    buf = io.BytesIO()
    to_grid_image(images, nrow).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
