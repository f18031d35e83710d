"""The Spark baseline against `ctr build` (`benchmarks/pipeline.py --check`, and every Spark run at scale 1): a tiny
world with every kind of bad row injected, and a comparison of two dataset directories that says, per property,
whether they agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read(path: Path) -> Any:
    """A Parquet file or a directory of part files (Spark's hidden .crc and _SUCCESS files are not Parquet)."""
    import polars as pl

    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed") if files else pl.DataFrame()


def compare_datasets(build_dir: Path, spark_dir: Path) -> dict[str, Any]:
    """Compare two dataset directories of the same world; returns {"ok": bool, "checks": {name: bool}, ...}."""
    import polars as pl

    checks: dict[str, bool] = {}
    detail: dict[str, Any] = {}
    users = {
        d: _read(d / "vocab" / "user.parquet").rename({"raw": "user_id", "idx": "user_idx"})
        for d in (build_dir, spark_dir)
    }
    samples = {}
    for d in (build_dir, spark_dir):
        parts = [_read(d / "samples" / s).with_columns(pl.lit(s).alias("split")) for s in ("train", "valid", "test")]
        samples[d] = pl.concat([p for p in parts if len(p)], how="diagonal_relaxed")
    rows = {d: dict(samples[d].group_by("split").len().iter_rows()) for d in samples}
    checks["rows_per_split"] = rows[build_dir] == rows[spark_dir]
    detail["rows_per_split"] = {"build": rows[build_dir], "spark": rows[spark_dir]}
    hist = {d: samples[d].group_by("split").agg(pl.col("hist_len").sort()).sort("split") for d in samples}
    checks["hist_len_multiset_per_split"] = hist[build_dir].equals(hist[spark_dir])

    quarantine = {}
    for d in (build_dir, spark_dir):
        counts: dict[str, dict[str, int]] = {}
        for t in sorted(p for p in (d / "quarantine").glob("*") if p.is_dir()):
            q = _read(t)
            if len(q):
                counts[t.name] = dict(sorted(q.group_by("reason").len().iter_rows()))
        quarantine[d] = counts
    totals = {d: {t: sum(c.values()) for t, c in q.items()} for d, q in quarantine.items()}
    checks["quarantine_rows_per_table"] = totals[build_dir] == totals[spark_dir]
    checks["quarantine_rows_per_reason"] = quarantine[build_dir] == quarantine[spark_dir]
    detail["quarantine"] = {"build": totals[build_dir], "spark": totals[spark_dir]}

    seqs = {}
    for d in (build_dir, spark_dir):
        s = _read(d / "sequences").join(users[d], on="user_idx", how="left")
        seqs[d] = s.drop("user_idx").sort("user_id")
    lengths = {d: s.select("user_id", pl.col("ts").list.len().alias("n")) for d, s in seqs.items()}
    checks["sequence_length_per_user"] = lengths[build_dir].equals(lengths[spark_dir])
    detail["users"] = {"build": len(lengths[build_dir]), "spark": len(lengths[spark_dir])}

    # exactly: vocabularies, split boundaries, every sample, every sequence
    spaces = sorted(p.name for p in (build_dir / "vocab").glob("*.parquet"))
    checks["vocabularies"] = spaces == sorted(p.name for p in (spark_dir / "vocab").glob("*.parquet")) and all(
        _read(build_dir / "vocab" / v).equals(_read(spark_dir / "vocab" / v).cast({"raw": pl.Int64, "idx": pl.Int32}))
        for v in spaces
    )
    bounds = [json.loads((d / "manifest.json").read_text())["split"] for d in (build_dir, spark_dir)]
    keys = ("valid_start_ts", "test_start_ts")
    checks["split_boundaries"] = [bounds[0][k] for k in keys] == [bounds[1][k] for k in keys]
    samples = {d: df.join(users[d], on="user_idx", how="left") for d, df in samples.items()}  # raw user ids
    cols = [c for c in samples[build_dir].columns if c != "user_idx"]
    checks["samples_exact"] = set(cols) == {c for c in samples[spark_dir].columns if c != "user_idx"} and samples[
        build_dir
    ].select(cols).sort(cols).equals(samples[spark_dir].select(cols).sort(cols))
    checks["sequences_exact"] = seqs[build_dir].columns == seqs[spark_dir].columns and all(
        seqs[build_dir][c].cast(pl.List(pl.Int64)).equals(seqs[spark_dir][c].cast(pl.List(pl.Int64)))
        for c in seqs[build_dir].columns
        if c != "user_id"
    )
    return {"ok": all(checks.values()), "checks": checks, **detail}


def _write_rows(path: Path, schema: Any, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}), path)


def dirty_world(raw: Path, seed: int = 0) -> None:
    """The tiny preset plus what real logs have: bad rows of every kind, duplicates, a quarantined item, an
    impression-only user, ties (the tiny preset has impression/behavior ts ties of its own)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.synthetic import generate

    generate("tiny", seed, raw)
    rng = np.random.default_rng(seed)
    items = pq.read_table(raw / "items.parquet")
    dim = items.schema.field("mm_emb").type.list_size
    new = {c: items[c].to_pylist()[:3] for c in items.column_names}  # three duplicate item ids (later rows: dups)
    new["item_id"] += [None, 1, 2, 3]  # a null id; a null cate; a NaN embedding (its behaviors become unknown)
    new["cate_id"] += [5, None, 5, 5]
    new["mm_emb"] += [[0.0] * dim, [0.0] * dim, [float("nan")] * dim, None]
    for c in items.column_names:
        if c not in ("item_id", "cate_id", "mm_emb"):
            new[c] += [1, 1, 1, None]
    pq.write_table(pa.concat_tables([items, pa.table(new, schema=items.schema)]), raw / "items.parquet")

    for table, n_dup in (("behaviors", 40), ("impressions", 30)):
        files = sorted((raw / table).glob("*.parquet"))
        first = pq.read_table(files[0])
        dup = first.take(rng.choice(first.num_rows, n_dup, replace=False)).to_pydict()
        bad = {c: dup[c][:8] for c in dup}
        bad["user_id"][0] = None
        bad["ts"][1] = None
        bad["ts"][2] = -5
        bad["item_id"][3] = 999  # not in the item table
        bad["item_id"][4] = 2  # the NaN-embedding item
        bad["item_id"][5] = None
        if table == "impressions":
            bad["label"][6], bad["label"][7] = 2, None
            dup["user_id"][-1] = 424242  # a user with one impression and no behavior
            dup["ts"][-1] = 1
            for c in first.column_names:
                if c not in ("user_id", "item_id", "ts", "label", "p_true"):
                    dup[c][0] = None  # a null context value
        else:
            dup["btype"][0] = bad["btype"][6] = None  # equals btype 0 (the builder fills null btype with 0)
            bad["ts"][7] = 0
        _write_rows(raw / table / "part-99998.parquet", first.schema, {c: dup[c] + bad[c] for c in dup})
        # a second copy in a file that sorts first: input order decides which copy is kept
        _write_rows(raw / table / "part-0.parquet", first.schema, {c: dup[c][:5] for c in dup})


# --------------------------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------------------------
