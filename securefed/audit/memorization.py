"""Memorisation of training images by synthetic data (auxiliary sets, generated samples).

- Memorisation ratio (Carlini et al. 2023, "Extracting Training Data from Diffusion Models",
  USENIX Security, §4.2): for a synthetic image ``s`` with training images sorted by l2
  distance ``d_1 <= d_2 <= ...``, ``ratio(s) = d_1 / (alpha * mean(d_1 .. d_k))`` with
  ``alpha = 0.5`` and ``k = 50``; ``s`` is FLAGGED as a (near-)copy of its nearest training
  image when ``ratio <= 1``: it is much closer to that one image than to the training images
  around it.
- DCR share (distance to closest record; e.g. Yale et al. 2020): the share of synthetic images
  strictly closer to the training set than to an equally large holdout (ties count 1/2);
  0.5 is ideal, above 0.5 the generator is drawn towards its training records.
- A grid of the closest synthetic/training pairs for a human to inspect.

Distances are l2 in pixel space on images flattened to ``[N, D]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from securefed.artefacts.grid import save_grid

__all__ = [
    "MemorizationReport",
    "audit_memorization",
    "closest_pairs_grid",
    "copy_p_value",
    "dcr_share",
    "k_nearest",
    "memorization_ratios",
]


def _flat(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.detach().to("cpu", torch.float64).reshape(t.shape[0], -1)


def k_nearest(
    queries: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    k: int,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest l2 distances from each query to the reference set.

    Args:
        queries: ``[Q, ...]``; reference: ``[R, ...]`` (flattened to vectors).
        k: ``1 <= k <= R``.

    Returns:
        ``(dist [Q, k] float64 ascending, index [Q, k] int64)``.
    """
    q, r = _flat(queries), _flat(reference)
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"k_nearest: queries have {q.shape[1]} values per image, the reference {r.shape[1]}"
        )
    if not 1 <= k <= r.shape[0]:
        raise ValueError(f"k_nearest: need 1 <= k <= {r.shape[0]} reference images, got k={k}")
    dists, idxs = [], []
    for i in range(0, q.shape[0], chunk):
        d = torch.cdist(q[i : i + chunk], r)
        v, j = torch.topk(d, k, dim=1, largest=False, sorted=True)
        dists.append(v)
        idxs.append(j)
    if not dists:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    return torch.cat(dists).numpy(), torch.cat(idxs).numpy().astype(np.int64)


def memorization_ratios(
    synthetic: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    k: int = 50,
    alpha: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Carlini et al. (2023) memorisation ratio per synthetic image.

    Args:
        synthetic: ``[S, C, H, W]``; train: ``[N, C, H, W]``.
        k: neighbours in the denominator (50; fewer when the training set is smaller).
        alpha: 0.5 in the paper.

    Returns:
        ``(ratio [S], nearest index [S], nearest distance [S])``; flagged iff ``ratio <= 1``.
    """
    if alpha <= 0:
        raise ValueError(f"memorization.alpha: must be > 0, got {alpha}")
    n = _flat(train).shape[0]
    dist, idx = k_nearest(synthetic, train, min(k, n))
    mean_k = dist.mean(axis=1)
    ratio = np.where(mean_k > 0, dist[:, 0] / np.maximum(alpha * mean_k, 1e-300), 0.0)
    return ratio, idx[:, 0], dist[:, 0]


def dcr_share(
    synthetic: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    holdout: torch.Tensor | np.ndarray,
    rng: np.random.Generator,
) -> tuple[float, np.ndarray]:
    """Share of synthetic images closer to the training set than to the holdout.

    The training set is subsampled (``rng``) to the holdout's size, so that both sets are
    equally large and 0.5 is the value for a generator that never saw its training records.

    Returns:
        ``(share, per-sample indicator [S] in {0, 0.5, 1})``.
    """
    tr, ho = _flat(train), _flat(holdout)
    size = min(tr.shape[0], ho.shape[0])
    tr = tr[torch.as_tensor(rng.choice(tr.shape[0], size=size, replace=False))]
    ho = ho[torch.as_tensor(rng.choice(ho.shape[0], size=size, replace=False))]
    d_tr = k_nearest(synthetic, tr, 1)[0][:, 0]
    d_ho = k_nearest(synthetic, ho, 1)[0][:, 0]
    ind = np.where(d_tr < d_ho, 1.0, np.where(d_tr == d_ho, 0.5, 0.0))
    return float(ind.mean()) if ind.size else float("nan"), ind


@dataclass(frozen=True)
class MemorizationReport:
    """Memorisation figures of one synthetic set.

    Attributes:
        source: where the synthetic images came from (``auxiliary/<file>`` or ``generated``).
        num_samples: synthetic images audited.
        flagged: images with memorisation ratio <= 1.
        flagged_fraction: ``flagged / num_samples``.
        baseline_flagged_fraction: the same rate for HOLDOUT images queried against the
            training set (what natural near-duplicates in the data give).
        copy_p_value: one-sided p-value that synthetic images are flagged MORE often than
            holdout images (Fisher's exact test on flagged / total of both sets: the binomial
            comparison with the baseline estimated from its own sample); small = copying.
        baseline_flagged / baseline_num: flagged holdout images and holdout images queried.
        min_ratio / median_ratio: of the memorisation ratio.
        dcr_share: share closer to training than to holdout (0.5 ideal).
        dcr_share_ci: 95% bootstrap interval of the share.
        k / alpha: the ratio's settings.
        closest: ``(synthetic index, training index, distance, ratio)`` of the closest pairs.
        grid: path of the closest-pairs grid (relative to the audit folder) or None.
    """

    source: str
    num_samples: int
    flagged: int
    flagged_fraction: float
    baseline_flagged_fraction: float
    min_ratio: float
    median_ratio: float
    dcr_share: float
    dcr_share_ci: tuple[float, float]
    k: int
    alpha: float
    closest: list[tuple[int, int, float, float]] = field(default_factory=list)
    grid: str | None = None
    copy_p_value: float = 1.0
    baseline_flagged: int = 0
    baseline_num: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metric(self, name: str) -> float:
        if name == "dcr_share_ci_high":
            return float(self.dcr_share_ci[1])
        if name == "dcr_share_ci_low":
            return float(self.dcr_share_ci[0])
        allowed = (
            "flagged",
            "flagged_fraction",
            "baseline_flagged_fraction",
            "min_ratio",
            "median_ratio",
            "dcr_share",
            "copy_p_value",
        )
        if name not in allowed:
            raise KeyError(
                f"unknown memorization metric {name!r}; choose one of "
                f"{[*allowed, 'dcr_share_ci_high', 'dcr_share_ci_low']}"
            )
        return float(getattr(self, name))


def closest_pairs_grid(
    synthetic: torch.Tensor,
    train: torch.Tensor,
    pairs: list[tuple[int, int, float, float]],
    path: str | Path,
) -> Path:
    """PNG grid: each row is (synthetic image, its nearest training image), closest first."""
    if not pairs:
        raise ValueError("closest_pairs_grid: no pairs to draw")
    cells = []
    for s_i, t_i, _, _ in pairs:
        cells += [synthetic[s_i].cpu().float(), train[t_i].cpu().float()]
    return save_grid(torch.stack(cells).clamp(-1, 1), path, nrow=2)


def audit_memorization(
    synthetic: torch.Tensor,
    train: torch.Tensor,
    holdout: torch.Tensor,
    rng: np.random.Generator,
    *,
    source: str,
    k: int = 50,
    alpha: float = 0.5,
    num_pairs: int = 16,
    bootstrap: int = 200,
    grid_path: str | Path | None = None,
) -> MemorizationReport:
    """All memorisation figures of ``synthetic`` ``[S, C, H, W]`` against the training images
    ``[N, C, H, W]`` and the holdout ``[M, C, H, W]`` (all in [-1, 1])."""
    if synthetic.dim() != 4 or synthetic.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"memorization: synthetic images {tuple(synthetic.shape)} do not match the training "
            f"images {tuple(train.shape[1:])} (expected [S, C, H, W] at the training resolution)"
        )
    if synthetic.shape[0] == 0:
        raise ValueError("memorization: no synthetic images to audit")
    ratio, nn_idx, nn_dist = memorization_ratios(synthetic, train, k, alpha)
    base_ratio, _, _ = memorization_ratios(holdout, train, k, alpha)
    share, ind = dcr_share(synthetic, train, holdout, rng)
    boots = [float(ind[rng.integers(0, ind.size, ind.size)].mean()) for _ in range(bootstrap)]
    ci = (
        (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)))
        if boots
        else (share, share)
    )
    order = np.argsort(nn_dist, kind="mergesort")[:num_pairs]
    pairs = [(int(i), int(nn_idx[i]), float(nn_dist[i]), float(ratio[i])) for i in order]
    grid = None
    if grid_path is not None and pairs:
        closest_pairs_grid(synthetic, train, pairs, grid_path)
        grid = Path(grid_path).name
    flagged = int((ratio <= 1.0).sum())
    base_flagged = int((base_ratio <= 1.0).sum())
    return MemorizationReport(
        source=source,
        num_samples=int(synthetic.shape[0]),
        flagged=flagged,
        flagged_fraction=flagged / synthetic.shape[0],
        baseline_flagged_fraction=float((base_ratio <= 1.0).mean()),
        min_ratio=float(ratio.min()),
        median_ratio=float(np.median(ratio)),
        dcr_share=share,
        dcr_share_ci=ci,
        k=int(min(k, train.shape[0])),
        alpha=float(alpha),
        closest=pairs,
        grid=grid,
        copy_p_value=copy_p_value(
            flagged, int(synthetic.shape[0]), base_flagged, int(base_ratio.size)
        ),
        baseline_flagged=base_flagged,
        baseline_num=int(base_ratio.size),
    )


def copy_p_value(flagged: int, num: int, baseline_flagged: int, baseline_num: int) -> float:
    """One-sided p-value of "synthetic images are flagged more often than holdout images":
    Fisher's exact test on the 2x2 table (flagged, not flagged) x (synthetic, holdout)
    (Fisher 1922). Real holdout images are flagged too (blur and natural near-duplicates set
    the baseline), so only an EXCESS over the baseline is evidence of copying."""
    if not (0 <= flagged <= num and 0 <= baseline_flagged <= baseline_num) or num < 1:
        raise ValueError(
            f"copy_p_value: need 0 <= flagged <= num >= 1 and 0 <= baseline_flagged <= "
            f"baseline_num; got {flagged}/{num}, {baseline_flagged}/{baseline_num}"
        )
    if baseline_num == 0:
        return 1.0 if flagged == 0 else 0.0
    table = [[flagged, num - flagged], [baseline_flagged, baseline_num - baseline_flagged]]
    return float(stats.fisher_exact(table, alternative="greater")[1])
