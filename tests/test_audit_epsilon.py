"""Empirical epsilon lower bounds against direct computations."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from securefed.audit.epsilon import (
    canary_cosines,
    clopper_pearson_audit,
    clopper_pearson_epsilon,
    clopper_pearson_upper,
    federated_canary_audit,
    gaussian_pair_delta,
    gaussian_pair_epsilon,
    one_run_audit,
    one_run_epsilon,
    one_run_p_value,
    random_canary_directions,
)


def direct_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke-Nasr-Jagielski (2023) p-value by explicit binomial sums (math.comb)."""
    q = 1.0 / (1.0 + math.exp(-eps))

    def pmf(k: int) -> float:
        return math.comb(r, k) * q**k * (1 - q) ** (r - k)

    beta = sum(pmf(k) for k in range(v, r + 1))
    alpha = 0.0
    for i in range(1, v + 1):
        alpha = max(alpha, sum(pmf(k) for k in range(v - i, v)) / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


@settings(max_examples=120, deadline=None)
@given(
    st.integers(1, 60).flatmap(
        lambda r: st.tuples(st.just(r), st.integers(0, r), st.integers(r, 3 * r))
    ),
    st.floats(0.0, 4.0),
    st.sampled_from([0.0, 1e-5, 1e-3]),
)
def test_one_run_p_value_matches_direct_binomial(
    rvm: tuple[int, int, int], eps: float, delta: float
) -> None:
    r, v, m = rvm
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        direct_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize(("r", "v"), [(10, 10), (20, 18), (50, 40), (100, 70), (30, 15)])
def test_one_run_epsilon_is_the_largest_rejected_eps(r: int, v: int) -> None:
    delta, beta = 1e-5, 0.05
    eps = one_run_epsilon(1000, r, v, delta, beta)
    grid = np.linspace(0, 6, 601)
    rejected = [e for e in grid if direct_p_value(1000, r, v, e, delta) < beta]
    expected = max(rejected) if rejected else 0.0
    assert eps == pytest.approx(expected, abs=1.1e-2)
    if eps > 0:
        assert direct_p_value(1000, r, v, eps, delta) < beta
        assert direct_p_value(1000, r, v, eps + 0.01, delta) >= beta


def test_one_run_pure_dp_closed_form() -> None:
    # all r guesses correct, delta = 0: P[Bin(r, q) >= r] = q^r < beta  <=>  q > beta^(1/r)
    r, beta = 20, 0.05
    q = beta ** (1 / r)
    assert one_run_epsilon(r, r, r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_one_run_audit_separates_and_abstains() -> None:
    rng = np.random.default_rng(0)
    inc = rng.random(400) < 0.5
    perfect = np.where(inc, 1.0, 0.0) + rng.random(400) * 1e-3
    res = one_run_audit(perfect, inc, 1e-5)
    assert res.eps_lb > 2.0 and res.v == res.r
    random_scores = rng.random(400)
    assert one_run_audit(random_scores, inc, 1e-5).eps_lb < 0.5
    with pytest.raises(ValueError, match="same length"):
        one_run_audit(perfect[:3], inc, 1e-5)


def test_clopper_pearson_upper_against_beta_quantile_and_coverage() -> None:
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 200)]:
        ub = clopper_pearson_upper(k, n, 0.05)
        ref = 1.0 if k == n else stats.beta.ppf(0.95, k + 1, n - k)
        assert ub == pytest.approx(ref)
        # the exact binomial tail at the bound is alpha (definition of the CP bound)
        if k < n:
            assert stats.binom.cdf(k, n, ub) == pytest.approx(0.05, abs=1e-6)
    # coverage: the true rate lies below the bound in >= 95% of draws
    rng = np.random.default_rng(1)
    p, n = 0.1, 50
    hits = [clopper_pearson_upper(int(rng.binomial(n, p)), n, 0.05) >= p for _ in range(400)]
    assert np.mean(hits) >= 0.93


def test_clopper_pearson_epsilon_formula() -> None:
    fpr_ub = clopper_pearson_upper(2, 100, 0.025)
    fnr_ub = clopper_pearson_upper(10, 100, 0.025)
    expected = max(math.log((1 - 1e-5 - fnr_ub) / fpr_ub), math.log((1 - 1e-5 - fpr_ub) / fnr_ub))
    assert clopper_pearson_epsilon(2, 100, 10, 100, 1e-5, 0.05) == pytest.approx(expected)
    assert clopper_pearson_epsilon(50, 100, 50, 100, 1e-5) == 0.0


def test_clopper_pearson_audit_uses_a_separate_split() -> None:
    rng = np.random.default_rng(2)
    inc = rng.random(600) < 0.5
    s = np.where(inc, 2.0, 0.0) + rng.normal(0, 0.5, 600)
    res = clopper_pearson_audit(s, inc, 1e-5, rng=np.random.default_rng(3))
    assert res.positives + res.negatives == 300  # evaluated on the other half only
    assert res.eps_lb > 1.0
    noise = clopper_pearson_audit(rng.random(600), inc, 1e-5, rng=np.random.default_rng(4))
    assert noise.eps_lb < 0.5


def test_gaussian_pair_matches_the_gaussian_mechanism() -> None:
    # equal variances: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Balle & Wang)
    mu, eps = 1.5, 1.0
    exact = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert gaussian_pair_delta(0.0, 1.0, mu, 1.0, eps) == pytest.approx(exact, abs=1e-6)
    e = gaussian_pair_epsilon(0.0, 1.0, mu, 1.0, 1e-5)
    assert gaussian_pair_delta(0.0, 1.0, mu, 1.0, e) <= 1e-5 * 1.01


def test_federated_canary_estimate_tracks_the_noise() -> None:
    """Andrew et al. (2024): canary clients' cosines with the final delta of a Gaussian sum."""
    rng = np.random.default_rng(5)
    d, m, clip = 10000, 400, 1.0
    dirs = random_canary_directions(2 * m, d, rng)
    inserted, null = dirs[:m], dirs[m:]

    def estimate(z: float) -> float:
        delta_vec = clip * inserted.sum(axis=0) + rng.normal(0, z * clip, d)
        cos_in = canary_cosines(delta_vec, inserted)
        cos_null = canary_cosines(delta_vec, null)
        return federated_canary_audit(cos_in, cos_null, 1e-5).eps_est

    ests = []
    for z in (0.5, 1.0, 2.0):
        # the estimate recovers the epsilon of the Gaussian mechanism with mu = 1 / z (the other
        # canaries add m / d to the variance of an inserted canary's projection)
        analytic = gaussian_pair_epsilon(0.0, 1.0, 1.0 / math.sqrt(z**2 + m / d), 1.0, 1e-5)
        ests.append(estimate(z))
        assert ests[-1] == pytest.approx(analytic, rel=0.3)
    assert ests[0] > ests[1] > ests[2]
    with pytest.raises(ValueError, match="directions must be"):
        canary_cosines(np.zeros(3), dirs)


def test_exact_fraction_reference_for_small_case() -> None:
    # r = 3, v = 3, eps = ln 3: q = 3/4, P = 27/64 exactly
    p = one_run_p_value(3, 3, 3, math.log(3), 0.0)
    assert p == pytest.approx(float(Fraction(27, 64)))
