"""Comparison report of one or more run directories: report.html (self-contained), report.md, PNGs, metrics.json.

This module assembles the page: :func:`render_report` loads the runs (:mod:`ctr.report.loading`), draws the figures
(:mod:`ctr.report.figures`), builds the tables (:mod:`ctr.report.tables`) and writes the HTML (inside
:mod:`ctr.report.template`), the Markdown and the combined metrics. ``RunData``, ``load_run`` and ``FIGURE_IDS``
are re-exported here for callers that import them from this module.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ctr.evaluation.metrics import GAUC_DEFINITION, to_jsonable
from ctr.report.figures import FIGURE_IDS, Fig, build_figures
from ctr.report.loading import RunData, disambiguate, load_run, num, oracle, split_suffix
from ctr.report.tables import Table, bucket_table, fmt, fmt_gap, html_table, md_table, metrics_table, runs_table
from ctr.report.template import page
from features.outputs import check_no_overlap, claim_output_dir

__all__ = ["FIGURE_IDS", "REPORT_MARKER", "RunData", "load_run", "render_report"]

log = logging.getLogger(__name__)
REPORT_MARKER = "report.md"  # what says that a directory is a report that `ctr report` wrote


def _summary(runs: Sequence[RunData]) -> str:
    ms = [(r, r.metrics or {}) for r in runs]
    scored = [(r, num(m.get("gauc"))) for r, m in ms if not math.isnan(num(m.get("gauc")))]
    if not scored:
        return "No GAUC values."
    best_run, best_gauc = max(scored, key=lambda t: t[1])
    text = (
        f"Best GAUC{split_suffix(runs)}: {best_run.label} at {best_gauc:.4f} (AUC {fmt(best_run.metrics.get('auc'))})"
    )
    o = oracle(best_run)
    if o and not math.isnan(num(o.get("gauc"))):
        text += f"; the oracle reaches GAUC {fmt(o.get('gauc'))} (gap {fmt_gap(o.get('gauc'), best_gauc)})"
    return text + f". {len(runs)} run(s) compared."


def _weightings(runs: Sequence[RunData]) -> str:
    ws = sorted({str((r.metrics or {}).get("gauc_weighting", "impressions")) for r in runs})
    return ", ".join(ws)


@dataclass
class _Report:
    """Everything the HTML and Markdown pages are written from."""

    title: str
    runs: list[RunData]
    figs: list[Fig]
    metrics_table: Table
    bucket_table: Table
    runs_table: Table
    generated: str
    weighting: str

    @property
    def colors(self) -> dict[str, str]:
        return {r.label: r.color for r in self.runs}

    @property
    def notes(self) -> list[tuple[str, str]]:
        return [(r.label, n) for r in self.runs for n in r.notes]


# --------------------------------------------------------------------------------------------------------------------
# steps of render_report


def _claim_out_dir(run_dirs: list[Path], out_dir: Path) -> None:
    """Refuse an ``out_dir`` that overlaps a run directory or is neither new, empty nor an earlier report."""
    for d in run_dirs:
        check_no_overlap(out_dir, {"run directory": Path(d)}, "--out")
    claim_output_dir(out_dir, REPORT_MARKER, overwrite=True, what="report directory (written by ctr report)")


def _load_runs(run_dirs: list[Path]) -> list[RunData]:
    """Load every run, give each a unique label and a colour, and log what each lacks."""
    runs = [load_run(Path(d)) for d in run_dirs]
    disambiguate(runs)
    for r in runs:
        for note in r.notes:
            log.info("%s: %s", r.label, note)
    return runs


def _write_figures(figs: list[Fig], out_dir: Path) -> dict[str, Path]:
    """Write each drawn figure's PNG; remove a stale PNG of a figure not drawn this time. Returns {fig id: path}."""
    paths: dict[str, Path] = {}
    for fg in figs:
        p = out_dir / fg.filename
        if fg.png is not None:
            p.write_bytes(fg.png)
            paths[fg.fig_id] = p
        elif p.exists():  # a stale plot of an earlier render must not pass for this one
            p.unlink()
    return paths


def _fig_html(fg: Fig) -> str:
    cap = f"<figcaption><b>{html.escape(fg.title)}.</b> {html.escape(fg.caption)}</figcaption>"
    if fg.png is None:
        return f'<figure id="{fg.fig_id}"><p class="missing">{html.escape(fg.missing or "")}</p>{cap}</figure>'
    b64 = base64.b64encode(fg.png).decode("ascii")
    alt = html.escape(fg.title)
    return f'<figure id="{fg.fig_id}"><img alt="{alt}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _notes_html(notes: list[tuple[str, str]]) -> str:
    if not notes:
        return "<p>All run files present.</p>"
    return "<ul>" + "".join(f'<li class="note">{html.escape(lbl)}: {html.escape(n)}</li>' for lbl, n in notes) + "</ul>"


def _configs_html(runs: Sequence[RunData]) -> str:
    return "".join(
        f"<details><summary>config.json of {html.escape(r.label)}</summary>"
        f"<pre>{html.escape(json.dumps(r.config, indent=2, sort_keys=True, default=str))}</pre></details>"
        for r in runs
    )


def _html_body(rep: _Report) -> str:
    """The HTML page's body: summary, tables, figures inline, notes and configs."""
    runs, colors = rep.runs, rep.colors
    by_id = {fg.fig_id: fg for fg in rep.figs}
    return f"""
<h1>{html.escape(rep.title)}</h1>
<p class="sub">Generated {rep.generated} · {len(runs)} run(s) · GAUC weighting: {html.escape(rep.weighting)}</p>
<div class="summary">{html.escape(_summary(runs))}</div>

<h2>Metrics{html.escape(split_suffix(runs))}</h2>
{html_table(rep.metrics_table, colors)}
<p class="sub">Bold: best per column. Gap to oracle = oracle − model (smaller is better). Calibration = mean predicted
probability / observed CTR (1 is calibrated).</p>
<h3>GAUC definition</h3>
<p class="definition" id="gauc-definition">{html.escape(GAUC_DEFINITION)}</p>
{_fig_html(by_id["fig-model-comparison"])}
<div class="grid2">
{_fig_html(by_id["fig-roc"])}
{_fig_html(by_id["fig-calibration"])}
</div>

<h2>By history length</h2>
{_fig_html(by_id["fig-length-buckets"])}
{html_table(rep.bucket_table, colors)}

<h2>Training</h2>
{_fig_html(by_id["fig-training-curves"])}

<h2>Runs and data</h2>
{html_table(rep.runs_table, colors)}
<h3>Missing or partial inputs</h3>
{_notes_html(rep.notes)}
{_configs_html(runs)}
"""


def _markdown(rep: _Report) -> str:
    """The Markdown page: the same tables, the figures as links to their PNGs."""
    runs = rep.runs
    md: list[str] = [
        f"# {rep.title}",
        "",
        f"Generated {rep.generated} · {len(runs)} run(s) · GAUC weighting: {rep.weighting}",
        "",
        f"> {_summary(runs)}",
        "",
        f"## Metrics{split_suffix(runs)}",
        "",
        md_table(rep.metrics_table),
        "",
        "Bold: best per column. Gap to oracle = oracle − model. Calibration = mean predicted / observed CTR.",
        "",
        "### GAUC definition",
        "",
        GAUC_DEFINITION,
        "",
    ]
    for fg in rep.figs:
        md.append(f"### {fg.title}")
        md.append("")
        md.append(f"![{fg.title}]({fg.filename})" if fg.png is not None else f"*{fg.missing}*")
        md.append("")
        md.append(fg.caption)
        md.append("")
        if fg.fig_id == "fig-length-buckets":
            md += ["## By history length", "", md_table(rep.bucket_table), ""]
    md += ["## Runs and data", "", md_table(rep.runs_table), ""]
    notes = rep.notes
    if notes:
        md += ["### Missing or partial inputs", ""] + [f"- {lbl}: {n}" for lbl, n in notes] + [""]
    return "\n".join(md)


def _write_metrics(runs: Sequence[RunData], path: Path) -> None:
    """The combined metrics.json: {model label: metrics}."""
    path.write_text(json.dumps(to_jsonable({r.label: r.metrics for r in runs}), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# the report


def render_report(run_dirs: list[Path], out_dir: Path, title: str = "CTR model comparison") -> dict[str, Path]:
    """Render the comparison report of ``run_dirs`` into ``out_dir``.

    Writes ``report.html`` (one self-contained file: inline CSS, plots as base64 PNG, nothing fetched), ``report.md``
    (the same tables, links to the PNGs), one PNG per figure, and ``metrics.json`` ({model label: metrics}).
    Returns {"html", "markdown", "metrics", <figure id>...: path}.

    ``out_dir`` must be new, empty, or a report directory written before (it holds report.md, which is written first,
    as a placeholder, and last); it may not be, contain or lie inside a run directory. Only the report's own files
    are rewritten; anything else in ``out_dir`` is left alone.
    """
    if not run_dirs:
        raise ValueError("render_report: no run directories given")
    out_dir = Path(out_dir)
    _claim_out_dir(run_dirs, out_dir)
    runs = _load_runs(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / REPORT_MARKER
    md_path.write_text("# report being written (ctr report has not finished)\n", encoding="utf-8")  # claims out_dir

    figs = build_figures(runs)
    paths = _write_figures(figs, out_dir)
    rep = _Report(
        title=title,
        runs=runs,
        figs=figs,
        metrics_table=metrics_table(runs),
        bucket_table=bucket_table(runs),
        runs_table=runs_table(runs),
        generated=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        weighting=_weightings(runs),
    )

    html_path = out_dir / "report.html"
    html_path.write_text(page(html.escape(title), _html_body(rep)), encoding="utf-8")
    paths["html"] = html_path
    md_path.write_text(_markdown(rep), encoding="utf-8")
    paths["markdown"] = md_path
    metrics_path = out_dir / "metrics.json"
    _write_metrics(runs, metrics_path)
    paths["metrics"] = metrics_path
    log.info("report written to %s (%d figures)", html_path, sum(fg.png is not None for fg in figs))
    return paths
