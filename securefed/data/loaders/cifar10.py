"""Loader ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` read by
torchvision, or, when its md5 check refuses re-packed batches, by a restricted unpickler that
only rebuilds numpy arrays (a tampered batch cannot run code)."""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists, dicts, strings and numbers.

    The CIFAR-10 "python version" *is* a pickle format (one pickled dict per batch with
    ``data`` uint8 ``[N, 3072]`` and ``labels``); restricting the globals keeps a tampered file
    from running code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _cifar_unpickle(path: Path) -> dict[str, Any]:
    try:
        obj = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except Exception as exc:
        raise DatasetError(
            f"data.root: {path} is not a CIFAR-10 python batch ({exc}); re-copy the original "
            "cifar-10-batches-py folder"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"data.root: {path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _load_cifar_batches_ourselves(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, ...]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        entry = _cifar_unpickle(path)
        if "data" not in entry or "labels" not in entry:
            raise DatasetError(
                f"data.root: {path}: a CIFAR-10 batch needs keys 'data' and 'labels', found "
                f"{sorted(entry)}"
            )
        x = np.asarray(entry["data"])
        y = np.asarray(entry["labels"], dtype=np.int64).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise DatasetError(
                f"data.root: {path}: 'data' must be uint8 [N, 3072] with one label per row, got "
                f"{x.dtype} {list(x.shape)} and {len(y)} labels"
            )
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar10(cfg: DataConfig) -> _Raw:
    root = _require_root(cfg)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [folder / n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetError(
            f"data.root: CIFAR-10 files not found. Expected {folder}/data_batch_1..5 and "
            f"{folder}/test_batch (missing: "
            + ", ".join(str(p) for p in missing)
            + "). "
            + _OBTAIN_TV.format(
                cls="CIFAR10", args="", what="<dir>/cifar-10-batches-py", dest=str(folder)
            )
            + " (or extract cifar-10-python.tar.gz into data.root)."
        )
    from torchvision import datasets as tvd  # lazy: torchvision is heavy; only this loader needs it

    try:
        parts = [tvd.CIFAR10(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError:
        # torchvision verifies the md5 of every batch and of batches.meta; files that differ
        # from the official release (re-packed or test-written batches) fail that check. They
        # are still in the CIFAR-10 python format, which we parse with a restricted unpickler.
        x, y = _load_cifar_batches_ourselves(folder, names)
        class_names: tuple[str, ...] = _CIFAR10_CLASSES
        meta = folder / "batches.meta"
        if meta.is_file():
            entry = _cifar_unpickle(meta)
            got = entry.get("label_names")
            if isinstance(got, (list, tuple)) and len(got) == 10:
                class_names = tuple(g.decode() if isinstance(g, bytes) else str(g) for g in got)
    else:
        x = np.concatenate([np.asarray(p.data).transpose(0, 3, 1, 2) for p in parts])
        y = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
        class_names = tuple(str(c) for c in parts[0].classes)
    _check_label_range(y, 10, folder)
    return _Raw(np.ascontiguousarray(x, dtype=np.uint8), 255.0, y, class_names)
