"""Loader ``medmnist``: one 2-D, single-label MedMNIST ``.npz`` file (``data.root`` is the file
itself), the splits named by ``data.medmnist_splits`` concatenated."""

from __future__ import annotations

import numpy as np

from securefed.config import DataConfig
from securefed.data.loaders.base import DatasetError, _Raw, _require_root

__all__: list[str] = []


def _load_medmnist(cfg: DataConfig) -> _Raw:
    path = _require_root(cfg)
    if not path.is_file():
        raise DatasetError(
            f"data.root: MedMNIST file not found: {path}. For medmnist, data.root is the .npz "
            "file itself (e.g. pathmnist.npz, from https://zenodo.org/records/10519652 or "
            "`medmnist` with download=True on a machine with internet access)."
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DatasetError(
            f"data.root: {path} is not a readable .npz file ({exc}); data.root must be a "
            "MedMNIST .npz file"
        ) from exc
    with npz:
        keys = set(npz.files)
        needed = [f"{s}_{k}" for s in cfg.medmnist_splits for k in ("images", "labels")]
        absent = [k for k in needed if k not in keys]
        if absent:
            raise DatasetError(
                f"data.root: {path} lacks {absent} (has {sorted(keys)}); a MedMNIST .npz holds "
                "train/val/test _images and _labels; adjust data.medmnist_splits"
            )
        all_labels = [np.asarray(npz[k]) for k in sorted(keys) if k.endswith("_labels")]
        xs, ys = [], []
        for split in dict.fromkeys(cfg.medmnist_splits):
            x = np.asarray(npz[f"{split}_images"])
            y = np.asarray(npz[f"{split}_labels"])
            if y.ndim == 2 and y.shape[1] > 1:
                raise DatasetError(
                    f"data.root: {path}: {split}_labels has shape {list(y.shape)}, i.e. "
                    f"multi-label ({y.shape[1]} binary labels per image, e.g. ChestMNIST); "
                    "only single-label MedMNIST subsets are supported"
                )
            if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
                raise DatasetError(
                    f"data.root: {path}: {split}_labels must be [N, 1] or [N], got {list(y.shape)}"
                )
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] != 3):
                raise DatasetError(
                    f"data.root: {path}: {split}_images must be uint8 [N, H, W] or [N, H, W, 3] "
                    f"(2-D MedMNIST), got {x.dtype} {list(x.shape)}"
                )
            if len(x) != len(y):
                raise DatasetError(
                    f"data.root: {path}: {split}_images has {len(x)} images but {split}_labels "
                    f"has {len(y)} labels"
                )
            xs.append(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))
            ys.append(y.reshape(-1).astype(np.int64))
    if len({a.shape[1:] for a in xs}) != 1:
        raise DatasetError(
            f"data.root: {path}: the splits {list(cfg.medmnist_splits)} have different image "
            f"shapes {[list(a.shape[1:]) for a in xs]}"
        )
    labels = np.concatenate(ys)
    if labels.size and labels.min() < 0:
        raise DatasetError(f"data.root: {path}: labels must be >= 0, got {int(labels.min())}")
    num_classes = max(
        (int(a.max()) + 1 for a in [*all_labels, labels] if a.size and a.ndim <= 2), default=1
    )
    return _Raw(
        np.ascontiguousarray(np.concatenate(xs)),
        255.0,
        labels,
        tuple(str(i) for i in range(num_classes)),
    )
