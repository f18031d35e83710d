"""The Taobao-MM release's files and columns as the importer reads them (`pipelines.importers.taobao_mm`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.importers._common import ImportSourceError

USER = "129_1"
ITEM = "205"
HIST_ITEMS = "150_2_180"
HIST_CATES = "151_2_180"
USER_ATTRS = ("130_1", "130_2", "130_3", "130_4", "130_5")
ITEM_ATTRS = ("213", "214")
EMB = "205_c"


def attr_name(col: str) -> str:
    return f"user_attr_{col.split('_')[1]}" if col.startswith("130_") else f"attr_{col}"


def find_files(src: Path, stem: str, required: bool) -> list[Path]:
    d = src / stem
    if d.is_dir():
        files = sorted(d.glob("*.parquet"))
    else:
        files = sorted(p for p in src.glob(f"{stem}*.parquet") if p.name[len(stem)] == ".")
    if required and not files:
        raise ImportSourceError(
            f"{src}: {stem}.parquet not found (also looked for {stem}.full.parquet, {stem}.part_*.parquet and "
            f"{stem}/*.parquet). A Taobao-MM folder holds train_samples, test_samples, train_user_features, "
            "test_user_features and item_features (+ scl_embedding_int8_p90); download it from "
            "huggingface.co/datasets/TaoBao-MM/Taobao-MM or pass the folder that holds those files."
        )
    return files


def column_names(files: list[Path]) -> list[str]:
    return pq.read_schema(files[0]).names


def read_columns(files: list[Path], columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def iter_batches(files: list[Path], columns: list[str], batch_rows: int):  # noqa: ANN202 - generator of (file, row0, batch)
    for f in files:
        row0 = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            yield f, row0, batch
            row0 += batch.num_rows


def list_overlap(train: np.ndarray, test: np.ndarray) -> int:
    """Largest k with train[-k:] == test[:k] (0 when none)."""
    if len(train) == 0 or len(test) == 0:
        return 0
    candidates = np.flatnonzero(test[: len(train)] == train[-1])[::-1]  # k - 1 for each candidate k
    for j in candidates:
        k = int(j) + 1
        if np.array_equal(train[len(train) - k :], test[:k]):
            return k
    return 0


def user_attributes(files: list[Path], attrs: list[str]) -> tuple[pl.DataFrame, np.ndarray]:
    """(one row per user: user_id + user_attr_*, first-occurrence mask over the file rows)."""
    t = pl.from_arrow(read_columns(files, [USER, *attrs]))
    assert isinstance(t, pl.DataFrame)
    first = t[USER].is_first_distinct().to_numpy() & t[USER].is_not_null().to_numpy()
    df = (
        t.filter(pl.Series(first))
        .rename({USER: "user_id", **{a: attr_name(a) for a in attrs}})
        .with_columns(pl.col(attr_name(a)).fill_null(0) for a in attrs)
    )
    return df, first
