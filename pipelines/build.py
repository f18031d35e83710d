"""`ctr build`: raw tables -> dataset directory (sequence store + sample index + items + vocab + manifest).

The job reads like the data flow::

    scan      schema-level checks of every raw file (errors name file, column, what was expected, how to fix)
    items     validate + dedup the item table, build the item/cate/attribute vocabularies, write items.parquet
    stage A   Ray tasks over (file, row groups): validate behaviors + impressions row by row, map item ids,
              write rejected rows to quarantine/, keep the rest                         -> _work/rows/
    users     the user vocabulary (sorted distinct user ids of the kept rows)
    split     time boundaries of train/valid/test (explicit, or impression-time quantiles)
    stage B   Ray hash shuffle by user_id (groupby -> map_groups): per user, sort behaviors by (ts, input
              order), drop duplicates, and give every impression hist_len = #behaviors with ts strictly
              before its ts (searchsorted, side='left': ties count as after)
              and in the same reduce tasks write sequences/ (one row per user), samples/{train,valid,test}/,
              and the quarantined duplicates
    manifest  row counts in/out/quarantined per table (they must reconcile), vocab sizes, percentiles, config

Everything is written into a sibling temporary directory and moved into place at the end, so a failed build never
leaves a dataset directory that looks complete (see `pipelines.outdirs` for the lock, the stale siblings and what
`--overwrite` may replace).

Faults: every Ray task of stage A and stage B writes files named by what it processes (stage A: its task id; stage
B: the first user_idx of its block), through a temporary file and a rename, so a task that Ray runs again after
its worker or node died overwrites its own files with the same content. Ray reruns such a task: stage A's map tasks
are submitted by Ray Data with max_retries=-1, stage B runs fused into the shuffle's reduce tasks, which Ray retries
3 times (Ray 2.60 defaults; Ray 2.60 deprecates changing them per call). An exception raised by our code (a
DataError) is not retried (DataContext.retried_map_errors is False by default) and fails the build
(max_errored_blocks=0). tests/test_build_faults.py kills a worker in each stage (the `_fault_point` hooks).

On a cluster (`--address`) the tasks read --raw and write into the staged --out themselves: both must be on a
filesystem that every node sees at the same path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from features.outputs import check_identifier, check_no_overlap, claim_output_dir, ensure_under
from features.schema import (
    FIRST_IDX,
    MM_EMB_COLUMN,
    SCHEMA_VERSION,
    SPLITS,
    idx_column,
    mm_emb_type,
    vocab_space,
)
from pipelines.config import BuildConfig
from pipelines.outdirs import (
    OutputLock,
    clean_stale_siblings,
    read_source,
    sibling,
    sweep_tmp_files,
    write_parquet_atomic,
)
from pipelines.validate import (
    R_DUP_BEHAVIOR,
    R_DUP_IMPRESSION,
    R_DUP_ITEM,
    R_UNKNOWN_ITEM,
    DataError,
    RawTable,
    data_error,
    iter_row_batches,
    row_reasons,
    scan_raw,
)

log = logging.getLogger(__name__)

KIND_BEHAVIOR = 0
KIND_IMPRESSION = 1
LENGTH_PERCENTILES = (50, 90, 99, 99.9, 100)
DATASET_MARKER = "manifest.json"
DATASET_WHAT = "dataset directory (written by ctr build)"

# Test-only fault injection (tests/test_build_faults.py): with LIFELONG_CTR_FAULT_KILL_STAGE=A (or B, or "A,B") and
# LIFELONG_CTR_FAULT_DIR=DIR in the environment of the Ray workers, the first task to reach the fault point of that
# stage (the one that creates DIR/fault-<stage>) kills its own worker with SIGKILL, or with
# LIFELONG_CTR_FAULT_ACTION=hang sleeps there (so that a test can kill the whole build mid-way). Every later attempt
# and every other task runs normally; while DIR does not exist the hook does nothing. Unset (always, outside tests),
# the hook costs an environment lookup.
FAULT_STAGE_ENV = "LIFELONG_CTR_FAULT_KILL_STAGE"
FAULT_DIR_ENV = "LIFELONG_CTR_FAULT_DIR"
FAULT_ACTION_ENV = "LIFELONG_CTR_FAULT_ACTION"


def _fault_point(stage: str) -> None:
    stages = os.environ.get(FAULT_STAGE_ENV)
    marker_dir = os.environ.get(FAULT_DIR_ENV)
    if not stages or not marker_dir or stage not in stages.split(","):
        return
    try:
        fd = os.open(os.path.join(marker_dir, f"fault-{stage}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # a task already took this stage's fault (this may be its retry)
    except FileNotFoundError:
        return  # DIR does not exist (yet): the hook is not armed
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    if os.environ.get(FAULT_ACTION_ENV) == "hang":
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------------
# vocabularies: raw ids sorted ascending; idx = FIRST_IDX + rank, so mapping is one searchsorted
# --------------------------------------------------------------------------------------------------------------------
def map_ids(vocab: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to indices with a sorted vocabulary; returns (idx int32 with 1 for unknown ids, known mask)."""
    pos = np.searchsorted(vocab, raw)
    pos_c = np.minimum(pos, max(len(vocab) - 1, 0))
    known = (vocab[pos_c] == raw) if len(vocab) else np.zeros(len(raw), dtype=bool)
    idx = np.where(known, pos_c + FIRST_IDX, 1).astype(np.int32)
    return idx, known


def write_vocab(path: Path, vocab: np.ndarray) -> None:
    pq.write_table(
        pa.table({"raw": pa.array(vocab, pa.int64()), "idx": pa.array(np.arange(len(vocab)) + FIRST_IDX, pa.int32())}),
        path,
    )


def _with_provenance(tbl: pa.Table, file_idx: int, first_row: int) -> pa.Table:
    n = tbl.num_rows
    tbl = tbl.append_column("source_file", pa.array(np.full(n, file_idx, np.int32)))
    return tbl.append_column("source_row", pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))


def _quarantine_table(tbl: pa.Table, reason: pa.Array, files: list[str]) -> pa.Table:
    """Rejected rows as written to quarantine/: the raw columns, then reason, source_file (path), source_row."""
    cols = [c for c in tbl.column_names if c not in ("source_file", "source_row")]
    paths = pa.array(files, pa.string()).take(tbl["source_file"])
    return pa.table(
        {**{c: tbl[c] for c in cols}, "reason": reason, "source_file": paths, "source_row": tbl["source_row"]}
    )


# --------------------------------------------------------------------------------------------------------------------
# items: small enough to handle on the driver (the catalog, not the log)
# --------------------------------------------------------------------------------------------------------------------
def build_items(table: RawTable, out: Path) -> dict[str, Any]:
    """Validate, dedup and index the item table; write items.parquet, vocab/ and quarantine/items/."""
    files = [str(f.path) for f in table.files]
    parts = []
    for file_idx, f in enumerate(table.files):
        for first_row, tbl in iter_row_batches(f.path, list(range(len(f.row_groups))), table.columns):
            parts.append(_with_provenance(tbl, file_idx, first_row))
    items = pa.concat_tables(parts, promote_options="permissive")
    dim = table.mm_emb_dim
    if MM_EMB_COLUMN in items.column_names and dim is None:
        lengths = pc.list_value_length(items[MM_EMB_COLUMN]).drop_null()
        if len(lengths) == 0:
            raise data_error(files[0], "every mm_emb value is null", "drop the column or fill it")
        dim = int(pc.mode(lengths)[0]["mode"].as_py())  # variable-length lists: the common length is the dimension
    reason = row_reasons("items", items, table.required, dim)
    # duplicate item ids: the first valid row (in input order) wins, later ones are quarantined
    ids = np.asarray(items["item_id"].fill_null(0))
    ok = np.asarray(reason.is_null())
    order = np.lexsort((np.arange(len(ids)), ids))
    sorted_ids, sorted_ok = ids[order], ok[order]
    seen_before = np.zeros(len(ids), dtype=bool)
    # among valid rows with equal id, every row after the first is a duplicate
    valid_order = order[sorted_ok]
    dup_sorted = np.concatenate([[False], sorted_ids[sorted_ok][1:] == sorted_ids[sorted_ok][:-1]])
    seen_before[valid_order[dup_sorted]] = True
    reason = pc.if_else(pa.array(seen_before), pa.scalar(R_DUP_ITEM), reason)
    good_mask = reason.is_null()
    bad = items.filter(pc.invert(good_mask))
    if bad.num_rows:
        qdir = out / "quarantine" / "items"
        qdir.mkdir(parents=True, exist_ok=True)
        pq.write_table(_quarantine_table(bad, reason.filter(pc.invert(good_mask)), files), qdir / "part-0.parquet")
    good = items.filter(good_mask)
    item_vocab = np.sort(np.asarray(good["item_id"]))
    cate_vocab = np.unique(np.asarray(good["cate_id"]))
    vocabs = {"item": item_vocab, "cate": cate_vocab}
    order = np.argsort(np.asarray(good["item_id"]), kind="stable")
    good = good.take(order)
    columns: dict[str, pa.Array] = {
        "item_idx": pa.array(np.arange(len(item_vocab), dtype=np.int32) + FIRST_IDX),
        "cate_idx": pa.array(map_ids(cate_vocab, np.asarray(good["cate_id"]))[0]),
    }
    for col in table.extra_int64:
        values = good[col].combine_chunks()
        vocab = np.unique(np.asarray(values.drop_null(), dtype=np.int64))
        vocabs[vocab_space(col)] = vocab
        idx, _ = map_ids(vocab, np.asarray(values.fill_null(0), dtype=np.int64))
        columns[idx_column(col)] = pa.array(np.where(np.asarray(values.is_null()), 0, idx).astype(np.int32))
    mm_missing = 0
    if MM_EMB_COLUMN in good.column_names:
        value_type = table.mm_emb_value_type or pa.float32()
        emb = good[MM_EMB_COLUMN].combine_chunks()
        mm_missing = emb.null_count
        columns[MM_EMB_COLUMN] = emb.cast(mm_emb_type(dim, value_type))  # type: ignore[arg-type]
    pq.write_table(pa.table(columns), out / "items.parquet")
    return {
        "vocabs": vocabs,
        "rows_in": items.num_rows,
        "rows_out": good.num_rows,
        "mm_emb": {"dim": dim, "dtype": str(table.mm_emb_value_type), "missing": mm_missing} if dim else None,
        "attributes": [idx_column(c) for c in table.extra_int64],
    }


# --------------------------------------------------------------------------------------------------------------------
# stage A: row-level validation of the log tables, in Ray tasks over (file, row groups)
# --------------------------------------------------------------------------------------------------------------------
def _row_tasks(tables: dict[str, RawTable], rows_per_task: int) -> list[dict[str, Any]]:
    tasks = []
    for kind, name in ((KIND_BEHAVIOR, "behaviors"), (KIND_IMPRESSION, "impressions")):
        for file_idx, f in enumerate(tables[name].files):
            group: list[int] = []
            rows = 0
            for rg, n in enumerate(f.row_groups):
                group.append(rg)
                rows += n
                if rows >= rows_per_task:
                    tasks.append({"kind": kind, "file_idx": file_idx, "path": str(f.path), "row_groups": group})
                    group, rows = [], 0
            if group:
                tasks.append({"kind": kind, "file_idx": file_idx, "path": str(f.path), "row_groups": group})
    for task_id, task in enumerate(tasks):
        task["task_id"] = task_id
    return tasks


def work_schema(context_cols: list[str], has_btype: bool, has_p_true: bool) -> pa.Schema:
    """One schema for behaviors and impressions in the per-user shuffle (impression-only columns null for behaviors)."""
    fields = [
        ("kind", pa.int8()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("item_idx", pa.int32()),
        ("cate_idx", pa.int32()),
        ("ts", pa.int64()),
        ("source_file", pa.int32()),
        ("source_row", pa.int64()),
        ("label", pa.int8()),
    ]
    if has_btype:
        fields.append(("btype", pa.int8()))
    if has_p_true:
        fields.append(("p_true", pa.float64()))
    fields += [(idx_column(c), pa.int32()) for c in context_cols]
    return pa.schema(fields)


def _validate_rows(task: dict[str, Any], *, spec: dict[str, Any]) -> pa.Table:
    """One Ray task: read a file's row groups, write the kept rows (work schema) to rows/ and the bad rows to
    quarantine/, both named by the task id (a retried task overwrites its own files); return a one-row summary."""
    import ray

    kind = task["kind"]
    name = "behaviors" if kind == KIND_BEHAVIOR else "impressions"
    table_spec = spec["tables"][name]
    item_vocab, cate_of_item, ctx_vocabs = ray.get(spec["vocab_ref"])
    schema: pa.Schema = spec["work_schema"]
    kept, rejected, reasons = [], [], []
    for first_row, tbl in iter_row_batches(Path(task["path"]), task["row_groups"], table_spec["columns"]):
        tbl = _with_provenance(tbl, task["file_idx"], first_row)
        reason = row_reasons(name, tbl, table_spec["required"], None)
        item_idx, known = map_ids(item_vocab, np.asarray(tbl["item_id"].fill_null(-1), dtype=np.int64))
        reason = pc.if_else(pc.and_(reason.is_null(), pa.array(~known)), pa.scalar(R_UNKNOWN_ITEM), reason)
        good = reason.is_null()
        if not pc.all(good).as_py():
            rejected.append(tbl.filter(pc.invert(good)))
            reasons.append(reason.filter(pc.invert(good)))
        gmask = np.asarray(good)
        item_idx = item_idx[gmask]
        g = tbl.filter(good)
        n = g.num_rows
        cols: dict[str, Any] = {
            "kind": pa.array(np.full(n, kind, np.int8)),
            "user_id": g["user_id"].cast(pa.int64()),
            "item_id": g["item_id"].cast(pa.int64()),
            "item_idx": pa.array(item_idx),
            "cate_idx": pa.array(cate_of_item[item_idx]),
            "ts": g["ts"].cast(pa.int64()),
            "source_file": g["source_file"],
            "source_row": g["source_row"],
            "label": g["label"].cast(pa.int8()) if "label" in g.column_names else pa.nulls(n, pa.int8()),
        }
        if "btype" in schema.names:
            cols["btype"] = g["btype"].cast(pa.int8()) if "btype" in g.column_names else pa.nulls(n, pa.int8())
        if "p_true" in schema.names:
            cols["p_true"] = g["p_true"].cast(pa.float64()) if "p_true" in g.column_names else pa.nulls(n, pa.float64())
        for col, vocab in ctx_vocabs.items():
            if col in g.column_names:
                values = g[col].combine_chunks()
                idx, _ = map_ids(vocab, np.asarray(values.fill_null(0), dtype=np.int64))
                cols[idx_column(col)] = pa.array(np.where(np.asarray(values.is_null()), 0, idx).astype(np.int32))
            else:
                cols[idx_column(col)] = pa.nulls(n, pa.int32())
        kept.append(pa.table(cols, schema=schema))
    part = f"part-{task['task_id']:05d}.parquet"
    if rejected:
        qdir = Path(spec["quarantine_dir"]) / name
        qdir.mkdir(parents=True, exist_ok=True)
        bad = pa.concat_tables(rejected)
        write_parquet_atomic(
            _quarantine_table(bad, pa.chunked_array(reasons).combine_chunks(), table_spec["files"]), qdir / part
        )
    rows = pa.concat_tables(kept) if kept else schema.empty_table()
    write_parquet_atomic(rows, Path(spec["rows_dir"]) / part)
    _fault_point("A")
    return pa.table({"task_id": pa.array([task["task_id"]], pa.int64()), "rows": pa.array([rows.num_rows], pa.int64())})


# --------------------------------------------------------------------------------------------------------------------
# stage B: per user, after a hash shuffle by user_id
# --------------------------------------------------------------------------------------------------------------------
def _first_of_equal_runs(*keys: np.ndarray) -> np.ndarray:
    """Given rows already sorted so that duplicates are adjacent, True where a row equals its predecessor."""
    n = len(keys[0])
    dup = np.ones(n, dtype=bool)
    if n:
        dup[0] = False
    for k in keys:
        dup[1:] &= k[1:] == k[:-1]
    return dup


def per_user(g: pa.Table, *, spec: dict[str, Any]) -> pa.Table:
    """Ray map_groups adapter of `user_row` (fetches the broadcast user vocabulary)."""
    import ray

    return user_row(g, ray.get(spec["user_vocab_ref"]), spec["sample_extra_columns"])


def user_row(g: pa.Table, user_vocab: np.ndarray, sample_extra_columns: list[str]) -> pa.Table:
    """All kept rows of one user (work schema) -> one row: the sorted, deduplicated sequence, the user's samples
    with hist_len, and the duplicates to quarantine."""
    kind = np.asarray(g["kind"])
    ts = np.asarray(g["ts"])
    item = np.asarray(g["item_idx"])
    src_file = np.asarray(g["source_file"])
    src_row = np.asarray(g["source_row"])
    has_btype = "btype" in g.column_names
    btype = np.asarray(g["btype"].fill_null(0)) if has_btype else np.zeros(len(ts), np.int8)

    # behaviors: duplicates are rows equal on (ts, item, btype); the first in input order is kept
    b = np.flatnonzero(kind == KIND_BEHAVIOR)
    b = b[np.lexsort((src_row[b], src_file[b], btype[b], item[b], ts[b]))]
    b_dup = _first_of_equal_runs(ts[b], item[b], btype[b])
    b_keep = b[~b_dup]
    b_keep = b_keep[np.lexsort((src_row[b_keep], src_file[b_keep], ts[b_keep]))]  # sequence order: (ts, input)
    # impressions: duplicates are rows equal on (ts, item)
    i = np.flatnonzero(kind == KIND_IMPRESSION)
    i = i[np.lexsort((src_row[i], src_file[i], item[i], ts[i]))]
    i_dup = _first_of_equal_runs(ts[i], item[i])
    i_keep = i[~i_dup]
    seq_ts = ts[b_keep]
    hist_len = np.searchsorted(seq_ts, ts[i_keep], side="left").astype(np.int32)  # strictly before: ties are after

    def lst(values: np.ndarray | pa.Array, typ: pa.DataType) -> pa.Array:
        return pa.array([values], pa.list_(typ))

    user_id = int(g["user_id"][0].as_py())
    user_idx = int(np.searchsorted(user_vocab, user_id)) + FIRST_IDX
    cols: dict[str, pa.Array] = {
        "user_idx": pa.array([user_idx], pa.int32()),
        "user_id": pa.array([user_id], pa.int64()),
        "item_idx": lst(item[b_keep], pa.int32()),
        "cate_idx": lst(np.asarray(g["cate_idx"])[b_keep], pa.int32()),
        "ts": lst(seq_ts, pa.int64()),
    }
    if has_btype:
        cols["btype"] = lst(btype[b_keep], pa.int8())
    cols["s_item_idx"] = lst(item[i_keep], pa.int32())
    cols["s_cate_idx"] = lst(np.asarray(g["cate_idx"])[i_keep], pa.int32())
    cols["s_ts"] = lst(ts[i_keep], pa.int64())
    cols["s_label"] = lst(np.asarray(g["label"].fill_null(0))[i_keep], pa.int8())
    cols["s_hist_len"] = lst(hist_len, pa.int32())
    for col in sample_extra_columns:
        arr = g[col].combine_chunks().take(pa.array(i_keep, pa.int64()))
        cols[f"s_{col}"] = pa.array([arr.to_numpy(zero_copy_only=False)], pa.list_(arr.type))
    dups = np.concatenate([b[b_dup], i[i_dup]])
    cols["dup_kind"] = lst(kind[dups], pa.int8())
    cols["dup_item_id"] = lst(np.asarray(g["item_id"])[dups], pa.int64())
    cols["dup_ts"] = lst(ts[dups], pa.int64())
    cols["dup_source_file"] = lst(src_file[dups], pa.int32())
    cols["dup_source_row"] = lst(src_row[dups], pa.int64())
    return pa.table(cols)


def explode_samples(users: pa.Table, sample_extra_columns: list[str]) -> pa.Table:
    """User rows -> one row per sample."""
    parents = pc.list_parent_indices(users["s_ts"])
    cols = {
        "user_idx": users["user_idx"].take(parents),
        "item_idx": pc.list_flatten(users["s_item_idx"]),
        "cate_idx": pc.list_flatten(users["s_cate_idx"]),
        "ts": pc.list_flatten(users["s_ts"]),
        "label": pc.list_flatten(users["s_label"]),
        "hist_len": pc.list_flatten(users["s_hist_len"]),
    }
    for col in sample_extra_columns:
        cols[col] = pc.list_flatten(users[f"s_{col}"])
    return pa.table(cols)


def duplicate_rows(users: pa.Table, files: dict[str, list[str]]) -> dict[str, pa.Table]:
    """User rows -> the quarantined duplicates of each table (raw ids, ts, reason, source file and row)."""
    parents = pc.list_parent_indices(users["dup_kind"])
    kind = np.asarray(pc.list_flatten(users["dup_kind"]))
    out = {}
    tables = ((KIND_BEHAVIOR, "behaviors", R_DUP_BEHAVIOR), (KIND_IMPRESSION, "impressions", R_DUP_IMPRESSION))
    for k, name, reason in tables:
        sel = pa.array(kind == k)
        n = int(np.sum(kind == k))
        if n:
            out[name] = pa.table(
                {
                    "user_id": users["user_id"].take(parents).filter(sel),
                    "item_id": pc.list_flatten(users["dup_item_id"]).filter(sel),
                    "ts": pc.list_flatten(users["dup_ts"]).filter(sel),
                    "reason": pa.array([reason] * n, pa.string()),
                    "source_file": pa.array(files[name]).take(pc.list_flatten(users["dup_source_file"]).filter(sel)),
                    "source_row": pc.list_flatten(users["dup_source_row"]).filter(sel),
                }
            )
    return out


def write_user_outputs(users: pa.Table, *, spec: dict[str, Any]) -> pa.Table:
    """The last step of the shuffle's reduce tasks: write this block of users' sequences, samples (by split) and
    duplicates. Files are named by the block's first user_idx, so a retried task overwrites its own files."""
    if users.num_rows == 0:
        return pa.table({"sequences": pa.array([], pa.int64())})
    out = Path(spec["out"])
    name = f"part-{pc.min(users['user_idx']).as_py():09d}.parquet"
    keep = ["user_idx", "item_idx", "cate_idx", "ts"] + (["btype"] if "btype" in users.column_names else [])
    write_parquet_atomic(users.select(keep).sort_by("user_idx"), out / "sequences" / name)
    _fault_point("B")
    samples = explode_samples(users, spec["sample_extra_columns"])
    ts = np.asarray(samples["ts"])
    split_of = np.where(ts >= spec["test_start_ts"], 2, np.where(ts >= spec["valid_start_ts"], 1, 0))
    for code, split in enumerate(SPLITS):
        part = samples.filter(pa.array(split_of == code))
        if part.num_rows:
            write_parquet_atomic(part, out / "samples" / split / name, row_group_size=spec["rows_per_row_group"])
    for table, rows in duplicate_rows(users, spec["files"]).items():
        write_parquet_atomic(rows, out / "quarantine" / table / f"duplicates-{name}")
    return pa.table({"sequences": [users.num_rows]})


# --------------------------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------------------------
def _init_ray(cfg: BuildConfig, address: str | None) -> bool:
    """Start (or connect to) Ray; returns True when this call started it and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus or os.cpu_count(),
            object_store_memory=cfg.ray.object_store_mb * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import version

    return version("lifelong-ctr")


def _split_boundaries(cfg: BuildConfig, rows_dir: Path) -> tuple[int, int]:
    if cfg.split.valid_start_ts is not None:
        return int(cfg.split.valid_start_ts), int(cfg.split.test_start_ts)  # type: ignore[arg-type]
    ds = pads.dataset(rows_dir, format="parquet")
    ts = ds.to_table(columns=["ts"], filter=pc.field("kind") == KIND_IMPRESSION)["ts"].to_numpy()
    if len(ts) == 0:
        raise DataError("every impression was quarantined: nothing to build samples from (see quarantine/)")
    q_valid = 1.0 - cfg.split.valid_fraction - cfg.split.test_fraction
    q_test = 1.0 - cfg.split.test_fraction
    test_start = int(np.quantile(ts, q_test, method="higher")) if cfg.split.test_fraction else int(ts.max()) + 1
    # no validation split: valid is the empty range [test_start, test_start), not [max + 1, ...) which would have
    # emptied the test split too (everything silently in train)
    valid_start = int(np.quantile(ts, q_valid, method="higher")) if cfg.split.valid_fraction else test_start
    return valid_start, max(test_start, valid_start)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {f"p{p:g}": float(np.percentile(values, p)) for p in LENGTH_PERCENTILES} | {"mean": float(values.mean())}


def _quarantine_counts(qroot: Path) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for table_dir in sorted(p for p in qroot.iterdir() if p.is_dir()) if qroot.exists() else []:
        if not any(table_dir.glob("*.parquet")):
            table_dir.rmdir()
            continue
        reasons = pads.dataset(table_dir, format="parquet").to_table(columns=["reason"])["reason"]
        vc = pc.value_counts(reasons)
        counts[table_dir.name] = {r["values"].as_py(): r["counts"].as_py() for r in vc}
    return counts


def build_dataset(
    raw_dir: str | Path, out_dir: str | Path, cfg: BuildConfig, address: str | None = None
) -> dict[str, Any]:
    """Build the dataset directory `out_dir` from raw tables in `raw_dir`; returns the manifest.

    `out_dir` may not exist, be empty, or (with `cfg.output.overwrite`) hold a dataset that `ctr build` wrote
    (its manifest.json); it may not be, contain or lie inside `raw_dir`. The build holds `OutputLock(out_dir)`
    throughout, writes into a sibling `.NAME.tmp-*` and publishes it by a rename.
    """
    t0 = time.time()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    check_no_overlap(out_dir, {"raw directory (--raw)": raw_dir}, "--out")

    def claim() -> bool:
        return claim_output_dir(out_dir, DATASET_MARKER, overwrite=cfg.output.overwrite, what=DATASET_WHAT)

    claim()  # fail fast, before scanning the raw files
    tables = scan_raw(raw_dir)
    with OutputLock(out_dir, "dataset directory"):
        clean_stale_siblings(out_dir)  # we hold the lock: whoever left them is gone
        claim()
        tmp = sibling(out_dir, "tmp")
        tmp.mkdir(parents=True)
        try:
            manifest = _build_into(raw_dir, tmp, tables, cfg, address)
            manifest["build_seconds"] = round(time.time() - t0, 2)
            (tmp / DATASET_MARKER).write_text(json.dumps(manifest, indent=2, sort_keys=False))
            if claim():  # again: someone may have put a file into --out while we were building
                old = sibling(out_dir, "old")
                out_dir.rename(old)
                tmp.rename(out_dir)
                shutil.rmtree(old)
            else:
                tmp.rename(out_dir)  # rename(2) replaces an empty directory
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("dataset written to %s in %.1f s", out_dir, time.time() - t0)
    return manifest


def _build_into(
    raw_dir: Path, out: Path, tables: dict[str, RawTable], cfg: BuildConfig, address: str | None
) -> dict[str, Any]:
    import ray

    (out / "vocab").mkdir()
    qroot = out / "quarantine"
    work = out / "_work"
    (work / "rows").mkdir(parents=True)
    log.info("items: validating %d rows", tables["items"].rows)
    items = build_items(tables["items"], out)
    vocabs: dict[str, np.ndarray] = dict(items["vocabs"])

    # context columns of impressions: vocabularies from a driver-side pass over those columns only
    imp = tables["impressions"]
    ctx_vocabs: dict[str, np.ndarray] = {}
    for col in imp.extra_int64:
        values = [pq.read_table(f.path, columns=[col])[col].drop_null() for f in imp.files]
        ctx_vocabs[col] = np.unique(np.concatenate([np.asarray(v, dtype=np.int64) for v in values]))
        vocabs[vocab_space(col)] = ctx_vocabs[col]
    has_btype = "btype" in tables["behaviors"].optional
    has_p_true = "p_true" in imp.optional
    schema = work_schema(imp.extra_int64, has_btype, has_p_true)
    vocab_paths = {space: _vocab_path(out, space) for space in [*vocabs, "user"]}  # before the expensive stages

    started = _init_ray(cfg, address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = log.isEnabledFor(logging.INFO)
        ctx.max_errored_blocks = 0  # a task that fails for good fails the build (no block is silently dropped)
        num_cpus = int(ray.cluster_resources().get("CPU", 1))
        partitions = cfg.ray.num_partitions or 2 * num_cpus

        # stage A
        item_vocab = vocabs["item"]
        cate_of_item = np.zeros(len(item_vocab) + FIRST_IDX, np.int32)
        cate_of_item[FIRST_IDX:] = np.asarray(pq.read_table(out / "items.parquet", columns=["cate_idx"])["cate_idx"])
        spec_a = {
            "tables": {
                name: {"columns": t.columns, "required": t.required, "files": [str(f.path) for f in t.files]}
                for name, t in tables.items()
            },
            "vocab_ref": ray.put((item_vocab, cate_of_item, ctx_vocabs)),
            "work_schema": schema,
            "quarantine_dir": str(qroot),
            "rows_dir": str(work / "rows"),
        }
        tasks = _row_tasks(tables, cfg.ray.rows_per_task)
        log.info("stage A: validating behaviors + impressions in %d tasks", len(tasks))
        done = (
            ray.data.from_items(tasks, override_num_blocks=len(tasks))
            .map_batches(_validate_rows_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": spec_a})
            .take_all()
        )
        if sorted(d["task_id"] for d in done) != list(range(len(tasks))):
            raise RuntimeError(f"stage A: {len(done)} task results for {len(tasks)} tasks")
        sweep_tmp_files(work / "rows")

        # users
        user_ids = pads.dataset(work / "rows", format="parquet").to_table(columns=["user_id"])["user_id"]
        vocabs["user"] = np.unique(np.asarray(user_ids))
        valid_start, test_start = _split_boundaries(cfg, work / "rows")

        # stage B
        extra = (["p_true"] if has_p_true else []) + [idx_column(c) for c in imp.extra_int64]
        spec_b = {
            "user_vocab_ref": ray.put(vocabs["user"]),
            "sample_extra_columns": extra,
            "valid_start_ts": valid_start,
            "test_start_ts": test_start,
        }
        spec_b |= {
            "out": str(out),
            "files": {name: [str(f.path) for f in t.files] for name, t in tables.items()},
            "rows_per_row_group": cfg.output.rows_per_row_group,
        }
        for d in [out / "sequences", *(out / "samples" / split for split in SPLITS)]:
            d.mkdir(parents=True)
        for name in ("behaviors", "impressions"):
            (qroot / name).mkdir(parents=True, exist_ok=True)
        log.info("stage B: shuffling by user into %d partitions, writing sequences and samples", partitions)
        (
            ray.data.read_parquet(str(work / "rows"))
            .groupby("user_id", num_partitions=partitions)
            .map_groups(per_user, batch_format="pyarrow", fn_kwargs={"spec": spec_b})
            .map_batches(write_user_outputs, batch_size=None, batch_format="pyarrow", fn_kwargs={"spec": spec_b})
            .materialize()
        )
    finally:
        if started:
            ray.shutdown()

    sweep_tmp_files(out)  # temporary files of task attempts that were killed
    for space, vocab in vocabs.items():
        write_vocab(vocab_paths[space], vocab)
    manifest = _manifest(raw_dir, out, tables, cfg, items, vocabs, valid_start, test_start)
    shutil.rmtree(work)
    return manifest


def _vocab_path(out: Path, space: str) -> Path:
    """vocab/<space>.parquet: the space is named after a raw column (checked at scan); checked again here, where
    it becomes a path."""
    check_identifier(space, f"vocabulary {space!r}")
    return ensure_under(out / "vocab" / f"{space}.parquet", out / "vocab")


def _validate_rows_batch(batch: pa.Table, *, spec: dict[str, Any]) -> pa.Table:
    """map_batches adapter: one task description per batch."""
    return _validate_rows(batch.to_pylist()[0], spec=spec)


def _manifest(
    raw_dir: Path,
    out: Path,
    tables: dict[str, RawTable],
    cfg: BuildConfig,
    items: dict[str, Any],
    vocabs: dict[str, np.ndarray],
    valid_start: int,
    test_start: int,
) -> dict[str, Any]:
    qcounts = _quarantine_counts(out / "quarantine")
    seq_len = np.asarray(
        pc.list_value_length(pads.dataset(out / "sequences", format="parquet").to_table(columns=["ts"])["ts"])
    )
    splits: dict[str, Any] = {}
    hist_lens = []
    for split in SPLITS:
        d = out / "samples" / split
        tbl = (
            pads.dataset(d, format="parquet").to_table(columns=["label", "hist_len", "ts"])
            if any(d.glob("*.parquet"))
            else None
        )
        n = tbl.num_rows if tbl is not None else 0
        splits[split] = {
            "rows": n,
            "positive_rate": float(pc.mean(tbl["label"].cast(pa.float64())).as_py()) if n else None,
            "ts_min": int(pc.min(tbl["ts"]).as_py()) if n else None,
            "ts_max": int(pc.max(tbl["ts"]).as_py()) if n else None,
            "files": sorted(p.name for p in d.glob("*.parquet")),
        }
        if n:
            hist_lens.append(np.asarray(tbl["hist_len"]))
    rows_out = {
        "items": items["rows_out"],
        "behaviors": int(seq_len.sum()),
        "impressions": sum(s["rows"] for s in splits.values()),
    }
    table_counts = {}
    for name, t in tables.items():
        q = sum(qcounts.get(name, {}).values())
        table_counts[name] = {
            "rows_in": t.rows,
            "rows_out": rows_out[name],
            "rows_quarantined": q,
            "quarantine_reasons": qcounts.get(name, {}),
            "files": [
                {"path": str(f.path.relative_to(raw_dir)), "rows": f.rows, "sha256": _file_sha256(f.path)}
                for f in t.files
            ],
        }
        if t.rows != rows_out[name] + q:
            raise RuntimeError(
                f"row counts of {name} do not reconcile: in {t.rows} != out {rows_out[name]} + quarantined {q}"
            )
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "raw_dir": str(raw_dir.resolve()),
        "source": read_source(raw_dir),
        "tables": table_counts,
        "vocab_sizes": {space: len(v) + FIRST_IDX for space, v in vocabs.items()},
        "item_attributes": items["attributes"],
        "context_columns": [idx_column(c) for c in tables["impressions"].extra_int64],
        "has_p_true": "p_true" in tables["impressions"].optional,
        "has_btype": "btype" in tables["behaviors"].optional,
        "mm_emb": items["mm_emb"],
        "users": len(vocabs["user"]),
        "sequence_length": _percentiles(seq_len),
        "hist_len": _percentiles(np.concatenate(hist_lens)) if hist_lens else {},
        "split": {"valid_start_ts": valid_start, "test_start_ts": test_start, **splits},
        "sequence_files": sorted(p.name for p in (out / "sequences").glob("*.parquet")),
        "config": cfg.model_dump(),
    }
