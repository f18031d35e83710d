"""Evaluate a run's ``predictions.parquet`` into ``metrics.json``.

Usage: ``python -m ctr.evaluation.evaluate RUN_DIR/predictions.parquet [--out metrics.json] [--split test]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl

from ctr.evaluation.metrics import Weighting, compute_metrics, to_jsonable

__all__ = ["OPTIONAL_COLUMNS", "REQUIRED_COLUMNS", "evaluate_predictions", "evaluate_run", "read_predictions"]

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("user_idx", "item_idx", "ts", "label", "score", "hist_len")
OPTIONAL_COLUMNS: tuple[str, ...] = ("p_true",)


def read_predictions(pred_path: Path, columns: tuple[str, ...] | None = None) -> pl.DataFrame:
    """Read a predictions Parquet file, checking the required columns (ValueError naming the file and columns)."""
    pred_path = Path(pred_path)
    if not pred_path.is_file():
        raise FileNotFoundError(f"predictions file not found: {pred_path}")
    schema = pl.read_parquet_schema(pred_path)
    wanted = REQUIRED_COLUMNS if columns is None else columns
    missing = [c for c in wanted if c not in schema]
    if missing:
        raise ValueError(f"{pred_path}: missing required column(s) {missing}; found {list(schema)}")
    present = [c for c in (*wanted, *OPTIONAL_COLUMNS) if c in schema]
    return pl.read_parquet(pred_path, columns=list(dict.fromkeys(present)))


def evaluate_predictions(
    pred_path: Path,
    out_path: Path | None = None,
    *,
    split: str | None = None,
    weighting: Weighting = "impressions",
) -> dict[str, Any]:
    """Compute :func:`~ctr.evaluation.metrics.compute_metrics` on a predictions file.

    Columns: user_idx int32, item_idx int32, ts int64, label int8, score float (a probability), hist_len int32,
    optional p_true float64 (the generator's true click probability; adds the oracle block). Adds ``"split"`` when
    given. Writes ``out_path`` (JSON, indent 2, NaN as null) when given. Returns the JSON-able dict.
    """
    pred_path = Path(pred_path)
    df = read_predictions(pred_path)
    try:
        metrics = compute_metrics(df, weighting=weighting)
    except ValueError as e:
        raise ValueError(f"{pred_path}: {e}") from e
    if split is not None:
        metrics["split"] = split
    result = to_jsonable(metrics)
    log.info(
        "evaluated %s: %d samples, AUC %s, GAUC %s (%d users used, %d skipped)",
        pred_path,
        result["samples"],
        result["auc"],
        result["gauc"],
        result["gauc_users_used"],
        result["gauc_users_skipped"],
    )
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", out_path)
    return result


def evaluate_run(run_dir: Path, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """`ctr evaluate`: score `split` with the run's best weights (`predict_split`), then write its metrics file
    with the run's identity added; returns the metrics."""
    from ..runs import metrics_path, read_run_config
    from .predict import predict_split

    pred = predict_split(run_dir, split, **kwargs)
    metrics = evaluate_predictions(pred, None, split=split)
    resolved = read_run_config(run_dir)
    metrics["model"] = resolved["model"]["name"]
    metrics["run_name"] = resolved.get("run_name")
    metrics_path(run_dir, split).write_text(json.dumps(to_jsonable(metrics), indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: metrics.json next to the predictions")
    parser.add_argument("--split", default=None)
    parser.add_argument("--weighting", default="impressions", choices=["impressions", "uniform", "clicks"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = args.out if args.out is not None else args.predictions.with_name("metrics.json")
    evaluate_predictions(args.predictions, out, split=args.split, weighting=args.weighting)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
