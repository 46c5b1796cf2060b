"""Run reports: training/FID curves, partition histograms, the audit section, report.md."""

from securefed.report.run_report import (
    plot_label_histogram,
    plot_training_curves,
    write_run_report,
)

__all__ = [
    "plot_label_histogram",
    "plot_training_curves",
    "write_run_report",
]
