"""Split member examples among federated clients.

:func:`partition` is a pure function of ``(labels, cfg, num_clients, seed, sites)``: every random
draw comes from ``np.random.default_rng(seed)``, nothing global is touched. It returns
``num_clients`` sorted int64 index arrays into ``labels`` that are disjoint, cover every index
and each hold at least ``cfg.min_examples_per_client`` examples (or it raises
:class:`PartitionError` saying why and what to change).

Schemes (``PartitionConfig.kind``):

- ``iid``: a uniform random permutation cut into near-equal parts.
- ``dirichlet``: for every class, proportions over clients ~ Dirichlet(alpha * 1_K)
  (Hsu et al. 2019, "Measuring the effects of non-identical data distribution ..."); redrawn
  up to 100 times until every client reaches the minimum size.
- ``shards``: McMahan et al. 2017: sort by label, cut into ``num_clients * classes_per_client``
  shards, deal ``classes_per_client`` shards to each client. When there are at most that many
  classes, shards never straddle two classes (a class gets shards in proportion to its size), so
  each client holds at most ``classes_per_client`` classes.
- ``quantity_skew``: IID labels, client sizes = minimum + Dirichlet(alpha) share of the rest.
- ``site``: one client per site (``sites`` required), clients in increasing site order.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from securefed.config import PartitionConfig
from securefed.errors import SecurefedError

__all__ = ["PartitionError", "label_histogram", "partition"]

_MAX_DIRICHLET_ATTEMPTS = 100


class PartitionError(SecurefedError, ValueError):
    """The requested partition is impossible or could not be drawn; the message says the fix."""


def partition(
    labels: np.ndarray,
    cfg: PartitionConfig,
    num_clients: int,
    seed: int,
    sites: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split indices ``0..N-1`` of ``labels`` among ``num_clients`` clients.

    Args:
        labels: int ``[N]`` class labels (>= 0).
        cfg: the partition scheme and its parameters.
        num_clients: number of clients ``K`` (>= 1).
        seed: seed of ``np.random.default_rng``; same arguments -> same result.
        sites: int ``[N]`` site index per example; required for ``kind="site"``.

    Returns:
        ``K`` sorted int64 index arrays, disjoint and covering ``0..N-1``, each with at least
        ``cfg.min_examples_per_client`` entries.

    Raises:
        PartitionError: bad inputs, an impossible request, or no valid draw found.
    """
    y = _check_labels(labels)
    n = len(y)
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise PartitionError(f"federation.num_clients: must be an integer >= 1, got {num_clients}")
    k = int(num_clients)
    m = cfg.min_examples_per_client
    if k * m > n:
        raise PartitionError(
            f"partition: impossible to give {k} clients (federation.num_clients) at least {m} "
            f"examples each (partition.min_examples_per_client) from {n} member examples; "
            "lower one of them or use more data"
        )
    rng = np.random.default_rng(seed)
    if cfg.kind == "iid":
        parts = _iid(n, k, rng)
    elif cfg.kind == "dirichlet":
        parts = _dirichlet(y, k, cfg.alpha, m, rng)
    elif cfg.kind == "shards":
        parts = _shards(y, k, cfg.classes_per_client, m, rng)
    elif cfg.kind == "quantity_skew":
        parts = _quantity_skew(n, k, cfg.alpha, m, rng)
    elif cfg.kind == "site":
        parts = _site(n, k, m, sites)
    else:  # pragma: no cover - PartitionConfig validates kind
        raise PartitionError(f"partition.kind: unknown scheme {cfg.kind!r}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def label_histogram(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Per-client class counts: int64 ``[K, num_classes]``; row k counts ``labels[parts[k]]``."""
    y = _check_labels(labels)
    if y.size and int(y.max()) >= num_classes:
        raise PartitionError(
            f"label_histogram: labels reach {int(y.max())} but num_classes is {num_classes}"
        )
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)
    return out


# --------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise PartitionError(f"partition: labels must be 1-D [N], got shape {list(y.shape)}")
    if y.size == 0:
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise PartitionError(f"partition: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise PartitionError(f"partition: labels must be >= 0, got {int(y.min())}")
    return y


def _iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), k))


def _dirichlet(
    y: np.ndarray, k: int, alpha: float, m: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    best = None
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, alpha))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:
                # Extremely small alpha can underflow; the limit is a one-hot draw.
                p = np.zeros(k)
                p[rng.integers(k)] = 1.0
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
        smallest = min(len(o) for o in out)
        if smallest >= m:
            return out
        best = smallest if best is None else max(best, smallest)
    raise PartitionError(
        f"partition: dirichlet with alpha={alpha} (partition.alpha) over {k} clients "
        f"(federation.num_clients) left some client with fewer than {m} examples "
        f"(partition.min_examples_per_client) in all {_MAX_DIRICHLET_ATTEMPTS} draws (best "
        f"smallest client: {best}); raise partition.alpha, use fewer clients, lower "
        "min_examples_per_client or use more data"
    )


def _shards(
    y: np.ndarray, k: int, classes_per_client: int, m: int, rng: np.random.Generator
) -> list[np.ndarray]:
    n = len(y)
    per_client = min(classes_per_client, max(1, n // k))  # every shard must be non-empty
    num_shards = k * per_client
    # Sort by label, random order within a class.
    perm = rng.permutation(n)
    order = perm[np.argsort(y[perm], kind="stable")]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) <= num_shards:
        # Single-class shards, allocated to classes by the D'Hondt rule (>= 1 each, shard sizes
        # as equal as possible), so no client can hold more than per_client classes.
        alloc = np.ones(len(classes), dtype=np.int64)
        heap = [(-int(c), i) for i, c in enumerate(counts) if c > 1]
        heapq.heapify(heap)
        for _ in range(num_shards - len(classes)):
            _, i = heapq.heappop(heap)
            alloc[i] += 1
            if alloc[i] < counts[i]:
                heapq.heappush(heap, (-(counts[i] / alloc[i]), i))
        shards = []
        for idx, a in zip(np.split(order, np.cumsum(counts)[:-1]), alloc, strict=True):
            shards.extend(np.array_split(idx, a))
    else:
        # More classes than shards: McMahan's contiguous cut (shards straddle classes).
        shards = list(np.array_split(order, num_shards))
    # Deal: random order, then largest shard first to the smallest client still short of
    # shards (ties to the lowest client index) -- balanced sizes, random class pairing.
    shard_order = rng.permutation(len(shards))
    sizes = np.array([len(shards[i]) for i in shard_order])
    shard_order = shard_order[np.argsort(-sizes, kind="stable")]
    owned: list[list[np.ndarray]] = [[] for _ in range(k)]
    open_clients = [(0, c) for c in range(k)]  # (examples so far, client), a min-heap
    for i in shard_order:
        total, c = heapq.heappop(open_clients)
        owned[c].append(shards[i])
        if len(owned[c]) < per_client:
            heapq.heappush(open_clients, (total + len(shards[i]), c))
    totals = np.array([sum(len(s) for s in o) for o in owned], dtype=np.int64)
    if totals.min() < m:
        raise PartitionError(
            f"partition: shards with classes_per_client={classes_per_client} "
            f"(partition.classes_per_client) over {k} clients leaves a client with "
            f"{int(totals.min())} < {m} examples (partition.min_examples_per_client) because "
            "some classes are small; lower min_examples_per_client, raise classes_per_client "
            "or use kind 'dirichlet'"
        )
    return [np.concatenate(o) for o in owned]


def _quantity_skew(
    n: int, k: int, alpha: float, m: int, rng: np.random.Generator
) -> list[np.ndarray]:
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    p = p / p.sum()
    extra = n - k * m
    quota = p * extra
    sizes = np.floor(quota).astype(np.int64)
    rest = extra - int(sizes.sum())
    if rest > 0:
        order = np.lexsort((rng.random(k), -(quota - sizes)))
        sizes[order[:rest]] += 1
    sizes += m
    return list(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def _site(n: int, k: int, m: int, sites: np.ndarray | None) -> list[np.ndarray]:
    if sites is None:
        raise PartitionError(
            "partition.kind: 'site' needs a site index per example (data.name 'image_folder' "
            "with one folder per site); use another partition.kind for this dataset"
        )
    s = np.asarray(sites)
    if s.shape != (n,):
        raise PartitionError(
            f"partition: sites must be [N] with N={n} (one per label), got shape {list(s.shape)}"
        )
    if n and not np.issubdtype(s.dtype, np.integer):
        raise PartitionError(f"partition: sites must be integers, got dtype {s.dtype}")
    present = np.unique(s)
    if len(present) != k:
        raise PartitionError(
            f"federation.num_clients: partition.kind 'site' makes one client per site; the "
            f"data has {len(present)} sites but num_clients is {k}; set "
            f"federation.num_clients: {len(present)}"
        )
    parts = [np.flatnonzero(s == v) for v in present]
    small = [(int(v), len(p)) for v, p in zip(present, parts, strict=True) if len(p) < m]
    if small:
        raise PartitionError(
            f"partition: sites {small} (site, examples) have fewer than {m} member examples "
            "(partition.min_examples_per_client); lower it or add images to those sites"
        )
    return parts
