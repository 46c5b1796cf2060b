"""Loader ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (values 0..16, the UCI
"Optical Recognition of Handwritten Digits" test set; shipped with scikit-learn, no files)."""

from __future__ import annotations

import numpy as np

from securefed.config import DataConfig
from securefed.data.loaders.base import _Raw

__all__: list[str] = []


def _load_digits(cfg: DataConfig) -> _Raw:
    # lazy: scikit-learn is slow to import; only this loader needs it
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float32)[:, None, :, :]  # [1797, 1, 8, 8] in 0..16
    labels = np.asarray(d.target, dtype=np.int64)
    return _Raw(images, 16.0, labels, tuple(str(i) for i in range(10)))
