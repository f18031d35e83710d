"""Row-level rules of `ctr build`: what sends a row to quarantine, and the error type of bad input.

What goes to quarantine (the row is kept aside with a `reason`, and counted): null ids, null or negative
timestamps, null labels or labels outside {0, 1}, NaN/inf or wrong-dimension embeddings, duplicate item ids,
behaviors and impressions of items that are not in the item table, duplicate behavior/impression rows.
File- and schema-level problems are errors, raised by the scan (`pipelines.scan`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.errors import UserError
from features.schema import MM_EMB_COLUMN


class DataError(UserError, ValueError):
    """Bad input that cannot be quarantined row by row. The message says where, what was expected, how to fix."""


def data_error(where: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: {problem}. How to fix: {fix}")


# Reasons written in the `reason` column of quarantine files.
R_NULL = "null value in required column {col}"
R_NEGATIVE_TS = "negative timestamp"
R_LABEL = "label outside {0, 1}"
R_EMB_NONFINITE = "mm_emb contains NaN or inf"
R_EMB_DIM = "mm_emb has the wrong dimension"
R_DUP_ITEM = "duplicate item_id (an earlier row of the item table has it)"
R_UNKNOWN_ITEM = "item_id not in the item table (or the item's row was quarantined)"
R_DUP_BEHAVIOR = "duplicate behavior row (same user_id, item_id, ts, btype as an earlier row)"
R_DUP_IMPRESSION = "duplicate impression (same user_id, item_id, ts as an earlier row)"


def first_reason(conditions: list[tuple[pa.Array, str]], n: int) -> pa.Array:
    """Per row, the reason of the first true condition (null when every condition is false)."""
    reason = pa.nulls(n, pa.string())
    for cond, text in reversed(conditions):
        cond = pc.fill_null(cond, True)
        reason = pc.if_else(cond, pa.scalar(text), reason)
    return reason


def row_reasons(name: str, tbl: pa.Table, required: list[str], mm_emb_dim: int | None) -> pa.Array:
    """Row-level checks of one batch of raw table `name`."""
    conds: list[tuple[pa.Array, str]] = []
    for col in required:
        conds.append((tbl[col].is_null(), R_NULL.format(col=col)))
    if "ts" in tbl.column_names:
        conds.append((pc.less(tbl["ts"], 0), R_NEGATIVE_TS))
    if name == "impressions":
        conds.append((pc.invert(pc.is_in(tbl["label"], pa.array([0, 1], tbl["label"].type))), R_LABEL))
    if name == "items" and MM_EMB_COLUMN in tbl.column_names:
        emb = tbl[MM_EMB_COLUMN].combine_chunks()
        lengths = pc.list_value_length(emb)
        if mm_emb_dim is not None:
            conds.append((pc.and_kleene(emb.is_valid(), pc.not_equal(lengths, mm_emb_dim)), R_EMB_DIM))
        flat = pc.list_flatten(emb)
        if pa.types.is_floating(flat.type) and len(flat):
            bad_value = pc.invert(pc.is_finite(flat))
            parents = pc.list_parent_indices(emb)
            bad_rows = np.zeros(len(emb), dtype=bool)
            bad_rows[np.asarray(parents)[np.asarray(pc.fill_null(bad_value, True))]] = True
            conds.append((pa.array(bad_rows), R_EMB_NONFINITE))
    return first_reason(conds, tbl.num_rows)


def with_provenance(tbl: pa.Table, file_idx: int, first_row: int) -> pa.Table:
    """Append source_file (index into the table's file list) and source_row (row number in that file)."""
    n = tbl.num_rows
    tbl = tbl.append_column("source_file", pa.array(np.full(n, file_idx, np.int32)))
    return tbl.append_column("source_row", pa.array(np.arange(first_row, first_row + n, dtype=np.int64)))


def quarantine_table(tbl: pa.Table, reason: pa.Array, files: list[str]) -> pa.Table:
    """Rejected rows as written to quarantine/: the raw columns, then reason, source_file (path), source_row."""
    cols = [c for c in tbl.column_names if c not in ("source_file", "source_row")]
    paths = pa.array(files, pa.string()).take(tbl["source_file"])
    return pa.table(
        {**{c: tbl[c] for c in cols}, "reason": reason, "source_file": paths, "source_row": tbl["source_row"]}
    )


def reason_counts(reason: pa.Array) -> dict[str, int]:
    """{reason: rows} of the non-null reasons."""
    vc = pc.value_counts(reason.drop_null())
    return {r["values"].as_py(): r["counts"].as_py() for r in vc}
