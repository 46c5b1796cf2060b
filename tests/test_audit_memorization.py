"""Memorisation ratio, DCR share and closest pairs on constructed data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.audit.memorization import (
    audit_memorization,
    dcr_share,
    k_nearest,
    memorization_ratios,
)


def brute_ratio(s: np.ndarray, train: np.ndarray, k: int, alpha: float) -> float:
    d = np.sort([float(np.sqrt(((s - t) ** 2).sum())) for t in train])
    return d[0] / (alpha * d[:k].mean())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 30), st.integers(1, 10), st.integers(0, 2**31))
def test_ratio_matches_brute_force(n_syn: int, n_train: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    syn = rng.normal(size=(n_syn, 1, 2, 3))
    train = rng.normal(size=(n_train, 1, 2, 3))
    ratio, idx, dist = memorization_ratios(torch.tensor(syn), torch.tensor(train), k, 0.5)
    kk = min(k, n_train)
    for i in range(n_syn):
        assert ratio[i] == pytest.approx(brute_ratio(syn[i], train, kk, 0.5), rel=1e-9)
        d_all = np.sqrt(((train - syn[i]) ** 2).reshape(n_train, -1).sum(1))
        assert dist[i] == pytest.approx(d_all.min()) and d_all[idx[i]] == pytest.approx(d_all.min())


def test_copies_are_flagged_and_fresh_images_are_not(tmp_path) -> None:
    rng = np.random.default_rng(0)
    train = torch.tensor(rng.uniform(-1, 1, (200, 1, 8, 8)), dtype=torch.float32)
    holdout = torch.tensor(rng.uniform(-1, 1, (200, 1, 8, 8)), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    copies = train[:10] + 0.01 * torch.randn(10, 1, 8, 8, generator=gen)
    fresh = torch.tensor(rng.uniform(-1, 1, (30, 1, 8, 8)), dtype=torch.float32)
    rep = audit_memorization(
        torch.cat([copies, fresh]),
        train,
        holdout,
        np.random.default_rng(2),
        source="constructed",
        grid_path=tmp_path / "pairs.png",
        num_pairs=5,
    )
    assert rep.flagged == 10 and rep.num_samples == 40
    assert rep.baseline_flagged_fraction == 0.0
    assert {p[1] for p in rep.closest} <= set(range(10))  # the closest pairs are the copies
    assert (tmp_path / "pairs.png").stat().st_size > 100
    # 10 copies are closer to training, the 30 fresh ones are a coin flip: share ~ (10 + 15) / 40
    assert 0.45 < rep.dcr_share < 0.85
    assert rep.dcr_share_ci[0] <= rep.dcr_share <= rep.dcr_share_ci[1]


def test_dcr_share_is_half_for_independent_samples() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 4))
    share, ind = dcr_share(x[:1000], x[1000:2000], x[2000:], rng)
    assert abs(share - 0.5) < 0.05 and set(np.unique(ind)) <= {0.0, 0.5, 1.0}
    share_copy, _ = dcr_share(x[1000:1100] + 1e-3, x[1000:2000], x[2000:], rng)
    # subsampling the training set to the holdout size keeps all copies' sources here
    assert share_copy == 1.0


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="1 <= k"):
        k_nearest(torch.zeros(2, 3), torch.zeros(2, 3), 5)
    with pytest.raises(ValueError, match="do not match"):
        audit_memorization(
            torch.zeros(2, 1, 4, 4), torch.zeros(5, 1, 8, 8), torch.zeros(5, 1, 8, 8),
            np.random.default_rng(0), source="x",
        )


def test_find_synthetic_reads_auxiliary_sets(tmp_path) -> None:
    from securefed.audit.targets import find_synthetic

    aux = tmp_path / "auxiliary"
    aux.mkdir()
    assert find_synthetic(tmp_path, (1, 8, 8)) is None
    (aux / "notes.txt").write_text("not images")
    imgs = np.linspace(-1, 1, 5 * 64, dtype=np.float32).reshape(5, 1, 8, 8)
    np.savez(aux / "auxiliary.npz", images=imgs, labels=np.zeros(5, np.int64))
    found = find_synthetic(tmp_path, (1, 8, 8))
    assert found is not None and found[1] == "auxiliary/auxiliary.npz"
    assert torch.allclose(found[0], torch.from_numpy(imgs))
    np.savez(aux / "auxiliary.npz", images=np.full((3, 8, 8, 1), 255, np.uint8))  # HWC, 8-bit
    x, _ = find_synthetic(tmp_path, (1, 8, 8))  # type: ignore[misc]
    assert x.shape == (3, 1, 8, 8) and float(x.max()) == 1.0
    np.savez(aux / "auxiliary.npz", images=np.zeros((3, 1, 4, 4), np.float32))  # wrong size
    assert find_synthetic(tmp_path, (1, 8, 8)) is None
