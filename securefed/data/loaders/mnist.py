"""Loaders ``mnist`` and ``fashion_mnist``: torchvision's raw IDX layout
``<root>/MNIST/raw/...`` and ``<root>/FashionMNIST/raw/...`` (plain or ``.gz``; the ``.gz``-only
case is parsed here, :func:`_read_idx`); train and test are combined."""

from __future__ import annotations

import gzip
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


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX (LeCun/"SN3") ubyte file, optionally gzip-compressed, into a uint8 array."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(
            f"{path}: not an unsigned-byte IDX file (magic 0x0000080{{ndim}} expected); "
            "re-copy the original MNIST files"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims)) if dims else 0
    if ndim not in (1, 3) or len(raw) < header + count:
        raise DatasetError(
            f"{path}: truncated or malformed IDX file (ndim={ndim}, dims={dims}, "
            f"{len(raw)} bytes); re-copy the original files"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims)


def _load_mnist_like(cfg: DataConfig, fashion: bool) -> _Raw:
    root = _require_root(cfg)
    folder = "FashionMNIST" if fashion else "MNIST"
    raw_dir = root / folder / "raw"
    stems = {
        True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    missing = [
        raw_dir / s
        for pair in stems.values()
        for s in pair
        if not (raw_dir / s).is_file() and not (raw_dir / (s + ".gz")).is_file()
    ]
    if missing:
        cls = "FashionMNIST" if fashion else "MNIST"
        raise DatasetError(
            f"data.root: {cls} files not found. Expected "
            + ", ".join(str(p) for p in missing)
            + " (each uncompressed or with .gz). "
            + _OBTAIN_TV.format(
                cls=cls, args="train=True, ", what=f"<dir>/{folder}", dest=str(root / folder)
            )
            + " (one call with train=True and one with train=False fetch all four files)."
        )
    from torchvision import datasets as tvd  # lazy: torchvision is heavy; only this loader needs it

    tv_cls = tvd.FashionMNIST if fashion else tvd.MNIST
    class_names = tuple(tv_cls.classes)
    imgs: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    for train, (img_stem, lab_stem) in stems.items():
        if (raw_dir / img_stem).is_file() and (raw_dir / lab_stem).is_file():
            try:
                ds = tv_cls(str(root), train=train, download=False)
            except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                raise DatasetError(
                    f"data.root: torchvision could not read {raw_dir / img_stem} / "
                    f"{raw_dir / lab_stem}: {exc}; re-copy the original files"
                ) from exc
            x, y = ds.data.numpy(), ds.targets.numpy()
        else:
            # Only the .gz archives are present; torchvision (download=False) does not
            # decompress them, so parse the same IDX format ourselves.
            def pick(stem: str) -> Path:
                p = raw_dir / stem
                return p if p.is_file() else raw_dir / (stem + ".gz")

            x, y = _read_idx(pick(img_stem)), _read_idx(pick(lab_stem))
            if x.ndim != 3 or y.ndim != 1:
                raise DatasetError(
                    f"data.root: {raw_dir}: expected a 3-D image IDX file and a 1-D label IDX "
                    f"file, got shapes {list(x.shape)} and {list(y.shape)}"
                )
        if len(x) != len(y):
            raise DatasetError(
                f"data.root: {raw_dir}: {img_stem} holds {len(x)} images but {lab_stem} holds "
                f"{len(y)} labels; re-copy the original files"
            )
        imgs.append(np.asarray(x, dtype=np.uint8)[:, None])
        labs.append(np.asarray(y, dtype=np.int64))
    labels = np.concatenate(labs)
    _check_label_range(labels, len(class_names), raw_dir)
    return _Raw(np.concatenate(imgs), 255.0, labels, class_names)
