"""Membership-inference metrics against slow references (sklearn, brute force)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from securefed.audit.metrics import (
    attack_result,
    balanced_accuracy,
    plot_roc,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)

scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=40)


def brute_auc(m: np.ndarray, n: np.ndarray) -> float:
    """P[member > non-member] + 0.5 P[tie], pair by pair."""
    total = 0.0
    for a in m:
        for b in n:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(m) * len(n))


def brute_tpr_at(m: np.ndarray, n: np.ndarray, target: float) -> float:
    """Best TPR over every threshold "member iff score >= thr" whose FPR <= target."""
    best = 0.0
    for thr in [np.inf, *np.unique(np.r_[m, n])]:
        fpr = float(np.mean(n >= thr))
        if fpr <= target:
            best = max(best, float(np.mean(m >= thr)))
    return best


@settings(max_examples=150, deadline=None)
@given(scores, scores)
def test_auc_matches_brute_force_and_sklearn(m: list[float], n: list[float]) -> None:
    a, b = np.array(m), np.array(n)
    auc = roc_auc(a, b)
    assert auc == pytest.approx(brute_auc(a, b), abs=1e-12)
    y = np.r_[np.ones(a.size), np.zeros(b.size)]
    assert auc == pytest.approx(roc_auc_score(y, np.r_[a, b]), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(scores, scores, st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0]))
def test_tpr_at_fpr_is_last_point_not_nearest(m: list[float], n: list[float], t: float) -> None:
    a, b = np.array(m), np.array(n)
    fpr, tpr = roc_curve(a, b)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert tpr_at_fpr(fpr, tpr, t) == pytest.approx(brute_tpr_at(a, b, t))
    # same curve as sklearn's (which drops collinear points unless asked not to)
    y = np.r_[np.ones(a.size), np.zeros(b.size)]
    sf, st_, _ = sk_roc_curve(y, np.r_[a, b], drop_intermediate=False)
    assert np.allclose(np.unique(np.c_[fpr, tpr], axis=0), np.unique(np.c_[sf, st_], axis=0))


def test_tpr_reading_uses_last_point_below_target() -> None:
    fpr = np.array([0.0, 0.004, 0.012, 1.0])
    tpr = np.array([0.0, 0.2, 0.9, 1.0])
    # the nearest point to 1% is (1.2%, 0.9); the rule reads the last point with FPR <= 1%
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.2
    with pytest.raises(ValueError, match="target FPR"):
        tpr_at_fpr(fpr, tpr, 1.5)


def test_balanced_accuracy_and_perfect_separation() -> None:
    fpr, tpr = roc_curve(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert balanced_accuracy(fpr, tpr) == 1.0
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    fpr, tpr = roc_curve(np.zeros(5), np.zeros(5))
    assert balanced_accuracy(fpr, tpr) == 0.5


def test_attack_result_intervals_and_errors(tmp_path) -> None:
    rng = np.random.default_rng(0)
    m, n = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 300)
    r = attack_result("loss", "global", m, n, rng=np.random.default_rng(1), bootstrap=100)
    assert r.ci["auc"].low <= r.auc <= r.ci["auc"].high
    assert 0.7 < r.auc < 0.84  # Phi(1 / sqrt 2) = 0.76
    assert r.metric("auc_ci_high") == r.ci["auc"].high
    with pytest.raises(KeyError, match="unknown attack metric"):
        r.metric("accuracy")
    assert r.metric("auc_symmetric") == r.auc  # AUC > 0.5 here
    flipped = attack_result("loss", "g", n, m, rng=np.random.default_rng(1), bootstrap=0)
    assert flipped.metric("auc_symmetric") == pytest.approx(r.auc)
    assert plot_roc([r], tmp_path / "roc.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="at least one member"):
        attack_result("loss", "g", np.array([]), n, rng=rng)
    with pytest.raises(ValueError, match="finite"):
        attack_result("loss", "g", np.array([np.nan]), n, rng=rng)
