"""Stage 3 of `ctr build`, the rows: the map side of the shuffle by user, in Ray tasks over (file, row groups).

Each task reads its row groups of one log table once and, in a few vectorized passes:

- validates every row (`pipelines.validate.row_reasons`) and maps item ids to item idx (unknown items are a
  quarantine reason), and writes the rejected rows to quarantine/<table>/part-<task>.parquet;
- range-partitions the kept rows by user_id: rows of partition p are those with
  bounds[p - 1] <= user_id < bounds[p]. Range (not hash) partitions give every partition a contiguous range of user
  ids, so the user vocabulary is the concatenation of the partitions' sorted distinct users, and a user's idx is
  FIRST_IDX + (distinct users of the partitions before it) + (its rank in its partition): no pass holds all users;
- returns the P partition blocks (they stay in Ray's object store until the reduce tasks read them: this is the
  shuffle, with no intermediate written to disk) and a small summary: rows in and kept, quarantine reasons, the
  time range of the kept impressions (for the split quantiles), the distinct values of the context columns, and
  the bytes of each block (what crosses the network on a cluster).

Rows keep their input order inside a block, and the reduce tasks concatenate blocks in task order, so within one
partition each log table arrives in input order (source_file, source_row), packed into one int64 `source`: the
reduce side relies on it for its tie-breaks (and checks it). Blocks carry no column that follows from another (raw
item id and cate idx follow from item idx), which keeps the shuffle at 29 bytes per behavior.

The partition bounds come from `user_bounds`: a deterministic sample of user ids read from the user_id column only
(tasks return at most `SAMPLE_PER_BUILD / tasks` ids each), cut at equal row quantiles. They only balance the
partitions; any bounds give the same dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.faults import fault_point
from pipelines.outdirs import write_parquet_atomic
from pipelines.scan import RawTable, iter_row_batches
from pipelines.validate import R_UNKNOWN_ITEM, quarantine_table, reason_counts, row_reasons, with_provenance
from pipelines.vocab import IdMap

LOG_TABLES = ("behaviors", "impressions")
SOURCE_ROW_BITS = 40  # rows per raw file < 2**40
SAMPLE_PER_BUILD = 200_000  # user ids sampled for the partition bounds, over all tasks


def row_tasks(tables: dict[str, RawTable], rows_per_task: int) -> list[dict[str, Any]]:
    """Tasks over (file, consecutive row groups) of the log tables, behaviors first; ids in input order."""
    tasks = []
    for name in LOG_TABLES:
        for file_idx, f in enumerate(tables[name].files):
            group: list[int] = []
            rows = 0
            for rg, n in enumerate(f.row_groups):
                group.append(rg)
                rows += n
                if rows >= rows_per_task:
                    tasks.append({"table": name, "file_idx": file_idx, "path": str(f.path), "row_groups": group})
                    group, rows = [], 0
            if group:
                tasks.append({"table": name, "file_idx": file_idx, "path": str(f.path), "row_groups": group})
    for task_id, task in enumerate(tasks):
        task["task_id"] = task_id
        task["rows"] = sum(tables[task["table"]].files[task["file_idx"]].row_groups[rg] for rg in task["row_groups"])
    return tasks


def block_schema(table: str, context_cols: list[str], has_btype: bool, has_p_true: bool) -> pa.Schema:
    """The kept rows of one log table as they cross the shuffle (context columns still raw: their vocabularies are
    known only once every task has run)."""
    fields = [
        ("user_id", pa.int64()),
        ("item_idx", pa.int32()),  # the raw item id and the cate idx follow from it (`ItemLookup`)
        ("ts", pa.int64()),
        ("source", pa.int64()),  # source_file << SOURCE_ROW_BITS | source_row: the input order, and the provenance
    ]
    if table == "behaviors":
        if has_btype:
            fields.append(("btype", pa.int8()))
    else:
        fields.append(("label", pa.int8()))
        if has_p_true:
            fields.append(("p_true", pa.float64()))
        fields += [(c, pa.int64()) for c in context_cols]
    return pa.schema(fields)


def sample_user_ids(task: dict[str, Any], k: int) -> dict[str, Any]:
    """Up to k user ids of the task's rows (user_id column only), drawn with a seed fixed by the task id; returns
    {"ids": ..., "rows": rows read}."""
    pf = pq.ParquetFile(task["path"])
    ids = pf.read_row_groups(task["row_groups"], columns=["user_id"])["user_id"].drop_null()
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > k:
        ids = np.random.default_rng(task["task_id"]).choice(ids, size=k, replace=False)
    return {"ids": ids, "rows": task["rows"]}


def user_bounds(samples: list[np.ndarray], partitions: int) -> np.ndarray:
    """P - 1 increasing cut points (fewer when the sample has few distinct ids): partition p holds
    bounds[p - 1] <= user_id < bounds[p]."""
    ids = np.sort(np.concatenate(samples)) if samples else np.zeros(0, np.int64)
    if len(ids) == 0 or partitions <= 1:
        return np.zeros(0, np.int64)
    cuts = ids[(np.arange(1, partitions) * len(ids)) // partitions]
    return np.unique(cuts[cuts > ids[0]])


def map_rows(task: dict[str, Any], spec: dict[str, Any], item_map: IdMap) -> tuple[Any, ...]:
    """One Ray task (num_returns = partitions + 1): validate, map, quarantine and range-partition the task's rows.

    Returns (summary, block_0, ..., block_{P-1}). Quarantine files are named by the task id, through a temporary
    file and a rename, so a task that Ray runs again overwrites its own files with the same content."""
    name = task["table"]
    table_spec = spec["tables"][name]
    schema: pa.Schema = spec["block_schemas"][name]
    bounds: np.ndarray = spec["bounds"]
    ctx_cols: list[str] = spec["context_columns"] if name == "impressions" else []
    kept, rejected, reasons = [], [], []
    counts: dict[str, int] = {}
    ctx_values: dict[str, list[np.ndarray]] = {c: [] for c in ctx_cols}
    for first_row, tbl in iter_row_batches(Path(task["path"]), task["row_groups"], table_spec["columns"]):
        tbl = with_provenance(tbl, task["file_idx"], first_row)
        for c in ctx_cols:  # every non-null value, kept row or not, is in the context vocabulary
            ctx_values[c].append(np.unique(np.asarray(tbl[c].drop_null(), dtype=np.int64)))
        reason = row_reasons(name, tbl, table_spec["required"], None)
        item_idx, known = item_map(np.asarray(tbl["item_id"].fill_null(-1), dtype=np.int64))
        reason = pc.if_else(pc.and_(reason.is_null(), pa.array(~known)), pa.scalar(R_UNKNOWN_ITEM), reason)
        good = reason.is_null()
        if reason.null_count != len(reason):
            bad = pc.invert(good)
            rejected.append(tbl.filter(bad))
            reasons.append(reason.filter(bad))
            for r, n in reason_counts(reason).items():
                counts[r] = counts.get(r, 0) + n
        gmask = np.asarray(good, dtype=bool)
        g = tbl.filter(good)
        idx = item_idx[gmask]
        source = (np.int64(task["file_idx"]) << SOURCE_ROW_BITS) | np.asarray(g["source_row"], dtype=np.int64)
        cols: dict[str, Any] = {
            "user_id": g["user_id"].cast(pa.int64()),
            "item_idx": pa.array(idx),
            "ts": g["ts"].cast(pa.int64()),
            "source": pa.array(source),
        }
        for f in schema:
            if f.name not in cols:
                cols[f.name] = g[f.name].cast(f.type) if f.name in g.column_names else pa.nulls(g.num_rows, f.type)
        kept.append(pa.table(cols, schema=schema))
    part = f"part-{task['task_id']:05d}.parquet"
    if rejected:
        qdir = Path(spec["quarantine_dir"]) / name
        qdir.mkdir(parents=True, exist_ok=True)
        bad_rows = quarantine_table(
            pa.concat_tables(rejected), pa.chunked_array(reasons).combine_chunks(), spec["files"][name]
        )
        write_parquet_atomic(bad_rows, qdir / part)
    rows = pa.concat_tables(kept).combine_chunks() if kept else schema.empty_table()
    blocks = partition_rows(rows, bounds)
    fault_point("A")
    ts = np.asarray(rows["ts"])
    summary = {
        "task_id": task["task_id"],
        "table": name,
        "rows_in": task["rows"],
        "rows_kept": rows.num_rows,
        "reasons": counts,
        "ts_min": int(ts.min()) if len(ts) else None,
        "ts_max": int(ts.max()) if len(ts) else None,
        "context_values": {
            c: np.unique(np.concatenate(v)) if v else np.zeros(0, np.int64) for c, v in ctx_values.items()
        },
        "block_rows": [b.num_rows for b in blocks],
        "block_bytes": [b.nbytes for b in blocks],
    }
    return (summary, *blocks)


def partition_rows(rows: pa.Table, bounds: np.ndarray) -> list[pa.Table]:
    """Split rows into len(bounds) + 1 user-id ranges, keeping the input order inside each range."""
    if len(bounds) == 0:
        return [rows]
    part = np.searchsorted(bounds, np.asarray(rows["user_id"]), side="right")
    order = np.argsort(part.astype(np.uint16 if len(bounds) < 2**16 else np.int64), kind="stable")
    starts = np.searchsorted(part[order], np.arange(len(bounds) + 2))
    # one take per partition (not slices of one sorted table: a slice would carry its parent's whole buffers
    # into the object store)
    return [rows.take(pa.array(order[starts[p] : starts[p + 1]])) for p in range(len(bounds) + 1)]
