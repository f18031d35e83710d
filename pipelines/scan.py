"""Stage 1 of `ctr build`, the scan: file- and schema-level checks of a raw directory, from Parquet metadata only.

What is an error (the build stops with a message naming the file, column, what was expected and how to fix it): a
path that does not exist, a table with no files or no rows, a file that is not readable Parquet, a missing required
column, an unexpected column, a column of the wrong type (a float timestamp included), an embedding dimension that
differs between files, an extra (categorical) column whose name is not an identifier `[A-Za-z_][A-Za-z0-9_]*` (it
names a vocabulary file) or whose id space is taken (user, item, cate, or the same name as an extra column of the
other table), and a raw directory whose source.json says that the generate/import that wrote it did not finish.
Row-level problems are the business of the later stages (`pipelines.validate` holds their rules).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.outputs import IDENTIFIER
from features.schema import MM_EMB_COLUMN, MM_EMB_VALUE_TYPES, RAW_SPECS, RAW_TABLES, idx_column, vocab_space
from pipelines.outdirs import read_source
from pipelines.validate import data_error

RESERVED_SPACES = ("user", "item", "cate")  # the id spaces of the required id columns

_INTEGER_TYPES = (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32())


@dataclass
class RawFile:
    path: Path
    rows: int
    row_groups: list[int]  # rows per row group


@dataclass
class RawTable:
    """One raw table after the file- and schema-level checks."""

    name: str
    files: list[RawFile]
    required: list[str]
    optional: list[str]  # optional columns present
    extra_int64: list[str]  # extra categorical columns (item attributes, user/context columns)
    mm_emb_dim: int | None = None
    mm_emb_value_type: pa.DataType | None = None
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def columns(self) -> list[str]:
        return self.required + self.optional + self.extra_int64 + ([MM_EMB_COLUMN] if self.mm_emb_value_type else [])


def table_files(raw_dir: Path, name: str) -> list[Path]:
    """The Parquet files of table `name`: `RAW_DIR/name.parquet` or `RAW_DIR/name/**/*.parquet`, sorted."""
    single = raw_dir / f"{name}.parquet"
    folder = raw_dir / name
    if single.exists() and folder.exists():
        raise data_error(str(raw_dir), f"both {single.name} and {folder.name}/ exist", "keep only one of them")
    if single.exists():
        return [single]
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
        if not files:
            raise data_error(str(folder), "the folder holds no *.parquet files", f"write the {name} table there")
        return files
    raise data_error(
        str(raw_dir),
        f"no {name} table (expected {single.name} or a folder {folder.name}/ of Parquet files)",
        "point --raw at a raw directory written by `ctr generate` or `ctr import`, or add the table",
    )


def _check_type(path: Path, col: str, actual: pa.DataType, expected: pa.DataType) -> None:
    if actual == expected:
        return
    if pa.types.is_integer(expected) and actual in _INTEGER_TYPES:
        return  # lossless widening to int64 / narrowing of labels is checked by value
    hint = ""
    if pa.types.is_floating(actual) and col == "ts":
        hint = " (timestamps must be integer seconds since the epoch)"
    raise data_error(
        f"{path}, column {col!r}",
        f"expected {expected}, found {actual}{hint}",
        f"cast the column to {expected} before writing the file (e.g. polars `pl.col({col!r}).cast(pl.Int64)`)",
    )


def _check_mm_emb(path: Path, t: pa.DataType) -> tuple[int | None, pa.DataType]:
    if pa.types.is_fixed_size_list(t) and t.value_type in MM_EMB_VALUE_TYPES:
        return t.list_size, t.value_type
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
        pa.types.is_floating(t.value_type) or t.value_type == pa.int8()
    ):
        # A variable-length list is accepted: the dimension is checked per row (wrong ones are quarantined).
        value_type = pa.int8() if t.value_type == pa.int8() else pa.float32()
        return (t.list_size if pa.types.is_fixed_size_list(t) else None), value_type
    raise data_error(
        f"{path}, column {MM_EMB_COLUMN!r}",
        f"expected fixed_size_list<float32 or int8>[D], found {t}",
        "write the embedding as a fixed-size list of float32 (or int8), e.g. features.schema.mm_emb_type(D)",
    )


def _check_name(path: Path, col: str, table: str) -> None:
    """An extra integer column names a vocabulary file (vocab/<space>.parquet) and a dataset column (<space>_idx):
    it must be a plain identifier, so that no name from data becomes a path outside the dataset."""
    if not IDENTIFIER.match(col):
        raise data_error(
            f"{path}, column {col!r}",
            f"the {table} table's extra column name is not an identifier ([A-Za-z_][A-Za-z0-9_]*); it would become "
            "part of a file name (vocab/<name>.parquet)",
            "rename the column to letters, digits and underscores (not starting with a digit), e.g. "
            f"{_suggest_identifier(col)!r}",
        )


def _suggest_identifier(col: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", col).strip("_") or "attr"
    return s if not s[0].isdigit() else f"c_{s}"


def _check_spaces(tables: dict[str, RawTable]) -> None:
    """The extra columns of items (attributes) and impressions (context) each get their own vocabulary: their id
    spaces must differ from each other and from the built-in ones (user, item, cate)."""
    seen: dict[str, str] = {space: "built in" for space in RESERVED_SPACES}
    for name in ("items", "impressions"):
        t = tables[name]
        for col in t.extra_int64:
            space = vocab_space(col)
            where = f"{name} column {col!r}"
            if space in seen:
                raise data_error(
                    f"{t.files[0].path}, column {col!r}",
                    f"its id space {space!r} (vocab/{space}.parquet, column {idx_column(col)}) is also that of "
                    f"{'the ' + space + ' ids' if seen[space] == 'built in' else seen[space]}",
                    "rename one of the columns (an item attribute and an impression context column cannot share a "
                    "name, and user/item/cate are taken)",
                )
            seen[space] = where


def _read_schema(path: Path) -> tuple[pa.Schema, list[int]]:
    if path.stat().st_size == 0:
        raise data_error(str(path), "the file is empty (0 bytes)", "remove it or write the table again")
    try:
        meta = pq.ParquetFile(path).metadata
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise data_error(
            str(path), f"not a readable Parquet file ({exc})", "the file is truncated or corrupt: write it again"
        ) from None
    return schema, [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def scan_table(raw_dir: Path, name: str) -> RawTable:
    """Check every file of one raw table at the schema level and return its description."""
    spec = RAW_SPECS[name]
    files: list[RawFile] = []
    table: RawTable | None = None
    for path in table_files(raw_dir, name):
        schema, row_groups = _read_schema(path)
        names = schema.names
        missing = [c for c in spec.required if c not in names]
        if missing:
            raise data_error(
                str(path),
                f"missing required column(s) {missing} of the {name} table (found {names})",
                f"the {name} table needs {list(spec.required)}; rename or add the columns",
            )
        for col, expected in spec.required.items():
            _check_type(path, col, schema.field(col).type, expected)
        optional, extra, dim, value_type = [], [], None, None
        for col in names:
            if col in spec.required:
                continue
            t = schema.field(col).type
            if col in spec.optional:
                if pa.types.is_floating(spec.optional[col]) and pa.types.is_floating(t):
                    pass
                else:
                    _check_type(path, col, t, spec.optional[col])
                optional.append(col)
            elif name == "items" and col == MM_EMB_COLUMN:
                dim, value_type = _check_mm_emb(path, t)
            elif spec.extra_int64_allowed and t in _INTEGER_TYPES:
                _check_name(path, col, name)
                extra.append(col)
            else:
                allowed = list(spec.required) + list(spec.optional)
                if spec.extra_int64_allowed:
                    allowed.append("<any integer column: categorical attribute>")
                if name == "items":
                    allowed.append(MM_EMB_COLUMN)
                raise data_error(
                    f"{path}, column {col!r}",
                    f"unexpected column of type {t} in the {name} table (allowed: {allowed})",
                    "drop the column, or encode it as an integer id column if it is a categorical feature",
                )
        if table is None:
            table = RawTable(name, [], list(spec.required), optional, extra, dim, value_type, schema)
        elif (optional, extra) != (table.optional, table.extra_int64):
            raise data_error(
                str(path),
                f"its columns {names} differ from those of {files[0].path.name} in the same table",
                "write every file of a table with the same columns",
            )
        elif value_type != table.mm_emb_value_type or (dim and table.mm_emb_dim and dim != table.mm_emb_dim):
            raise data_error(
                f"{path}, column {MM_EMB_COLUMN!r}",
                f"embedding type {value_type}[{dim}] differs from {table.mm_emb_value_type}[{table.mm_emb_dim}]"
                f" in {files[0].path.name}",
                "write every file with the same embedding dimension and type",
            )
        table.mm_emb_dim = table.mm_emb_dim or dim
        files.append(RawFile(path, sum(row_groups), row_groups))
    assert table is not None
    table.files = files
    if table.rows == 0:
        raise data_error(str(raw_dir / name), f"the {name} table has no rows", "check the export that wrote it")
    return table


def scan_raw(raw_dir: str | Path) -> dict[str, RawTable]:
    """Schema-level checks of a raw directory; raises DataError on the first problem."""
    raw_dir = Path(raw_dir)
    if not raw_dir.exists():
        raise data_error(str(raw_dir), "the raw directory does not exist", "check the path given to --raw")
    if not raw_dir.is_dir():
        raise data_error(str(raw_dir), "not a directory", "--raw takes the directory holding the raw tables")
    read_source(raw_dir)  # an unfinished generate/import is an error, not half a dataset
    tables = {name: scan_table(raw_dir, name) for name in RAW_TABLES}
    _check_spaces(tables)
    return tables


def iter_row_batches(path: Path, row_groups: list[int], columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
    """Yield (first row number in the file, table) for the given row groups of one file."""
    pf = pq.ParquetFile(path)
    starts = np.concatenate([[0], np.cumsum([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])])
    for rg in row_groups:
        try:
            tbl = pf.read_row_group(rg, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise data_error(
                f"{path}, row group {rg}", f"cannot be decoded ({exc})", "the file is corrupt: write it again"
            ) from None
        yield int(starts[rg]), tbl
