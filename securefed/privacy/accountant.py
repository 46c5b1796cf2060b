"""Privacy accounting for DP-SGD: pure functions over Opacus' accountants (REFERENCES §3).

A client's DP-SGD run is a composition of Poisson-subsampled Gaussian mechanisms (Abadi et al.
2016, "Deep Learning with Differential Privacy"). Its *history* is a list of
``(noise_multiplier, sample_rate, steps)`` triples, exactly the ``history`` attribute of an Opacus
accountant; :func:`epsilon_of` turns it into the epsilon spent at a given delta.

Accountants (registry keyed by the names used in ``dp.accountant``):

- ``prv`` (default): numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz
  2021, "Numerical Composition of Differential Privacy"). Opacus reports its *upper* error bound
  ``eps_upper``, the tightest valid bound available.
- ``rdp``: Renyi DP (Mironov 2017; Mironov, Talwar & Zhang 2019 for the subsampled Gaussian):
  a rigorous upper bound, looser than PRV (5-15% in typical regimes).
- ``gdp`` is refused: the Gaussian DP accountant (Dong, Roth & Su 2019) relies on a central
  limit approximation that can *under*-estimate epsilon, which a privacy ledger must never do.

Robustness of ``prv``: the PRV accountant discretises the privacy loss on a grid whose size grows
with ``sqrt(steps)`` and with the RDP epsilon; for large epsilons (weak noise, large sample rates)
the grid reaches 10^7-10^8 points (tens of seconds, gigabytes) and the result overflows to
``inf``; for tiny deltas or degenerate histories it raises (``Cannot compute epsilon``,
``Floating point errors will dominate``, ``Discrete mean differs significantly``). In all those
cases :func:`epsilon_of` reports the RDP epsilon instead and logs a warning. RDP is a valid upper
bound on the true epsilon, so the fallback can over-count but never under-count.

The PRV result is computed exactly as ``opacus.accountants.PRVAccountant().get_epsilon(delta)``
(default ``eps_error=0.01``) on the *compacted* history (consecutive entries with the same noise
multiplier and sample rate merged, as ``PRVAccountant.step`` does), so a ledger's epsilon equals
what an Opacus accountant stepped through the same steps reports.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant, register_accountant
from opacus.accountants.analysis import rdp as _opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "PRV_MAX_DOMAIN_POINTS",
    "History",
    "calibrate_noise_multiplier",
    "compact_history",
    "default_delta",
    "epsilon_of",
]

log = logging.getLogger(__name__)

#: ``(noise_multiplier, sample_rate, steps)`` per phase, in order
History = list[tuple[float, float, int]]

#: above this many grid points the PRV accountant is too slow/large; RDP is reported instead
PRV_MAX_DOMAIN_POINTS = 4_000_000


class _PRVTooCostly(RuntimeError):
    """The PRV discretisation grid would exceed :data:`PRV_MAX_DOMAIN_POINTS`."""


class _BoundedPRVAccountant(PRVAccountant):
    """Opacus' PRV accountant that refuses (raises) before building an oversized grid.

    Identical results to :class:`opacus.accountants.PRVAccountant` whenever it returns.
    """

    def _get_domain(
        self, prvs: Any, num_self_compositions: Any, eps_error: float, delta_error: float
    ) -> Any:
        domain = super()._get_domain(
            prvs=prvs,
            num_self_compositions=num_self_compositions,
            eps_error=eps_error,
            delta_error=delta_error,
        )
        if domain.size > PRV_MAX_DOMAIN_POINTS:
            raise _PRVTooCostly(f"PRV grid of {domain.size} points exceeds {PRV_MAX_DOMAIN_POINTS}")
        return domain


def _memoise_rdp_orders() -> None:
    """Memoise Opacus' per-order RDP of one subsampled Gaussian step, ``_compute_rdp(q, sigma,
    alpha)``: a pure function of three floats (Mironov, Talwar & Zhang 2019) that
    ``compute_rdp`` looks up as a module global and multiplies by the step count.

    Every PRV evaluation bounds its grid with RDP (``compute_safe_domain_size``) for the same
    ``(q, sigma)`` pairs; the ledger's per-round ``would_exceed``/``charge`` differ only in the
    step count, so without the cache ~85% of a DP run's accounting time (about half the wall time
    of a small DP run) went into re-evaluating the same fractional-order series. Results are
    bit-identical (tested against the uncached function).
    """
    fn = _opacus_rdp._compute_rdp
    if not hasattr(fn, "cache_info"):
        _opacus_rdp._compute_rdp = functools.lru_cache(maxsize=65536)(fn)


_memoise_rdp_orders()

#: name -> accountant class (``dp.accountant``); ``prv`` is size-bounded, see the module doc
ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": _BoundedPRVAccountant, "rdp": RDPAccountant}

_REFUSED = {
    "gdp": "the Gaussian DP accountant uses a central-limit approximation that can under-estimate "
    "epsilon; use 'prv' (tightest valid bound) or 'rdp'",
}


def _check_accountant(accountant: str) -> None:
    if accountant in _REFUSED:
        raise ValueError(f"dp.accountant: {accountant!r} is refused: {_REFUSED[accountant]}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"dp.accountant: unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"delta: must lie in (0, 1), got {delta!r}")


def _check_sample_rate(sample_rate: float) -> None:
    if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
        raise ValueError(
            f"sample_rate: the Poisson sampling rate batch_size / n must lie in (0, 1], "
            f"got {sample_rate!r}"
        )


def compact_history(history: Iterable[Sequence[float | int]]) -> History:
    """Validated history with zero-step entries dropped and equal neighbours merged.

    Merging consecutive ``(sigma, q, a)``, ``(sigma, q, b)`` into ``(sigma, q, a + b)`` is what
    ``PRVAccountant.step`` does, so the PRV epsilon matches an Opacus accountant stepped one step at
    a time. (The composed mechanism is the same; only PRV's numerical grid depends on the split.)

    Raises:
        ValueError: an entry is not ``(noise_multiplier >= 0, sample_rate in (0, 1], steps >= 0)``.
    """
    out: History = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"history[{i}]: expected (noise_multiplier, sample_rate, steps)")
        sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
        if not (math.isfinite(sigma) and sigma >= 0.0):
            raise ValueError(f"history[{i}]: noise_multiplier must be finite and >= 0, got {sigma}")
        if not 0.0 < q <= 1.0:
            raise ValueError(f"history[{i}]: sample_rate must lie in (0, 1], got {q}")
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError(f"history[{i}]: steps must be an integer >= 0, got {steps!r}")
        steps = int(steps)
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def _rdp_epsilon(history: History, delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": still a bound
        return float(acc.get_epsilon(delta=delta))


def _epsilon(history: History, delta: float, accountant: str) -> tuple[float, str | None]:
    """``(epsilon, reason)``: reason is ``None`` or why PRV fell back to RDP."""
    return _epsilon_cached(tuple(history), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str
) -> tuple[float, str | None]:
    """:func:`_epsilon`, memoised (a pure function of its arguments).

    One accountant evaluation costs 0.1-5 s and the ledger asks the same question twice per round
    (``would_exceed`` then ``charge``).
    """
    if not history:
        return 0.0, None
    if any(sigma == 0.0 for sigma, _, _ in history):
        return math.inf, None  # an un-noised release: no DP guarantee at all
    if accountant == "rdp":
        return _rdp_epsilon(list(history), delta), None
    acc = ACCOUNTANTS[accountant]()
    acc.history = list(history)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # overflow is checked below
            warnings.simplefilter("ignore")
            eps = float(acc.get_epsilon(delta=delta))
    except (_PRVTooCostly, RuntimeError, ValueError, FloatingPointError, MemoryError) as exc:
        return _rdp_epsilon(list(history), delta), f"{type(exc).__name__}: {exc}"
    if not math.isfinite(eps):
        return _rdp_epsilon(list(history), delta), f"PRV returned {eps}"
    return eps, None


def epsilon_of(
    history: Iterable[Sequence[float | int]], delta: float, accountant: str = "prv"
) -> float:
    """Epsilon spent by a DP-SGD history at ``delta`` (an upper bound; 0.0 for no steps).

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` entries in order (see
            :func:`compact_history`); a zero noise multiplier gives ``inf``.
        delta: target delta in (0, 1).
        accountant: ``"prv"`` or ``"rdp"`` (``"gdp"`` is refused: it can under-estimate).

    Returns:
        epsilon such that the composed mechanism is (epsilon, delta)-DP. With ``prv`` this is
        Opacus' PRV upper bound, or the RDP bound (logged) where PRV cannot be evaluated.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    eps, reason = _epsilon(compact_history(history), delta, accountant)
    if reason is not None:
        log.warning(
            "PRV accountant could not evaluate epsilon (%s); reporting the RDP upper bound "
            "%.4g instead (valid, possibly looser: never under-counts)",
            reason,
            eps,
        )
    return eps


class _Calibrating(IAccountant):
    """Adapter so that ``get_noise_multiplier`` evaluates the same epsilon as the ledger."""

    base = "prv"

    def __init__(self) -> None:
        self.history: History = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float, *args: Any, **kwargs: Any) -> float:
        return _epsilon(compact_history(self.history), delta, self.base)[0]

    def __len__(self) -> int:
        return len(self.history)

    @classmethod
    def mechanism(cls) -> str:
        return f"securefed-{cls.base}"


class _CalibratingPRV(_Calibrating):
    base = "prv"


class _CalibratingRDP(_Calibrating):
    base = "rdp"


_CALIBRATORS: dict[str, type[_Calibrating]] = {"prv": _CalibratingPRV, "rdp": _CalibratingRDP}
# Import side effect: Opacus' accountant registry learns "securefed-prv" and "securefed-rdp", the
# names get_noise_multiplier is given (its only extension point); Opacus' own names are untouched.
for _cls in _CALIBRATORS.values():
    register_accountant(_cls.mechanism(), _cls, force=True)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (within tolerance) whose schedule spends at most the target.

    Uses ``opacus.accountants.utils.get_noise_multiplier`` (doubling then bisection, returning the
    high end, so ``epsilon_of([(sigma, sample_rate, steps)], delta) <= target_epsilon`` holds for
    the returned ``sigma``), evaluated with :func:`epsilon_of`'s accountant, so the calibration and
    the ledger agree exactly.

    Args:
        target_epsilon: the budget, > 0.
        delta: in (0, 1), e.g. :func:`default_delta`.
        sample_rate: Poisson rate ``batch_size / n`` in (0, 1].
        steps: planned DP-SGD steps, >= 1.
        accountant: ``"prv"`` or ``"rdp"``.
        epsilon_tolerance: the result spends between ``target - tol`` and ``target``.

    Raises:
        ValueError: invalid inputs, or a target that no noise multiplier up to 1e6 reaches (PRV's
            reported epsilon never drops below its numerical resolution ``eps_error = 0.01``).
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    if not (isinstance(target_epsilon, (int, float)) and 0.0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon: must be a finite number > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps: the planned number of DP-SGD steps must be >= 1, got {steps!r}")
    if not epsilon_tolerance > 0.0:
        raise ValueError(f"epsilon_tolerance: must be > 0, got {epsilon_tolerance!r}")
    try:
        sigma = get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=float(delta),
            sample_rate=float(sample_rate),
            steps=int(steps),
            accountant=_CALIBRATORS[accountant].mechanism(),
            epsilon_tolerance=epsilon_tolerance,
        )
    except ValueError as exc:
        if "budget is too low" not in str(exc):
            raise
        raise ValueError(
            f"target_epsilon: {target_epsilon} cannot be reached with sample_rate={sample_rate} "
            f"over {steps} steps at delta={delta} even with noise multiplier 1e6 (the {accountant} "
            "accountant's epsilon does not go that low); raise the target or lower the steps"
        ) from None
    eps = epsilon_of([(sigma, sample_rate, steps)], delta, accountant)  # logs a fallback once
    if eps > target_epsilon:  # cannot happen: get_noise_multiplier guarantees eps_high <= target
        raise RuntimeError(f"calibration failed: sigma={sigma} spends {eps} > {target_epsilon}")
    return float(sigma)


#: the largest default delta, whatever the dataset size
MAX_DEFAULT_DELTA = 1e-5


def default_delta(num_examples: int) -> float:
    """``min(1e-5, 1 / (10 n))`` for a client with ``n`` examples.

    Delta is the probability of a catastrophic failure; it must be well below ``1 / n``, otherwise
    releasing one random example in the clear would satisfy the definition (Dwork & Roth 2014,
    "The Algorithmic Foundations of Differential Privacy", §2.3). ``1 / (10 n)`` alone is not
    enough: a mechanism that leaks each record with probability delta then leaks SOME record
    with probability about ``1 - (1 - delta)^n ~ 10%``; capping at ``1e-5`` (the usual DP-SGD
    choice, Abadi et al. 2016) keeps that below ``n * 1e-5`` (0.1% at n = 100).
    """
    if isinstance(num_examples, bool) or int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"num_examples: must be an integer >= 1, got {num_examples!r}")
    return min(MAX_DEFAULT_DELTA, 1.0 / (10.0 * int(num_examples)))
