"""Stage 4 of `ctr build`, the partitions: the reduce side of the shuffle by user, one Ray task per user range.

`reduce_partition` turns one partition's kept rows (both log tables, each in input order) into its sequences,
samples and duplicates with a handful of vectorized passes and no Python call per user or per row:

1. one composite int64 key per row, (user, ts, kind) packed into bits (dense ranks when the raw ranges do not fit
   in 63 bits), with impressions (kind 0) before behaviors (kind 1) at equal (user, ts);
2. one stable argsort of the key: the order is (user, ts, kind, input order);
3. duplicates: only rows in runs of equal key can be duplicates; those few rows are lexsorted by (run, item,
   btype, position) and every row equal to its predecessor is one (the first in input order is kept);
4. hist_len of each kept impression = kept behaviors before it in this order minus those before its user's first
   row: a cumulative sum. Since impressions sort before behaviors at equal ts, a behavior at the impression's own
   ts is not counted (strictly before; ties count as after);
5. list offsets of the sequence store from one bincount of kept behaviors per user.

It is tested against the readable per-user reference `pipelines.reference.user_row`.

The Ray side runs in two waves, because a user's idx needs the number of distinct users of every partition before
it (partitions are contiguous user-id ranges, see `pipelines.rows`): wave 1 (`sort_task`) reduces a partition and
keeps the result in the object store, returning the partition's user count and a histogram of its impression
timestamps; the driver turns counts into offsets and, unless the split boundaries are explicit, selects the exact
quantiles (`select_ranks`: histogram rounds, then the values of one bin); wave 2 (`write_task`) adds the user idx,
cuts samples into splits and writes the files. Files are named by partition, through a temporary file and a
rename, so a retried task overwrites its own files with the same content.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.dataset import samples_dir, sequences_dir
from features.schema import FIRST_IDX, SPLITS, idx_column
from pipelines.faults import fault_point
from pipelines.outdirs import write_parquet_atomic
from pipelines.rows import SOURCE_ROW_BITS
from pipelines.validate import R_DUP_BEHAVIOR, R_DUP_IMPRESSION
from pipelines.vocab import ItemLookup, map_nullable, vocab_table

HIST_BINS = 65_536  # bins per histogram round of the quantile selection
MAX_BIN_VALUES = 1 << 20  # a bin with at most this many values is gathered and sorted instead of split again
_MAX_LIST_VALUES = 2**31 - 1  # list<...> offsets are int32: a list column is chunked beyond this many values


def _bits(span: int) -> int:
    return int(span).bit_length()


def _in_input_order(tbl: pa.Table) -> pa.Table:
    """The rows of one log table sorted by `source` (file, row), which they already are when they come from the map
    tasks in task order (checked in one pass; sorted only if not, e.g. in tests)."""
    src = np.asarray(tbl["source"])
    if len(src) < 2 or bool(np.all(src[1:] > src[:-1])):
        return tbl
    return tbl.take(pa.array(np.argsort(src, kind="stable")))


def sort_key(user: np.ndarray, ts: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, int]:
    """(user, ts, kind) packed into one int64 that sorts like the tuple; returns (key, bits below the user part)."""
    if len(user) == 0:
        return np.zeros(0, np.int64), 1
    u_span = int(user.max()) - int(user.min())
    t_span = int(ts.max()) - int(ts.min())
    u = user - user.min()
    t = ts - ts.min()
    if _bits(u_span) + _bits(t_span) + 1 > 63:  # raw ranges too wide: dense ranks keep the order and fit
        if _bits(u_span) > 31:
            _, u = np.unique(user, return_inverse=True)
        if _bits(int(u.max())) + _bits(t_span) + 1 > 63:
            _, t = np.unique(ts, return_inverse=True)
    shift = _bits(int(t.max())) + 1
    return (u.astype(np.int64) << shift) | (t.astype(np.int64) << 1) | kind.astype(np.int64), shift


def _list_column(offsets: np.ndarray, values: np.ndarray, typ: pa.DataType) -> pa.ChunkedArray:
    """A list<typ> column from int64 offsets, in chunks of at most 2^31 - 1 values (list offsets are int32)."""
    n = len(offsets) - 1
    cuts = [0]
    while offsets[n] - offsets[cuts[-1]] > _MAX_LIST_VALUES:
        s = cuts[-1]
        cuts.append(max(s + 1, int(np.searchsorted(offsets, offsets[s] + _MAX_LIST_VALUES, side="right")) - 1))
    cuts.append(n)
    chunks = []
    for s, e in zip(cuts[:-1], cuts[1:], strict=True):
        off = (offsets[s : e + 1] - offsets[s]).astype(np.int32)
        chunks.append(pa.ListArray.from_arrays(pa.array(off), pa.array(values[offsets[s] : offsets[e]], typ)))
    return pa.chunked_array(chunks, pa.list_(typ))


def reduce_partition(
    beh: pa.Table, imp: pa.Table, items: ItemLookup, context_vocabs: dict[str, np.ndarray]
) -> dict[str, Any]:
    """All kept rows of a set of users (block schemas of `pipelines.rows`) -> sequences, samples, duplicates.

    Returns {"sequences": user_id + list columns, one row per user (every user with a kept row, ascending),
    "samples": user_local (row of the user in "sequences"), item_idx, cate_idx, ts, label, hist_len, then p_true
    when the impressions have it and <col>_idx per context column (raw ids mapped through `context_vocabs`),
    "duplicates": {table: user_id, item_id, ts, reason, source_file (index), source_row}}."""
    beh, imp = _in_input_order(beh), _in_input_order(imp)
    nb, ni = beh.num_rows, imp.num_rows
    user = np.concatenate([np.asarray(beh["user_id"]), np.asarray(imp["user_id"])])
    ts = np.concatenate([np.asarray(beh["ts"]), np.asarray(imp["ts"])])
    item = np.concatenate([np.asarray(beh["item_idx"]), np.asarray(imp["item_idx"])])
    cate = items.cate_of_item[item]
    has_btype = "btype" in beh.column_names
    btype_b = np.asarray(beh["btype"].fill_null(0), dtype=np.int8) if has_btype else np.zeros(nb, np.int8)
    btype = np.concatenate([btype_b, np.zeros(ni, np.int8)])
    kind = np.concatenate([np.ones(nb, np.int8), np.zeros(ni, np.int8)])  # impressions first at equal (user, ts)

    key, shift = sort_key(user, ts, kind)
    order = np.argsort(key, kind="stable")  # (user, ts, kind, input order)
    sk = key[order]
    n = len(sk)

    # duplicates: rows of one run of equal (user, ts, kind) that agree on (item, btype); the first is kept
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = sk[1:] != sk[:-1]
    run = np.cumsum(new_run) - 1
    dup = np.zeros(n, dtype=bool)
    cand = np.flatnonzero(np.bincount(run, minlength=1)[run] > 1) if n else np.zeros(0, np.int64)
    if len(cand):
        rows = order[cand]
        sub = cand[np.lexsort((cand, btype[rows], item[rows], run[cand]))]
        same = (run[sub[1:]] == run[sub[:-1]]) & (item[order[sub[1:]]] == item[order[sub[:-1]]])
        same &= btype[order[sub[1:]]] == btype[order[sub[:-1]]]
        dup[sub[1:][same]] = True

    is_b = order < nb
    keep_b = is_b & ~dup
    keep_i = ~is_b & ~dup
    # users: runs of equal user part of the key
    uk = sk >> shift
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = uk[1:] != uk[:-1]
    user_run = np.cumsum(new_user) - 1
    starts = np.flatnonzero(new_user)
    n_users = len(starts)
    before = np.cumsum(keep_b) - keep_b  # kept behaviors before each position (in this partition)

    pos_b = np.flatnonzero(keep_b)
    rows_b = order[pos_b]
    lengths = np.bincount(user_run[pos_b], minlength=n_users)
    offsets = np.zeros(n_users + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq_cols = {
        "user_id": pa.array(user[order[starts]], pa.int64()),
        "item_idx": _list_column(offsets, item[rows_b], pa.int32()),
        "cate_idx": _list_column(offsets, cate[rows_b], pa.int32()),
        "ts": _list_column(offsets, ts[rows_b], pa.int64()),
    }
    if has_btype:
        seq_cols["btype"] = _list_column(offsets, btype[rows_b], pa.int8())

    pos_i = np.flatnonzero(keep_i)
    rows_i = order[pos_i] - nb
    hist_len = before[pos_i] - before[starts][user_run[pos_i]]
    take_i = pa.array(rows_i)
    samples: dict[str, Any] = {
        "user_local": pa.array(user_run[pos_i].astype(np.int64)),
        "item_idx": pa.array(item[nb:][rows_i]),
        "cate_idx": pa.array(cate[nb:][rows_i]),
        "ts": pa.array(ts[nb:][rows_i]),
        "label": imp["label"].take(take_i),
        "hist_len": pa.array(hist_len.astype(np.int32)),
    }
    if "p_true" in imp.column_names:
        samples["p_true"] = imp["p_true"].take(take_i)
    for col, vocab in context_vocabs.items():
        samples[idx_column(col)] = pa.array(map_nullable(vocab, imp[col].take(take_i)))

    rows_d = order[np.flatnonzero(dup)]
    duplicates = {}
    for name, tbl, rows, reason in (
        ("behaviors", beh, rows_d[rows_d < nb], R_DUP_BEHAVIOR),
        ("impressions", imp, rows_d[rows_d >= nb] - nb, R_DUP_IMPRESSION),
    ):
        if len(rows):
            t = tbl.select(["user_id", "item_idx", "ts", "source"]).take(pa.array(rows))
            src = np.asarray(t["source"])
            duplicates[name] = pa.table(
                {
                    "user_id": t["user_id"],
                    "item_id": pa.array(items.vocab[np.asarray(t["item_idx"]) - FIRST_IDX]),
                    "ts": t["ts"],
                    "reason": pa.array([reason] * len(rows), pa.string()),
                    "source_file": pa.array((src >> SOURCE_ROW_BITS).astype(np.int32)),
                    "source_row": pa.array(src & ((1 << SOURCE_ROW_BITS) - 1)),
                }
            )
    return {"sequences": pa.table(seq_cols), "samples": pa.table(samples), "duplicates": duplicates}


# --------------------------------------------------------------------------------------------------------------------
# wave 1: reduce, keep the result in the object store, report users and an impression-time histogram
# --------------------------------------------------------------------------------------------------------------------
def sort_task(part: int, spec: dict[str, Any], n_beh_blocks: int, *blocks: pa.Table) -> tuple[dict, dict]:
    """Ray task (num_returns=2): reduce partition `part` from its map blocks (behaviors first, task order) and write
    its duplicates to quarantine; returns (summary, result kept for wave 2)."""
    import ray

    schemas = spec["block_schemas"]
    beh = pa.concat_tables([schemas["behaviors"].empty_table(), *blocks[:n_beh_blocks]])
    imp = pa.concat_tables([schemas["impressions"].empty_table(), *blocks[n_beh_blocks:]])
    context_vocabs = ray.get(spec["context_vocabs_ref"]) if spec["context_vocabs_ref"] is not None else {}
    result = reduce_partition(beh, imp, ray.get(spec["items_ref"]), context_vocabs)
    name = f"duplicates-part-{part:05d}.parquet"
    dup_counts = {}
    for table, rows in result.pop("duplicates").items():
        paths = pa.array(spec["files"][table], pa.string()).take(rows["source_file"])
        rows = rows.set_column(rows.schema.get_field_index("source_file"), "source_file", paths)
        write_parquet_atomic(rows, Path(spec["quarantine_dir"]) / table / name)
        dup_counts[table] = rows.num_rows
    imp_ts = np.asarray(imp["ts"])  # every kept impression before dedup: the population of the split quantiles
    result["imp_ts"] = imp_ts
    summary: dict[str, Any] = {
        "part": part,
        "users": result["sequences"].num_rows,
        "samples": result["samples"].num_rows,
        "duplicates": dup_counts,
    }
    if spec.get("ts_hist") is not None:
        lo, width = spec["ts_hist"]
        summary["ts_hist"] = histogram(imp_ts, lo, None, width, HIST_BINS)
    return summary, result


def histogram(values: np.ndarray, lo: int, end: int | None, width: int, bins: int) -> np.ndarray:
    """Counts of values in [lo, end) (end None: no upper limit) in `bins` bins of `width`, starting at lo."""
    if end is not None:
        values = values[(values >= lo) & (values < end)]
    return np.bincount((values - lo) // width, minlength=bins)[:bins].astype(np.int64)


def values_in(values: np.ndarray, lo: int, end: int) -> np.ndarray:
    return values[(values >= lo) & (values < end)]


def quantile_rank(n: int, q: float) -> int:
    """The 0-based rank that `np.quantile(x, q, method="higher")` returns for len(x) == n (same float steps)."""
    return int(min(max(np.ceil((n - 1) * np.float64(q)), 0), n - 1))


def select_ranks(
    ranks: list[int],
    lo: int,
    width: int,
    counts: np.ndarray,
    hist_fn: Callable[[int, int, int], np.ndarray],
    values_fn: Callable[[int, int], np.ndarray],
    max_bin_values: int = MAX_BIN_VALUES,
) -> list[int]:
    """Exact order statistics of a distributed multiset, given its histogram `counts` (bins of `width` from lo):
    find each rank's bin; gather the bin's values when they are few (`values_fn(lo, end)`, every partition's values
    in [lo, end)), otherwise histogram the bin again (`hist_fn(lo, end, width)`, HIST_BINS bins) and repeat. Each
    round divides the bin width by HIST_BINS, so 64-bit values need at most 4 rounds."""
    out = []
    for rank in ranks:
        a, w, c, r = lo, width, counts, rank
        while True:
            cum = np.cumsum(c)
            b = int(np.searchsorted(cum, r, side="right"))
            r -= int(cum[b - 1]) if b else 0
            a += b * w
            if w == 1:
                out.append(a)
                break
            if c[b] <= max_bin_values:
                out.append(int(np.sort(values_fn(a, a + w))[r]))
                break
            end, w = a + w, -(-w // HIST_BINS)
            c = hist_fn(a, end, w)
    return out


# --------------------------------------------------------------------------------------------------------------------
# wave 2: user idx, splits, files
# --------------------------------------------------------------------------------------------------------------------
def write_task(part: int, result: dict[str, Any], user_offset: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Ray task: write partition `part` (sequences, samples by split, its slice of the user vocabulary); returns the
    counts and length distributions the manifest needs."""
    out = Path(spec["out"])
    name = f"part-{part:05d}.parquet"
    seqs: pa.Table = result["sequences"]
    samples: pa.Table = result["samples"]
    first_idx = FIRST_IDX + user_offset
    user_idx = np.arange(seqs.num_rows, dtype=np.int32) + first_idx
    summary: dict[str, Any] = {"part": part, "users": seqs.num_rows, "splits": {}}
    if seqs.num_rows:
        write_parquet_atomic(vocab_table(np.asarray(seqs["user_id"]), first_idx), Path(spec["users_dir"]) / name)
        write_parquet_atomic(
            seqs.drop(["user_id"]).add_column(0, "user_idx", pa.array(user_idx)), sequences_dir(out) / name
        )
    fault_point("B")
    # samples in a seeded random order: a row group is then a random sample of the partition's users, not a
    # narrow range of them (the loader shuffles row groups, and rows only inside a window of row groups)
    samples = samples.take(pa.array(np.random.default_rng(part).permutation(samples.num_rows)))
    local = np.asarray(samples["user_local"])
    samples = samples.drop(["user_local"]).add_column(0, "user_idx", pa.array(user_idx[local], pa.int32()))
    ts = np.asarray(samples["ts"])
    split_of = np.where(ts >= spec["test_start_ts"], 2, np.where(ts >= spec["valid_start_ts"], 1, 0))
    for code, split in enumerate(SPLITS):
        mask = split_of == code
        rows = int(mask.sum())
        if rows:
            part_rows = samples.filter(pa.array(mask))
            write_parquet_atomic(part_rows, samples_dir(out, split) / name, row_group_size=spec["rows_per_row_group"])
            summary["splits"][split] = {
                "rows": rows,
                "label_sum": int(np.asarray(part_rows["label"], dtype=np.int64).sum()),
                "ts_min": int(ts[mask].min()),
                "ts_max": int(ts[mask].max()),
            }
    seq_len = np.asarray(pc.list_value_length(seqs["ts"]), dtype=np.int64)
    summary["behaviors"] = int(seq_len.sum())
    summary["sequence_length"] = value_counts(seq_len)
    hist_len = np.asarray(samples["hist_len"])
    summary["hist_len"] = value_counts(hist_len)
    for code, split in enumerate(SPLITS):  # per split too: a model's statistics come from the train split only
        summary[f"hist_len_{split}"] = value_counts(hist_len[split_of == code])
    return summary


def value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v, c = np.unique(values, return_counts=True)
    return v.astype(np.int64), c.astype(np.int64)
