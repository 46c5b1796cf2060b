"""The audit section of the run report: ``audit/report.json`` (written by ``securefed audit``)
rendered as markdown. Pure formatting of the audit's JSON: the report layer reads what the audit
wrote and never imports the audit (issue 16: the run -> report -> audit -> run cycle)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from securefed.artefacts.rundir import RunDir

__all__ = ["AUDIT_DIR", "audit_section", "clean_json", "render_markdown"]

#: the folder of a run directory that ``securefed audit`` fills
AUDIT_DIR = RunDir(".").audit.name


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}f}"
    return str(v)


def clean_json(obj: Any) -> Any:
    """JSON-safe copy: inf/nan become strings so that the file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def _privacy_table(eps: dict[str, Any]) -> list[str]:
    if "eps_lb" not in eps:
        return ["_No empirical epsilon: no attack scores or canaries were available._", ""]
    acct = eps.get("accountant")
    one = eps.get("one_run", {})
    gf = eps.get("gaussian_fit") or {}
    gf_s = (
        f"{_f(gf.get('eps_est'), 2)} [{_f(gf.get('ci_low'), 2)}, {_f(gf.get('ci_high'), 2)}]"
        if gf
        else "-"
    )
    lines = [
        "| accountant epsilon at audit delta | empirical eps_LB (one-run) | ceiling | audit delta "
        "| ledger epsilon (its delta) | diagnostics: Clopper-Pearson, Gaussian fit [95%] "
        "| source |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {_f(acct)} ({eps.get('accountant_level')}) | **{_f(eps.get('eps_lb'))}** "
        f"({one.get('v')}/{one.get('r')} correct, m={one.get('m')}) | {_f(eps.get('ceiling'))} "
        f"| {eps.get('delta')} | {_f(eps.get('accountant_ledger'))} "
        f"({_f(eps.get('ledger_delta'), 6)}) | {_f(eps.get('eps_lb_cp'))}, {gf_s} | "
        f"{eps.get('source', '-')}, confidence {1 - float(eps.get('beta', 0.05)):.0%} |",
        "",
    ]
    if eps.get("accountant_canary_clients") is not None:
        lines += [
            f"_Canary clients: the accountant's epsilon at the audit delta is the larger of the "
            f"real clients' ({_f(eps.get('accountant_clients'))}) and the canary clients' own "
            f"({_f(eps.get('accountant_canary_clients'))}, at most "
            f"{eps.get('canary_participations_max')} participations)._",
            "",
        ]
    cos = eps.get("andrew_cosine")
    if cos:
        lines += [
            f"_Diagnostic (Andrew et al. 2024, cosines of the final model delta with the canary "
            f"directions, Gaussian fit; an estimate, not a bound): epsilon "
            f"{_f(cos.get('eps_est'), 2)}._",
            "",
        ]
    if eps.get("unfit"):
        lines += [f"_{eps['unfit']}._", ""]
    return lines


def _attack_table(attacks: list[dict[str, Any]]) -> list[str]:
    if not attacks:
        return []
    lines = [
        "| attack | target | AUC [95% CI] | TPR@1%FPR | TPR@0.1%FPR | balanced acc. | n |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a in attacks:
        ci = a.get("ci", {}).get("auc")
        ci_s = f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else ""
        lines.append(
            f"| {a['attack']} | {a['target']} | {a['auc']:.3f}{ci_s} | "
            f"{a['tpr_at_1pct_fpr']:.3f} | {a['tpr_at_01pct_fpr']:.3f} | "
            f"{a['balanced_accuracy']:.3f} | {a['num_members']}+{a['num_nonmembers']} |"
        )
    return [*lines, ""]


def _memo_lines(mem: dict[str, Any] | None, link_prefix: str) -> list[str]:
    if not mem:
        return []
    ci = mem["dcr_share_ci"]
    lines = [
        "| source | samples | flagged (ratio <= 1) | holdout baseline | min / median ratio | "
        "DCR share [95% CI] |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {mem['source']} | {mem['num_samples']} | {mem['flagged']} "
        f"({mem['flagged_fraction']:.1%}) | {mem['baseline_flagged_fraction']:.1%} | "
        f"{mem['min_ratio']:.3f} / {mem['median_ratio']:.3f} | {mem['dcr_share']:.3f} "
        f"[{ci[0]:.3f}, {ci[1]:.3f}] |",
        "",
    ]
    if mem.get("grid"):
        lines += [
            f"Closest synthetic (left) / training (right) pairs: "
            f"![closest pairs]({link_prefix}{mem['grid']})",
            "",
        ]
    return lines


def render_markdown(d: dict[str, Any], link_prefix: str = "", heading: str = "#") -> list[str]:
    """Markdown lines of an audit report dict (``AuditReport.as_dict()``)."""
    h = heading
    verdict = "PASS" if d["passed"] else "FAIL"
    lines = [
        f"{h} Privacy audit: {verdict}",
        "",
        f"Threat models: {', '.join(d['threat_models'])}. Audit time {d['seconds']:.1f} s.",
        "",
        f"{h}# Accountant vs empirical epsilon",
        "",
        *_privacy_table(d["epsilon"]),
        f"{h}# Membership-inference attacks",
        "",
        *_attack_table(d["attacks"]),
    ]
    if d["attacks"]:
        lines += [f"![ROC]({link_prefix}roc.png)", ""]
    if d.get("memorization"):
        lines += [
            f"{h}# Synthetic data memorisation",
            "",
            *_memo_lines(d["memorization"], link_prefix),
        ]
    lines += [f"{h}# Criteria", ""]
    lines += [
        "| threat model | criterion | metric | value [95% bounds] (N) | required | outcome |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for tm, checks in d["defences"].items():
        for c in checks:
            lines.append(
                f"| {tm} | defence `{c['id']}` | `{c['check']}` | {c['detail']} | config | "
                f"{'PASS' if c['passed'] else '**FAIL**'} |"
            )
    for c in d["criteria"]:
        req = f"{c['op']} {_f(c['threshold'])}"
        if isinstance(c["threshold_expr"], str):
            req += f" ({c['threshold_expr']})"
        val = _f(c["actual"])
        if c.get("low") is not None and c.get("high") is not None and c["low"] != c["high"]:
            val += f" [{_f(c['low'])}, {_f(c['high'])}]"
        if c.get("n") is not None:
            val += f" (N={c['n']}, min {c.get('min_n', 0)})"
        outcome = c.get("outcome", "PASS" if c["passed"] else "FAIL")
        mark = outcome if outcome == "PASS" else f"**{outcome}**"
        if outcome == "INCONCLUSIVE" and c["passed"]:
            mark += " (counts as pass)"
        lines.append(
            f"| {c['threat_model']} | `{c['id']}` | `{c['metric']}` | {val} | {req} | {mark} |"
        )
    lines.append("")
    if d.get("notes"):
        lines += [f"{h}# Notes", "", *[f"- {n}" for n in d["notes"]], ""]
    return lines


def audit_section(run_dir: str | Path) -> list[str]:
    """The run report's audit section (``## Privacy audit``), or ``[]`` without ``audit/``."""
    path = RunDir(run_dir).audit_json
    if not path.exists():
        return []
    try:
        d = json.loads(path.read_text())
    except ValueError:
        return ["## Privacy audit", "", f"_{path} is not valid JSON; rerun `securefed audit`._", ""]
    for key in ("accountant", "eps_lb", "accountant_ledger"):
        v = d.get("epsilon", {}).get(key)
        if isinstance(v, str):
            d["epsilon"][key] = float(v)
    return render_markdown(d, link_prefix=f"{AUDIT_DIR}/", heading="##")
