"""Negative sampling of the importers: every random choice a pure function of the row it belongs to.

A negative's item is drawn from a splitmix64 hash of (seed, the positive's user, item, ts, the draw number), so an
import is deterministic whatever the batch boundaries or the row order; `interleave` merges negatives after their
positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer over uint64 arrays (wrap-around arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _key(seed: int, *cols: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _mix64(np.full(len(cols[0]), np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN, dtype=np.uint64))
        for c in cols:
            h = _mix64(h ^ (c.astype(np.int64).view(np.uint64) + _GOLDEN))
    return h


@dataclass
class NegativeSample:
    user_id: np.ndarray
    item_id: np.ndarray
    ts: np.ndarray
    pos_index: np.ndarray  # row of the positive each negative belongs to
    unsampleable: int  # (positive, k) pairs for which no valid negative was found within max_attempts


def sample_negatives(
    user_id: np.ndarray,
    item_id: np.ndarray,
    ts: np.ndarray,
    candidates: np.ndarray,
    weights: np.ndarray | None,
    neg_per_pos: int,
    seed: int,
    exclude_pairs: pl.DataFrame | None = None,
    max_attempts: int = 64,
) -> NegativeSample:
    """`neg_per_pos` negatives per positive (user, item, ts), at the positive's ts.

    A negative is drawn from `candidates` (uniformly, or proportionally to `weights`) and redrawn while it equals the
    positive's item or, when given, is one of the user's (user_id, item_id) rows in `exclude_pairs`. The draw is a
    hash of (seed, user, item, ts, k, attempt) (splitmix64), so the result does not depend on the order of rows or
    on how they are batched. Output rows are ordered positive-major, k-minor.
    """
    n = len(user_id)
    if neg_per_pos <= 0 or n == 0 or len(candidates) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return NegativeSample(empty, empty, empty, empty, 0 if neg_per_pos <= 0 else n * max(neg_per_pos, 0))
    u = np.repeat(np.asarray(user_id, dtype=np.int64), neg_per_pos)
    t = np.repeat(np.asarray(ts, dtype=np.int64), neg_per_pos)
    pos = np.repeat(np.asarray(item_id, dtype=np.int64), neg_per_pos)
    k = np.tile(np.arange(neg_per_pos, dtype=np.int64), n)
    base = _key(seed, u, pos, t, k)
    cand = np.asarray(candidates, dtype=np.int64)
    cdf = None
    if weights is not None:
        cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    out = np.empty(len(u), dtype=np.int64)
    todo = np.arange(len(u))
    for attempt in range(max_attempts):
        if len(todo) == 0:
            break
        with np.errstate(over="ignore"):
            h = _mix64(base[todo] + np.uint64(attempt) * _GOLDEN)
        r = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # uniform in [0, 1)
        if cdf is None:
            idx = np.minimum((r * len(cand)).astype(np.int64), len(cand) - 1)
        else:
            idx = np.minimum(np.searchsorted(cdf, r * cdf[-1], side="right"), len(cand) - 1)
        draw = cand[idx]
        bad = draw == pos[todo]
        if exclude_pairs is not None and exclude_pairs.height:
            hit = (
                pl.DataFrame({"user_id": u[todo], "item_id": draw})
                .join(
                    exclude_pairs.select("user_id", "item_id").with_columns(pl.lit(True).alias("_hit")),
                    on=["user_id", "item_id"],
                    how="left",
                    maintain_order="left",
                )["_hit"]
                .fill_null(False)
                .to_numpy()
            )
            bad |= hit
        out[todo[~bad]] = draw[~bad]
        todo = todo[bad]
    keep = np.ones(len(u), dtype=bool)
    keep[todo] = False
    pos_index = np.repeat(np.arange(n, dtype=np.int64), neg_per_pos)
    return NegativeSample(u[keep], out[keep], t[keep], pos_index[keep], int(len(todo)))


def interleave(positives: pl.DataFrame, neg: NegativeSample) -> pl.DataFrame:
    """Impressions: each positive (label 1) followed by its negatives (label 0), columns user_id, item_id, ts, label."""
    cols = {"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Int64}
    pos = positives.select(pl.col(c).cast(t) for c, t in cols.items()).with_columns(
        pl.lit(1, pl.Int8).alias("label"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("_p"),
        pl.lit(-1, pl.Int64).alias("_k"),
    )
    negs = pl.DataFrame(
        {"user_id": neg.user_id, "item_id": neg.item_id, "ts": neg.ts, "_p": neg.pos_index},
        schema={**cols, "_p": pl.Int64},
    ).with_columns(pl.lit(0, pl.Int8).alias("label"), pl.int_range(pl.len(), dtype=pl.Int64).alias("_k"))
    both = pl.concat([pos, negs.select(pos.columns)], how="vertical")
    return both.sort(["_p", "_k"]).drop("_p", "_k")


# --------------------------------------------------------------------------------------------------------------
# source.json and the summary
# --------------------------------------------------------------------------------------------------------------
