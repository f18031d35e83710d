"""Offline evaluation: exact AUC, GAUC, logloss, calibration, per-length buckets, oracle ceiling."""

from ctr.evaluation.evaluate import evaluate_predictions, read_predictions
from ctr.evaluation.metrics import (
    GAUC_DEFINITION,
    LENGTH_BUCKET_EDGES,
    LENGTH_BUCKET_LABELS,
    CalibrationResult,
    GaucResult,
    auc,
    calibration,
    calibration_curve,
    compute_metrics,
    gauc,
    length_buckets,
    logloss,
    roc_curve_points,
    to_jsonable,
)

__all__ = [
    "GAUC_DEFINITION",
    "LENGTH_BUCKET_EDGES",
    "LENGTH_BUCKET_LABELS",
    "CalibrationResult",
    "GaucResult",
    "auc",
    "calibration",
    "calibration_curve",
    "compute_metrics",
    "evaluate_predictions",
    "gauc",
    "length_buckets",
    "logloss",
    "read_predictions",
    "roc_curve_points",
    "to_jsonable",
]
