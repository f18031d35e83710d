"""`ctr build`: raw tables -> dataset directory (sequence store + sample index + items + vocab + manifest).

The job reads like the data flow; each stage is one module, called in this order by `_build_into`:

    scan       pipelines.scan       schema-level checks of every raw file, from Parquet footers (errors name file,
                                    column, what was expected, how to fix)
    items      pipelines.items      validate + dedup the item table, item/cate/attribute vocabularies, items.parquet
    rows       pipelines.rows       Ray tasks over (file, row groups) of the logs: validate row by row, map item ids,
                                    quarantine the rejected rows, range-partition the kept rows by user_id; the
                                    blocks stay in the object store (the map side of the shuffle)
    partition  pipelines.partition  one Ray task per user range: sort, dedup, hist_len (ties count as after), list
                                    offsets, all vectorized; then user idx from the partitions' user counts, exact
                                    split quantiles from histograms, and the files: sequences/, samples/{train,
                                    valid,test}/, the quarantined duplicates, the user vocabulary
    manifest   pipelines.manifest   counts in/out/quarantined per table (they must reconcile), vocab sizes, length
                                    percentiles, stage timings, shuffle bytes, config

The driver holds no per-row data: every count, vocabulary of users, split boundary and percentile comes out of the
Ray tasks as a small summary, so its memory is the items table plus O(tasks x partitions) object references.
Each log row is read from the raw files once (plus its user_id once more, for the partition bounds), crosses the
shuffle once, through the object store (spilled to disk by Ray when it does not fit), and is written once.

Everything is written into a sibling temporary directory and moved into place at the end, so a failed build never
leaves a dataset directory that looks complete (see `pipelines.outdirs` for the lock, the stale siblings and what
`--overwrite` may replace).

Faults: every task writes files named by what it processes (map tasks: their task id; reduce tasks: their
partition), through a temporary file and a rename, so a task that Ray runs again after its worker or node died
overwrites its own files with the same content. Ray retries a task whose worker died (3 times, Ray's default for
tasks) and rebuilds a lost object from its lineage; an exception raised by our code (a DataError) is not retried
(retry_exceptions is off) and fails the build with its own message. tests/test_build_faults.py kills a worker in
each side of the shuffle (`pipelines.faults`).

On a cluster (`--address`) the tasks read --raw and write into the staged --out themselves: both must be on a
filesystem that every node sees at the same path.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from features.dataset import MANIFEST, quarantine_dir, samples_dir, sequences_dir, vocab_dir, write_manifest
from features.errors import UserError
from features.outputs import check_no_overlap, claim_output_dir
from features.schema import FIRST_IDX, SPLITS
from pipelines.config import BuildConfig
from pipelines.faults import FAULT_ACTION_ENV, FAULT_DIR_ENV, FAULT_STAGE_ENV
from pipelines.items import build_items
from pipelines.manifest import build_manifest, file_sha256, merge_counts
from pipelines.outdirs import OutputLock, clean_stale_siblings, sibling, sweep_tmp_files
from pipelines.partition import HIST_BINS, histogram, quantile_rank, select_ranks, sort_task, values_in, write_task
from pipelines.rows import LOG_TABLES, SAMPLE_PER_BUILD, block_schema, map_rows, row_tasks, sample_user_ids, user_bounds
from pipelines.scan import RawTable, scan_raw
from pipelines.validate import R_DUP_BEHAVIOR, R_DUP_IMPRESSION, DataError
from pipelines.vocab import IdMap, ItemLookup, vocab_path, write_vocab

__all__ = ["FAULT_ACTION_ENV", "FAULT_DIR_ENV", "FAULT_STAGE_ENV", "DATASET_MARKER", "build_dataset"]

log = logging.getLogger(__name__)

DATASET_MARKER = MANIFEST  # its presence marks a finished build
DATASET_WHAT = "dataset directory (written by ctr build)"


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
    timer = StageTimer()
    with timer("scan"):
        tables = scan_raw(raw_dir)
    with OutputLock(out_dir, "dataset directory"):
        clean_stale_siblings(out_dir)  # we hold the lock: whoever left them is gone
        claim()
        tmp = sibling(out_dir, "tmp")
        tmp.mkdir(parents=True)
        try:
            manifest = _build_into(raw_dir, tmp, tables, cfg, address, timer)
            manifest["build_seconds"] = round(time.time() - t0, 2)
            write_manifest(tmp, manifest)
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
    seconds = time.time() - t0
    log_rows = tables["behaviors"].rows + tables["impressions"].rows
    log.info(
        "dataset written to %s in %.1f s: %s behaviors/s, %s log rows/s",
        out_dir,
        seconds,
        f"{tables['behaviors'].rows / seconds:,.0f}",
        f"{log_rows / seconds:,.0f}",
    )
    return manifest


class StageTimer:
    """Wall seconds per stage, for the manifest (where a slow build spends its time)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.driver_rss_mb: dict[str, float | None] = {}  # the driver's RSS at the end of each stage

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.time() - t0, 3)
            self.driver_rss_mb[stage] = _rss_mb()


def _rss_mb() -> float | None:
    """This process's resident set now (Linux /proc; ru_maxrss would not do: it is inherited across exec)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


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
            object_store_memory=cfg.ray.object_store_mb * 2**20 if cfg.ray.object_store_mb else None,
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


@contextmanager
def ray_session(cfg: BuildConfig, address: str | None = None) -> Iterator[None]:
    """One Ray instance for several steps (the demo's build and TWIN-V2's clustering): each step that finds Ray
    running uses it instead of starting and stopping its own (about 3 s to start and 1 s to stop on 2 cores)."""
    import ray

    started = _init_ray(cfg, address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _gather(refs: list[Any], desc: str, total: int, rows_of: Any, fold: Any = None) -> list[Any]:
    """ray.get every ref in submission order, with a progress bar of rows (`rows_of(result)`) at rows/s; a task
    that raised a UserError (bad input) re-raises it as it is, without Ray's wrapping. `fold(result)`, when given,
    sees each result as it arrives and may move its bulky parts into a running total (so that the driver holds one
    total, not one per task)."""
    import ray
    from tqdm import tqdm

    results: dict[Any, Any] = {}
    pending = list(refs)
    with tqdm(total=total, desc=desc, unit="rows", unit_scale=True, disable=not log.isEnabledFor(logging.INFO)) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=min(len(pending), 8), timeout=1.0)
            for ref in done:
                try:
                    results[ref] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, UserError):
                        raise exc.cause from None
                    raise
                bar.update(rows_of(results[ref]))
                if fold is not None:
                    fold(results[ref])
    return [results[r] for r in refs]


def _build_into(
    raw_dir: Path, out: Path, tables: dict[str, RawTable], cfg: BuildConfig, address: str | None, timer: StageTimer
) -> dict[str, Any]:
    import ray

    qroot = quarantine_dir(out)
    work = out / "_work"
    for d in [vocab_dir(out), work / "users", sequences_dir(out), *(samples_dir(out, s) for s in SPLITS)]:
        d.mkdir(parents=True)
    for name in tables:
        (qroot / name).mkdir(parents=True)
    started = _init_ray(cfg, address)
    try:
        return _stages(raw_dir, out, tables, cfg, timer)
    finally:
        if started:
            ray.shutdown()


def _stages(raw_dir: Path, out: Path, tables: dict[str, RawTable], cfg: BuildConfig, timer: StageTimer) -> dict:
    """The stages after the scan, in order, on a running Ray."""
    import ray

    qroot = quarantine_dir(out)
    work = out / "_work"
    with timer("items"):  # a task too: the catalog (64-dim embeddings: 128 MB at 500K items) stays off the driver
        log.info("items: validating %d rows", tables["items"].rows)
        build = ray.remote(build_items).remote(tables["items"], out)
        items = _gather([build], "items", tables["items"].rows, lambda s: s["rows_in"])[0]
    vocabs: dict[str, np.ndarray] = dict(items["vocabs"])
    imp = tables["impressions"]
    context_cols = list(imp.extra_int64)
    has_btype = "btype" in tables["behaviors"].optional
    has_p_true = "p_true" in imp.optional
    schemas = {name: block_schema(name, context_cols, has_btype, has_p_true) for name in LOG_TABLES}
    files = {name: [str(f.path) for f in t.files] for name, t in tables.items()}
    reasons: dict[str, dict[str, int]] = {"items": items["quarantine_reasons"], "behaviors": {}, "impressions": {}}

    num_cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = row_tasks(tables, cfg.ray.rows_per_task)
    log_rows = sum(t["rows"] for t in tasks)
    partitions = cfg.ray.num_partitions or max(2 * num_cpus, -(-log_rows // cfg.ray.rows_per_partition))
    hash_refs = {name: [ray.remote(file_sha256).remote(p) for p in paths] for name, paths in files.items()}

    with timer("bounds"):
        k = max(1, SAMPLE_PER_BUILD // len(tasks))
        sample = ray.remote(sample_user_ids)
        samples = _gather([sample.remote(t, k) for t in tasks], "user ids", log_rows, lambda s: s["rows"])
        bounds = user_bounds([s["ids"] for s in samples], partitions)
    n_parts = len(bounds) + 1

    with timer("rows"):
        spec_rows = {
            "tables": {name: {"columns": t.columns, "required": t.required} for name, t in tables.items()},
            "files": files,
            "block_schemas": schemas,
            "bounds": bounds,
            "context_columns": context_cols,
            "quarantine_dir": str(qroot),
        }
        item_map = ray.put(IdMap(vocabs["item"]))
        map_fn = ray.remote(map_rows).options(num_returns=n_parts + 1)
        log.info("rows: %d tasks over %s log rows, %d user partitions", len(tasks), f"{log_rows:,}", n_parts)
        outs = [map_fn.remote(t, spec_rows, item_map) for t in tasks]
        mapped = _gather([o[0] for o in outs], "rows", log_rows, lambda s: s["rows_in"])
    for s in mapped:
        for r, n in s["reasons"].items():
            reasons[s["table"]][r] = reasons[s["table"]].get(r, 0) + n
    context_vocabs = {
        c: np.unique(np.concatenate([s["context_values"][c] for s in mapped if s["table"] == "impressions"]))
        for c in context_cols
    }
    vocabs.update({c: v for c, v in context_vocabs.items()})
    imp_summ = [s for s in mapped if s["table"] == "impressions" and s["rows_kept"]]
    n_imp = sum(s["rows_kept"] for s in imp_summ)
    if n_imp == 0:
        raise DataError("every impression was quarantined: nothing to build samples from (see quarantine/)")
    ts_lo, ts_hi = min(s["ts_min"] for s in imp_summ), max(s["ts_max"] for s in imp_summ)
    ts_width = -(-(ts_hi - ts_lo + 1) // HIST_BINS)
    explicit = cfg.split.valid_start_ts is not None

    with timer("partition"):
        spec_sort = {
            "block_schemas": schemas,
            "context_vocabs_ref": ray.put(context_vocabs) if context_vocabs else None,
            "items_ref": ray.put(ItemLookup(vocabs["item"], items["cate_of_item"])),
            "files": files,
            "quarantine_dir": str(qroot),
            "ts_hist": None if explicit else (ts_lo, ts_width),
        }
        order = [t["task_id"] for t in tasks if t["table"] == "behaviors"]
        order += [t["task_id"] for t in tasks if t["table"] == "impressions"]
        n_beh = sum(1 for t in tasks if t["table"] == "behaviors")
        sort_fn = ray.remote(sort_task).options(num_returns=2)
        waves = [sort_fn.remote(p, spec_sort, n_beh, *(outs[t][1 + p] for t in order)) for p in range(n_parts)]
        shuffle_bytes = sum(sum(s["block_bytes"]) for s in mapped)
        rows_of_part = [sum(s["block_rows"][p] for s in mapped) for p in range(n_parts)]
        del outs  # each block is freed once its partition's task has read it
        ts_hist = np.zeros(HIST_BINS, np.int64)

        def add_hist(summary: dict[str, Any]) -> None:
            if "ts_hist" in summary:
                ts_hist[:] += summary.pop("ts_hist")

        sorted_parts = _gather(
            [w[0] for w in waves], "partitions", sum(rows_of_part), lambda s: rows_of_part[s["part"]], add_hist
        )
        results = [w[1] for w in waves]
    for s in sorted_parts:
        for table, n in s["duplicates"].items():
            reason = R_DUP_BEHAVIOR if table == "behaviors" else R_DUP_IMPRESSION
            reasons[table][reason] = reasons[table].get(reason, 0) + n
    user_counts = np.array([s["users"] for s in sorted_parts], np.int64)
    user_offsets = np.concatenate([[0], np.cumsum(user_counts)[:-1]])

    with timer("split"):
        if explicit:
            valid_start, test_start = int(cfg.split.valid_start_ts), int(cfg.split.test_start_ts)  # type: ignore[arg-type]
        else:
            valid_start, test_start = _split_boundaries(cfg, n_imp, ts_lo, ts_width, ts_hi, ts_hist, results)

    with timer("write"):
        spec_write = {
            "out": str(out),
            "users_dir": str(work / "users"),
            "valid_start_ts": valid_start,
            "test_start_ts": test_start,
            "rows_per_row_group": cfg.output.rows_per_row_group,
        }
        write_fn = ray.remote(write_task)
        length_keys = ["sequence_length", "hist_len", *(f"hist_len_{s}" for s in SPLITS)]
        lengths = {key: (np.zeros(0, np.int64),) * 2 for key in length_keys}

        def add_lengths(summary: dict[str, Any]) -> None:
            for key in lengths:
                lengths[key] = merge_counts([lengths[key], summary.pop(key)])

        written = _gather(
            [write_fn.remote(p, results[p], int(user_offsets[p]), spec_write) for p in range(n_parts)],
            "write",
            sum(s["samples"] for s in sorted_parts),
            lambda s: sum(x["rows"] for x in s["splits"].values()),
            add_lengths,
        )
        del results
        sha256 = {name: ray.get(refs) for name, refs in hash_refs.items()}

    with timer("manifest"):
        sweep_tmp_files(out)  # temporary files of task attempts that were killed
        for name in tables:  # a table with nothing quarantined has no folder there
            if not any((qroot / name).iterdir()):
                (qroot / name).rmdir()
        for space, vocab in vocabs.items():
            write_vocab(vocab_path(out, space), vocab)
        _concat_parquet(sorted((work / "users").glob("*.parquet")), vocab_path(out, "user"))
        n_users = int(user_counts.sum())
        vocab_sizes = {space: len(v) + FIRST_IDX for space, v in vocabs.items()} | {"user": n_users + FIRST_IDX}
        extra = {
            "partitions": n_parts,
            "shuffle_bytes": shuffle_bytes,
            "stages": dict(timer.seconds),
            "ray_cpus": num_cpus,
        }
        manifest = build_manifest(
            raw_dir,
            out,
            tables,
            cfg,
            items,
            vocab_sizes,
            reasons,
            written,
            lengths,
            (valid_start, test_start),
            sha256,
            extra,
        )
        shutil.rmtree(work)
    manifest["stages"] = dict(timer.seconds)
    manifest["driver_rss_mb"] = dict(timer.driver_rss_mb)
    return manifest


def _split_boundaries(
    cfg: BuildConfig, n: int, lo: int, width: int, hi: int, counts: np.ndarray, results: list[Any]
) -> tuple[int, int]:
    """The default split: impression-time quantiles 1 - valid - test and 1 - test, exactly as
    np.quantile(ts, q, method="higher") over every kept impression (before dedup), selected from the partitions'
    histograms (`partition.select_ranks`) without gathering the timestamps."""
    import ray

    hist_remote, values_remote = ray.remote(_ts_histogram), ray.remote(_ts_values)

    def hist_fn(a: int, end: int, w: int) -> np.ndarray:
        return np.sum(ray.get([hist_remote.remote(r, a, end, w) for r in results]), axis=0)

    def values_fn(a: int, end: int) -> np.ndarray:
        return np.concatenate(ray.get([values_remote.remote(r, a, end) for r in results]))

    q_valid = 1.0 - cfg.split.valid_fraction - cfg.split.test_fraction
    q_test = 1.0 - cfg.split.test_fraction
    ranks = [quantile_rank(n, q_valid), quantile_rank(n, q_test)]
    valid_q, test_q = select_ranks(ranks, lo, width, counts, hist_fn, values_fn)
    test_start = test_q if cfg.split.test_fraction else hi + 1
    # no validation split: valid is the empty range [test_start, test_start), not [max + 1, ...) which would have
    # emptied the test split too (everything silently in train)
    valid_start = valid_q if cfg.split.valid_fraction else test_start
    return valid_start, max(test_start, valid_start)


def _ts_histogram(result: dict[str, Any], lo: int, end: int, width: int) -> np.ndarray:
    return histogram(result["imp_ts"], lo, end, width, HIST_BINS)


def _ts_values(result: dict[str, Any], lo: int, end: int) -> np.ndarray:
    return values_in(result["imp_ts"], lo, end)


def _concat_parquet(parts: list[Path], dest: Path) -> None:
    """Stream Parquet files with one schema into one file, a row group at a time (the user vocabulary: the driver
    never holds more than one row group of it)."""
    if not parts:
        write_vocab(dest, np.zeros(0, np.int64))
        return
    writer = None
    try:
        for p in parts:
            f = pq.ParquetFile(p)
            for rg in range(f.num_row_groups):
                tbl = f.read_row_group(rg)
                writer = writer or pq.ParquetWriter(dest, tbl.schema)
                writer.write_table(tbl)
    finally:
        if writer is not None:
            writer.close()
