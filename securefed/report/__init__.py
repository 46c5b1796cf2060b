"""Run reports: sample grids, training/FID curves, partition histograms, report.md."""

from securefed.report.grid import save_grid, to_grid_image
from securefed.report.run_report import (
    plot_label_histogram,
    plot_training_curves,
    write_run_report,
)

__all__ = [
    "plot_label_histogram",
    "plot_training_curves",
    "save_grid",
    "to_grid_image",
    "write_run_report",
]
