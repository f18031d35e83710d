"""Reading run directories for the report: :class:`RunData`, :func:`load_run`, labels and colours, oracle blocks.

A run directory holds ``config.json``, ``metrics.json`` (from :func:`ctr.evaluation.evaluate_predictions`),
``predictions.parquet`` and ``train_log.jsonl``. Only the metrics (or the predictions to compute them from) are
needed; whatever else is missing becomes a note on the run instead of an error.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ctr.evaluation.metrics import compute_metrics, to_jsonable
from ctr.runs import CONFIG, TRAIN_LOG, metrics_path, prediction_path

__all__ = [
    "LAIN_SUFFIX",
    "PALETTE",
    "RunData",
    "disambiguate",
    "load_run",
    "num",
    "oracle",
    "shared_oracle",
    "split_suffix",
]

log = logging.getLogger(__name__)

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
LAIN_SUFFIX = "_lain"


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
    config = _read_json(run_dir / CONFIG, notes)
    if not isinstance(config, dict):
        config = {}
    preds = _read_predictions(prediction_path(run_dir), notes)
    metrics = _read_json(metrics_path(run_dir), notes)
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
    train_log = _read_train_log(run_dir / TRAIN_LOG, notes)
    label = str(config.get("run_name") or "") or _model_name(config) or run_dir.name
    return RunData(run_dir, label, config, metrics, preds, train_log, notes)


def disambiguate(runs: list[RunData]) -> None:
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


def num(v: Any) -> float:
    """Float or NaN (metrics.json stores NaN as null)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def oracle(run: RunData) -> dict[str, Any] | None:
    """The run's oracle block (metrics of the true click probabilities), or None."""
    o = run.metrics.get("oracle") if run.metrics else None
    return o if isinstance(o, dict) else None


def shared_oracle(runs: Sequence[RunData]) -> dict[str, Any] | None:
    """The oracle block when every run that has one reports the same values (same split); else None."""
    blocks = [(o, r) for r in runs if (o := oracle(r)) is not None]
    if not blocks:
        return None
    first = blocks[0][0]
    for o, _ in blocks[1:]:
        for k in ("auc", "gauc"):
            a, b = num(first.get(k)), num(o.get(k))
            if not (math.isnan(a) and math.isnan(b)) and not abs(a - b) <= 1e-9:
                return None
    return first


def split_suffix(runs: Sequence[RunData]) -> str:
    """Title suffix: ' (test split)' if all runs name one split, ' (splits: a, b)' if they differ, else ''."""
    splits = sorted({r.split for r in runs if r.split})
    if not splits:
        return ""
    return f" ({splits[0]} split)" if len(splits) == 1 else f" (splits: {', '.join(splits)})"
