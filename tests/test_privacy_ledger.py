"""Accountant functions and the per-client privacy ledger (REFERENCES §3)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import securefed.io
from securefed.privacy import (
    ClientPlan,
    LedgerError,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compact_history,
    default_delta,
    epsilon_of,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")

DELTA = 1e-5
SIGMA, Q = 1.1, 0.05


def _opacus_stepped(accountant: type, steps: list[tuple[float, float, int]]) -> float:
    """An independent Opacus accountant fed the same steps one ``.step`` at a time."""
    acc = accountant()
    for sigma, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=DELTA))


# ---------------------------------------------------------------------- accountant functions
def test_epsilon_of_equals_opacus_accountants_stepped_one_step_at_a_time() -> None:
    history = [(SIGMA, Q, 30), (SIGMA, Q, 20), (0.9, 0.08, 10)]
    assert epsilon_of(history, DELTA, "prv") == _opacus_stepped(PRVAccountant, history)
    assert epsilon_of(history, DELTA, "rdp") == pytest.approx(
        _opacus_stepped(RDPAccountant, history), rel=1e-12
    )
    assert epsilon_of(history, DELTA, "prv") < epsilon_of(history, DELTA, "rdp")


@settings(max_examples=40, deadline=None)
@given(
    q=st.floats(1e-4, 1.0),
    sigma=st.floats(0.3, 20.0),
    alpha=st.sampled_from([1.5, 2.0, 3.3, 8.0, 10.9, 32.0, 63.0]),
)
def test_memoised_rdp_orders_are_bit_identical_to_opacus(q: float, sigma: float, alpha: float
                                                          ) -> None:
    """The accountant memoises Opacus' per-order RDP (a pure function); the cached value must
    be exactly what the uncached function returns."""
    from opacus.accountants.analysis import rdp

    cached = rdp._compute_rdp
    assert hasattr(cached, "cache_info"), "securefed.privacy.accountant did not install the cache"
    assert cached(q, sigma, alpha) == cached.__wrapped__(q, sigma, alpha)
    assert cached(q, sigma, alpha) == cached.__wrapped__(q, sigma, alpha)  # the cached hit too


def test_epsilon_of_edge_cases_and_refusals() -> None:
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of([(SIGMA, Q, 0)], DELTA) == 0.0
    assert epsilon_of([(0.0, Q, 1)], DELTA) == math.inf  # no noise: no guarantee
    with pytest.raises(ValueError, match=r"gdp.*under-estimate"):
        epsilon_of([(SIGMA, Q, 1)], DELTA, "gdp")
    with pytest.raises(ValueError, match="unknown accountant"):
        epsilon_of([(SIGMA, Q, 1)], DELTA, "moments")
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon_of([(SIGMA, 1.5, 1)], DELTA)
    with pytest.raises(ValueError, match="steps"):
        epsilon_of([(SIGMA, Q, -1)], DELTA)
    with pytest.raises(ValueError, match="delta"):
        epsilon_of([(SIGMA, Q, 1)], 1.0)


def test_prv_failure_falls_back_to_the_rdp_upper_bound(caplog: pytest.LogCaptureFixture) -> None:
    # weak noise, large rate: PRV's grid would have ~6e7 points (and overflow to inf)
    history = [(0.5, 0.1, 10000)]
    with caplog.at_level(logging.WARNING, logger="securefed.privacy.accountant"):
        eps = epsilon_of(history, DELTA, "prv")
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert eps == float(rdp.get_epsilon(DELTA))
    assert "RDP upper bound" in caplog.text


def test_prv_exception_falls_back_to_rdp(monkeypatch: pytest.MonkeyPatch) -> None:
    from securefed.privacy import accountant as mod

    def boom(self: object, *a: object, **k: object) -> float:
        raise RuntimeError("Cannot compute epsilon")

    monkeypatch.setattr(mod.ACCOUNTANTS["prv"], "get_epsilon", boom)
    history = [(1.2345, 0.0567, 11)]  # not evaluated (memoised) by any other test
    assert epsilon_of(history, DELTA, "prv") == epsilon_of(history, DELTA, "rdp")


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6))
def test_history_split_does_not_change_epsilon(splits: list[int]) -> None:
    split = [(SIGMA, Q, n) for n in splits]
    assert compact_history(split) == ([(SIGMA, Q, sum(splits))] if sum(splits) else [])
    assert epsilon_of(split, DELTA, "rdp") == epsilon_of([(SIGMA, Q, sum(splits))], DELTA, "rdp")


def test_calibration_matches_opacus_and_stays_under_target() -> None:
    sigma = calibrate_noise_multiplier(4.0, DELTA, 0.1, 40, "rdp", epsilon_tolerance=0.1)
    assert sigma == get_noise_multiplier(
        target_epsilon=4.0,
        target_delta=DELTA,
        sample_rate=0.1,
        steps=40,
        accountant="rdp",
        epsilon_tolerance=0.1,
    )
    assert 4.0 - 0.1 <= epsilon_of([(sigma, 0.1, 40)], DELTA, "rdp") <= 4.0
    sigma = calibrate_noise_multiplier(4.0, DELTA, 0.1, 40, "prv", epsilon_tolerance=0.2)
    assert 4.0 - 0.2 <= epsilon_of([(sigma, 0.1, 40)], DELTA, "prv") <= 4.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.2}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"accountant": "gdp"}, "refused"),
        ({"target_epsilon": 1e-4}, "cannot be reached"),
    ],
)
def test_calibration_refuses_impossible_inputs(kwargs: dict[str, float], match: str) -> None:
    args = {
        "target_epsilon": 2.0,
        "delta": DELTA,
        "sample_rate": 0.1,
        "steps": 10,
        "accountant": "rdp",
    } | kwargs
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)  # type: ignore[arg-type]


def test_default_delta() -> None:
    assert default_delta(100) == pytest.approx(1e-5)  # capped (1/(10 n) = 1e-3 leaks ~10%)
    assert default_delta(10**6) == pytest.approx(1e-7)
    assert default_delta(7) < 1 / 7
    with pytest.raises(ValueError, match="num_examples"):
        default_delta(0)


# ---------------------------------------------------------------------- ledger
def _ledger(path: Path, target: float | None = 3.0) -> PrivacyLedger:
    led = PrivacyLedger(path)
    led.plan(
        0,
        noise_multiplier=SIGMA,
        sample_rate=Q,
        planned_steps=60,
        target_epsilon=target,
        delta=DELTA,
        accountant="prv",
    )
    return led


def test_ledger_epsilon_equals_independent_opacus_prv(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "privacy_ledger.json")
    charged = []
    for rnd, steps in enumerate([7, 7, 5], start=1):
        eps = led.charge(0, phase="train", round=rnd, steps=steps)
        charged.append((SIGMA, Q, steps))
        assert eps == _opacus_stepped(PRVAccountant, charged)
        assert led.epsilon(0) == eps
    # a phase with another mechanism (override) composes heterogeneously, like Opacus does
    eps = led.charge(0, phase="upload", round=3, steps=2, noise_multiplier=2.0, sample_rate=0.1)
    charged.append((2.0, 0.1, 2))
    assert eps == _opacus_stepped(PRVAccountant, charged)
    assert led.history(0) == charged
    assert [(e.phase, e.round, e.steps) for e in led.entries] == [
        ("train", 1, 7),
        ("train", 2, 7),
        ("train", 3, 5),
        ("upload", 3, 2),
    ]
    assert led.entries[-1].epsilon_after == led.epsilon(0)
    on_disk = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert on_disk["entries"][-1]["epsilon_after"] == led.epsilon(0)  # saved before returning


def test_kill_and_resume_gives_the_same_epsilon_without_double_count(tmp_path: Path) -> None:
    plan = [(1, 6), (2, 6), (3, 6), (4, 6)]
    straight = _ledger(tmp_path / "a.json")
    for rnd, steps in plan:
        straight.charge(0, phase="train", round=rnd, steps=steps)

    # killed after round 2 (all charges on disk): reload and continue
    path = tmp_path / "b.json"
    led = _ledger(path)
    for rnd, steps in plan[:2]:
        led.charge(0, phase="train", round=rnd, steps=steps)
    del led
    led = PrivacyLedger.open(path)
    for rnd, steps in plan[2:]:
        led.charge(0, phase="train", round=rnd, steps=steps)
    assert led.epsilon(0) == straight.epsilon(0)
    assert led.entries == straight.entries

    # killed after charging round 3, last checkpoint at round 2: truncate, replay 3 and 4
    path = tmp_path / "c.json"
    led = _ledger(path)
    for rnd, steps in plan[:3]:
        led.charge(0, phase="train", round=rnd, steps=steps)
    led = PrivacyLedger.load(path)
    # re-planning an identical plan on resume is a no-op
    led.plan(
        0,
        noise_multiplier=SIGMA,
        sample_rate=Q,
        planned_steps=60,
        target_epsilon=3.0,
        delta=DELTA,
        accountant="prv",
    )
    dropped = led.truncate_after(2)
    assert [e.round for e in dropped] == [3]
    assert [e.round for e in PrivacyLedger.load(path).entries] == [1, 2]
    for rnd, steps in plan[2:]:
        led.charge(0, phase="train", round=rnd, steps=steps)
    assert led.epsilon(0) == straight.epsilon(0)
    assert led.steps(0) == 24


def test_would_exceed_refuses_exactly_at_the_boundary(tmp_path: Path) -> None:
    target = epsilon_of([(SIGMA, Q, 40)], DELTA)  # the budget is exactly 40 steps
    led = PrivacyLedger(tmp_path / "l.json")
    led.plan(
        3,
        noise_multiplier=SIGMA,
        sample_rate=Q,
        planned_steps=40,
        target_epsilon=target,
        delta=DELTA,
        accountant="prv",
    )
    led.charge(3, phase="train", round=1, steps=36)
    assert not led.would_exceed(3, 4)
    assert led.would_exceed(3, 5)
    assert led.remaining_steps(3) == 4
    assert led.charge(3, phase="train", round=2, steps=4) == target
    assert led.status(3) == "active"
    assert led.would_exceed(3, 1)
    assert led.remaining_steps(3) == 0
    assert not led.would_exceed(3, 0)
    led.mark_exhausted(3, round=3)
    assert led.status(3) == "budget_exhausted"
    assert led.would_exceed(3, 0)
    assert PrivacyLedger.load(tmp_path / "l.json").status(3) == "budget_exhausted"


def test_overspending_charge_is_recorded_and_exhausts(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.json", target=0.5)
    eps = led.charge(0, phase="train", round=1, steps=60)
    assert eps > 0.5 and led.epsilon(0) == eps  # never under-counted, even past the target
    assert led.status(0) == "budget_exhausted"
    assert led.truncate_after(0)[0].round == 1
    assert led.status(0) == "active" and led.epsilon(0) == 0.0


def test_plan_without_target_budgets_the_planned_schedule_and_conflicts(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.json", target=None)
    p = led.get_plan(0)
    assert isinstance(p, ClientPlan)
    assert p.target_epsilon == p.planned_epsilon == epsilon_of([(SIGMA, Q, 60)], DELTA)
    with pytest.raises(LedgerError, match="already has a plan"):
        led.plan(
            0,
            noise_multiplier=2.0,
            sample_rate=Q,
            planned_steps=60,
            target_epsilon=None,
            delta=DELTA,
            accountant="prv",
        )
    with pytest.raises(KeyError, match="no plan"):
        led.charge(9, phase="train", round=1, steps=1)
    with pytest.raises(ValueError, match="target_epsilon"):
        led.plan(
            1,
            noise_multiplier=None,
            sample_rate=Q,
            planned_steps=5,
            target_epsilon=None,
            delta=DELTA,
        )


def test_plan_calibrates_when_no_noise_multiplier(tmp_path: Path) -> None:
    led = PrivacyLedger(tmp_path / "l.json")
    p = led.plan(
        1,
        noise_multiplier=None,
        sample_rate=0.1,
        planned_steps=20,
        target_epsilon=2.0,
        delta=DELTA,
        accountant="rdp",
    )
    assert p.noise_multiplier == calibrate_noise_multiplier(2.0, DELTA, 0.1, 20, "rdp")
    assert p.planned_epsilon <= 2.0
    assert not led.would_exceed(1, 20)


def test_failed_save_leaves_the_old_file_and_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "privacy_ledger.json"
    led = _ledger(path)
    led.charge(0, phase="train", round=1, steps=5)
    before = path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(securefed.io.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        led.charge(0, phase="train", round=2, steps=5)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy_ledger.json"]
    assert len(led.entries) == 1  # memory mirrors the disk
    assert PrivacyLedger.load(path).epsilon(0) == led.epsilon(0)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda raw: "{not json", "cannot read"),
        (lambda raw: json.dumps({**raw, "format": "x"}), "format"),
        (
            lambda raw: json.dumps({**raw, "entries": [{**raw["entries"][0], "steps": -2}]}),
            r"entries\[0\]\.steps",
        ),
        (
            lambda raw: json.dumps(
                {**raw, "clients": {"0": {**raw["clients"]["0"], "delta": "x"}}}
            ),
            "delta",
        ),
        (
            lambda raw: json.dumps({**raw, "entries": [{**raw["entries"][0], "client_id": 5}]}),
            "client 5 has no plan",
        ),
    ],
)
def test_corrupt_ledger_is_refused_naming_the_file(
    tmp_path: Path, mutate: object, match: str
) -> None:
    path = tmp_path / "privacy_ledger.json"
    _ledger(path).charge(0, phase="train", round=1, steps=2)
    path.write_text(mutate(json.loads(path.read_text())))  # type: ignore[operator]
    with pytest.raises(LedgerError, match=match) as info:
        PrivacyLedger.load(path)
    assert str(path) in str(info.value)


def test_table_lists_every_client(tmp_path: Path) -> None:
    led = _ledger(tmp_path / "l.json")
    led.plan(
        4,
        noise_multiplier=2.0,
        sample_rate=0.2,
        planned_steps=10,
        target_epsilon=8.0,
        delta=1e-4,
        accountant="rdp",
    )
    led.charge(0, phase="train", round=1, steps=3)
    text = led.table()
    lines = text.splitlines()
    assert "target eps" in lines[0] and "eps spent" in lines[0] and "status" in lines[0]
    assert len(lines) == 4
    assert lines[2].split()[0] == "0" and "3/60" in lines[2] and "active" in lines[2]
    assert lines[3].split()[0] == "4" and "0/10" in lines[3]
