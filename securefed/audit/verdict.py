"""Audit verdicts as statistical tests: PASS, FAIL or INCONCLUSIVE.

A criterion ``metric OP threshold`` is judged on the metric's CONFIDENCE BOUNDS, not on its
point estimate (a privacy officer signs "we are confident the leak is below the threshold", not
"our estimate happened to be below it"):

- FAIL when even the favourable confidence bound violates the threshold (for ``<=``: the lower
  bound is above it): the violation is established at the stated confidence;
- PASS when the unfavourable bound clears it (for ``<=``: the upper bound is at or below it),
  the sample holds at least the criterion's minimum N, and nothing else makes the measurement
  unfit for a pass (e.g. an empirical epsilon from natural examples instead of canaries, or an
  audit whose best possible bound cannot reach the accountant's epsilon);
- INCONCLUSIVE otherwise: the data cannot tell. A required criterion that is inconclusive
  fails the audit unless its threat model says ``on_inconclusive: pass``.

Minimum N (overridable per criterion with ``min_n``): AUC and balanced accuracy need
:data:`MIN_N_AUC` members and as many non-members; a TPR at FPR ``f`` needs ``ceil(10 / f)``
non-members (at least ten expected false positives: 1,000 for 1% FPR; with 128 non-members an
honest model fails ``TPR@1%FPR <= 0.03`` about 18% of the time, Carlini et al. 2022 §IV);
memorisation figures need :data:`MIN_N_MEMORIZATION` synthetic images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from securefed.audit.metrics import LOW_FPR_TARGETS

__all__ = [
    "FAIL",
    "INCONCLUSIVE",
    "MIN_N_AUC",
    "MIN_N_MEMORIZATION",
    "OUTCOMES",
    "PASS",
    "Measurement",
    "Outcome",
    "compare",
    "judge",
    "min_n_for",
]

Outcome = Literal["PASS", "FAIL", "INCONCLUSIVE"]
PASS: Outcome = "PASS"
FAIL: Outcome = "FAIL"
INCONCLUSIVE: Outcome = "INCONCLUSIVE"
OUTCOMES: tuple[Outcome, ...] = (PASS, FAIL, INCONCLUSIVE)

#: members (and non-members) an AUC / balanced-accuracy criterion needs: at N = 100 the 95%
#: interval of a chance-level AUC is about +-0.08, so a 0.6 threshold can be cleared
MIN_N_AUC = 100
#: synthetic images a memorisation criterion needs
MIN_N_MEMORIZATION = 100


@dataclass(frozen=True)
class Measurement:
    """A measured metric with its confidence bounds.

    Attributes:
        value: the point estimate (None: not measured).
        low / high: confidence bounds (equal to ``value`` for a quantity that is itself a
            bound, e.g. ``eps_lb``, or an exact count).
        n: the sample size the metric rests on (None: not applicable).
        min_n: the smallest ``n`` that can support a PASS.
        detail: where the value came from.
        unfit: a reason the measurement cannot support a PASS ("" when fit).
    """

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int | None = None
    min_n: int = 0
    detail: str = ""
    unfit: str = ""


def min_n_for(metric: str) -> int:
    """Default minimum N of a criterion on ``metric`` (see module docstring)."""
    last = metric.split(".")[-1]
    if metric.startswith("attacks."):
        base = last.removesuffix("_ci_high").removesuffix("_ci_low")
        if base in LOW_FPR_TARGETS:
            return math.ceil(10 / LOW_FPR_TARGETS[base] - 1e-9)
        return MIN_N_AUC
    if metric.startswith("memorization."):
        return MIN_N_MEMORIZATION
    return 0


def compare(a: float, op: str, b: float) -> bool:
    """``a OP b`` for the criteria operators."""
    return {
        "==": a == b,
        "!=": a != b,
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
    }.get(op, False)


def judge(m: Measurement, op: str, threshold: float | None) -> tuple[Outcome, str]:
    """The outcome of ``m OP threshold`` and why (see module docstring)."""
    if m.value is None or threshold is None or (
        isinstance(m.value, float) and math.isnan(m.value)
    ):
        return FAIL, f"not measured ({m.detail}): a criterion that was not measured fails"
    low = m.value if m.low is None else m.low
    high = m.value if m.high is None else m.high
    if op in ("<", "<="):
        favourable, unfavourable = low, high
    elif op in (">", ">="):
        favourable, unfavourable = high, low
    else:
        favourable = unfavourable = m.value
    if not compare(favourable, op, threshold):
        if favourable == unfavourable:
            return FAIL, f"{m.value:.4g} {op} {threshold:.4g} does not hold"
        return FAIL, (
            f"even the favourable confidence bound {favourable:.4g} violates {op} "
            f"{threshold:.4g}"
        )
    if m.n is not None and m.n < m.min_n:
        return INCONCLUSIVE, (
            f"N = {m.n} is below this criterion's minimum N = {m.min_n} (collect more examples "
            "or set min_n in the threat model)"
        )
    if m.unfit:
        return INCONCLUSIVE, m.unfit
    if compare(unfavourable, op, threshold):
        return PASS, (
            f"the confidence bound {unfavourable:.4g} clears {op} {threshold:.4g}"
            if favourable != unfavourable
            else f"{m.value:.4g} {op} {threshold:.4g}"
        )
    return INCONCLUSIVE, (
        f"the confidence interval [{low:.4g}, {high:.4g}] straddles the threshold {threshold:.4g}"
    )
