"""Run comparison report: self-contained report.html, report.md, PNG plots and combined metrics.json."""

from ctr.report.render import FIGURE_IDS, load_run, render_report

__all__ = ["FIGURE_IDS", "load_run", "render_report"]
