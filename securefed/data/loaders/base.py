"""What every dataset loader shares: :class:`DatasetError`, the raw form a loader returns
(:class:`_Raw`: images ``[N, C, H, W]`` in ``[0, scale]``, int64 labels, class names, optional
sites), the ``data.root`` and label-range checks, the torchvision how-to-obtain hint, and the
chunked bilinear resize also used by :func:`securefed.data.datasets.load_dataset`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from securefed.config import DataConfig
from securefed.errors import SecurefedError

__all__ = [
    "DatasetError",
]


_RESIZE_CHUNK = 2048  # images resized per interpolate call (bounds peak memory)
_OBTAIN_TV = (
    "To obtain them, on a machine with internet access run "
    "`torchvision.datasets.{cls}('<dir>', {args}download=True)` and copy {what} to {dest}."
)


class DatasetError(SecurefedError, ValueError):
    """A dataset cannot be loaded or split; the message names the field/path and the fix."""


@dataclass
class _Raw:
    images: np.ndarray | torch.Tensor  # [N, C, H, W], values in [0, scale]
    scale: float  # maximum pixel value (255 for uint8, 16 for digits, 1 for pre-scaled)
    labels: np.ndarray  # [N] int64
    class_names: tuple[str, ...]
    sites: np.ndarray | None = None  # [N] int64
    site_names: tuple[str, ...] = ()


def _require_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise DatasetError(
            f"data.root: dataset {cfg.name!r} is loaded from local files; set data.root"
        )
    return Path(cfg.root).expanduser()


def _check_label_range(labels: np.ndarray, num_classes: int, where: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"data.root: {where}: labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]; re-copy the original files"
        )


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear antialiased resize of float ``[N, C, H, W]`` to ``[N, C, size, size]``."""
    out = [
        F.interpolate(
            x[i : i + _RESIZE_CHUNK],
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        for i in range(0, x.shape[0], _RESIZE_CHUNK)
    ]
    return torch.cat(out) if out else x.new_zeros((0, x.shape[1], size, size))
