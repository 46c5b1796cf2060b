"""Client-level DP (DP-FedAvg): clipping, distributed noise in every protocol, accounting."""

from __future__ import annotations

import functools
import json
import math
import operator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.config import ConfigError, DPConfig, SecureAggregationConfig, StrategyConfig
from securefed.noise.discrete_gaussian import ddg_tau, discrete_gaussian
from securefed.privacy import PrivacyLedger, epsilon_of
from securefed.privacy.client_level import (
    ClientLevelDP,
    clip_update,
    geometric_clip_update,
    update_noise_multiplier,
)
from securefed.run import run_experiment
from securefed.secagg import DistributedNoise, PlainAggregation
from securefed.secagg.masking import MaskingAggregation
from securefed.strategies import build_strategy
from tests.helpers import metrics_rows, one_cohort, tiny_config, uniform_inputs

# ----------------------------------------------------------------------------- pure maths


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=50),
    st.floats(0.01, 5.0),
)
def test_clip_update_bounds_norm_and_keeps_direction(values: list[float], s: float) -> None:
    delta = torch.tensor(values, dtype=torch.float64)
    clipped, norm = clip_update(delta, s)
    assert norm == pytest.approx(float(delta.norm()))
    assert float(clipped.norm()) <= s * (1 + 1e-9)
    if norm <= s:
        assert torch.equal(clipped, delta)
    else:
        assert torch.allclose(clipped * norm / s, delta)


def test_andrew_noise_relation() -> None:
    # Andrew et al. 2021 Thm 1: z^-2 = z_upd^-2 + (2 sigma_b)^-2
    z, sb = 1.1, 2.0
    zu = update_noise_multiplier(z, sb)
    assert zu > z and zu**-2 + (2 * sb) ** -2 == pytest.approx(z**-2)
    assert update_noise_multiplier(z, None) == z
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        update_noise_multiplier(3.0, 1.0)
    # the geometric update moves S towards the target quantile
    assert (
        geometric_clip_update(1.0, 0.9, 0.5, 0.2) < 1.0 < geometric_clip_update(1.0, 0.1, 0.5, 0.2)
    )


@pytest.mark.parametrize("sigma", [0.8, 2.0, 40.0, 3e6])
def test_discrete_gaussian_matches_pmf_moments(sigma: float) -> None:
    x = discrete_gaussian(sigma, 200_000)
    ks = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3) if sigma < 100 else None
    if ks is not None:
        w = np.exp(-(ks.astype(np.float64) ** 2) / (2 * sigma**2))
        var = float((w * ks**2).sum() / w.sum())  # the exact variance of N_Z(0, sigma^2)
        p0 = float(w[ks == 0][0] / w.sum())
        assert abs(np.mean(x == 0) - p0) < 5 * math.sqrt(p0 * (1 - p0) / x.size)
    else:
        var = sigma**2
    assert abs(float(x.mean())) < 5 * math.sqrt(var / x.size)
    assert float(x.var()) == pytest.approx(var, rel=0.02)
    assert ddg_tau(1e3, 10) == 0.0 and ddg_tau(0.5, 10) > 0


def test_discrete_gaussian_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="sigma"):
        discrete_gaussian(0.0, 3)
    with pytest.raises(ValueError, match="32 bytes"):
        discrete_gaussian(1.0, 3, key=b"short")


# ----------------------------------------------------------------------------- protocols


def test_masking_adds_distributed_noise_to_the_exact_sum() -> None:
    """Masked sum with noise shares vs the plain sum: the difference is the survivors' noise."""
    cfg = SecureAggregationConfig(protocol="masking", threshold=0.5, bits=40, clip_range=1.0)
    proto = MaskingAggregation.from_config(cfg, 6)
    x = uniform_inputs(6, 30_000, scale=0.05)
    std = 0.02
    res = proto.aggregate(3, x, {5: "masked_input", 4: "unmasking"}, noise=DistributedNoise(std, 6))
    exact = sum(x[c] for c in res.survivors)
    diff = res.total - exact
    survivors_std = std * math.sqrt(len(res.survivors) / 6)
    assert res.info["noise_std_total"] == pytest.approx(survivors_std)
    assert float(diff.std()) == pytest.approx(survivors_std, rel=0.03)
    assert abs(float(diff.mean())) < 5 * survivors_std / math.sqrt(diff.size)
    assert 0 < float(res.info["encoding_sensitivity"]) < 1e-3  # type: ignore[arg-type]
    # the server view never holds an un-noised sum: without noise the same round is exact
    res0 = proto.aggregate(4, x, {5: "masked_input"})
    assert np.max(np.abs(res0.total - sum(x[c] for c in res0.survivors))) < 1e-6


def test_plain_central_noise() -> None:
    x = uniform_inputs(3, 20_000, scale=0.05)
    res = PlainAggregation().aggregate(1, x, noise=DistributedNoise(0.05, 3))
    diff = res.total - sum(x.values())
    assert float(diff.std()) == pytest.approx(0.05, rel=0.03)


# ----------------------------------------------------------------------------- strategy


def _wrapper(adaptive: bool = False, protocol: str = "masking") -> ClientLevelDP:
    base = build_strategy(StrategyConfig(name="fedavg"), 5, 1.0)
    dp = DPConfig(
        level="client", target_epsilon=5.0, max_update_norm=0.5, adaptive_clipping=adaptive
    )
    sa = SecureAggregationConfig(protocol=protocol, threshold=0.6, bits=40)  # type: ignore[arg-type]
    return ClientLevelDP(base, dp, sa, noise_multiplier=1.2)


@pytest.mark.parametrize("adaptive", [False, True])
def test_round_noise_charges_the_worst_case_exactly(adaptive: bool) -> None:
    w = _wrapper(adaptive)
    rn = w.round_noise(5, 10_000)
    assert rn.min_survivors == 3
    # with only the threshold's shares the whole vector has effective multiplier z
    eff = rn.std * math.sqrt(3 / 5) / (rn.sensitivity + 2 * math.sqrt(10_000) * 0)
    assert rn.charged_multiplier == pytest.approx(1.2, rel=1e-6)
    assert eff >= rn.charged_multiplier
    central = _wrapper(adaptive, protocol="plain").round_noise(5, 10_000)
    assert central.min_survivors == 5 and central.update_multiplier <= rn.update_multiplier


def test_wrapper_sends_clipped_unweighted_deltas_and_adapts_clip() -> None:
    w = _wrapper(adaptive=True)
    g = torch.zeros(100)
    plan = w.configure_round(1, g, list(range(5)), 1.0, 1, np.random.default_rng(0))
    assert plan.clients == (0, 1, 2, 3, 4)
    ups = [
        w.client.client_update(k, plan.broadcast, g + float(k), 10 * (k + 1), 5, 0.01, {})
        for k in range(5)
    ]
    for u in ups:
        assert u.weight == 1.0
        assert float(u.vectors["delta"].norm()) <= 0.5 + 1e-6
    sums = {k: functools.reduce(operator.add, [u.vectors[k].double() for u in ups])
            for k in ups[0].vectors}
    new = w.aggregate(1, g, one_cohort(sums, 5.0, 5))
    assert torch.allclose(new, sums["delta"].float() / 5)
    # only client 0 (delta 0) was unclipped: fraction 0.2 < 0.5, so S grows
    assert w.last_unclipped_fraction == pytest.approx(0.2)
    assert w.clip > 0.5


def test_client_level_refuses_scaffold() -> None:
    with pytest.raises(ConfigError, match=r"dp\.level"):
        tiny_config(dp__level="client", dp__target_epsilon=5.0, strategy__name="scaffold")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_client_level_run_with_masking(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(
        dp__level="client",
        dp__target_epsilon=20.0,
        dp__adaptive_clipping=True,
        secure_aggregation__protocol="masking",
        secure_aggregation__threshold=0.6,
        secure_aggregation__bits=40,
        federation__rounds=3,
        federation__dropout_prob=0.3,
    )
    res = run_experiment(cfg, tmp_path / "r", progress=False)
    assert res.finished
    rows = metrics_rows(tmp_path / "r")
    ledger = PrivacyLedger.load(tmp_path / "r" / "privacy_ledger.json")
    for cid in ledger.clients:
        hist = ledger.history(cid)
        trained = sum(1 for r in rows if cid in r["trained"])
        assert len(hist) == trained and all(q == 1.0 and s == 1 for _, q, s in hist)
        if hist:
            assert ledger.epsilon(cid) == pytest.approx(
                epsilon_of(hist, ledger.get_plan(cid).delta), rel=1e-6
            )
        assert ledger.epsilon(cid) <= 20.0 + 1e-6
    for r in rows:
        if r["participants"]:
            c = r["client_dp"]
            assert c["realised_multiplier"] >= c["charged_multiplier"] * (1 - 1e-9)
    assert "## Differential privacy" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_client_level_budget_stops_the_run(tmp_path: Path, cache_env: Path) -> None:
    cfg = tiny_config(
        dp__level="client",
        dp__target_epsilon=2.0,
        dp__noise_multiplier=1.0,
        federation__rounds=10,
    )
    res = run_experiment(cfg, tmp_path / "r", progress=False, write_report=False)
    assert res.finished and res.rounds_completed < 10
    ledger = PrivacyLedger.load(tmp_path / "r" / "privacy_ledger.json")
    assert all(ledger.epsilon(c) <= 2.0 + 1e-6 for c in ledger.clients)
    assert "exhausted" in json.loads((tmp_path / "r" / "stopped.json").read_text())["reason"]


def test_dp_fedavg_aggregates_when_the_noised_weight_sum_is_negative() -> None:
    """DP-FedAvg divides by the number of contributors: the summed weight carries the noise and
    may be negative (a round-4 abort of the canary-client runs, fixed with the strategy split)."""
    w = _wrapper(adaptive=False)
    g = torch.zeros(100)
    w.configure_round(1, g, list(range(5)), 1.0, 1, np.random.default_rng(0))
    sums = {"delta": torch.full((100,), 0.5, dtype=torch.float64)}
    new = w.aggregate(1, g, one_cohort(sums, -4.97, 5))
    assert torch.allclose(new, torch.full((100,), 0.1))
