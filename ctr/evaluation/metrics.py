"""Offline CTR metrics: exact tie-aware AUC, GAUC, logloss, calibration, per-length buckets.

Everything is plain numpy and vectorized: one sort, then segment reductions. There is no Python loop over users or
samples, so GAUC over millions of users costs about as much as one global AUC.

How AUC is computed (both global and per user): sort by (group, score); runs of equal (group, score) are ties. For
each run, count the positives and negatives in it and the negatives strictly below it in the same group. Then

    2U = sum over runs of  pos_in_run * (2 * neg_below + neg_in_run)

which is twice the Mann-Whitney U statistic with average ranks (a tied positive/negative pair counts 1/2), and
AUC = U / (n_pos * n_neg). All counts are int64, so the statistic is exact (no rank sums in float64, which would
lose integer precision past ~1e8 samples).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from features.stats import grouped_auc as _grouped_auc  # the one AUC core, shared with pipelines

__all__ = [
    "GAUC_DEFINITION",
    "LENGTH_BUCKET_EDGES",
    "LENGTH_BUCKET_LABELS",
    "CalibrationResult",
    "GaucResult",
    "PairedDelta",
    "Weighting",
    "auc",
    "calibration",
    "calibration_curve",
    "compute_metrics",
    "gauc",
    "length_buckets",
    "logloss",
    "paired_bootstrap",
    "roc_curve_points",
    "to_jsonable",
]

Weighting = Literal["impressions", "uniform", "clicks"]
_WEIGHTINGS: tuple[str, ...] = ("impressions", "uniform", "clicks")

GAUC_DEFINITION = (
    "GAUC = sum_u w_u * AUC_u / sum_u w_u, where AUC_u is the exact, tie-aware ROC AUC (a tied positive/negative "
    "pair counts 1/2) of user u's impressions in the evaluated split, and w_u = the number of impressions of user u. "
    "Only users with both a click and a non-click in the split take part; users with a single class are skipped "
    "and their number is reported. Other weightings (options): uniform (w_u = 1) and clicks (w_u = clicks of u)."
)

LENGTH_BUCKET_EDGES: tuple[float, ...] = (0, 50, 200, 1_000, 10_000, math.inf)
LENGTH_BUCKET_LABELS: tuple[str, ...] = ("0-50", "50-200", "200-1K", "1K-10K", "10K+")


# --------------------------------------------------------------------------------------------------------------------
# validation helpers


def _as_labels(labels: ArrayLike) -> NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0/1, found {bad.tolist()}")
    return y.astype(np.int64)


def _as_scores(scores: ArrayLike, n: int, name: str = "scores") -> NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like labels, got {s.shape}")
    if s.size and not np.isfinite(s).all():
        raise ValueError(f"{name} contain NaN or inf ({int((~np.isfinite(s)).sum())} values)")
    return s


def _as_probs(probs: ArrayLike, n: int, name: str = "probs") -> NDArray[np.float64]:
    p = _as_scores(probs, n, name)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        # A logit passed where a probability is expected would otherwise give a silently wrong logloss.
        raise ValueError(f"{name} must be probabilities in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
    return p


# --------------------------------------------------------------------------------------------------------------------
# AUC / GAUC


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact ROC AUC; ties in scores count 1/2 (Mann-Whitney U with average ranks). NaN if a class is missing."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    res = _grouped_auc(y, s, None)
    return float(res.auc[0]) if res.auc.size else math.nan


@dataclass(frozen=True)
class GaucResult:
    """Result of :func:`gauc`. ``value`` is NaN when no user has both classes."""

    value: float
    users_total: int
    users_used: int
    users_skipped: int
    weight_sum: float
    weighting: str = "impressions"


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike, weighting: Weighting = "impressions") -> GaucResult:
    """Group (per-user) AUC.

    Definition (also :data:`GAUC_DEFINITION`, printed verbatim in reports): the exact tie-aware AUC of each user's
    impressions, over users with both classes in the evaluated split, averaged with weights w_u:

    - ``"impressions"`` (default): w_u = number of impressions of user u (all of them, clicks and non-clicks);
    - ``"uniform"``: w_u = 1;
    - ``"clicks"``: w_u = number of clicks of user u.

    Users with a single class have no AUC; they are skipped and counted in ``users_skipped``.
    Computed with one lexsort by (group, score) and segment reductions, no loop over users.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape} like labels, got {g.shape}")
    res = _grouped_auc(y, s, g)
    used = ~np.isnan(res.auc)
    if weighting == "impressions":
        w = res.n[used].astype(np.float64)
    elif weighting == "clicks":
        w = res.n_pos[used].astype(np.float64)
    else:
        w = np.ones(int(used.sum()), dtype=np.float64)
    weight_sum = float(w.sum())
    value = float(np.dot(w, res.auc[used]) / weight_sum) if weight_sum > 0 else math.nan
    n_users = int(res.n.size)
    n_used = int(used.sum())
    return GaucResult(value, n_users, n_used, n_users - n_used, weight_sum, weighting)


@dataclass(frozen=True)
class PairedDelta:
    """Result of :func:`paired_bootstrap`: ``delta = metric(a) - metric(b)`` on the data and its bootstrap 95%
    percentile interval ``[lo, hi]`` over ``resamples`` resamples of the users."""

    delta: float
    lo: float
    hi: float
    resamples: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return bool(self.lo > 0 or self.hi < 0)


def paired_bootstrap(
    labels: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    groups: ArrayLike,
    metric: Literal["auc", "gauc"] = "auc",
    resamples: int = 200,
    seed: int = 0,
) -> PairedDelta:
    """How sure is "model a beats model b"? ``metric(a) - metric(b)`` with a paired bootstrap over users.

    Both models scored the same samples (same order). Each resample draws as many users as there are, with
    replacement, takes all their samples, and recomputes both metrics on them (the same resample for a and b, so
    the noise they share cancels); a user drawn twice counts as two users in GAUC. Users, not samples, are resampled
    because a user's impressions are correlated. The interval is the 2.5 and 97.5 percentiles of the deltas.
    """
    y = _as_labels(labels)
    a = _as_scores(score_a, y.size, "score_a")
    b = _as_scores(score_b, y.size, "score_b")
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape} like labels, got {g.shape}")

    def value(idx: NDArray[np.int64], grp: NDArray[Any]) -> float:
        if metric == "auc":
            return auc(y[idx], a[idx]) - auc(y[idx], b[idx])
        return gauc(y[idx], a[idx], grp).value - gauc(y[idx], b[idx], grp).value

    order = np.argsort(g, kind="stable")
    _, starts, counts = np.unique(g[order], return_index=True, return_counts=True)
    delta = value(order, g[order])
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    for r in range(resamples):  # a loop over resamples (200), each one vectorized
        pick = rng.integers(0, len(starts), len(starts))
        n = counts[pick]
        copy = np.repeat(np.arange(len(pick)), n)  # a user drawn twice is two groups
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        idx = order[np.repeat(starts[pick], n) + within]
        deltas[r] = value(idx, copy)
    lo, hi = np.nanpercentile(deltas, [2.5, 97.5])
    return PairedDelta(float(delta), float(lo), float(hi), resamples)


# --------------------------------------------------------------------------------------------------------------------
# logloss / calibration


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps]. NaN on empty input."""
    y = _as_labels(labels)
    p = np.clip(_as_probs(probs, y.size), eps, 1.0 - eps)
    if y.size == 0:
        return math.nan
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


@dataclass(frozen=True)
class CalibrationResult:
    """``ratio`` = mean predicted probability / observed CTR (1 is calibrated; NaN when there are no clicks)."""

    ratio: float
    mean_predicted: float
    observed_ctr: float


def calibration(labels: ArrayLike, probs: ArrayLike) -> CalibrationResult:
    """Predicted mean over observed CTR, with both means."""
    y = _as_labels(labels)
    p = _as_probs(probs, y.size)
    if y.size == 0:
        return CalibrationResult(math.nan, math.nan, math.nan)
    mean_pred = float(p.mean())
    ctr = float(y.mean())
    ratio = mean_pred / ctr if ctr > 0 else math.nan
    return CalibrationResult(ratio, mean_pred, ctr)


# --------------------------------------------------------------------------------------------------------------------
# length buckets


def length_buckets(hist_len: ArrayLike) -> NDArray[np.int64]:
    """Bucket index of each history length: bucket i holds ``EDGES[i] <= hist_len < EDGES[i + 1]``.

    Edges are :data:`LENGTH_BUCKET_EDGES` = [0, 50, 200, 1000, 10000, inf); names in :data:`LENGTH_BUCKET_LABELS`.
    So 49 -> "0-50", 50 -> "50-200", 10000 -> "10K+".
    """
    h = np.asarray(hist_len)
    if h.size and h.min() < 0:
        raise ValueError(f"hist_len must be >= 0, found {h.min()}")
    return (np.searchsorted(np.asarray(LENGTH_BUCKET_EDGES), h, side="right") - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# curves for plots


def roc_curve_points(
    labels: ArrayLike, scores: ArrayLike, max_points: int = 200
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(fpr, tpr) of the ROC curve at distinct score thresholds, thinned to at most ``max_points`` points.

    Starts at (0, 0) and ends at (1, 1). Empty arrays when a class is missing.
    """
    if max_points < 2:
        raise ValueError("max_points must be >= 2")
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="stable")
    ss, ys = s[order], y[order]
    last_of_run = np.append(ss[1:] != ss[:-1], True)  # threshold positions: after each block of tied scores
    tp = np.cumsum(ys)[last_of_run]
    fp = np.cumsum(1 - ys)[last_of_run]
    fpr = np.concatenate(([0.0], fp / n_neg))
    tpr = np.concatenate(([0.0], tp / n_pos))
    if fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(np.int64))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


def calibration_curve(
    labels: ArrayLike, probs: ArrayLike, n_bins: int = 10
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Reliability diagram data over quantile bins of the predicted probability.

    Returns (mean predicted, observed click rate, count) per non-empty bin, in increasing order of prediction.
    Quantile bins (not equal-width) because CTR predictions crowd near 0: equal-width bins would leave most bins
    empty and one bin with nearly all samples. Tied quantile edges collapse, so fewer bins may come back.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y = _as_labels(labels)
    p = _as_probs(probs, y.size)
    if y.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    inner = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    b = np.searchsorted(inner, p, side="right")
    count = np.bincount(b, minlength=inner.size + 1)
    sum_p = np.bincount(b, weights=p, minlength=inner.size + 1)
    sum_y = np.bincount(b, weights=y, minlength=inner.size + 1)
    nz = count > 0
    return sum_p[nz] / count[nz], sum_y[nz] / count[nz], count[nz].astype(np.int64)


# --------------------------------------------------------------------------------------------------------------------
# all metrics of one prediction set

_REQUIRED = ("label", "score", "user_idx", "hist_len")


def _column(data: Any, name: str) -> NDArray[Any] | None:
    """Column ``name`` of a polars/pandas DataFrame, pyarrow Table or mapping of arrays; None when absent."""
    if data is None:
        return None
    is_arrow = hasattr(data, "column_names")  # pyarrow.Table
    if is_arrow:
        names = list(data.column_names)
    elif hasattr(data, "columns"):  # polars / pandas DataFrame
        names = list(data.columns)
    elif isinstance(data, Mapping):
        names = list(data.keys())
    else:
        raise TypeError(f"compute_metrics: unsupported data type {type(data).__name__}")
    if name not in names:
        return None
    col = data.column(name) if is_arrow else data[name]
    if hasattr(col, "null_count") and not isinstance(col, np.ndarray):
        nulls = col.null_count() if callable(col.null_count) else col.null_count
        if nulls == len(col):
            return None
        if nulls:
            raise ValueError(f"column {name!r} has {nulls} null values")
    return np.asarray(col.to_numpy() if hasattr(col, "to_numpy") else col)


def _block(y: NDArray[np.int64], s: NDArray[np.float64], users: NDArray[Any], weighting: Weighting) -> dict[str, Any]:
    g = gauc(y, s, users, weighting)
    return {
        "samples": int(y.size),
        "positives": int(y.sum()),
        "auc": auc(y, s),
        "gauc": g.value,
        "gauc_users_used": g.users_used,
        "gauc_users_skipped": g.users_skipped,
        "logloss": logloss(y, s),
    }


def compute_metrics(
    data: Any = None,
    *,
    label: ArrayLike | None = None,
    score: ArrayLike | None = None,
    user_idx: ArrayLike | None = None,
    hist_len: ArrayLike | None = None,
    p_true: ArrayLike | None = None,
    weighting: Weighting = "impressions",
) -> dict[str, Any]:
    """All metrics of one prediction set, as a JSON-able dict (NaN stays NaN here; see :func:`to_jsonable`).

    Give either ``data`` (a polars/pandas DataFrame, pyarrow Table or mapping with columns label, score, user_idx,
    hist_len and optionally p_true) or the arrays as keywords (keywords override columns). ``score`` is the model's
    click probability. ``p_true`` is the generator's true click probability (synthetic data only); when present the
    result has an ``"oracle"`` block and ``"oracle_buckets"``: the metrics of a model that predicts the truth, the
    ceiling a learned model can reach on this split.
    """
    cols: dict[str, Any] = {
        "label": label,
        "score": score,
        "user_idx": user_idx,
        "hist_len": hist_len,
        "p_true": p_true,
    }
    for name in (*_REQUIRED, "p_true"):
        if cols[name] is None:
            cols[name] = _column(data, name)
    missing = [n for n in _REQUIRED if cols[n] is None]
    if missing:
        raise ValueError(f"compute_metrics: missing column(s) {missing}")
    y = _as_labels(cols["label"])
    s = _as_probs(cols["score"], y.size, "score")
    users = np.asarray(cols["user_idx"])
    if users.shape != y.shape:
        raise ValueError(f"user_idx must have shape {y.shape}, got {users.shape}")
    bucket = length_buckets(cols["hist_len"])
    if bucket.shape != y.shape:
        raise ValueError(f"hist_len must have shape {y.shape}, got {bucket.shape}")
    pt = None if cols["p_true"] is None else _as_probs(cols["p_true"], y.size, "p_true")

    overall = _block(y, s, users, weighting)
    cal = calibration(y, s)
    out: dict[str, Any] = {
        "samples": overall["samples"],
        "positives": overall["positives"],
        "ctr": cal.observed_ctr,
        "auc": overall["auc"],
        "gauc": overall["gauc"],
        "gauc_users_used": overall["gauc_users_used"],
        "gauc_users_skipped": overall["gauc_users_skipped"],
        "gauc_weighting": weighting,
        "logloss": overall["logloss"],
        "calibration": cal.ratio,
        "mean_score": cal.mean_predicted,
        "buckets": {},
    }
    masks = [bucket == i for i in range(len(LENGTH_BUCKET_LABELS))]  # 5 buckets: a loop over buckets, not samples
    for name, m in zip(LENGTH_BUCKET_LABELS, masks, strict=True):
        out["buckets"][name] = _block(y[m], s[m], users[m], weighting)
    if pt is not None:
        o = _block(y, pt, users, weighting)
        out["oracle"] = {"auc": o["auc"], "gauc": o["gauc"], "logloss": o["logloss"]}
        out["oracle_buckets"] = {}
        for name, m in zip(LENGTH_BUCKET_LABELS, masks, strict=True):
            ob = _block(y[m], pt[m], users[m], weighting)
            out["oracle_buckets"][name] = {"auc": ob["auc"], "gauc": ob["gauc"]}
    out["gauc_definition"] = GAUC_DEFINITION
    return out


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to plain JSON types: NaN/inf -> None, numpy scalars/arrays -> Python, dataclasses -> dict.

    ``json.dumps`` would otherwise write the non-standard token ``NaN``, which strict parsers (browsers, jq) reject.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
