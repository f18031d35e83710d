"""`ctr import taobao-userbehavior SRC --out RAW_DIR`: Alibaba's Taobao UserBehavior.csv (Tianchi dataId 649).

Source: `UserBehavior.csv` with no header, one event per line: `user_id,item_id,category_id,behavior,timestamp`,
behavior in `pv|cart|fav|buy`, timestamp in unix seconds. SRC is the file, or a folder holding `UserBehavior.csv`
(or exactly one `.csv`). A first line that starts with `user` is taken as a header and skipped. The file (100M
rows, 3.5 GB) is streamed with polars' streaming engine; nothing is held per row in Python.

Protocol:

* behaviors: every parsed row, `btype` pv=1, cart=2, fav=3, buy=4 (int8), ts = timestamp.
* items: one row per item from the (item, category) pairs of all rows. An item seen with several categories (rare
  in this data) takes its most frequent one, ties the smallest id; the number of such items is reported
  (`items_with_conflicting_categories`).
* impressions: every `pv` (a click on the item detail page; `positive_behavior` picks another behavior) whose ts is
  strictly later than the user's first event of any kind is a positive impression (label 1) at its ts, so each
  sample has at least one earlier behavior (ties count as after). Each positive gets `neg_per_pos` (default 1)
  negatives (label 0) at the same ts, drawn from the item popularity distribution (number of positive-behavior
  rows per item; `negative_sampling="uniform"` draws uniformly over those items) and redrawn while equal to the
  positive's item. A negative may be an item the user viewed at another time (as in common popularity-sampled
  protocols). Draws are a hash of (seed, user, item, ts, k, attempt): deterministic, independent of batching.
* rejects: a line that is empty, has other than 5 fields, an unparsable id/timestamp, an unknown behavior string,
  or (with `ts_range`) a timestamp outside [start, end) is not dropped silently: it is counted and written to
  `import_rejects.csv` with its line number and reason. The full dataset has a few rows outside its documented
  2017-11-25..2017-12-03 window; they are kept unless `ts_range` is given.
* No `recommended_split` is written; a common choice for the full dataset is the last day as test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipelines.importers._common import (
    ImportSourceError,
    RawTableWriter,
    Rejects,
    finish_import,
    prepare_out_dir,
    raw_schema,
    require_src,
    resolve_item_cates,
    tmp_dir,
    write_raw_table,
)
from pipelines.importers.negatives import interleave, sample_negatives

log = logging.getLogger(__name__)

NAME = "taobao-userbehavior"
BTYPES = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}
PROTOCOL = (
    "Taobao UserBehavior.csv (user,item,category,behavior,ts; no header), streamed: every row is a behavior "
    "(btype pv=1 cart=2 fav=3 buy=4); items take their most frequent category (ties: smallest); each pv strictly "
    "later than the user's first event is a positive impression at its ts plus neg_per_pos negatives at the same "
    "ts drawn from item pv popularity (item != target, seeded hash, order-independent). Unparsable rows and "
    "unknown behaviors go to import_rejects.csv with the reason."
)
_BATCH_ROWS = 1_000_000


def _locate(src: Path) -> Path:
    if src.is_file():
        return src
    named = src / "UserBehavior.csv"
    if named.exists():
        return named
    csvs = sorted(src.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    raise ImportSourceError(
        f"{src}: expected UserBehavior.csv (no header: user_id,item_id,category_id,behavior,timestamp) "
        f"in this folder, found {[p.name for p in csvs] or 'no CSV'}; pass the file itself as SRC."
    )


def _has_header(path: Path) -> bool:
    with open(path, "rb") as fh:
        first = fh.readline(4096).decode("utf-8", errors="replace").strip().lower()
    return first.startswith("user")


def _btype(behavior: pl.Expr) -> pl.Expr:
    """Behavior string -> int8 code, null when unknown (a when-chain: `replace_strict` is not streamed)."""
    names = list(BTYPES)
    expr = pl.when(behavior == names[0]).then(pl.lit(BTYPES[names[0]], pl.Int8))
    for name in names[1:]:
        expr = expr.when(behavior == name).then(pl.lit(BTYPES[name], pl.Int8))
    return expr.otherwise(pl.lit(None, pl.Int8))


def _parse(path: Path, ts_range: tuple[int, int] | None) -> pl.LazyFrame:
    """One row per line: parsed fields plus `reason` (null when the row is valid)."""
    lf = pl.scan_csv(
        path,
        has_header=False,
        separator="\x1f",  # never in the data: each line is one string, split below
        quote_char=None,
        schema={"line": pl.String},
        truncate_ragged_lines=True,
    ).with_row_index("source_row", offset=1)
    if _has_header(path):
        lf = lf.filter(pl.col("source_row") > 1)
    f = pl.col("line").str.split(",")

    def field(i: int) -> pl.Expr:
        return f.list.get(i, null_on_oob=True).str.strip_chars()

    lf = lf.with_columns(
        f.list.len().alias("_n"),
        field(0).cast(pl.Int64, strict=False).alias("user_id"),
        field(1).cast(pl.Int64, strict=False).alias("item_id"),
        field(2).cast(pl.Int64, strict=False).alias("cate_id"),
        _btype(field(3)).alias("btype"),
        field(4).cast(pl.Int64, strict=False).alias("ts"),
        field(3).alias("_behavior"),
    )
    reason = (
        pl.when(pl.col("line").is_null() | (pl.col("line").str.strip_chars() == ""))
        .then(pl.lit("empty line"))
        .when(pl.col("_n") != 5)
        .then(pl.format("expected 5 fields, got {}", pl.col("_n")))
        .when(pl.col("user_id").is_null())
        .then(pl.lit("unparsable user_id"))
        .when(pl.col("item_id").is_null())
        .then(pl.lit("unparsable item_id"))
        .when(pl.col("cate_id").is_null())
        .then(pl.lit("unparsable category_id"))
        .when(pl.col("btype").is_null())
        .then(pl.format("unknown behavior '{}'", pl.col("_behavior")))
        .when(pl.col("ts").is_null())
        .then(pl.lit("unparsable timestamp"))
    )
    if ts_range is not None:
        lo, hi = int(ts_range[0]), int(ts_range[1])
        reason = reason.when((pl.col("ts") < lo) | (pl.col("ts") >= hi)).then(
            pl.lit(f"timestamp outside ts_range [{lo}, {hi})")
        )
    return lf.with_columns(reason.otherwise(pl.lit(None, dtype=pl.String)).alias("reason"))


def import_taobao_userbehavior(
    src: str | Path,
    out_dir: str | Path,
    *,
    neg_per_pos: int = 1,
    seed: int = 0,
    negative_sampling: str = "popularity",
    positive_behavior: str = "pv",
    ts_range: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Import Taobao UserBehavior.csv (streamed) into RAW_DIR; returns the summary (see module docstring)."""
    if negative_sampling not in ("popularity", "uniform"):
        raise ValueError(f"negative_sampling must be 'popularity' or 'uniform', got {negative_sampling!r}")
    if positive_behavior not in BTYPES:
        raise ValueError(f"positive_behavior must be one of {list(BTYPES)}, got {positive_behavior!r}")
    if neg_per_pos < 0:
        raise ValueError(f"neg_per_pos must be >= 0, got {neg_per_pos}")
    src_path = require_src(src, NAME)
    path = _locate(src_path)
    out = prepare_out_dir(out_dir, src_path, NAME)
    tmp = tmp_dir(out)
    rejects = Rejects(out)

    # ---- pass 1 over the CSV: valid rows to a scratch Parquet, rejected rows to a scratch CSV
    parsed = _parse(path, ts_range)
    valid_path, bad_path = tmp / "valid.parquet", tmp / "rejects.csv"
    pl.collect_all(
        [
            parsed.filter(pl.col("reason").is_null())
            .select("user_id", "item_id", "cate_id", "ts", "btype")
            .sink_parquet(valid_path, lazy=True),
            parsed.filter(pl.col("reason").is_not_null())
            .select(
                pl.lit(path.name).alias("source_file"),
                pl.col("source_row").cast(pl.Int64),
                "reason",
                pl.col("line").fill_null("").alias("raw"),
            )
            .sink_csv(bad_path, lazy=True),
        ],
        engine="streaming",
    )
    rejects.add_file(bad_path)
    valid = pl.scan_parquet(valid_path)
    n_valid = int(valid.select(pl.len()).collect().item())
    if n_valid == 0:
        raise ImportSourceError(
            f"{path}: no parsable row (expected user_id,item_id,category_id,behavior,timestamp with behavior in "
            f"{list(BTYPES)}); see {out / 'import_rejects.csv'}."
        )

    # ---- behaviors (streamed copy) and items
    behaviors_schema = raw_schema("behaviors", btype=True)
    valid.select("user_id", "item_id", "ts", "btype").sink_parquet(
        out / "behaviors.parquet", arrow_schema=behaviors_schema, compression="zstd"
    )
    items, conflicts = resolve_item_cates(valid.select("item_id", "cate_id"))
    n_items = write_raw_table(items, out / "items.parquet", raw_schema("items"))

    # ---- impressions: positives (streamed to scratch), then negatives batch by batch
    pos_code = BTYPES[positive_behavior]
    first = valid.group_by("user_id").agg(pl.col("ts").min().alias("_first"))
    pos_path = tmp / "positives.parquet"
    (
        valid.filter(pl.col("btype") == pos_code)
        .join(first, on="user_id", how="inner", maintain_order="left")
        .filter(pl.col("ts") > pl.col("_first"))
        .select("user_id", "item_id", "ts")
        .sink_parquet(pos_path)
    )
    pop = (
        valid.filter(pl.col("btype") == pos_code).group_by("item_id").len().sort("item_id").collect(engine="streaming")
    )
    candidates = pop["item_id"].to_numpy()
    weights = pop["len"].to_numpy().astype(np.float64) if negative_sampling == "popularity" else None
    n_pos = n_neg = n_unsampleable = 0
    with RawTableWriter(out / "impressions.parquet", raw_schema("impressions")) as writer:
        for batch in pq.ParquetFile(pos_path).iter_batches(batch_size=_BATCH_ROWS):
            pos = pl.from_arrow(batch)
            assert isinstance(pos, pl.DataFrame)
            neg = sample_negatives(
                pos["user_id"].to_numpy(),
                pos["item_id"].to_numpy(),
                pos["ts"].to_numpy(),
                candidates,
                weights,
                neg_per_pos,
                seed,
            )
            writer.write(interleave(pos, neg))
            n_pos += pos.height
            n_neg += len(neg.item_id)
            n_unsampleable += neg.unsampleable
        n_impressions = writer.rows

    btype_counts = valid.group_by("btype").len().collect()
    by_btype = {name: 0 for name in BTYPES}
    inv = {v: k for k, v in BTYPES.items()}
    for code, n in btype_counts.iter_rows():
        by_btype[inv[int(code)]] = int(n)
    extra = {
        "header_line_skipped": _has_header(path),
        "behaviors_by_type": by_btype,
        "categories": int(items["cate_id"].n_unique()),
        "items_with_conflicting_categories": conflicts,
        "positives": n_pos,
        "negatives": n_neg,
        "negatives_unsampleable": n_unsampleable,
        "positive_rows_at_user_first_ts": int(by_btype[positive_behavior] - n_pos),
    }
    rows = {"items": n_items, "behaviors": n_valid, "impressions": n_impressions}
    options = {
        "file": path.name,
        "neg_per_pos": neg_per_pos,
        "seed": seed,
        "negative_sampling": negative_sampling,
        "positive_behavior": positive_behavior,
        "ts_range": list(ts_range) if ts_range is not None else None,
        "btype_codes": BTYPES,
    }
    return finish_import(
        out, importer=NAME, src=src_path, protocol=PROTOCOL, options=options, rows=rows, rejects=rejects, extra=extra
    )
