"""Empirical lower bounds on epsilon: one-run auditing, Clopper-Pearson, federated canaries.

A DP guarantee bounds how well ANY test can tell whether a record was used. An attack that
tells better than that proves the guarantee false: if the audited ``eps_LB`` exceeds the
accountant's epsilon, the DP implementation or its accounting is wrong.

References:
    Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1) Training Run", NeurIPS;
    Theorem 3.1 (pure DP) and Appendix D (the p-value with delta, reproduced below).
    Jagielski, Ullman & Oprea (2020), "Auditing Differentially Private Machine Learning: How
    Private is Private SGD?"; Nasr et al. (2021), "Adversary Instantiation" (Clopper-Pearson).
    Andrew et al. (2024), "One-shot Empirical Privacy Estimation for Federated Learning", ICLR.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

__all__ = [
    "ClopperPearsonAudit",
    "FederatedCanaryAudit",
    "OneRunAudit",
    "canary_cosines",
    "clopper_pearson_audit",
    "clopper_pearson_epsilon",
    "clopper_pearson_upper",
    "federated_canary_audit",
    "gaussian_fit_epsilon",
    "gaussian_pair_delta",
    "gaussian_pair_epsilon",
    "one_run_audit",
    "one_run_ceiling",
    "one_run_epsilon",
    "one_run_p_value",
    "random_canary_directions",
]

_EPS_MAX = 50.0


# --------------------------------------------------------------------------- one run
def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of ``v`` or more correct guesses out of ``r`` if the mechanism were
    ``(eps, delta)``-DP (Steinke, Nasr & Jagielski 2023, Theorem 3.1 / Appendix D).

    With ``q = e^eps / (1 + e^eps)`` (the accuracy of eps-randomised response),
    ``p = P[Binomial(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v > Binomial(r, q) >= v - i] / i``.

    Args:
        m: canaries, each included independently with probability 1/2.
        r: guesses made (the rest abstain), ``r <= m``.
        v: correct guesses, ``v <= r``.
        eps: ``>= 0``; delta: in [0, 1].
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"one_run_p_value: need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"one_run_p_value: need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    q = special.expit(eps)
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest ``eps`` with ``one_run_p_value(m, r, v, eps, delta) < beta`` (bisection to 1e-6):
    with confidence ``1 - beta`` the mechanism is NOT ``(eps, delta)``-DP for any smaller eps.
    0 when even eps = 0 cannot be rejected."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"one_run_epsilon: beta must be in (0, 1), got {beta}")
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > _EPS_MAX:
            return _EPS_MAX
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class OneRunAudit:
    """Result of a one-run audit.

    Attributes:
        eps_lb: the lower bound (max over the ``(k+, k-)`` grid, Bonferroni-corrected).
        m: canaries; r: guesses; v: correct guesses (at the best grid point).
        k_plus / k_minus: guessed IN (top scores) / OUT (bottom scores) at the best point.
        delta, beta: the null's delta and the confidence (1 - beta) of the bound.
        grid_size: number of (k+, k-) pairs tried (beta was divided by it).
        natural: True when the "canaries" are natural members vs holdout examples (their
            inclusion is a seeded random split rather than independent fair coins, so the bound
            is approximate).
    """

    eps_lb: float
    m: int
    r: int
    v: int
    k_plus: int
    k_minus: int
    delta: float
    beta: float
    grid_size: int
    natural: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    *,
    beta: float = 0.05,
    guess_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0),
    natural: bool = False,
) -> OneRunAudit:
    """One-run audit from canary scores (Steinke, Nasr & Jagielski 2023, Algorithm 1).

    Guess IN for the ``k+`` highest scores and OUT for the ``k-`` lowest, with
    ``k+ = k- = f m / 2`` for each ``f`` in ``guess_fractions``; the best bound over the grid is
    reported at confidence ``1 - beta`` (each point tested at ``beta / len(grid)``: Bonferroni,
    so choosing the best point after seeing the scores stays valid).

    Args:
        scores: ``[m]`` canary scores (higher = more likely included).
        included: ``[m]`` bool, which canaries were inserted.
        delta: the mechanism's delta.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    if s.shape != inc.shape or s.size < 2:
        raise ValueError(
            f"one_run_audit: scores [{s.size}] and included [{inc.size}] must have the same "
            "length >= 2"
        )
    if not np.isfinite(s).all():
        raise ValueError("one_run_audit: scores must be finite")
    m = s.size
    order = np.argsort(-s, kind="mergesort")
    grid = sorted({max(1, int(f * m / 2)) for f in guess_fractions if f > 0})
    grid = [k for k in grid if 2 * k <= m]
    if not grid:
        raise ValueError(f"one_run_audit: no valid guess counts for m={m} canaries")
    b = beta / len(grid)
    best: OneRunAudit | None = None
    for k in grid:
        top, bottom = order[:k], order[m - k :]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        eps = one_run_epsilon(m, 2 * k, v, delta, b)
        if best is None or eps > best.eps_lb:
            best = OneRunAudit(eps, m, 2 * k, v, k, k, delta, beta, len(grid), natural)
    if best is None:  # pragma: no cover - grid is non-empty (checked above)
        raise RuntimeError("one_run_audit: no guess count was evaluated")
    return best


def one_run_ceiling(
    m: int,
    delta: float,
    *,
    beta: float = 0.05,
    guess_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0),
) -> float:
    """The largest bound :func:`one_run_audit` can return with ``m`` canaries: every guess
    right, at the best grid point (its power: an audit whose ceiling is at or below the
    accountant's epsilon cannot catch any violation)."""
    grid = sorted({max(1, int(f * m / 2)) for f in guess_fractions if f > 0})
    grid = [k for k in grid if 2 * k <= m]
    if not grid:
        return 0.0
    return max(one_run_epsilon(m, 2 * k, 2 * k, delta, beta / len(grid)) for k in grid)


# --------------------------------------------------------------------------- Clopper-Pearson
def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound on a binomial rate from ``k`` of
    ``n`` (Clopper & Pearson 1934): the ``1 - alpha`` quantile of Beta(k + 1, n - k)."""
    if not (0 <= k <= n) or n < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(
            f"clopper_pearson_upper: need 0 <= k <= n, n >= 1, alpha in (0, 1); got {k}, {n}, "
            f"{alpha}"
        )
    if k == n:
        return 1.0
    return float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


def clopper_pearson_epsilon(
    fp: int, negatives: int, fn: int, positives: int, delta: float, alpha: float = 0.05
) -> float:
    """``eps_LB = max(ln((1 - delta - FNR_ub) / FPR_ub), ln((1 - delta - FPR_ub) / FNR_ub), 0)``
    with one-sided Clopper-Pearson upper bounds at ``alpha / 2`` each (Jagielski et al. 2020;
    Nasr et al. 2021): holds with confidence ``1 - alpha``."""
    fpr_ub = clopper_pearson_upper(fp, negatives, alpha / 2)
    fnr_ub = clopper_pearson_upper(fn, positives, alpha / 2)
    vals = [0.0]
    if fpr_ub > 0 and 1 - delta - fnr_ub > 0:
        vals.append(math.log((1 - delta - fnr_ub) / fpr_ub))
    if fnr_ub > 0 and 1 - delta - fpr_ub > 0:
        vals.append(math.log((1 - delta - fpr_ub) / fnr_ub))
    return max(vals)


@dataclass(frozen=True)
class ClopperPearsonAudit:
    """Threshold chosen on one split, bound computed on the other.

    Attributes:
        eps_lb: the bound on the evaluation split. threshold: chosen on the selection split.
        fp / negatives / fn / positives: counts on the evaluation split.
    """

    eps_lb: float
    threshold: float
    fp: int
    negatives: int
    fn: int
    positives: int
    delta: float
    alpha: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def clopper_pearson_audit(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    *,
    rng: np.random.Generator,
    alpha: float = 0.05,
    selection_fraction: float = 0.5,
) -> ClopperPearsonAudit:
    """Clopper-Pearson eps lower bound with the threshold chosen on a SEPARATE split.

    The examples are split at random (``rng``); on the selection part every threshold is tried
    and the one with the largest bound is kept; the bound is then computed on the evaluation
    part only, so choosing the threshold does not bias it.

    Args:
        scores: ``[n]`` (higher = member); included: ``[n]`` bool.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    if s.shape != inc.shape or s.size < 4 or inc.all() or not inc.any():
        raise ValueError(
            "clopper_pearson_audit: need >= 4 scores of equal length to `included`, with both "
            "members and non-members"
        )
    perm = rng.permutation(s.size)
    cut = round(selection_fraction * s.size)
    sel, ev = perm[:cut], perm[cut:]

    def bound(idx: np.ndarray, thr: float) -> tuple[float, int, int, int, int]:
        pos, neg = inc[idx], ~inc[idx]
        guess = s[idx] >= thr
        fp, fn = int((guess & neg).sum()), int((~guess & pos).sum())
        n_neg, n_pos = int(neg.sum()), int(pos.sum())
        if n_neg == 0 or n_pos == 0:
            return 0.0, fp, n_neg, fn, n_pos
        return clopper_pearson_epsilon(fp, n_neg, fn, n_pos, delta, alpha), fp, n_neg, fn, n_pos

    thresholds = np.unique(s[sel])
    best_thr, best_val = float(thresholds[0]), -1.0
    for thr in thresholds:
        val = bound(sel, float(thr))[0]
        if val > best_val:
            best_thr, best_val = float(thr), val
    eps, fp, n_neg, fn, n_pos = bound(ev, best_thr)
    return ClopperPearsonAudit(eps, best_thr, fp, n_neg, fn, n_pos, delta, alpha)


# --------------------------------------------------------------------------- federated canaries
def random_canary_directions(m: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``[m, dim]`` float64 unit vectors uniform on the sphere (Andrew et al. 2024): canary
    clients upload ``S * direction`` (the clip norm times a random direction)."""
    if m < 1 or dim < 2:
        raise ValueError(f"random_canary_directions: need m >= 1 and dim >= 2, got {m}, {dim}")
    z = rng.standard_normal((m, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def canary_cosines(model_delta: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """``[m]`` cosines between the final model delta ``[D]`` and each canary direction
    ``[m, D]``; for a direction the model never saw the cosine is about N(0, 1/D)."""
    d = np.asarray(model_delta, dtype=np.float64).reshape(-1)
    u = np.asarray(directions, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != d.size:
        raise ValueError(
            f"canary_cosines: directions must be [m, {d.size}], got {list(u.shape)}"
        )
    norm = float(np.linalg.norm(d))
    if norm == 0:
        return np.zeros(u.shape[0])
    return (u @ d) / (norm * np.linalg.norm(u, axis=1))


def gaussian_pair_delta(mu0: float, s0: float, mu1: float, s1: float, eps: float) -> float:
    """Hockey-stick divergence ``max(sup_S P(S) - e^eps Q(S), sup_S Q(S) - e^eps P(S))`` of
    P = N(mu1, s1^2) and Q = N(mu0, s0^2), by numerical integration on a fine grid (equal
    variances reduce to the Gaussian mechanism of Balle & Wang 2018, Theorem 8)."""
    if s0 <= 0 or s1 <= 0:
        raise ValueError(f"gaussian_pair_delta: standard deviations must be > 0, got {s0}, {s1}")
    lo = min(mu0 - 12 * s0, mu1 - 12 * s1)
    hi = max(mu0 + 12 * s0, mu1 + 12 * s1)
    x = np.linspace(lo, hi, 200_001)
    lp = stats.norm.logpdf(x, mu1, s1)
    lq = stats.norm.logpdf(x, mu0, s0)
    dx = x[1] - x[0]
    a = np.sum(np.maximum(np.exp(lp) - np.exp(eps + lq), 0.0)) * dx
    b = np.sum(np.maximum(np.exp(lq) - np.exp(eps + lp), 0.0)) * dx
    return float(max(a, b))


def gaussian_pair_epsilon(mu0: float, s0: float, mu1: float, s1: float, delta: float) -> float:
    """Smallest ``eps >= 0`` with ``gaussian_pair_delta(...) <= delta`` (bisection)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"gaussian_pair_epsilon: delta must be in (0, 1), got {delta}")
    if gaussian_pair_delta(mu0, s0, mu1, s1, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_pair_delta(mu0, s0, mu1, s1, hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > _EPS_MAX:
            return _EPS_MAX
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if gaussian_pair_delta(mu0, s0, mu1, s1, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass(frozen=True)
class FederatedCanaryAudit:
    """Andrew et al. (2024) one-shot estimate from canary-client cosines.

    Attributes:
        eps_est: epsilon of the fitted Gaussians (an ESTIMATE, not a high-confidence bound).
        mean_inserted / std_inserted: cosine statistics of the inserted canaries.
        mean_null / std_null: of the null (unseen canaries; N(0, 1/D) in theory).
    """

    eps_est: float
    mean_inserted: float
    std_inserted: float
    mean_null: float
    std_null: float
    num_inserted: int
    num_null: int
    delta: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def federated_canary_audit(
    cos_inserted: np.ndarray, cos_null: np.ndarray, delta: float
) -> FederatedCanaryAudit:
    """Fit Gaussians to the cosines of inserted and of never-inserted canary directions with
    the final model delta and report the epsilon, at ``delta``, of the Gaussian mechanism with
    ``mu = (mean_inserted - mean_null) / pooled std`` (Andrew et al. 2024, Algorithm 2)."""
    a = np.asarray(cos_inserted, dtype=np.float64)
    b = np.asarray(cos_null, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError("federated_canary_audit: need >= 2 inserted and >= 2 null cosines")
    ma, sa, mb, sb = float(a.mean()), float(a.std(ddof=1)), float(b.mean()), float(b.std(ddof=1))
    # equal-variance Gaussian mechanism with mu = (mean_in - mean_null) / pooled std: unequal
    # fitted variances would give an unbounded privacy loss in the tails (an artefact of the fit)
    pooled = math.sqrt(((a.size - 1) * sa**2 + (b.size - 1) * sb**2) / (a.size + b.size - 2))
    eps = gaussian_pair_epsilon(mb, max(pooled, 1e-12), ma, max(pooled, 1e-12), delta)
    return FederatedCanaryAudit(eps, ma, sa, mb, sb, int(a.size), int(b.size), delta)


def gaussian_fit_epsilon(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    *,
    rng: np.random.Generator,
    bootstrap: int = 200,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Andrew et al. (2024)-style ESTIMATE: Gaussians fitted to the included and the excluded
    canaries' scores, epsilon of the equal-variance Gaussian mechanism between them at
    ``delta``, with a percentile bootstrap interval (canaries resampled within each group).

    A diagnostic, never a verdict: it assumes Gaussian scores and is not a high-confidence
    lower bound (:func:`one_run_audit` is).

    Returns:
        ``{"eps_est", "ci_low", "ci_high", "mu", "bootstrap", "delta"}``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included, dtype=bool).reshape(-1)
    a, b = s[inc], s[~inc]
    if a.size < 2 or b.size < 2:
        raise ValueError("gaussian_fit_epsilon: need >= 2 included and >= 2 excluded scores")

    def est(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        pooled = math.sqrt(
            ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
        )
        mu = abs(float(x.mean() - y.mean())) / max(pooled, 1e-300)
        return _gdp_epsilon(mu, delta), mu

    eps, mu = est(a, b)
    boots = [
        est(a[rng.integers(0, a.size, a.size)], b[rng.integers(0, b.size, b.size)])[0]
        for _ in range(bootstrap)
    ]
    lo, hi = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    return {
        "eps_est": eps,
        "ci_low": float(np.quantile(boots, lo)) if boots else eps,
        "ci_high": float(np.quantile(boots, hi)) if boots else eps,
        "mu": mu,
        "bootstrap": int(bootstrap),
        "delta": float(delta),
    }


def _gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(
        stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    )


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest eps >= 0 with mu-GDP's delta(eps) <= delta (bisection)."""
    if _gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > _EPS_MAX:
            return _EPS_MAX
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _gdp_delta(mu, mid) > delta else (lo, mid)
    return hi
