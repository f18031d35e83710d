"""Comparison report of one or more run directories: report.html (self-contained), report.md, PNGs, metrics.json.

A run directory holds ``config.json``, ``metrics.json`` (from :func:`ctr.evaluation.evaluate_predictions`),
``predictions.parquet`` and ``train_log.jsonl``. Only the metrics (or the predictions to compute them from) are
needed; whatever else is missing is stated in the report instead of failing.

Plots use the object-oriented matplotlib API (``matplotlib.figure.Figure``, rendered by Agg) rather than pyplot, so
rendering touches no global backend state and leaks no open figures.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from ctr.evaluation.metrics import (
    GAUC_DEFINITION,
    LENGTH_BUCKET_LABELS,
    calibration_curve,
    compute_metrics,
    roc_curve_points,
    to_jsonable,
)
from ctr.report.template import page
from features.outputs import check_no_overlap, claim_output_dir

__all__ = ["FIGURE_IDS", "RunData", "load_run", "render_report"]

log = logging.getLogger(__name__)
REPORT_MARKER = "report.md"  # what says that a directory is a report that `ctr report` wrote

FIGURE_IDS: tuple[str, ...] = (
    "fig-model-comparison",
    "fig-roc",
    "fig-calibration",
    "fig-length-buckets",
    "fig-training-curves",
)

# Colour-blind-friendly palette (Okabe-Ito without black, which marks the oracle); one colour per model everywhere.
PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#8C564B",
    "#7F7F7F",
    "#17BECF",
)
ORACLE_COLOR = "#111111"
LAIN_SUFFIX = "_lain"
DPI = 110
_MAX_ROC_SAMPLES = 5_000_000  # above this, the ROC/reliability plots use a fixed-seed subsample (exact metrics don't)


# --------------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class RunData:
    """One run directory as the report sees it."""

    run_dir: Path
    label: str
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    predictions: pl.DataFrame | None
    train_log: list[dict[str, Any]] | None
    notes: list[str] = field(default_factory=list)
    color: str = PALETTE[0]
    variant: bool = False  # a plug-in variant (``*_lain``) drawn in its backbone's colour, dashed / hatched

    @property
    def linestyle(self) -> str:
        return "--" if self.variant else "-"

    @property
    def hatch(self) -> str | None:
        return "//" if self.variant else None

    @property
    def model_name(self) -> str:
        return _model_name(self.config) or "?"

    @property
    def split(self) -> str | None:
        if self.metrics and self.metrics.get("split"):
            return str(self.metrics["split"])
        s = self.config.get("split")
        return str(s) if s else None

    @property
    def dataset(self) -> str | None:
        for key in ("dataset_dir", "dataset", "data_dir", "data"):
            v = self.config.get(key)
            if isinstance(v, str | Path):
                return str(v)
            if isinstance(v, dict):
                for sub in ("dir", "path", "dataset_dir", "root", "name"):
                    if isinstance(v.get(sub), str):
                        return str(v[sub])
        return None


def _model_name(config: dict[str, Any]) -> str | None:
    model = config.get("model")
    if isinstance(model, dict) and model.get("name"):
        return str(model["name"])
    if isinstance(model, str) and model:
        return model
    return None


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        notes.append(f"{path.name} missing")
    except (json.JSONDecodeError, OSError) as e:
        notes.append(f"{path.name} unreadable ({e})")
        log.warning("cannot read %s: %s", path, e)
    return None


def _read_train_log(path: Path, notes: list[str]) -> list[dict[str, Any]] | None:
    if not path.is_file():
        notes.append("train_log.jsonl missing: no training curves")
        return None
    records: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if bad:
        notes.append(f"train_log.jsonl: {bad} malformed line(s) skipped")
        log.warning("%s: %d malformed lines skipped", path, bad)
    return records


def _read_predictions(path: Path, notes: list[str]) -> pl.DataFrame | None:
    if not path.is_file():
        notes.append("predictions.parquet missing: no ROC or reliability curves")
        return None
    try:
        schema = pl.read_parquet_schema(path)
        missing = [c for c in ("label", "score") if c not in schema]
        if missing:
            notes.append(f"predictions.parquet lacks column(s) {missing}: not used")
            return None
        cols = [c for c in ("label", "score", "user_idx", "hist_len", "p_true") if c in schema]
        return pl.read_parquet(path, columns=cols)
    except Exception as e:  # a broken file must not stop the report of the other runs
        notes.append(f"predictions.parquet unreadable ({type(e).__name__}: {e})")
        log.warning("cannot read %s: %s", path, e)
        return None


def load_run(run_dir: Path) -> RunData:
    """Load one run directory. Raises ValueError only when it has neither metrics.json nor usable predictions."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    notes: list[str] = []
    config = _read_json(run_dir / "config.json", notes)
    if not isinstance(config, dict):
        config = {}
    preds = _read_predictions(run_dir / "predictions.parquet", notes)
    metrics = _read_json(run_dir / "metrics.json", notes)
    if not isinstance(metrics, dict):
        metrics = None
    if metrics is None and preds is not None:
        try:
            metrics = to_jsonable(compute_metrics(preds))
            notes.append("metrics computed from predictions.parquet")
        except ValueError as e:
            notes.append(f"cannot compute metrics from predictions.parquet ({e})")
    if metrics is None:
        raise ValueError(f"{run_dir}: neither metrics.json nor usable predictions.parquet")
    train_log = _read_train_log(run_dir / "train_log.jsonl", notes)
    label = str(config.get("run_name") or "") or _model_name(config) or run_dir.name
    return RunData(run_dir, label, config, metrics, preds, train_log, notes)


def _disambiguate(runs: list[RunData]) -> None:
    """Unique labels: duplicates get the directory name appended, then a counter if still equal."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({r.run_dir.name})"
    seen: dict[str, int] = {}
    for r in runs:
        n = seen.get(r.label, 0)
        seen[r.label] = n + 1
        if n:
            r.label = f"{r.label} #{n + 1}"
    # one colour per model family: a LAIN variant takes its backbone's colour (dashed lines, hatched bars) when the
    # backbone is in the report too, so 13 models need 7 colours and each pair reads at a glance
    names = {r.model_name for r in runs}
    family: dict[str, str] = {}
    for r in runs:
        base = r.model_name.removesuffix(LAIN_SUFFIX)
        r.variant = r.model_name != base and base in names
        key = base if r.variant else r.label  # the backbone's label is its model name unless disambiguated
        family.setdefault(key, PALETTE[len(family) % len(PALETTE)])
        r.color = family[key]


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def _num(v: Any) -> float:
    """Float or NaN (metrics.json stores NaN as null)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: Any, digits: int = 4) -> str:
    x = _num(v)
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _fmt_int(v: Any) -> str:
    x = _num(v)
    return "–" if math.isnan(x) else f"{int(x):,}"


def _fmt_gap(oracle: Any, model: Any) -> str:
    o, m = _num(oracle), _num(model)
    return "–" if math.isnan(o) or math.isnan(m) else f"{o - m:+.4f}"


def _oracle(run: RunData) -> dict[str, Any] | None:
    o = run.metrics.get("oracle") if run.metrics else None
    return o if isinstance(o, dict) else None


def _shared_oracle(runs: Sequence[RunData]) -> dict[str, Any] | None:
    """The oracle block when every run that has one reports the same values (same split); else None."""
    blocks = [(o, r) for r in runs if (o := _oracle(r)) is not None]
    if not blocks:
        return None
    first = blocks[0][0]
    for o, _ in blocks[1:]:
        for k in ("auc", "gauc"):
            a, b = _num(first.get(k)), _num(o.get(k))
            if not (math.isnan(a) and math.isnan(b)) and not abs(a - b) <= 1e-9:
                return None
    return first


def _split_suffix(runs: Sequence[RunData]) -> str:
    """Title suffix: ' (test split)' if all runs name one split, ' (splits: a, b)' if they differ, else ''."""
    splits = sorted({r.split for r in runs if r.split})
    if not splits:
        return ""
    return f" ({splits[0]} split)" if len(splits) == 1 else f" (splits: {', '.join(splits)})"


def _subsample(df: pl.DataFrame) -> pl.DataFrame:
    return df if df.height <= _MAX_ROC_SAMPLES else df.sample(_MAX_ROC_SAMPLES, seed=0)


@dataclass
class _Fig:
    fig_id: str
    title: str
    caption: str
    png: bytes | None = None
    missing: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.fig_id}.png"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _legend_above(fig: Figure, handles: list[Any], names: list[str]) -> None:
    """One legend for the whole figure, above it (its bottom at the figure's top, so more rows push it up instead
    of covering the subplot titles; `_png` saves with a tight bounding box that includes it)."""
    fig.legend(
        handles, names, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(names), 6), frameon=False,
        fontsize=9,
    )  # fmt: skip


def _style(ax: Any) -> None:
    ax.grid(True, color="#e3e6eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


# --------------------------------------------------------------------------------------------------------------------
# figures


def _fig_model_comparison(runs: Sequence[RunData]) -> _Fig:
    out = _Fig(
        "fig-model-comparison",
        "Model comparison: AUC and GAUC",
        "Test AUC and GAUC per model (higher is better). Black dashed line: the oracle, i.e. the generator's true "
        "click probabilities scored the same way, the ceiling on this split. The y axis starts near 0.5 (random "
        "ranking) so that differences are visible.",
    )
    metrics = ("auc", "gauc")
    vals = np.array([[_num(r.metrics.get(m)) for m in metrics] for r in runs])  # type: ignore[union-attr]
    if np.isnan(vals).all():
        out.missing = "No AUC/GAUC values in any run."
        return out
    fig = Figure(figsize=(max(6.0, 2.2 + 1.1 * len(runs)), 4.2))
    ax = fig.add_subplot()
    n = len(runs)
    width = 0.8 / n
    shared = _shared_oracle(runs)
    oracle_vals: list[float] = []
    for i, r in enumerate(runs):
        x = np.arange(len(metrics)) - 0.4 + width * (i + 0.5)
        bars = ax.bar(
            x, np.nan_to_num(vals[i], nan=0.0), width * 0.92, color=r.color, hatch=r.hatch, edgecolor="white",
            label=r.label,
        )  # fmt: skip
        for b, v in zip(bars, vals[i], strict=True):
            if not math.isnan(v):  # value inside the bar top, so that it never collides with the oracle line
                ax.annotate(
                    f"{v:.3f}",
                    (b.get_x() + b.get_width() / 2, v),
                    xytext=(0, -4),
                    textcoords="offset points",
                    ha="center",
                    va="top",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                    rotation=90 if n > 4 else 0,
                )
        o = _oracle(r)
        if o is not None and shared is None:  # different splits: one oracle tick per bar
            for xj, m in zip(x, metrics, strict=True):
                ov = _num(o.get(m))
                if not math.isnan(ov):
                    oracle_vals.append(ov)
                    ax.hlines(
                        ov,
                        xj - width / 2,
                        xj + width / 2,
                        colors=ORACLE_COLOR,
                        linestyles="--",
                        linewidth=1.6,
                        label="oracle (per run)" if (i, m) == (0, "auc") else None,
                    )
    if shared is not None:
        for j, m in enumerate(metrics):
            ov = _num(shared.get(m))
            if not math.isnan(ov):
                oracle_vals.append(ov)
                ax.hlines(
                    ov,
                    j - 0.45,
                    j + 0.45,
                    colors=ORACLE_COLOR,
                    linestyles="--",
                    linewidth=1.6,
                    label="oracle (true p)" if j == 0 else None,
                )
                ax.annotate(
                    f"oracle {ov:.3f}",
                    (j - 0.45, ov),
                    xytext=(0, 3),
                    textcoords="offset points",
                    fontsize=8,
                    color=ORACLE_COLOR,
                    ha="left",
                    va="bottom",
                )
    finite = [v for v in [*vals[~np.isnan(vals)].tolist(), *oracle_vals] if math.isfinite(v)]
    lo = min(0.5, min(finite) - 0.02)
    hi = min(1.0, max(finite) + 0.04)
    ax.set_ylim(max(0.0, lo), max(hi, lo + 0.05))
    ax.set_xticks(range(len(metrics)), ["AUC", "GAUC"])
    ax.set_xlim(-0.55, len(metrics) - 0.45)
    ax.set_ylabel("score (higher is better)")
    ax.set_title("AUC and GAUC per model")
    _style(ax)
    ax.grid(False, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    out.png = _png(fig)
    return out


def _fig_roc(runs: Sequence[RunData]) -> _Fig:
    out = _Fig(
        "fig-roc",
        "ROC curves",
        "ROC curve of each model on its test predictions (AUC in the legend); dashed black: the oracle (true click "
        "probabilities); dotted: random ranking.",
    )
    have = [r for r in runs if r.predictions is not None]
    if not have:
        out.missing = "No run has predictions.parquet: ROC curves cannot be drawn."
        return out
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="#9aa1ab", linewidth=1, label="random")
    oracles: dict[tuple[int, float], RunData] = {}
    for r in have:
        df = _subsample(r.predictions)  # type: ignore[arg-type]
        y = df["label"].to_numpy()
        fpr, tpr = roc_curve_points(y, df["score"].to_numpy(), max_points=300)
        if fpr.size:
            ax.plot(
                fpr, tpr, r.linestyle, color=r.color, linewidth=1.8,
                label=f"{r.label} (AUC {_fmt(r.metrics.get('auc'), 3)})",
            )  # fmt: skip
        if "p_true" in df.columns and df["p_true"].null_count() < df.height:
            key = (r.predictions.height, round(_num((_oracle(r) or {}).get("auc")), 9))  # type: ignore[union-attr]
            oracles.setdefault(key, r)
    for k, r in enumerate(oracles.values()):
        df = _subsample(r.predictions)  # type: ignore[arg-type]
        fpr, tpr = roc_curve_points(df["label"].to_numpy(), df["p_true"].to_numpy(), max_points=300)
        if not fpr.size:
            continue
        which = "" if len(oracles) == 1 else f", split of {r.label}"
        ax.plot(
            fpr,
            tpr,
            "--",
            color=ORACLE_COLOR if len(oracles) == 1 else r.color,
            linewidth=1.4,
            label=f"oracle{which} (AUC {_fmt((_oracle(r) or {}).get('auc'), 3)})",
            zorder=1 + k,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curves{_split_suffix(runs)}")
    _style(ax)
    ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    out.png = _png(fig)
    lacking = [r.label for r in runs if r.predictions is None]
    if lacking:
        out.caption += f" Not shown (no predictions.parquet): {', '.join(lacking)}."
    return out


def _fig_calibration(runs: Sequence[RunData]) -> _Fig:
    out = _Fig(
        "fig-calibration",
        "Reliability diagram",
        "Observed click rate against mean predicted probability in 10 quantile bins of each model's prediction; "
        "points on the diagonal are calibrated, above it the model under-predicts. Legend: mean predicted / "
        "observed CTR.",
    )
    have = [r for r in runs if r.predictions is not None]
    if not have:
        out.missing = "No run has predictions.parquet: the reliability diagram cannot be drawn."
        return out
    fig = Figure(figsize=(5.6, 5.0))
    ax = fig.add_subplot()
    top = 0.0
    for r in have:
        df = _subsample(r.predictions)  # type: ignore[arg-type]
        try:
            mp, obs, _cnt = calibration_curve(df["label"].to_numpy(), df["score"].to_numpy(), n_bins=10)
        except ValueError as e:  # e.g. scores that are not probabilities
            log.warning("%s: no reliability curve: %s", r.label, e)
            out.caption += f" {r.label}: not drawn ({e})."
            continue
        if not mp.size:
            continue
        top = max(top, float(mp.max()), float(obs.max()))
        ax.plot(
            mp,
            obs,
            "o-",
            color=r.color,
            markersize=4,
            linewidth=1.5,
            label=f"{r.label} (pred/obs {_fmt(r.metrics.get('calibration'), 3)})",
        )
    top = min(1.0, top * 1.08) if top > 0 else 1.0
    ax.plot([0, top], [0, top], ":", color="#9aa1ab", linewidth=1, label="perfectly calibrated")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted click probability (bin)")
    ax.set_ylabel("observed click rate (bin)")
    ax.set_title(f"Reliability diagram{_split_suffix(runs)}")
    _style(ax)
    ax.legend(loc="upper left", fontsize=8, frameon=True, framealpha=0.9)
    out.png = _png(fig)
    lacking = [r.label for r in runs if r.predictions is None]
    if lacking:
        out.caption += f" Not shown (no predictions.parquet): {', '.join(lacking)}."
    return out


def _fig_length_buckets(runs: Sequence[RunData]) -> _Fig:
    out = _Fig(
        "fig-length-buckets",
        "AUC and GAUC by history length",
        "AUC (left) and GAUC (right) of each model by the user's history length at the impression (hist_len "
        "bucket; n = test samples in the bucket). Dashed black: the oracle. Gaps: buckets without samples or "
        "without both classes.",
    )
    if not any(isinstance(r.metrics.get("buckets"), dict) for r in runs if r.metrics):
        out.missing = "No per-length bucket metrics in any run."
        return out
    labels = list(LENGTH_BUCKET_LABELS)
    x = np.arange(len(labels))
    fig = Figure(figsize=(11.0, 4.2))
    axes = fig.subplots(1, 2, sharey=False)
    shared = _shared_oracle(runs)
    for ax, metric, title in zip(
        axes, ("auc", "gauc"), ("AUC by history length", "GAUC by history length"), strict=True
    ):
        for r in runs:
            b = r.metrics.get("buckets") or {}  # type: ignore[union-attr]
            y = [_num((b.get(k) or {}).get(metric)) for k in labels]
            ax.plot(x, y, "o" + r.linestyle, color=r.color, label=r.label, linewidth=1.8, markersize=5)
        for r in runs:
            ob = r.metrics.get("oracle_buckets") if r.metrics else None
            if not isinstance(ob, dict):
                continue
            y = [_num((ob.get(k) or {}).get(metric)) for k in labels]
            one = shared is not None
            ax.plot(
                x,
                y,
                "--",
                color=ORACLE_COLOR if one else r.color,
                linewidth=1.3,
                marker="_",
                markersize=10,
                label="oracle (true p)" if one else f"oracle, split of {r.label}",
            )
            if one:
                break
        ref = next((r for r in runs if isinstance((r.metrics or {}).get("buckets"), dict)), None)
        same_split = len({(r.metrics or {}).get("samples") for r in runs}) == 1
        ticks = labels
        if ref is not None and same_split:
            ticks = [
                f"{k}\nn={_fmt_int((ref.metrics['buckets'].get(k) or {}).get('samples'))}"  # type: ignore[index]
                for k in labels
            ]
        ax.set_xticks(x, ticks, fontsize=9)
        ax.set_xlabel("history length (behaviors before the impression)")
        ax.set_ylabel(metric.upper())
        ax.set_title(title)
        _style(ax)
    fig.tight_layout()
    _legend_above(fig, *axes[0].get_legend_handles_labels())
    out.png = _png(fig)
    return out


def _ema(v: np.ndarray, n: int) -> np.ndarray:
    """Exponential moving average with a span of about n/30 points (for noisy per-step losses)."""
    alpha = 2.0 / (max(2, n // 30) + 1)
    out = np.empty_like(v)
    acc = v[0]
    for i, x in enumerate(v):  # a plot-sized series (one value per logged step), not samples
        acc = alpha * x + (1 - alpha) * acc
        out[i] = acc
    return out


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [
        (_num(r.get("step")), _num(r.get(key)))
        for r in records
        if r.get("kind", "train" if "loss" in r else "eval") == kind
    ]
    pts = [(s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v)]
    pts.sort()
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _fig_training_curves(runs: Sequence[RunData]) -> _Fig:
    out = _Fig(
        "fig-training-curves",
        "Training curves",
        "Left: training loss by step (thin: as logged; thick: smoothed). Right: validation GAUC by step.",
    )
    have = [r for r in runs if r.train_log]
    if not have:
        out.missing = "No run has a train_log.jsonl with records: training curves cannot be drawn."
        return out
    fig = Figure(figsize=(11.0, 4.0))
    ax_loss, ax_val = fig.subplots(1, 2)
    any_val = False
    for r in have:
        steps, loss = _series(r.train_log, "train", "loss")  # type: ignore[arg-type]
        if steps.size:
            if steps.size > 50:
                ax_loss.plot(steps, loss, color=r.color, alpha=0.25, linewidth=0.8)
                ax_loss.plot(steps, _ema(loss, steps.size), r.linestyle, color=r.color, linewidth=1.8, label=r.label)
            else:
                ax_loss.plot(steps, loss, "o" + r.linestyle, color=r.color, linewidth=1.6, markersize=3, label=r.label)
        vsteps, vg = _series(r.train_log, "eval", "gauc")  # type: ignore[arg-type]
        if vsteps.size:
            any_val = True
            ax_val.plot(vsteps, vg, "o" + r.linestyle, color=r.color, linewidth=1.6, markersize=4, label=r.label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (logloss)")
    ax_loss.set_title("Training loss")
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation GAUC")
    ax_val.set_title("Validation GAUC")
    if not any_val:
        ax_val.text(
            0.5, 0.5, "no validation records", ha="center", va="center", transform=ax_val.transAxes, color="#8a4b00"
        )
    for ax in (ax_loss, ax_val):
        _style(ax)
    handles, names = ax_loss.get_legend_handles_labels()
    if not handles:
        handles, names = ax_val.get_legend_handles_labels()
    fig.tight_layout()
    if handles:
        _legend_above(fig, handles, names)
    out.png = _png(fig)
    lacking = [r.label for r in runs if not r.train_log]
    if lacking:
        out.caption += f" Not shown (no train_log.jsonl): {', '.join(lacking)}."
    return out


_FIGURES: tuple[Callable[[Sequence[RunData]], _Fig], ...] = (
    _fig_model_comparison,
    _fig_roc,
    _fig_calibration,
    _fig_length_buckets,
    _fig_training_curves,
)


# --------------------------------------------------------------------------------------------------------------------
# tables (shared by HTML and Markdown: a table is a header plus rows of (text, css classes))

_Cell = tuple[str, str]  # (text, css class); class "l" = left-aligned


@dataclass
class _Table:
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


def _metrics_table(runs: Sequence[RunData]) -> _Table:
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
        "auc": _best([_num(m.get("auc")) for m in ms], "max"),
        "gauc": _best([_num(m.get("gauc")) for m in ms], "max"),
        "logloss": _best([_num(m.get("logloss")) for m in ms], "min"),
        "calibration": _best([_num(m.get("calibration")) for m in ms], "one"),
    }
    rows: list[list[_Cell]] = []
    classes: list[str] = []
    for i, (r, m) in enumerate(zip(runs, ms, strict=True)):
        o = _oracle(r) or {}

        def cell(key: str, i: int = i, m: dict[str, Any] = m) -> _Cell:
            return _fmt(m.get(key)), "best" if best[key] == i else ""

        rows.append(
            [
                (r.label, "l model"),
                cell("auc"),
                cell("gauc"),
                cell("logloss"),
                cell("calibration"),
                (_fmt_gap(o.get("auc"), m.get("auc")), ""),
                (_fmt_gap(o.get("gauc"), m.get("gauc")), ""),
                (_fmt_int(m.get("gauc_users_used")), ""),
                (_fmt_int(m.get("gauc_users_skipped")), ""),
            ]
        )
        classes.append("")
    shared = _shared_oracle(runs)
    oracle_rows = (
        [("oracle (true p)", shared)]
        if shared
        else [(f"oracle, split of {r.label}", _oracle(r)) for r in runs if _oracle(r)]
    )
    for name, o in oracle_rows:
        assert o is not None
        rows.append(
            [
                (name, "l"),
                (_fmt(o.get("auc")), ""),
                (_fmt(o.get("gauc")), ""),
                (_fmt(o.get("logloss")), ""),
                ("–", ""),
                ("–", ""),
                ("–", ""),
                ("–", ""),
                ("–", ""),
            ]
        )
        classes.append("oracle")
    return _Table(header, rows, classes)


def _bucket_table(runs: Sequence[RunData]) -> _Table:
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
                    (_fmt_int(b.get("samples")), ""),
                    (_fmt_int(b.get("positives")), ""),
                    (_fmt(b.get("auc")), ""),
                    (_fmt(b.get("gauc")), ""),
                    (_fmt_int(b.get("gauc_users_used")), ""),
                    (_fmt_int(b.get("gauc_users_skipped")), ""),
                    (_fmt(b.get("logloss")), ""),
                    (_fmt(ob.get("auc")), ""),
                    (_fmt(ob.get("gauc")), ""),
                ]
            )
            classes.append("group-start" if j == 0 else "")
    return _Table(header, rows, classes, frozenset({0, 1}))


def _runs_table(runs: Sequence[RunData]) -> _Table:
    header = ["Model", "model name", "split", "samples", "positives", "CTR", "mean score", "run directory", "dataset"]
    rows: list[list[_Cell]] = []
    for r in runs:
        m = r.metrics or {}
        rows.append(
            [
                (r.label, "l model"),
                (r.model_name, "l"),
                (r.split or "–", "l"),
                (_fmt_int(m.get("samples")), ""),
                (_fmt_int(m.get("positives")), ""),
                (_fmt(m.get("ctr")), ""),
                (_fmt(m.get("mean_score")), ""),
                (str(r.run_dir.resolve()), "l path"),
                (r.dataset or "–", "l path"),
            ]
        )
    return _Table(header, rows, [""] * len(rows), frozenset({0, 1, 2, 7, 8}))


def _html_table(t: _Table, colors: dict[str, str]) -> str:
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


def _md_table(t: _Table) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in t.header) + " |"]
    lines.append("|" + "|".join(":---" if i in t.left else "---:" for i in range(len(t.header))) + "|")
    for row in t.rows:
        cells = []
        for text, cls in row:
            s = _md_escape(text)
            cells.append(f"**{s}**" if "best" in cls.split() and s != "–" else s)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# the report


def _summary(runs: Sequence[RunData]) -> str:
    ms = [(r, r.metrics or {}) for r in runs]
    scored = [(r, _num(m.get("gauc"))) for r, m in ms if not math.isnan(_num(m.get("gauc")))]
    if not scored:
        return "No GAUC values."
    best_run, best_gauc = max(scored, key=lambda t: t[1])
    text = (
        f"Best GAUC{_split_suffix(runs)}: {best_run.label} at {best_gauc:.4f} (AUC {_fmt(best_run.metrics.get('auc'))})"
    )
    o = _oracle(best_run)
    if o and not math.isnan(_num(o.get("gauc"))):
        text += f"; the oracle reaches GAUC {_fmt(o.get('gauc'))} (gap {_fmt_gap(o.get('gauc'), best_gauc)})"
    return text + f". {len(runs)} run(s) compared."


def _weightings(runs: Sequence[RunData]) -> str:
    ws = sorted({str((r.metrics or {}).get("gauc_weighting", "impressions")) for r in runs})
    return ", ".join(ws)


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
    for d in run_dirs:
        check_no_overlap(out_dir, {"run directory": Path(d)}, "--out")
    claim_output_dir(out_dir, REPORT_MARKER, overwrite=True, what="report directory (written by ctr report)")
    runs = [load_run(Path(d)) for d in run_dirs]
    _disambiguate(runs)
    colors = {r.label: r.color for r in runs}
    for r in runs:
        for note in r.notes:
            log.info("%s: %s", r.label, note)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / REPORT_MARKER
    md_path.write_text("# report being written (ctr report has not finished)\n", encoding="utf-8")  # claims out_dir

    figs = [f(runs) for f in _FIGURES]
    paths: dict[str, Path] = {}
    for fg in figs:
        p = out_dir / fg.filename
        if fg.png is not None:
            p.write_bytes(fg.png)
            paths[fg.fig_id] = p
        elif p.exists():  # a stale plot of an earlier render must not pass for this one
            p.unlink()

    metrics_table, bucket_table, runs_table = _metrics_table(runs), _bucket_table(runs), _runs_table(runs)
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    weighting = _weightings(runs)
    definition = GAUC_DEFINITION
    notes = [(r.label, n) for r in runs for n in r.notes]

    # ---- HTML
    def fig_html(fg: _Fig) -> str:
        cap = f"<figcaption><b>{html.escape(fg.title)}.</b> {html.escape(fg.caption)}</figcaption>"
        if fg.png is None:
            return f'<figure id="{fg.fig_id}"><p class="missing">{html.escape(fg.missing or "")}</p>{cap}</figure>'
        b64 = base64.b64encode(fg.png).decode("ascii")
        alt = html.escape(fg.title)
        return f'<figure id="{fg.fig_id}"><img alt="{alt}" src="data:image/png;base64,{b64}">{cap}</figure>'

    by_id = {fg.fig_id: fg for fg in figs}
    notes_html = (
        "<ul>" + "".join(f'<li class="note">{html.escape(lbl)}: {html.escape(n)}</li>' for lbl, n in notes) + "</ul>"
        if notes
        else "<p>All run files present.</p>"
    )
    configs_html = "".join(
        f"<details><summary>config.json of {html.escape(r.label)}</summary>"
        f"<pre>{html.escape(json.dumps(r.config, indent=2, sort_keys=True, default=str))}</pre></details>"
        for r in runs
    )
    body = f"""
<h1>{html.escape(title)}</h1>
<p class="sub">Generated {generated} · {len(runs)} run(s) · GAUC weighting: {html.escape(weighting)}</p>
<div class="summary">{html.escape(_summary(runs))}</div>

<h2>Metrics{html.escape(_split_suffix(runs))}</h2>
{_html_table(metrics_table, colors)}
<p class="sub">Bold: best per column. Gap to oracle = oracle − model (smaller is better). Calibration = mean predicted
probability / observed CTR (1 is calibrated).</p>
<h3>GAUC definition</h3>
<p class="definition" id="gauc-definition">{html.escape(definition)}</p>
{fig_html(by_id["fig-model-comparison"])}
<div class="grid2">
{fig_html(by_id["fig-roc"])}
{fig_html(by_id["fig-calibration"])}
</div>

<h2>By history length</h2>
{fig_html(by_id["fig-length-buckets"])}
{_html_table(bucket_table, colors)}

<h2>Training</h2>
{fig_html(by_id["fig-training-curves"])}

<h2>Runs and data</h2>
{_html_table(runs_table, colors)}
<h3>Missing or partial inputs</h3>
{notes_html}
{configs_html}
"""
    html_path = out_dir / "report.html"
    html_path.write_text(page(html.escape(title), body), encoding="utf-8")
    paths["html"] = html_path

    # ---- Markdown
    md: list[str] = [
        f"# {title}",
        "",
        f"Generated {generated} · {len(runs)} run(s) · GAUC weighting: {weighting}",
        "",
        f"> {_summary(runs)}",
        "",
        f"## Metrics{_split_suffix(runs)}",
        "",
        _md_table(metrics_table),
        "",
        "Bold: best per column. Gap to oracle = oracle − model. Calibration = mean predicted / observed CTR.",
        "",
        "### GAUC definition",
        "",
        definition,
        "",
    ]
    for fg in figs:
        md.append(f"### {fg.title}")
        md.append("")
        md.append(f"![{fg.title}]({fg.filename})" if fg.png is not None else f"*{fg.missing}*")
        md.append("")
        md.append(fg.caption)
        md.append("")
        if fg.fig_id == "fig-length-buckets":
            md += ["## By history length", "", _md_table(bucket_table), ""]
    md += ["## Runs and data", "", _md_table(runs_table), ""]
    if notes:
        md += ["### Missing or partial inputs", ""] + [f"- {lbl}: {n}" for lbl, n in notes] + [""]
    md_path.write_text("\n".join(md), encoding="utf-8")
    paths["markdown"] = md_path

    # ---- combined metrics
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(to_jsonable({r.label: r.metrics for r in runs}), indent=2) + "\n")
    paths["metrics"] = metrics_path
    log.info("report written to %s (%d figures)", html_path, sum(fg.png is not None for fg in figs))
    return paths
