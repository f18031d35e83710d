"""The report's five figures as PNG bytes: model comparison, ROC, reliability, by history length, training curves.

Plots use the object-oriented matplotlib API (``matplotlib.figure.Figure``, rendered by Agg) rather than pyplot, so
rendering touches no global backend state and leaks no open figures.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from ctr.evaluation.metrics import LENGTH_BUCKET_LABELS, calibration_curve, roc_curve_points
from ctr.report.loading import RunData, num, oracle, shared_oracle, split_suffix
from ctr.report.tables import fmt, fmt_int

__all__ = ["DPI", "FIGURES", "FIGURE_IDS", "ORACLE_COLOR", "Fig", "build_figures"]

log = logging.getLogger(__name__)

FIGURE_IDS: tuple[str, ...] = (
    "fig-model-comparison",
    "fig-roc",
    "fig-calibration",
    "fig-length-buckets",
    "fig-training-curves",
)
ORACLE_COLOR = "#111111"
DPI = 110
_MAX_ROC_SAMPLES = 5_000_000  # above this, the ROC/reliability plots use a fixed-seed subsample (exact metrics don't)
_SCORE_METRICS = ("auc", "gauc")  # the bars of the model comparison


@dataclass
class Fig:
    """One figure of the report: its id, title and caption, and its PNG or why it is missing."""

    fig_id: str
    title: str
    caption: str
    png: bytes | None = None
    missing: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.fig_id}.png"


def _subsample(df: pl.DataFrame) -> pl.DataFrame:
    return df if df.height <= _MAX_ROC_SAMPLES else df.sample(_MAX_ROC_SAMPLES, seed=0)


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


def _lacking_caption(runs: Sequence[RunData], what: str, has: Callable[[RunData], bool]) -> str:
    """Caption tail naming the runs that a figure leaves out for lack of ``what``; '' when none."""
    lacking = [r.label for r in runs if not has(r)]
    return f" Not shown (no {what}): {', '.join(lacking)}." if lacking else ""


# --------------------------------------------------------------------------------------------------------------------
# model comparison


def _score_bars(ax: Any, r: RunData, x: np.ndarray, vals: np.ndarray, width: float, rotate: bool) -> None:
    """One run's AUC and GAUC bars, each with its value inside the bar top."""
    bars = ax.bar(
        x, np.nan_to_num(vals, nan=0.0), width * 0.92, color=r.color, hatch=r.hatch, edgecolor="white",
        label=r.label,
    )  # fmt: skip
    for b, v in zip(bars, vals, strict=True):
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
                rotation=90 if rotate else 0,
            )


def _run_oracle_ticks(ax: Any, r: RunData, i: int, x: np.ndarray, width: float) -> list[float]:
    """Different splits: one oracle tick above each bar of run ``i``. Returns the values drawn."""
    o = oracle(r)
    if o is None:
        return []
    drawn: list[float] = []
    for xj, m in zip(x, _SCORE_METRICS, strict=True):
        ov = num(o.get(m))
        if not math.isnan(ov):
            drawn.append(ov)
            ax.hlines(
                ov,
                xj - width / 2,
                xj + width / 2,
                colors=ORACLE_COLOR,
                linestyles="--",
                linewidth=1.6,
                label="oracle (per run)" if (i, m) == (0, "auc") else None,
            )
    return drawn


def _shared_oracle_lines(ax: Any, shared: dict[str, Any]) -> list[float]:
    """One split: one labelled oracle line across each metric's bar group. Returns the values drawn."""
    drawn: list[float] = []
    for j, m in enumerate(_SCORE_METRICS):
        ov = num(shared.get(m))
        if not math.isnan(ov):
            drawn.append(ov)
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
    return drawn


def _finish_comparison_axes(ax: Any, vals: np.ndarray, oracle_vals: list[float]) -> None:
    """Y range from near 0.5 to just above the highest bar or oracle line; ticks, labels, legend on the right."""
    finite = [v for v in [*vals[~np.isnan(vals)].tolist(), *oracle_vals] if math.isfinite(v)]
    lo = min(0.5, min(finite) - 0.02)
    hi = min(1.0, max(finite) + 0.04)
    ax.set_ylim(max(0.0, lo), max(hi, lo + 0.05))
    ax.set_xticks(range(len(_SCORE_METRICS)), ["AUC", "GAUC"])
    ax.set_xlim(-0.55, len(_SCORE_METRICS) - 0.45)
    ax.set_ylabel("score (higher is better)")
    ax.set_title("AUC and GAUC per model")
    _style(ax)
    ax.grid(False, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)


def fig_model_comparison(runs: Sequence[RunData]) -> Fig:
    """Grouped AUC and GAUC bars per model, with the oracle as a dashed line (one per split)."""
    out = Fig(
        "fig-model-comparison",
        "Model comparison: AUC and GAUC",
        "Test AUC and GAUC per model (higher is better). Black dashed line: the oracle, i.e. the generator's true "
        "click probabilities scored the same way, the ceiling on this split. The y axis starts near 0.5 (random "
        "ranking) so that differences are visible.",
    )
    vals = np.array([[num(r.metrics.get(m)) for m in _SCORE_METRICS] for r in runs])  # type: ignore[union-attr]
    if np.isnan(vals).all():
        out.missing = "No AUC/GAUC values in any run."
        return out
    fig = Figure(figsize=(max(6.0, 2.2 + 1.1 * len(runs)), 4.2))
    ax = fig.add_subplot()
    n = len(runs)
    width = 0.8 / n
    shared = shared_oracle(runs)
    oracle_vals: list[float] = []
    for i, r in enumerate(runs):
        x = np.arange(len(_SCORE_METRICS)) - 0.4 + width * (i + 0.5)
        _score_bars(ax, r, x, vals[i], width, rotate=n > 4)
        if shared is None:
            oracle_vals += _run_oracle_ticks(ax, r, i, x, width)
    if shared is not None:
        oracle_vals += _shared_oracle_lines(ax, shared)
    _finish_comparison_axes(ax, vals, oracle_vals)
    out.png = _png(fig)
    return out


# --------------------------------------------------------------------------------------------------------------------
# ROC and reliability


def _plot_oracle_rocs(ax: Any, oracles: Sequence[RunData]) -> None:
    """The oracle's ROC curve: once in black when all runs share a split, else once per split in a run's colour."""
    for k, r in enumerate(oracles):
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
            label=f"oracle{which} (AUC {fmt((oracle(r) or {}).get('auc'), 3)})",
            zorder=1 + k,
        )


def fig_roc(runs: Sequence[RunData]) -> Fig:
    """ROC curve per model from its predictions, plus the oracle's and the diagonal."""
    out = Fig(
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
                label=f"{r.label} (AUC {fmt(r.metrics.get('auc'), 3)})",
            )  # fmt: skip
        if "p_true" in df.columns and df["p_true"].null_count() < df.height:
            key = (r.predictions.height, round(num((oracle(r) or {}).get("auc")), 9))  # type: ignore[union-attr]
            oracles.setdefault(key, r)
    _plot_oracle_rocs(ax, list(oracles.values()))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curves{split_suffix(runs)}")
    _style(ax)
    ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    out.png = _png(fig)
    out.caption += _lacking_caption(runs, "predictions.parquet", lambda r: r.predictions is not None)
    return out


def fig_calibration(runs: Sequence[RunData]) -> Fig:
    """Reliability diagram: observed click rate against mean prediction in 10 quantile bins per model."""
    out = Fig(
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
            label=f"{r.label} (pred/obs {fmt(r.metrics.get('calibration'), 3)})",
        )
    top = min(1.0, top * 1.08) if top > 0 else 1.0
    ax.plot([0, top], [0, top], ":", color="#9aa1ab", linewidth=1, label="perfectly calibrated")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted click probability (bin)")
    ax.set_ylabel("observed click rate (bin)")
    ax.set_title(f"Reliability diagram{split_suffix(runs)}")
    _style(ax)
    ax.legend(loc="upper left", fontsize=8, frameon=True, framealpha=0.9)
    out.png = _png(fig)
    out.caption += _lacking_caption(runs, "predictions.parquet", lambda r: r.predictions is not None)
    return out


# --------------------------------------------------------------------------------------------------------------------
# by history length


def _plot_bucket_oracles(ax: Any, runs: Sequence[RunData], metric: str, one: bool) -> None:
    """The oracle per bucket: once in black when all runs share it (``one``), else once per run in its colour."""
    labels = list(LENGTH_BUCKET_LABELS)
    x = np.arange(len(labels))
    for r in runs:
        ob = r.metrics.get("oracle_buckets") if r.metrics else None
        if not isinstance(ob, dict):
            continue
        y = [num((ob.get(k) or {}).get(metric)) for k in labels]
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


def _bucket_ticks(runs: Sequence[RunData]) -> list[str]:
    """Bucket labels, with the sample count of each under it when all runs have the same number of samples."""
    labels = list(LENGTH_BUCKET_LABELS)
    ref = next((r for r in runs if isinstance((r.metrics or {}).get("buckets"), dict)), None)
    same_split = len({(r.metrics or {}).get("samples") for r in runs}) == 1
    if ref is None or not same_split:
        return labels
    return [
        f"{k}\nn={fmt_int((ref.metrics['buckets'].get(k) or {}).get('samples'))}"  # type: ignore[index]
        for k in labels
    ]


def fig_length_buckets(runs: Sequence[RunData]) -> Fig:
    """AUC (left) and GAUC (right) per history-length bucket per model, with the oracle's."""
    out = Fig(
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
    shared = shared_oracle(runs)
    for ax, metric, title in zip(
        axes, ("auc", "gauc"), ("AUC by history length", "GAUC by history length"), strict=True
    ):
        for r in runs:
            b = r.metrics.get("buckets") or {}  # type: ignore[union-attr]
            y = [num((b.get(k) or {}).get(metric)) for k in labels]
            ax.plot(x, y, "o" + r.linestyle, color=r.color, label=r.label, linewidth=1.8, markersize=5)
        _plot_bucket_oracles(ax, runs, metric, one=shared is not None)
        ax.set_xticks(x, _bucket_ticks(runs), fontsize=9)
        ax.set_xlabel("history length (behaviors before the impression)")
        ax.set_ylabel(metric.upper())
        ax.set_title(title)
        _style(ax)
    fig.tight_layout()
    _legend_above(fig, *axes[0].get_legend_handles_labels())
    out.png = _png(fig)
    return out


# --------------------------------------------------------------------------------------------------------------------
# training curves


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
        (num(r.get("step")), num(r.get(key)))
        for r in records
        if r.get("kind", "train" if "loss" in r else "eval") == kind
    ]
    pts = [(s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v)]
    pts.sort()
    if not pts:
        return np.zeros(0), np.zeros(0)
    a = np.asarray(pts, dtype=np.float64)
    return a[:, 0], a[:, 1]


def _plot_run_curves(ax_loss: Any, ax_val: Any, r: RunData) -> bool:
    """One run's training loss (raw and smoothed when long) and validation GAUC. True if it has validation points."""
    steps, loss = _series(r.train_log, "train", "loss")  # type: ignore[arg-type]
    if steps.size:
        if steps.size > 50:
            ax_loss.plot(steps, loss, color=r.color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(steps, _ema(loss, steps.size), r.linestyle, color=r.color, linewidth=1.8, label=r.label)
        else:
            ax_loss.plot(steps, loss, "o" + r.linestyle, color=r.color, linewidth=1.6, markersize=3, label=r.label)
    vsteps, vg = _series(r.train_log, "eval", "gauc")  # type: ignore[arg-type]
    if vsteps.size:
        ax_val.plot(vsteps, vg, "o" + r.linestyle, color=r.color, linewidth=1.6, markersize=4, label=r.label)
    return bool(vsteps.size)


def fig_training_curves(runs: Sequence[RunData]) -> Fig:
    """Training loss (left) and validation GAUC (right) by step, from each run's train_log.jsonl."""
    out = Fig(
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
        any_val = _plot_run_curves(ax_loss, ax_val, r) or any_val
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (logloss)")
    ax_loss.set_title("Training loss")
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation GAUC")
    ax_val.set_title("Validation GAUC")
    if not any_val:
        ax_val.text(
            0.5, 0.5, "no validation records\n(train.validation: false, or no valid split)", ha="center", va="center",
            transform=ax_val.transAxes, color="#8a4b00",
        )  # fmt: skip
    for ax in (ax_loss, ax_val):
        _style(ax)
    handles, names = ax_loss.get_legend_handles_labels()
    if not handles:
        handles, names = ax_val.get_legend_handles_labels()
    fig.tight_layout()
    if handles:
        _legend_above(fig, handles, names)
    out.png = _png(fig)
    out.caption += _lacking_caption(runs, "train_log.jsonl", lambda r: bool(r.train_log))
    return out


FIGURES: tuple[Callable[[Sequence[RunData]], Fig], ...] = (
    fig_model_comparison,
    fig_roc,
    fig_calibration,
    fig_length_buckets,
    fig_training_curves,
)


def build_figures(runs: Sequence[RunData]) -> list[Fig]:
    """All figures of the report, in :data:`FIGURE_IDS` order."""
    return [f(runs) for f in FIGURES]
