"""Membership-inference metrics: ROC, AUC, TPR at low FPR, balanced accuracy, bootstrap CIs.

Convention everywhere: a score is higher for "more likely a member"; members are the positive
class. Low-FPR operating points follow Carlini et al. (2022), "Membership Inference Attacks From
First Principles" (average-case metrics such as AUC hide confident leaks): the TPR at a target
FPR is read at the LAST ROC point whose FPR does not exceed the target (never interpolated,
never the nearest point).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from securefed.io import atomic_write_bytes

__all__ = [
    "ATTACK_METRICS",
    "LOW_FPR_TARGETS",
    "AttackResult",
    "Interval",
    "attack_result",
    "balanced_accuracy",
    "plot_roc",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]


def _check_scores(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember, dtype=np.float64).reshape(-1)
    if m.size == 0 or n.size == 0:
        raise ValueError(
            f"membership scores: need at least one member and one non-member score, got "
            f"{m.size} members and {n.size} non-members"
        )
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership scores: every score must be finite (got NaN or inf)")
    return m, n


def roc_curve(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC of the rule "member iff score >= threshold" over every distinct threshold.

    Args:
        member: ``[M]`` scores of members (positives).
        nonmember: ``[N]`` scores of non-members (negatives).

    Returns:
        ``(fpr, tpr)``, each ``[K + 1]`` float64, starting at ``(0, 0)`` (threshold ``+inf``)
        and ending at ``(1, 1)``; one point per distinct score (tied scores move together), FPR
        and TPR non-decreasing.
    """
    m, n = _check_scores(member, nonmember)
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(m.size, bool), np.zeros(n.size, bool)])
    order = np.argsort(-scores, kind="mergesort")
    s, lab = scores[order], is_member[order]
    tp = np.cumsum(lab)
    fp = np.cumsum(~lab)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tpr = np.r_[0.0, tp[last_of_tie] / m.size]
    fpr = np.r_[0.0, fp[last_of_tie] / n.size]
    return fpr, tpr


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """Area under the ROC curve = P[score(member) > score(non-member)] + 0.5 P[tie]
    (Mann-Whitney U / (M N); Hanley & McNeil 1982)."""
    fpr, tpr = roc_curve(member, nonmember)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """TPR at the last ROC point with ``FPR <= target`` (Carlini et al. 2022).

    Args:
        fpr, tpr: ``[K]`` from :func:`roc_curve` (non-decreasing, starting at 0).
        target: FPR in [0, 1].
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"tpr_at_fpr: target FPR must be in [0, 1], got {target}")
    ok = np.flatnonzero(np.asarray(fpr) <= target + 1e-12)
    return float(np.asarray(tpr)[ok[-1]]) if ok.size else 0.0


def balanced_accuracy(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Best balanced accuracy ``max_threshold (TPR + 1 - FPR) / 2`` over the ROC points."""
    return float(np.max((np.asarray(tpr) + 1.0 - np.asarray(fpr)) / 2.0))


@dataclass(frozen=True)
class Interval:
    """A two-sided percentile bootstrap confidence interval."""

    low: float
    high: float


@dataclass(frozen=True)
class AttackResult:
    """One attack on one target.

    Attributes:
        attack: attack name (``loss``, ``secmi``, ``pia``, ``pian``, ``lira_offline``, ...).
        target: what was attacked (``global``, ``client_3``, ...).
        auc: ROC AUC.
        tpr_at_1pct_fpr / tpr_at_01pct_fpr / tpr_at_5pct_fpr: TPR at FPR <= 1% / 0.1% / 5%
            (last ROC point).
        balanced_accuracy: best (TPR + TNR) / 2.
        num_members / num_nonmembers: evaluation set sizes.
        ci: metric name -> 95% bootstrap interval (members and non-members resampled apart).
        fpr / tpr: the ROC curve.
        params: the attack's settings.
        seconds: wall time of scoring.
    """

    attack: str
    target: str
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    balanced_accuracy: float
    num_members: int
    num_nonmembers: int
    ci: dict[str, Interval] = field(default_factory=dict)
    fpr: list[float] = field(default_factory=list, repr=False)
    tpr: list[float] = field(default_factory=list, repr=False)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    tpr_at_5pct_fpr: float = 0.0

    def interval(self, name: str) -> Interval | None:
        """The confidence interval of metric ``name`` (``auc_symmetric`` derived from the AUC's:
        ``max(auc, 1 - auc)`` over the interval), or None without a bootstrap."""
        if name == "auc_symmetric":
            ci = self.ci.get("auc")
            if ci is None:
                return None
            high = max(ci.high, 1.0 - ci.low)
            low = 0.5 if ci.low <= 0.5 <= ci.high else max(ci.low, 1.0 - ci.high)
            return Interval(float(low), float(high))
        if name in LOW_FPR_TARGETS:
            # Clopper-Pearson on the members above the threshold the non-members fixed (the
            # percentile bootstrap is unreliable at extreme quantiles)
            return _clopper_pearson(round(self.tpr_at(name) * self.num_members), self.num_members)
        return self.ci.get(name)

    def tpr_at(self, name: str) -> float:
        return float(getattr(self, name))

    def metric(self, name: str) -> float:
        """A metric by its criteria name: ``auc``, ``auc_symmetric`` (``max(auc, 1 - auc)``),
        ``tpr_at_1pct_fpr``, ``tpr_at_01pct_fpr``, ``balanced_accuracy``, or
        ``<metric>_ci_high`` / ``<metric>_ci_low``."""
        for suffix, attr in (("_ci_high", "high"), ("_ci_low", "low")):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                ci = self.interval(base)
                if ci is None:
                    raise KeyError(
                        f"no bootstrap interval for {base!r} in attack {self.attack} (run the "
                        "audit with --bootstrap > 0)"
                    )
                return float(getattr(ci, attr))
        if name == "auc_symmetric":
            # an attacker with reference data learns the score's direction: AUC 0.3 leaks as
            # much as AUC 0.7
            return float(max(self.auc, 1.0 - self.auc))
        if name not in _METRICS:
            raise KeyError(
                f"unknown attack metric {name!r}; choose one of "
                f"{[*sorted(_METRICS), 'auc_symmetric']} (optionally with _ci_high / _ci_low)"
            )
        return float(getattr(self, name))

    def as_dict(self, with_curve: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_curve:
            d.pop("fpr")
            d.pop("tpr")
        return d


_METRICS = (
    "auc",
    "tpr_at_1pct_fpr",
    "tpr_at_01pct_fpr",
    "tpr_at_5pct_fpr",
    "balanced_accuracy",
)

#: every metric name a criterion may read from an attack (``_ci_high`` / ``_ci_low`` too)
ATTACK_METRICS = (*_METRICS, "auc_symmetric")

#: the target FPR of each low-FPR metric (a criterion on it needs >= 10 / FPR non-members)
LOW_FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_01pct_fpr": 0.001, "tpr_at_5pct_fpr": 0.05}


def _metrics(m: np.ndarray, n: np.ndarray) -> dict[str, float]:
    fpr, tpr = roc_curve(m, n)
    return {
        "auc": float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_01pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "tpr_at_5pct_fpr": tpr_at_fpr(fpr, tpr, 0.05),
        "balanced_accuracy": balanced_accuracy(fpr, tpr),
    }


def attack_result(
    attack: str,
    target: str,
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    rng: np.random.Generator,
    bootstrap: int = 200,
    confidence: float = 0.95,
    params: dict[str, Any] | None = None,
    seconds: float = 0.0,
) -> AttackResult:
    """Metrics of one attack with percentile bootstrap intervals (Efron & Tibshirani 1993).

    Args:
        member_scores: ``[M]``; nonmember_scores: ``[N]`` (higher = member).
        rng: draws the bootstrap resamples (members and non-members resampled separately).
        bootstrap: number of resamples (0: no intervals).
        confidence: two-sided level of the intervals.
    """
    m, n = _check_scores(member_scores, nonmember_scores)
    if bootstrap < 0 or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"attack_result: need bootstrap >= 0 and confidence in (0, 1), got {bootstrap} "
            f"and {confidence}"
        )
    point = _metrics(m, n)
    fpr, tpr = roc_curve(m, n)
    ci: dict[str, Interval] = {}
    if bootstrap > 0:
        samples: dict[str, list[float]] = {k: [] for k in point}
        for _ in range(bootstrap):
            bm = m[rng.integers(0, m.size, m.size)]
            bn = n[rng.integers(0, n.size, n.size)]
            for k, v in _metrics(bm, bn).items():
                samples[k].append(v)
        lo, hi = (1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0
        for k, vals in samples.items():
            arr = np.asarray(vals)
            ci[k] = Interval(float(np.quantile(arr, lo)), float(np.quantile(arr, hi)))
    return AttackResult(
        attack=attack,
        target=target,
        num_members=int(m.size),
        num_nonmembers=int(n.size),
        ci=ci,
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
        params=dict(params or {}),
        seconds=float(seconds),
        **point,
    )


def _clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Two-sided Clopper-Pearson interval of a binomial rate ``k / n`` (Clopper & Pearson
    1934)."""
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return Interval(low, high)


def plot_roc(results: list[AttackResult], path: str | Path, title: str = "") -> Path:
    """ROC curves on log-log axes (low-FPR regime visible), chance line dashed."""
    # lazy: matplotlib is slow to import, and every CLI command imports securefed.audit.metrics
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above (after matplotlib.use)

    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    floor = 1.0
    for r in results:
        fpr, tpr = np.asarray(r.fpr), np.asarray(r.tpr)
        n_min = max(1, min(r.num_members, r.num_nonmembers))
        floor = min(floor, 0.5 / n_min)
        ax.step(
            np.maximum(fpr, 0.5 / max(r.num_nonmembers, 1)),
            np.maximum(tpr, 0.5 / max(r.num_members, 1)),
            where="post",
            label=f"{r.attack} [{r.target}] AUC {r.auc:.3f}, TPR@1% {r.tpr_at_1pct_fpr:.3f}",
        )
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "Membership inference ROC (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
