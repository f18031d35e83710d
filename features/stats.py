"""Exact, tie-aware ROC AUC (global and per group), numpy only, shared by `pipelines` and `ctr`.

How it is computed: sort by (group, score); runs of equal (group, score) are ties. For each run, count the positives
and negatives in it and the negatives strictly below it in the same group. Then

    2U = sum over runs of  pos_in_run * (2 * neg_below + neg_in_run)

which is twice the Mann-Whitney U statistic with average ranks (a tied positive/negative pair counts 1/2), and
AUC = U / (n_pos * n_neg). All counts are int64, so the statistic is exact (no rank sums in float64, which would lose
integer precision past ~1e8 samples); the only rounding is the final division.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["GroupAuc", "auc", "grouped_auc"]


@dataclass(frozen=True)
class GroupAuc:
    """Per-group statistics, groups in sorted order of their key."""

    keys: NDArray[Any]
    n: NDArray[np.int64]
    n_pos: NDArray[np.int64]
    n_neg: NDArray[np.int64]
    auc: NDArray[np.float64]  # NaN where the group has a single class


def grouped_auc(y: NDArray[np.int64], s: NDArray[np.float64], groups: NDArray[Any] | None) -> GroupAuc:
    """Exact tie-aware AUC of every group with one sort and segment reductions (see the module docstring).

    `y` are 0/1 int64 labels, `s` finite float64 scores of the same length (not checked here); `groups=None` is one
    group (the global AUC).
    """
    n = y.size
    if n == 0:
        empty_i = np.zeros(0, dtype=np.int64)
        keys = np.zeros(0, dtype=groups.dtype if groups is not None else np.int64)
        return GroupAuc(keys, empty_i, empty_i, empty_i, np.zeros(0, dtype=np.float64))
    if groups is None:
        order = np.argsort(s, kind="stable")
        gs = np.zeros(n, dtype=np.int64)
    else:
        order = np.lexsort((s, groups))  # primary key: group, secondary: score
        gs = groups[order]
    ys, ss = y[order], s[order]

    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(gs[1:], gs[:-1], out=new_group[1:])
    new_run = new_group.copy()
    new_run[1:] |= ss[1:] != ss[:-1]

    run_starts = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_starts, n))
    pos_in_run = np.add.reduceat(ys, run_starts)
    neg_in_run = run_len - pos_in_run

    group_first_run = np.flatnonzero(new_group[run_starts])  # index (into runs) of each group's first run
    run_group = np.cumsum(new_group[run_starts]) - 1  # group id of each run
    cum_neg_excl = np.cumsum(neg_in_run) - neg_in_run  # negatives in all earlier runs (any group)
    neg_below = cum_neg_excl - cum_neg_excl[group_first_run][run_group]  # ... restricted to the same group

    twice_u = np.add.reduceat(pos_in_run * (2 * neg_below + neg_in_run), group_first_run)
    g_n = np.add.reduceat(run_len, group_first_run)
    g_pos = np.add.reduceat(pos_in_run, group_first_run)
    g_neg = g_n - g_pos
    pairs = g_pos * g_neg
    with np.errstate(divide="ignore", invalid="ignore"):
        g_auc = np.where(pairs > 0, twice_u / (2.0 * pairs), np.nan)
    keys = gs[np.flatnonzero(new_group)]
    return GroupAuc(keys, g_n, g_pos, g_neg, g_auc.astype(np.float64))


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact ROC AUC; ties in scores count 1/2 (Mann-Whitney U with average ranks). NaN if a class is missing.

    `labels` are 1-D bool or 0/1, `scores` finite numbers of the same length (ValueError otherwise).
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.dtype != np.bool_ and y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, found {np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()}")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores must have shape {y.shape} like labels, got {s.shape}")
    if s.size and not np.isfinite(s).all():
        raise ValueError(f"scores contain NaN or inf ({int((~np.isfinite(s)).sum())} values)")
    res = grouped_auc(y.astype(np.int64), s, None)
    return float(res.auc[0]) if res.auc.size else math.nan
