"""Improved precision and recall (Kynkäänniemi et al. 2019) and class coverage.

Each set of features is turned into a manifold estimate: the union of balls around every sample
whose radius is the distance to its ``k``-th nearest neighbour within the same set. *Precision*
is the fraction of generated samples that fall inside the real manifold (fidelity); *recall* is
the fraction of real samples inside the generated manifold (diversity). The paper uses ``k = 3``
with equal-sized real and generated sets; both depend on the set sizes, so compare like with
like.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["class_coverage", "knn_precision_recall", "knn_radii"]

# Distances are computed in chunks of at most this many pairs (float64: 8 bytes each).
_MAX_PAIRS = 1 << 22


def _as_features(x: np.ndarray | Tensor, name: str) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    t = t.to(torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return t


def _cdist(a: Tensor, b: Tensor) -> Tensor:
    # exact (no ||a||^2 + ||b||^2 - 2ab expansion): identical points are at distance exactly 0
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats: np.ndarray | Tensor, k: int) -> np.ndarray:
    """Distance ``[N]`` of each row of ``feats`` ``[N, D]`` to its ``k``-th nearest other row.

    The point itself is not counted (as in the reference implementation, where it is the 0-th
    neighbour); duplicates count as neighbours at distance 0.
    """
    f = _as_features(feats, "knn_radii")
    n = len(f)
    if not 1 <= k < n:
        raise ValueError(f"knn_radii: k must be in [1, N - 1] = [1, {n - 1}], got k={k}")
    chunk = max(1, _MAX_PAIRS // n)
    out = [_cdist(f[i : i + chunk], f).kthvalue(k + 1, dim=1).values for i in range(0, n, chunk)]
    return torch.cat(out).numpy()


def _inside_fraction(queries: Tensor, centres: Tensor, radii: Tensor) -> float:
    chunk = max(1, _MAX_PAIRS // len(centres))
    inside = 0
    for i in range(0, len(queries), chunk):
        d = _cdist(queries[i : i + chunk], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def knn_precision_recall(
    real_feats: np.ndarray | Tensor,
    fake_feats: np.ndarray | Tensor,
    k: int = 5,
    *,
    real_radii: np.ndarray | None = None,
) -> tuple[float, float]:
    """k-NN precision and recall of generated vs real features (Kynkäänniemi et al. 2019).

    Args:
        real_feats: ``[N, D]`` features of real images.
        fake_feats: ``[M, D]`` features of generated images.
        k: neighbourhood size (``1 <= k < min(N, M)``).
        real_radii: optional precomputed ``knn_radii(real_feats, k)`` ``[N]`` (for a fixed
            reference set evaluated many times).

    Returns:
        ``(precision, recall)``, each in ``[0, 1]``.
    """
    real = _as_features(real_feats, "knn_precision_recall: real_feats")
    fake = _as_features(fake_feats, "knn_precision_recall: fake_feats")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"knn_precision_recall: real features have D={real.shape[1]}, "
            f"fake features D={fake.shape[1]}"
        )
    if not 1 <= k < min(len(real), len(fake)):
        raise ValueError(
            f"knn_precision_recall: k must be in [1, min(N, M) - 1] = "
            f"[1, {min(len(real), len(fake)) - 1}], got k={k}"
        )
    if real_radii is None:
        r_real = torch.from_numpy(knn_radii(real, k))
    else:
        r_real = torch.as_tensor(np.asarray(real_radii), dtype=torch.float64)
        if r_real.shape != (len(real),):
            raise ValueError(
                f"knn_precision_recall: real_radii must be [{len(real)}], got {tuple(r_real.shape)}"
            )
    r_fake = torch.from_numpy(knn_radii(fake, k))
    precision = _inside_fraction(fake, real, r_real)
    recall = _inside_fraction(real, fake, r_fake)
    return precision, recall


def class_coverage(predicted: np.ndarray | Tensor, num_classes: int) -> tuple[np.ndarray, float]:
    """Histogram of predicted classes and the fraction of classes predicted at least once.

    A cheap mode-collapse check: the feature net classifies the generated images.

    Args:
        predicted: ``[N]`` integer class predictions in ``[0, num_classes)``.
        num_classes: number of classes ``C``.

    Returns:
        ``(histogram, coverage)``: int64 ``[C]`` counts and the fraction of nonzero counts.
    """
    if num_classes < 1:
        raise ValueError(f"class_coverage: num_classes must be >= 1, got {num_classes}")
    p = predicted.detach().cpu().numpy() if isinstance(predicted, Tensor) else np.asarray(predicted)
    p = p.reshape(-1)
    if p.size and not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"class_coverage: predictions must be integers, got dtype {p.dtype}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(
            f"class_coverage: predictions must lie in [0, {num_classes - 1}], "
            f"got range [{p.min()}, {p.max()}]"
        )
    hist = np.bincount(p.astype(np.int64), minlength=num_classes).astype(np.int64)
    return hist, float(np.count_nonzero(hist)) / num_classes
