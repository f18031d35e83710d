"""The report's tables and number formatting: metrics, per-length buckets and runs, as HTML or Markdown.

A table is a header plus rows of (text, css classes) cells, built once and written both ways; class "l" marks a
left-aligned cell, "best" the best value of its column, "model" a model label (coloured swatch in HTML).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctr.evaluation.metrics import LENGTH_BUCKET_LABELS
from ctr.report.loading import RunData, num, oracle, shared_oracle

__all__ = [
    "Table",
    "bucket_table",
    "fmt",
    "fmt_gap",
    "fmt_int",
    "html_table",
    "md_table",
    "metrics_table",
    "runs_table",
]

_Cell = tuple[str, str]  # (text, css class); class "l" = left-aligned


def fmt(v: Any, digits: int = 4) -> str:
    """``v`` with ``digits`` decimals, or an en dash when it is missing or not a number."""
    x = num(v)
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def fmt_int(v: Any) -> str:
    """``v`` as an integer with thousands separators, or an en dash."""
    x = num(v)
    return "–" if math.isnan(x) else f"{int(x):,}"


def fmt_gap(oracle_value: Any, model_value: Any) -> str:
    """Signed ``oracle - model`` with 4 decimals, or an en dash when either is missing."""
    o, m = num(oracle_value), num(model_value)
    return "–" if math.isnan(o) or math.isnan(m) else f"{o - m:+.4f}"


@dataclass
class Table:
    """A header plus rows of (text, css classes) cells, one css class per row."""

    header: list[str]
    rows: list[list[_Cell]]
    row_classes: list[str]
    left: frozenset[int] = frozenset({0})  # left-aligned (text) columns


def _best(values: list[float], how: str) -> int | None:
    arr = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.isnan(arr).all():
        return None
    if how == "max":
        return int(np.nanargmax(arr))
    if how == "min":
        return int(np.nanargmin(arr))
    return int(np.nanargmin(np.abs(arr - 1.0)))  # calibration: closest to 1


def _oracle_rows(runs: Sequence[RunData]) -> list[list[_Cell]]:
    """The oracle's rows of the metrics table: one when all runs share it, else one per run that has one."""
    shared = shared_oracle(runs)
    named = (
        [("oracle (true p)", shared)]
        if shared
        else [(f"oracle, split of {r.label}", oracle(r)) for r in runs if oracle(r)]
    )
    rows: list[list[_Cell]] = []
    for name, o in named:
        assert o is not None
        rows.append(
            [
                (name, "l"),
                (fmt(o.get("auc")), ""),
                (fmt(o.get("gauc")), ""),
                (fmt(o.get("logloss")), ""),
                ("–", ""),
                ("–", ""),
                ("–", ""),
                ("–", ""),
                ("–", ""),
            ]
        )
    return rows


def metrics_table(runs: Sequence[RunData]) -> Table:
    """AUC, GAUC, logloss, calibration and gaps to the oracle per run, then the oracle row(s)."""
    header = [
        "Model",
        "AUC",
        "GAUC",
        "logloss",
        "calibration (pred/obs)",
        "AUC gap to oracle",
        "GAUC gap to oracle",
        "GAUC users used",
        "GAUC users skipped",
    ]
    ms = [r.metrics or {} for r in runs]
    best = {
        "auc": _best([num(m.get("auc")) for m in ms], "max"),
        "gauc": _best([num(m.get("gauc")) for m in ms], "max"),
        "logloss": _best([num(m.get("logloss")) for m in ms], "min"),
        "calibration": _best([num(m.get("calibration")) for m in ms], "one"),
    }
    rows: list[list[_Cell]] = []
    for i, (r, m) in enumerate(zip(runs, ms, strict=True)):
        o = oracle(r) or {}

        def cell(key: str, i: int = i, m: dict[str, Any] = m) -> _Cell:
            return fmt(m.get(key)), "best" if best[key] == i else ""

        rows.append(
            [
                (r.label, "l model"),
                cell("auc"),
                cell("gauc"),
                cell("logloss"),
                cell("calibration"),
                (fmt_gap(o.get("auc"), m.get("auc")), ""),
                (fmt_gap(o.get("gauc"), m.get("gauc")), ""),
                (fmt_int(m.get("gauc_users_used")), ""),
                (fmt_int(m.get("gauc_users_skipped")), ""),
            ]
        )
    classes = [""] * len(rows)
    oracle_rows = _oracle_rows(runs)
    return Table(header, rows + oracle_rows, classes + ["oracle"] * len(oracle_rows))


def bucket_table(runs: Sequence[RunData]) -> Table:
    """Per history-length bucket, one row per run: counts, AUC, GAUC, logloss and the oracle's AUC and GAUC."""
    header = [
        "History length",
        "Model",
        "samples",
        "positives",
        "AUC",
        "GAUC",
        "GAUC users used",
        "GAUC users skipped",
        "logloss",
        "oracle AUC",
        "oracle GAUC",
    ]
    rows: list[list[_Cell]] = []
    classes: list[str] = []
    for k in LENGTH_BUCKET_LABELS:
        for j, r in enumerate(runs):
            b = ((r.metrics or {}).get("buckets") or {}).get(k) or {}
            ob = ((r.metrics or {}).get("oracle_buckets") or {}).get(k) or {}
            rows.append(
                [
                    (k if j == 0 else "", "l"),
                    (r.label, "l model"),
                    (fmt_int(b.get("samples")), ""),
                    (fmt_int(b.get("positives")), ""),
                    (fmt(b.get("auc")), ""),
                    (fmt(b.get("gauc")), ""),
                    (fmt_int(b.get("gauc_users_used")), ""),
                    (fmt_int(b.get("gauc_users_skipped")), ""),
                    (fmt(b.get("logloss")), ""),
                    (fmt(ob.get("auc")), ""),
                    (fmt(ob.get("gauc")), ""),
                ]
            )
            classes.append("group-start" if j == 0 else "")
    return Table(header, rows, classes, frozenset({0, 1}))


def runs_table(runs: Sequence[RunData]) -> Table:
    """One row per run: model name, split, sample counts, CTR, mean score, run directory and dataset."""
    header = ["Model", "model name", "split", "samples", "positives", "CTR", "mean score", "run directory", "dataset"]
    rows: list[list[_Cell]] = []
    for r in runs:
        m = r.metrics or {}
        rows.append(
            [
                (r.label, "l model"),
                (r.model_name, "l"),
                (r.split or "–", "l"),
                (fmt_int(m.get("samples")), ""),
                (fmt_int(m.get("positives")), ""),
                (fmt(m.get("ctr")), ""),
                (fmt(m.get("mean_score")), ""),
                (str(r.run_dir.resolve()), "l path"),
                (r.dataset or "–", "l path"),
            ]
        )
    return Table(header, rows, [""] * len(rows), frozenset({0, 1, 2, 7, 8}))


def html_table(t: Table, colors: dict[str, str]) -> str:
    """``t`` as an HTML table in a scrolling div; model cells get a swatch of their colour in ``colors``."""
    head = "".join(
        f'<th class="l">{html.escape(h)}</th>' if i in t.left else f"<th>{html.escape(h)}</th>"
        for i, h in enumerate(t.header)
    )
    body = []
    for row, rc in zip(t.rows, t.row_classes, strict=True):
        cells = []
        for text, cls in row:
            content = html.escape(text)
            if "model" in cls.split() and text in colors:
                content = f'<span class="swatch" style="background:{colors[text]}"></span>{content}'
            cls_attr = " ".join(c for c in cls.split() if c != "model")
            cells.append(f'<td class="{cls_attr}">{content}</td>' if cls_attr else f"<td>{content}</td>")
        body.append(f'<tr class="{rc}">' + "".join(cells) + "</tr>" if rc else "<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(t: Table) -> str:
    """``t`` as a Markdown table; the best value of a column in bold."""
    lines = ["| " + " | ".join(_md_escape(h) for h in t.header) + " |"]
    lines.append("|" + "|".join(":---" if i in t.left else "---:" for i in range(len(t.header))) + "|")
    for row in t.rows:
        cells = []
        for text, cls in row:
            s = _md_escape(text)
            cells.append(f"**{s}**" if "best" in cls.split() and s != "–" else s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
