"""Loader ``svhn``: ``<root>/{train,test}_32x32.mat`` read by torchvision, or parsed here with
SciPy when the files differ from the official release (label 10 means digit 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from securefed.config import DataConfig
from securefed.data.loaders.base import (
    _OBTAIN_TV,
    DatasetError,
    _check_label_range,
    _Raw,
    _require_root,
)

__all__: list[str] = []


def _load_svhn(cfg: DataConfig) -> _Raw:
    root = _require_root(cfg)
    files = {"train": root / "train_32x32.mat", "test": root / "test_32x32.mat"}
    missing = [p for p in files.values() if not p.is_file()]
    if missing:
        raise DatasetError(
            "data.root: SVHN files not found. Expected "
            + " and ".join(str(p) for p in files.values())
            + f" (missing: {', '.join(str(p) for p in missing)}). "
            + _OBTAIN_TV.format(
                cls="SVHN",
                args="split='train', ",
                what="train_32x32.mat and test_32x32.mat (also split='test')",
                dest=str(root),
            )
        )
    from torchvision import datasets as tvd  # lazy: torchvision is heavy; only this loader needs it

    xs, ys = [], []
    for split, path in files.items():
        try:
            ds = tvd.SVHN(str(root), split=split, download=False)
            x, y = np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64)
        except RuntimeError:
            # md5 mismatch with the official release: parse the same .mat format ourselves,
            # exactly as torchvision does (X [32, 32, 3, N] uint8, y [N, 1] with 10 meaning 0).
            x, y = _read_svhn_mat(path)
        xs.append(x)
        ys.append(y)
    y = np.concatenate(ys)
    _check_label_range(y, 10, root)
    return _Raw(
        np.ascontiguousarray(np.concatenate(xs), dtype=np.uint8),
        255.0,
        y,
        tuple(str(i) for i in range(10)),
    )


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat  # lazy: scipy.io, only for .mat files torchvision refuses

    try:
        mat = loadmat(str(path))
    except Exception as exc:
        raise DatasetError(f"data.root: {path} is not a readable .mat file ({exc})") from exc
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"data.root: {path}: an SVHN .mat file needs variables 'X' and 'y'")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise DatasetError(
            f"data.root: {path}: 'X' must be [32, 32, 3, N] with N = len(y), got {list(x.shape)} "
            f"and {len(y)} labels"
        )
    y = np.where(y == 10, 0, y)
    return np.transpose(x, (3, 2, 0, 1)), y
