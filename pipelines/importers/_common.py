"""Shared helpers of the importers: errors, output directory, typed table writers, rejects, stable ids, sampling.

Every importer writes the raw contract of `features.schema` (see that module's docstring) into RAW_DIR, plus
`source.json` and, when some input rows could not be parsed, `import_rejects.csv`
(`source_file, source_row, reason, raw`). The helpers here make the types exact (`to_raw_table`), make rejected
rows visible instead of dropped (`Rejects`), and make every random choice a pure function of the row it belongs to
(`pipelines.importers.negatives`), so that an import is deterministic whatever the batch boundaries or the row order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from features.errors import UserError
from features.schema import MM_EMB_COLUMN, MM_EMB_VALUE_TYPES, RAW_SPECS, SCHEMA_VERSION, mm_emb_type
from pipelines.outdirs import RAW_OUTPUTS, SOURCE_FILE, prepare_raw_dir

log = logging.getLogger(__name__)

REJECTS_FILE = "import_rejects.csv"
# Every name an importer may write into RAW_DIR. Only these are replaced on a re-import; nothing else is touched.
OWNED_OUTPUTS = RAW_OUTPUTS
PARQUET_COMPRESSION = "zstd"
ID_MASK_63 = (1 << 63) - 1
_FLOAT32 = pa.float32()


class ImportSourceError(UserError, ValueError):
    """The source given to an importer is missing, incomplete or not in the expected format.

    The message names the file, what was expected and how to fix it.
    """


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def require_src(src: str | Path, importer: str) -> Path:
    """The source path, resolved; a clear error when it does not exist."""
    path = Path(src).expanduser()
    if not path.exists():
        raise ImportSourceError(
            f"ctr import {importer}: source path {str(path)!r} does not exist. "
            f"Pass the folder (or file) that holds the downloaded {importer} data."
        )
    return path.resolve()


def require_columns(actual: Iterable[str], expected: Sequence[str], file: Path | str, fix: str) -> None:
    """Raise `ImportSourceError` naming the file and the missing columns when `expected` is not a subset."""
    actual = list(actual)
    missing = [c for c in expected if c not in actual]
    if missing:
        raise ImportSourceError(
            f"{file}: missing column(s) {missing}; expected at least {list(expected)}, found {actual}. {fix}"
        )


def read_text_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(1-based line number, line without the newline) for a text file, gzip-compressed when it ends in `.gz`."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:  # type: ignore[operator]
        for lineno, line in enumerate(fh, start=1):
            yield lineno, line.rstrip("\r\n")


# --------------------------------------------------------------------------------------------------------------
# Output directory and typed tables
# --------------------------------------------------------------------------------------------------------------


def prepare_out_dir(out_dir: str | Path, src: Path | None = None, importer: str = "") -> Path:
    """Claim and create RAW_DIR (see `pipelines.outdirs.prepare_raw_dir`): it may not overlap the source `src`, and
    must be new, empty, or a raw directory written before (source.json); only the names in `OWNED_OUTPUTS` are
    replaced. Until `finish_import` ends the import, source.json marks the directory incomplete."""
    return prepare_raw_dir(out_dir, f"ctr import {importer}".strip(), {"import source": src})


def tmp_dir(out: Path) -> Path:
    """A scratch folder inside RAW_DIR, removed by `cleanup_tmp`."""
    t = out / ".import_tmp"
    t.mkdir(parents=True, exist_ok=True)
    return t


def cleanup_tmp(out: Path) -> None:
    shutil.rmtree(out / ".import_tmp", ignore_errors=True)


def raw_schema(
    table: str,
    *,
    btype: bool = False,
    extra_int64: Sequence[str] = (),
    mm_emb_dim: int | None = None,
    mm_emb_value_type: pa.DataType = _FLOAT32,
) -> pa.Schema:
    """The exact Arrow schema of a raw table: required columns, then btype, extra int64 columns, then mm_emb."""
    spec = RAW_SPECS[table]
    fields = [pa.field(name, typ, nullable=False) for name, typ in spec.required.items()]
    if btype:
        fields.append(pa.field("btype", spec.optional["btype"]))
    if extra_int64:
        if not spec.extra_int64_allowed:
            raise ValueError(f"raw table {table!r} takes no extra columns (got {list(extra_int64)})")
        fields.extend(pa.field(name, pa.int64()) for name in extra_int64)
    if mm_emb_dim is not None:
        if table != "items":
            raise ValueError("mm_emb belongs to the items table")
        if mm_emb_value_type not in MM_EMB_VALUE_TYPES:
            raise ValueError(f"mm_emb values must be one of {MM_EMB_VALUE_TYPES}, got {mm_emb_value_type}")
        fields.append(pa.field(MM_EMB_COLUMN, mm_emb_type(mm_emb_dim, mm_emb_value_type)))
    return pa.schema(fields)


def to_raw_table(data: pl.DataFrame | pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `data` to exactly `schema` (column order and types); raises on a lossy cast or a null id."""
    table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"internal: column {f.name!r} missing when writing {schema.names}")
        col = table.column(f.name)
        if col.type != f.type or str(col.type) != str(f.type):  # str: list field names count too
            col = col.cast(f.type, safe=True)
        if not f.nullable and col.null_count:
            raise ValueError(f"internal: column {f.name!r} has {col.null_count} nulls")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def write_raw_table(data: pl.DataFrame | pa.Table, path: Path, schema: pa.Schema) -> int:
    """Write one raw table with its exact schema; returns the number of rows."""
    table = to_raw_table(data, schema)
    pq.write_table(table, path, compression=PARQUET_COMPRESSION)
    return table.num_rows


class RawTableWriter:
    """Streams batches of one raw table into a single Parquet file with the exact schema."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.rows = 0
        self._writer = pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION)

    def write(self, data: pl.DataFrame | pa.Table) -> None:
        table = to_raw_table(data, self.schema)
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> RawTableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# Rejected input rows
# --------------------------------------------------------------------------------------------------------------

REJECT_COLUMNS = {"source_file": pl.String, "source_row": pl.Int64, "reason": pl.String, "raw": pl.String}


@dataclass
class Rejects:
    """Input rows an importer could not parse: never dropped silently, written to `import_rejects.csv`."""

    out: Path
    frames: list[pl.DataFrame] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # CSVs already written by streaming sinks (same columns)

    def add(self, source_file: str, source_row: int, reason: str, raw: str) -> None:
        self.frames.append(
            pl.DataFrame(
                {"source_file": [source_file], "source_row": [source_row], "reason": [reason], "raw": [raw]},
                schema=REJECT_COLUMNS,
            )
        )

    def add_frame(self, df: pl.DataFrame) -> None:
        if df.height:
            self.frames.append(df.select(pl.col(c).cast(t) for c, t in REJECT_COLUMNS.items()))

    def add_file(self, path: Path) -> None:
        self.files.append(path)

    def collect(self) -> pl.DataFrame:
        parts = list(self.frames)
        for f in self.files:
            if f.exists() and f.stat().st_size:
                parts.append(pl.read_csv(f, schema=REJECT_COLUMNS))
        if not parts:
            return pl.DataFrame(schema=REJECT_COLUMNS)
        return pl.concat(parts, how="vertical")

    def finish(self) -> dict[str, Any]:
        """Write `import_rejects.csv` when there is anything to write; the summary block of the rejects."""
        df = self.collect()
        path = self.out / REJECTS_FILE
        if df.height:
            df.write_csv(path)
            reasons = df.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
            by_reason = {r: int(n) for r, n in reasons.iter_rows()}
            log.warning("%d input rows rejected, written to %s: %s", df.height, path, by_reason)
        else:
            by_reason = {}
        return {"count": int(df.height), "reasons": by_reason, "file": REJECTS_FILE if df.height else None}


def parse_columns(
    df: pl.DataFrame,
    types: dict[str, pl.DataType],
    *,
    source_file: str,
    first_row: int,
    checks: Sequence[tuple[pl.Expr, str]] = (),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast string columns to `types`; rows where a cast fails (or a value is missing) are rejected.

    `df` holds strings as read. `first_row` is the source row number of df's first row (e.g. 2 for a CSV with a
    header), so `source_row` is the file's line number. `checks` are (expression that is True when the parsed row is
    bad, reason) applied after the casts, in order. Returns (parsed rows with the other columns untouched, rejects in
    the `import_rejects.csv` layout).
    """
    raw_cols = list(df.columns)
    df = df.with_row_index("_row", offset=first_row)
    reason: pl.Expr = pl.lit(None, dtype=pl.String)
    casts = {}
    for col, typ in reversed(list(types.items())):
        casted = pl.col(col).str.strip_chars().cast(typ, strict=False)
        casts[col] = casted
        reason = (
            pl.when(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""))
            .then(pl.lit(f"missing {col}"))
            .when(casted.is_null())
            .then(pl.format("unparsable {}: '{}'", pl.lit(col), pl.col(col)))
            .otherwise(reason)
        )
    raw = pl.concat_str([pl.col(c).fill_null("") for c in raw_cols], separator=",")
    df = df.with_columns(reason.alias("_reason"), raw.alias("_raw"))
    parsed = df.with_columns(**{c: e for c, e in casts.items()})
    for bad, why in checks:
        parsed = parsed.with_columns(
            pl.when(pl.col("_reason").is_null() & bad.fill_null(False))
            .then(pl.lit(why))
            .otherwise(pl.col("_reason"))
            .alias("_reason")
        )
    rejects = parsed.filter(pl.col("_reason").is_not_null()).select(
        pl.lit(source_file).alias("source_file"),
        pl.col("_row").cast(pl.Int64).alias("source_row"),
        pl.col("_reason").alias("reason"),
        pl.col("_raw").alias("raw"),
    )
    good = parsed.filter(pl.col("_reason").is_null()).drop("_row", "_reason", "_raw")
    return good, rejects


# --------------------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------------------


def stable_id(value: str) -> int:
    """Stable int64 id of a string: the first 8 bytes of BLAKE2b(utf-8), little-endian, masked to 63 bits (>= 0)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ID_MASK_63


def stable_ids(values: pl.Series, space: str) -> tuple[pl.Series, pl.DataFrame]:
    """Map a string column to stable int64 ids (`stable_id`); also the (space, raw, id) map of its distinct values.

    Raises if two distinct strings of the space hash to the same id (probability ~ n^2 / 2^64).
    """
    uniq = values.drop_nulls().unique().sort()
    ids = pl.Series("id", [stable_id(v) for v in uniq.to_list()], dtype=pl.Int64)
    mapping = pl.DataFrame({"space": pl.Series([space] * len(uniq), dtype=pl.String), "raw": uniq, "id": ids})
    if mapping["id"].n_unique() != mapping.height:
        dup = mapping.filter(pl.col("id").is_duplicated()).head(4).to_dicts()
        raise ValueError(f"stable id collision in space {space!r}: {dup}")
    mapped = values.to_frame("raw").join(mapping.select("raw", "id"), on="raw", how="left", maintain_order="left")
    return mapped["id"], mapping


def code_map(values: Iterable[str], start: int = 1) -> dict[str, int]:
    """Sorted distinct strings -> consecutive int codes from `start` (0 is left for unknown/none)."""
    return {v: i for i, v in enumerate(sorted(set(values)), start=start)}


# --------------------------------------------------------------------------------------------------------------
# Items from (item, category) observations
# --------------------------------------------------------------------------------------------------------------


def resolve_item_cates(pairs: pl.LazyFrame | pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """One category per item from (item_id, cate_id[, n]) observations: the most frequent, ties the smallest.

    Returns (items frame item_id, cate_id sorted by item_id; number of items seen with more than one category).
    """
    lf = pairs.lazy()
    if "n" not in lf.collect_schema().names():
        lf = lf.group_by("item_id", "cate_id").len("n")
    else:
        lf = lf.group_by("item_id", "cate_id").agg(pl.col("n").sum())
    counts = lf.collect(engine="streaming")
    conflicts = int(counts.group_by("item_id").len().filter(pl.col("len") > 1).height)
    items = (
        counts.sort(["item_id", "n", "cate_id"], descending=[False, True, False])
        .unique(subset="item_id", keep="first", maintain_order=True)
        .select("item_id", "cate_id")
    )
    return items, conflicts


def count_distinct_users(out: Path) -> int:
    """Distinct user ids over behaviors and impressions as written."""
    frames = [pl.scan_parquet(out / f"{t}.parquet").select("user_id") for t in ("behaviors", "impressions")]
    return int(pl.concat(frames).select(pl.col("user_id").n_unique()).collect(engine="streaming").item())


def finish_import(
    out: Path,
    *,
    importer: str,
    src: Path,
    protocol: str,
    options: dict[str, Any],
    rows: dict[str, int],
    rejects: Rejects,
    extra: dict[str, Any] | None = None,
    recommended_split: dict[str, Any] | None = None,
    source_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `source.json`; return the summary (rows per table, users, items, rejected rows, importer extras).

    `source_extra` adds keys to source.json only (e.g. the code tables of string attributes).
    """
    summary: dict[str, Any] = {
        "importer": importer,
        "out_dir": str(out),
        "rows": dict(rows),
        "users": count_distinct_users(out),
        "items": int(rows.get("items", 0)),
        "rejected": rejects.finish(),
    }
    if extra:
        summary.update(extra)
    source = {
        "schema_version": SCHEMA_VERSION,
        "importer": importer,
        "source": str(src),
        "protocol": " ".join(protocol.split()),
        "options": options,
        "counts": {k: v for k, v in summary.items() if k not in ("importer", "out_dir")},
        "recommended_split": recommended_split,
        **(source_extra or {}),
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=False, default=_json_default) + "\n")
    cleanup_tmp(out)
    log.info("ctr import %s: %s", importer, summary)
    return summary


def _json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
