"""The baseline an ads team would write today: `ctr build`'s outputs from one PySpark job (DataFrames + windows).

Why it exists: `benchmarks/pipeline.py` measures `ctr build` against the way such datasets are usually built, a
Spark job with window functions, on the same worlds and the same 2-core, 24 GiB machine. It is meant to be a fair,
idiomatic Spark job, not a straw man: one shuffle by user for the per-user work, broadcast joins for the (small)
vocabularies, the deduplicated rows persisted once and reused by every output.

What it writes (the dataset contract of `features/schema.py`, with Spark's file layout: directories of part files,
and `items.parquet` / `vocab/*.parquet` moved out of their one-file directories)::

    OUT/items.parquet, vocab/{item,cate,user,<attr>,<context>}.parquet (raw int64, idx int32 = 2 + rank)
    OUT/sequences/        one row per user: user_idx, item_idx, cate_idx, ts[, btype] lists in (ts, input order)
    OUT/samples/{train,valid,test}/   user_idx, item_idx, cate_idx, ts, label, hist_len[, p_true, <ctx>_idx]
    OUT/quarantine/<table>/           rejected rows with reason, source_file, source_row
    OUT/manifest.json                 split boundaries, vocab sizes, seconds per stage

How, step by step (the semantics are `pipelines/build.py`'s): validate rows with `when` chains (reasons in the same
order as `pipelines/validate.py`); map item ids by a broadcast join (unknown ids are quarantined); input order is
(file index in sorted path order, `_metadata.row_index`); duplicates are `row_number() > 1` over a window on the
duplicate key ordered by input order; `hist_len` is `sum(is_behavior)` over a window partitioned by user, ordered by
ts, with the frame `rangeBetween(unboundedPreceding, -1)` (strictly earlier ts: ties count as after); sequences are
`array_sort(collect_list(struct(ts, file, row, ...)))` per user.

Split boundaries, exactly as numpy's `np.quantile(ts, q, method="higher")` over the kept (validated, not yet
deduplicated) impression timestamps, i.e. `sorted(ts)[ceil((n - 1) * q)]`: n and the index k are computed on the
driver with the same float64 arithmetic as numpy; Spark counts rows per distinct ts, a running sum over ts order
(one window without partitioning, over distinct timestamps only), and the answer is the smallest ts whose running
count exceeds k.

Resources: local mode `local[2]` (the machine has 2 cores), `spark.driver.memory=8g` (in local mode the driver JVM
runs the tasks too: 8 GiB of heap leaves room on a 24 GiB box for the Python driver, the page cache and the OS;
what does not fit in memory, the persisted rows and sorts, spills to spark.local.dir).

    python benchmarks/spark_build.py --raw RAW_DIR --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from functools import reduce
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import FIRST_IDX, RAW_SPECS, SPLITS  # the contract this job reproduces
from pipelines.scan import table_files
from pipelines.validate import (
    R_DUP_BEHAVIOR,
    R_DUP_IMPRESSION,
    R_DUP_ITEM,
    R_EMB_DIM,
    R_EMB_NONFINITE,
    R_LABEL,
    R_NEGATIVE_TS,
    R_NULL,
    R_UNKNOWN_ITEM,
)

REQUIRED = {name: list(spec.required) for name, spec in RAW_SPECS.items()}


def space_of(column: str) -> str:
    return column[: -len("_id")] if column.endswith("_id") and len(column) > 3 else column


def spark_session(driver_memory: str = "8g", shuffle_partitions: int = 16) -> Any:
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("lifelong-ctr spark baseline")
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def read_table(spark: Any, files: list[Path]) -> Any:
    """All files of a table, with the input order: file_idx (position in the sorted file list) and row_index."""
    from pyspark.sql import functions as F

    schema = spark.read.parquet(str(files[0])).schema  # given to every read: no schema inference job per file
    parts = [
        spark.read.schema(schema)
        .parquet(str(f))
        .select(
            "*",
            F.lit(i).cast("int").alias("file_idx"),
            F.col("_metadata.row_index").alias("source_row"),
        )
        for i, f in enumerate(files)
    ]
    return reduce(lambda a, b: a.unionByName(b), parts)


def source_path(files: list[Path]) -> Any:
    """file_idx -> the file's path (an array literal: rows carry the 4-byte index, not the path)."""
    from pyspark.sql import functions as F

    return F.element_at(F.array(*(F.lit(str(f)) for f in files)), F.col("file_idx") + 1)


def first_reason(conditions: list[tuple[Any, str]]) -> Any:
    """The reason of the first true condition (null when none is true)."""
    from pyspark.sql import functions as F

    expr = F.lit(None).cast("string")
    for cond, text in reversed(conditions):
        expr = F.when(cond, F.lit(text)).otherwise(expr)
    return expr


def indexed(df: Any, column: str) -> Any:
    """Sorted distinct non-null values of `column` -> (raw int64, idx int32 = 2 + rank): a window over one partition,
    fine for vocabularies (at most a few million ids)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    distinct = df.select(F.col(column).cast("long").alias("raw")).where(F.col("raw").isNotNull()).distinct()
    rank = F.row_number().over(Window.orderBy("raw")) + (FIRST_IDX - 1)
    return distinct.select("raw", rank.cast("int").alias("idx"))


def write_single(df: Any, path: Path) -> None:
    """One Parquet file at `path` (Spark writes a directory; its one part file is moved to the contract's name)."""
    tmp = path.with_name(path.name + ".spark")
    df.coalesce(1).write.parquet(str(tmp))
    (part,) = tmp.glob("part-*.parquet")
    part.rename(path)
    shutil.rmtree(tmp)


def map_idx(df: Any, vocab: Any, column: str, out: str, null_idx: int | None = None) -> Any:
    """Left broadcast join of a vocabulary: `column` raw id -> `out` idx (null ids -> `null_idx`)."""
    from pyspark.sql import functions as F

    v = F.broadcast(vocab.withColumnRenamed("raw", f"_{out}_raw").withColumnRenamed("idx", out))
    joined = df.join(v, df[column] == v[f"_{out}_raw"], "left").drop(f"_{out}_raw")
    return joined.withColumn(out, F.coalesce(F.col(out), F.lit(null_idx))) if null_idx is not None else joined


def build_items(spark: Any, raw: Path, out: Path) -> tuple[Any, dict[str, Any], Any]:
    """Validate + dedup the item table; write items.parquet and the item/cate/attribute vocabularies.
    Returns (item lookup item_id -> item_idx, cate_idx; vocabularies; quarantined item rows)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    files = table_files(raw, "items")
    schema = pq.read_schema(files[0])
    items = read_table(spark, files)
    has_emb = "mm_emb" in schema.names
    attrs = [
        c
        for c in schema.names
        if c not in ("item_id", "cate_id", "mm_emb") and pa.types.is_integer(schema.field(c).type)
    ]
    conds = [(F.col(c).isNull(), R_NULL.format(col=c)) for c in REQUIRED["items"]]
    if has_emb:
        emb_type = schema.field("mm_emb").type
        dim = emb_type.list_size if pa.types.is_fixed_size_list(emb_type) else None
        if dim is None:  # variable-length lists: the most common length (the smallest on ties) is the dimension
            lengths = items.where(F.col("mm_emb").isNotNull()).groupBy(F.size("mm_emb").alias("n")).count()
            dim = lengths.orderBy(F.desc("count"), "n").first()["n"]
        conds.append((F.col("mm_emb").isNotNull() & (F.size("mm_emb") != dim), R_EMB_DIM))
        if pa.types.is_floating(emb_type.value_type):
            bad = F.exists("mm_emb", lambda x: x.isNull() | F.isnan(x) | (F.abs(x) == float("inf")))
            conds.append((F.coalesce(bad, F.lit(False)), R_EMB_NONFINITE))
    items = items.withColumn("reason", first_reason(conds))
    # duplicate item ids: among valid rows, the first in input order wins
    first = Window.partitionBy("item_id", F.col("reason").isNull()).orderBy("file_idx", "source_row")
    dup = F.col("reason").isNull() & (F.row_number().over(first) > 1)
    items = items.withColumn("reason", F.when(dup, F.lit(R_DUP_ITEM)).otherwise(F.col("reason"))).persist()
    good = items.where(F.col("reason").isNull())
    vocabs = {"item": indexed(good, "item_id"), "cate": indexed(good, "cate_id")}
    vocabs |= {space_of(c): indexed(good, c) for c in attrs}
    table = map_idx(good, vocabs["item"], "item_id", "item_idx")
    table = map_idx(table, vocabs["cate"], "cate_id", "cate_idx")
    for c in attrs:
        table = map_idx(table, vocabs[space_of(c)], c, f"{space_of(c)}_idx", null_idx=0)
    table = table.persist()
    cols = ["item_idx", "cate_idx", *(f"{space_of(c)}_idx" for c in attrs), *(["mm_emb"] if has_emb else [])]
    write_single(table.select(*cols).orderBy("item_idx"), out / "items.parquet")
    rejected = items.where(F.col("reason").isNotNull())
    return table.select("item_id", "item_idx", "cate_idx"), vocabs, rejected


def validate_log(spark: Any, raw: Path, name: str, lookup: Any) -> tuple[Any, Any]:
    """Row checks of behaviors or impressions + the item id lookup; returns (kept rows, rejected rows)."""
    from pyspark.sql import functions as F

    df = read_table(spark, table_files(raw, name))
    conds = [(F.col(c).isNull(), R_NULL.format(col=c)) for c in REQUIRED[name]]
    conds.append((F.col("ts") < 0, R_NEGATIVE_TS))
    if name == "impressions":
        conds.append((~F.col("label").isin(0, 1), R_LABEL))
    df = df.withColumn("reason", first_reason(conds))
    lk = F.broadcast(lookup.withColumnRenamed("item_id", "_item_id"))
    df = df.join(lk, df["item_id"] == lk["_item_id"], "left").drop("_item_id")
    unknown = F.col("reason").isNull() & F.col("item_idx").isNull()
    df = df.withColumn("reason", F.when(unknown, F.lit(R_UNKNOWN_ITEM)).otherwise(F.col("reason")))
    kept = df.where(F.col("reason").isNull()).drop("reason")
    rejected = df.where(F.col("reason").isNotNull()).drop("item_idx", "cate_idx")
    return kept, rejected


def split_boundaries(impression_ts: Any, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """numpy's quantile(ts, q, method="higher") = sorted(ts)[ceil((n - 1) * q)], exactly (see the module doc)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    counts = impression_ts.groupBy("ts").count().persist()
    n = counts.agg(F.sum("count")).first()[0] or 0
    if n == 0:
        raise ValueError("every impression was quarantined: nothing to build samples from")
    running = counts.withColumn(
        "cum", F.sum("count").over(Window.orderBy("ts").rowsBetween(Window.unboundedPreceding, 0))
    )

    def kth(q: float) -> Any:  # the k-th smallest (0-based) is the first ts whose running count exceeds k
        k = min(max(math.ceil((n - 1) * q), 0), n - 1)
        return F.min(F.when(F.col("cum") > k, F.col("ts")))

    q_valid, q_test = 1.0 - valid_fraction - test_fraction, 1.0 - test_fraction
    row = running.agg(kth(q_valid).alias("v"), kth(q_test).alias("t"), F.max("ts").alias("m")).first()
    counts.unpersist()
    test_start = int(row["t"]) if test_fraction else int(row["m"]) + 1
    valid_start = int(row["v"]) if valid_fraction else test_start
    return valid_start, max(test_start, valid_start)


def spark_build(
    raw_dir: str | Path,
    out_dir: str | Path,
    *,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    driver_memory: str = "8g",
) -> dict[str, Any]:
    """Build `out_dir` (must not exist or be empty) from the raw tables in `raw_dir`; returns the manifest."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t0 = time.time()
    raw, out = Path(raw_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    (out / "vocab").mkdir(parents=True, exist_ok=True)
    raw_rows = sum(
        pq.ParquetFile(f).metadata.num_rows for t in ("behaviors", "impressions") for f in table_files(raw, t)
    )
    spark = spark_session(driver_memory, shuffle_partitions=max(8, min(200, raw_rows // 1_000_000)))
    stages: dict[str, float] = {}

    def stage(name: str, t: float) -> float:
        stages[name] = round(time.time() - t, 2)
        print(f"spark_build: {name} {stages[name]} s", flush=True)
        return time.time()

    t = time.time()
    lookup, vocabs, q_items = build_items(spark, raw, out)
    t = stage("items", t)

    beh_schema = pq.read_schema(table_files(raw, "behaviors")[0])
    imp_schema = pq.read_schema(table_files(raw, "impressions")[0])
    has_btype = "btype" in beh_schema.names
    has_p_true = "p_true" in imp_schema.names
    ctx = [c for c in imp_schema.names if c not in REQUIRED["impressions"] and c != "p_true"]
    imp_raw = read_table(spark, table_files(raw, "impressions"))
    for c in ctx:  # context vocabularies: every non-null value of the impression log (quarantined rows included)
        vocabs[space_of(c)] = indexed(imp_raw, c)
    b_kept, q_beh = validate_log(spark, raw, "behaviors", lookup)
    i_kept, q_imp = validate_log(spark, raw, "impressions", lookup)
    for c in ctx:
        i_kept = map_idx(i_kept, vocabs[space_of(c)], c, f"{space_of(c)}_idx", null_idx=0)

    # one frame for both logs, shuffled once by user: every later window and aggregation is per user (or finer)
    ctx_idx = [f"{space_of(c)}_idx" for c in ctx]
    common = ["user_id", "item_idx", "cate_idx", "ts", "file_idx", "source_row"]
    beh = b_kept.select(
        F.lit(0).cast("byte").alias("kind"),
        *common,
        F.lit(None).cast("byte").alias("label"),
        (F.coalesce(F.col("btype"), F.lit(0)) if has_btype else F.lit(0)).cast("byte").alias("btype"),
        F.lit(None).cast("double").alias("p_true"),
        *(F.lit(None).cast("int").alias(c) for c in ctx_idx),
    )
    imp = i_kept.select(
        F.lit(1).cast("byte").alias("kind"),
        *common,
        F.col("label").cast("byte"),
        F.lit(0).cast("byte").alias("btype"),
        (F.col("p_true").cast("double") if has_p_true else F.lit(None).cast("double")).alias("p_true"),
        *(F.col(c).cast("int") for c in ctx_idx),
    )
    rows = beh.unionByName(imp).repartition("user_id")
    # duplicates: equal (user, item, ts, btype) behaviors / (user, item, ts) impressions; the first in input order wins
    dup_key = Window.partitionBy("user_id", "kind", "item_idx", "ts", "btype").orderBy("file_idx", "source_row")
    rows = rows.withColumn("dup", F.row_number().over(dup_key) > 1).persist(StorageLevel.MEMORY_AND_DISK)
    kept = rows.where(~F.col("dup"))
    vocabs["user"] = indexed(rows, "user_id").persist()
    for space, vocab in vocabs.items():
        write_single(vocab.orderBy("idx"), out / "vocab" / f"{space}.parquet")
    t = stage("validate + user vocab", t)

    valid_start, test_start = split_boundaries(
        rows.where(F.col("kind") == 1).select("ts"), valid_fraction, test_fraction
    )
    t = stage("split boundaries", t)

    # quarantine: the rows rejected by validation (every raw column) and the duplicates (ids, ts, provenance)
    item_ids = F.broadcast(vocabs["item"].select(F.col("raw").alias("item_id"), F.col("idx").alias("item_idx")))
    dups = rows.where(F.col("dup")).join(item_ids, "item_idx").select(
        "kind", "user_id", "item_id", "ts", "file_idx", "source_row",
        F.when(F.col("kind") == 0, F.lit(R_DUP_BEHAVIOR)).otherwise(F.lit(R_DUP_IMPRESSION)).alias("reason"),
    )  # fmt: skip
    for name, rejected, kind in (("items", q_items, None), ("behaviors", q_beh, 0), ("impressions", q_imp, 1)):
        if kind is not None:
            rejected = rejected.unionByName(dups.where(F.col("kind") == kind).drop("kind"), allowMissingColumns=True)
        cols = [c for c in rejected.columns if c not in ("reason", "file_idx", "source_row")]
        source = source_path(table_files(raw, name)).alias("source_file")
        rejected.select(*cols, "reason", source, "source_row").write.parquet(str(out / "quarantine" / name))
    t = stage("quarantine", t)

    # samples: hist_len = the user's kept behaviors with ts strictly before (range frame up to ts - 1)
    earlier = Window.partitionBy("user_id").orderBy("ts").rangeBetween(Window.unboundedPreceding, -1)
    hist = F.coalesce(F.sum(1 - F.col("kind").cast("int")).over(earlier), F.lit(0)).cast("int")
    samples = map_idx(
        kept.withColumn("hist_len", hist).where(F.col("kind") == 1), vocabs["user"], "user_id", "user_idx"
    )
    split = F.when(F.col("ts") >= test_start, "test").when(F.col("ts") >= valid_start, "valid").otherwise("train")
    extra = (["p_true"] if has_p_true else []) + ctx_idx
    samples = samples.select(
        "user_idx", "item_idx", "cate_idx", "ts", "label", "hist_len", *extra, split.alias("split")
    )
    samples.write.partitionBy("split").parquet(str(out / "samples"))
    for s in SPLITS:  # Spark's samples/split=NAME/ -> samples/NAME/ (an empty split gets an empty folder)
        (out / "samples" / f"split={s}").mkdir(exist_ok=True)
        (out / "samples" / f"split={s}").rename(out / "samples" / s)
    t = stage("samples", t)

    # sequences: per user, the kept behaviors sorted by (ts, input order); users with impressions only get []
    fields = ["ts", "file_idx", "source_row", "item_idx", "cate_idx", *(["btype"] if has_btype else [])]
    seq = F.array_sort(F.collect_list(F.when(F.col("kind") == 0, F.struct(*fields))))
    seqs = map_idx(kept.groupBy("user_id").agg(seq.alias("s")), vocabs["user"], "user_id", "user_idx")
    lists = [F.col(f"s.{c}").alias(c) for c in ("item_idx", "cate_idx", "ts", *(["btype"] if has_btype else []))]
    seqs.select("user_idx", *lists).write.parquet(str(out / "sequences"))
    stage("sequences", t)

    sizes = {space: pq.read_metadata(out / "vocab" / f"{space}.parquet").num_rows + FIRST_IDX for space in vocabs}
    manifest = {
        "job": "spark_build (PySpark window functions)",
        "spark_version": spark.version,
        "master": spark.sparkContext.master,
        "driver_memory": spark.conf.get("spark.driver.memory", driver_memory),
        "split": {"valid_start_ts": valid_start, "test_start_ts": test_start},
        "vocab_sizes": sizes,
        "stages": stages,
        "build_seconds": round(time.time() - t0, 2),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    spark.stop()
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="raw directory (items, behaviors, impressions)")
    parser.add_argument("--out", required=True, help="dataset directory to write (must not exist or be empty)")
    parser.add_argument("--driver-memory", default="8g")
    args = parser.parse_args()
    print(json.dumps(spark_build(args.raw, args.out, driver_memory=args.driver_memory)))


if __name__ == "__main__":
    main()
