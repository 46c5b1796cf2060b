"""Client partitions: pure, disjoint, covering, non-empty, and faithful to each scheme."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.config import PartitionConfig
from securefed.data import PartitionError, label_histogram, partition

KINDS = ("iid", "dirichlet", "shards", "quantity_skew")
FAST = settings(max_examples=80, deadline=None)


def _check_valid(parts: list[np.ndarray], n: int, k: int, m: int) -> None:
    assert len(parts) == k
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
        assert len(p) >= m
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@FAST
@given(
    labels=st.lists(st.integers(0, 9), min_size=0, max_size=150),
    kind=st.sampled_from(KINDS),
    k=st.integers(1, 12),
    alpha=st.floats(0.05, 20.0),
    cpc=st.integers(1, 4),
    m=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties(labels, kind, k, alpha, cpc, m, seed):
    y = np.array(labels, dtype=np.int64)
    n = len(y)
    cfg = PartitionConfig(kind=kind, alpha=alpha, classes_per_client=cpc, min_examples_per_client=m)
    state = np.random.get_state()[1].copy()  # noqa: NPY002 - checks the legacy global RNG
    if k * m > n:
        with pytest.raises(PartitionError, match="impossible"):
            partition(y, cfg, k, seed)
        return
    try:
        parts = partition(y, cfg, k, seed)
    except PartitionError as exc:
        # Only draws that can legitimately fail may raise, and they must say what to change.
        assert kind in ("dirichlet", "shards"), exc
        assert (kind == "dirichlet" and "alpha" in str(exc)) or (kind == "shards" and m > 1)
        assert "min_examples_per_client" in str(exc)
        return
    _check_valid(parts, n, k, m)
    again = partition(y, cfg, k, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    hist = label_histogram(y, parts, 10)
    assert hist.shape == (k, 10) and hist.dtype == np.int64
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(y, minlength=10))
    if kind == "shards":
        per_client = min(cpc, n // k)
        if len(np.unique(y)) <= k * per_client:
            assert np.all((hist > 0).sum(axis=1) <= cpc)
    if kind == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


@FAST
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    extra=st.integers(-1, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_site_partition(sizes, extra, seed):
    rng = np.random.default_rng(seed)
    sites = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    y = rng.integers(0, 3, size=len(sites))
    cfg = PartitionConfig(kind="site")
    k = len(sizes) + extra
    if extra != 0:
        if k >= 1:
            with pytest.raises(PartitionError, match="num_clients"):
                partition(y, cfg, k, seed, sites=sites)
        return
    parts = partition(y, cfg, k, seed, sites=sites)
    _check_valid(parts, len(y), k, 1)
    for s, p in enumerate(parts):
        assert np.all(sites[p] == s) and len(p) == sizes[s]


def test_site_needs_sites():
    with pytest.raises(PartitionError, match="image_folder"):
        partition(np.zeros(4, np.int64), PartitionConfig(kind="site"), 2, 0)


def test_seed_changes_draw_and_dirichlet_skews():
    y = np.repeat(np.arange(10), 50)
    cfg = PartitionConfig(kind="dirichlet", alpha=0.1)
    a, b = partition(y, cfg, 5, 0), partition(y, cfg, 5, 1)
    assert any(not np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    hist = label_histogram(y, a, 10)
    iid = label_histogram(y, partition(y, PartitionConfig(kind="iid"), 5, 0), 10)
    # Non-IID: class shares per client are far more uneven than in the IID split.
    assert hist.std(axis=0).mean() > 3 * iid.std(axis=0).mean()


def test_shards_mcmahan_layout():
    y = np.repeat(np.arange(10), 60)
    parts = partition(y, PartitionConfig(kind="shards", classes_per_client=2), 10, 3)
    hist = label_histogram(y, parts, 10)
    assert [len(p) for p in parts] == [60] * 10
    assert np.all((hist > 0).sum(axis=1) <= 2)
    assert np.all(hist[hist > 0] % 30 == 0)  # 20 single-class shards of 30 examples


def test_dirichlet_unreachable_minimum():
    y = np.repeat(np.arange(2), 10)
    cfg = PartitionConfig(kind="dirichlet", alpha=0.01, min_examples_per_client=4)
    with pytest.raises(PartitionError, match=r"alpha=0\.01"):
        partition(y, cfg, 5, 0)


def test_quantity_skew_sizes():
    y = np.zeros(1000, np.int64)
    cfg = PartitionConfig(kind="quantity_skew", alpha=0.2, min_examples_per_client=10)
    sizes = sorted(len(p) for p in partition(y, cfg, 8, 0))
    assert sizes[0] >= 10 and sizes[-1] > 3 * sizes[0]


def test_bad_inputs():
    with pytest.raises(PartitionError, match="1-D"):
        partition(np.zeros((2, 2)), PartitionConfig(), 1, 0)
    with pytest.raises(PartitionError, match=">= 0"):
        partition(np.array([0, -1]), PartitionConfig(), 1, 0)
    with pytest.raises(PartitionError, match="num_clients"):
        partition(np.array([0, 1]), PartitionConfig(), 0, 0)
    with pytest.raises(PartitionError, match="num_classes"):
        label_histogram(np.array([0, 3]), [np.array([0, 1])], 2)
