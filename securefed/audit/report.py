"""Audit outputs: ``audit/report.json``, ``audit/report.md`` and ROC plots (the run report's
audit section renders the same JSON: :mod:`securefed.report.audit_section`)."""

from __future__ import annotations

from pathlib import Path

from securefed.artefacts.rundir import RunDir
from securefed.audit.metrics import plot_roc
from securefed.audit.runner import AuditReport
from securefed.io import atomic_write_json, atomic_write_text
from securefed.report.audit_section import AUDIT_DIR, clean_json, render_markdown

__all__ = ["AUDIT_DIR", "write_audit"]


def write_audit(report: AuditReport, run_dir: str | Path | None = None) -> Path:
    """Write ``audit/report.json``, ``audit/report.md`` and ``audit/roc.png``; returns the
    audit folder."""
    rd = RunDir(run_dir or report.run_dir)
    out = rd.audit
    out.mkdir(parents=True, exist_ok=True)
    d = report.as_dict()
    if report.attacks:
        plot_roc(report.attacks, out / "roc.png", title="Membership inference (log-log)")
        atomic_write_json(
            out / "roc_curves.json",
            {f"{a.attack}:{a.target}": {"fpr": a.fpr, "tpr": a.tpr} for a in report.attacks},
        )
    atomic_write_json(rd.audit_json, clean_json(d))
    atomic_write_text(rd.audit_markdown, "\n".join(render_markdown(d)) + "\n")
    return out
