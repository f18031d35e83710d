"""Stage 2 of `ctr build`, the items: validate, dedup and index the item table on the driver (the catalog, not the
log: its size is that of the item vocabulary, which the driver holds anyway to map the logs' item ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.dataset import items_path, quarantine_dir
from features.schema import FIRST_IDX, MM_EMB_COLUMN, idx_column, mm_emb_type, vocab_space
from pipelines.scan import RawTable, iter_row_batches
from pipelines.validate import R_DUP_ITEM, data_error, quarantine_table, reason_counts, row_reasons, with_provenance
from pipelines.vocab import map_ids, map_nullable


def build_items(table: RawTable, out: Path) -> dict[str, Any]:
    """Validate, dedup and index the item table; write items.parquet and quarantine/items/.

    Returns the vocabularies (item, cate, one per attribute column), the row counts, the quarantine reasons, the
    embedding description and `cate_of_item` (cate idx by item idx, for the log rows)."""
    files = [str(f.path) for f in table.files]
    parts = []
    for file_idx, f in enumerate(table.files):
        for first_row, tbl in iter_row_batches(f.path, list(range(len(f.row_groups))), table.columns):
            parts.append(with_provenance(tbl, file_idx, first_row))
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
        qdir = quarantine_dir(out, "items")
        qdir.mkdir(parents=True, exist_ok=True)
        pq.write_table(quarantine_table(bad, reason.filter(pc.invert(good_mask)), files), qdir / "part-0.parquet")
    good = items.filter(good_mask)
    item_vocab = np.sort(np.asarray(good["item_id"]))
    cate_vocab = np.unique(np.asarray(good["cate_id"]))
    vocabs = {"item": item_vocab, "cate": cate_vocab}
    order = np.argsort(np.asarray(good["item_id"]), kind="stable")
    good = good.take(order)
    cate_idx = map_ids(cate_vocab, np.asarray(good["cate_id"]))[0]
    columns: dict[str, pa.Array] = {
        "item_idx": pa.array(np.arange(len(item_vocab), dtype=np.int32) + FIRST_IDX),
        "cate_idx": pa.array(cate_idx),
    }
    for col in table.extra_int64:
        values = good[col].combine_chunks()
        vocab = np.unique(np.asarray(values.drop_null(), dtype=np.int64))
        vocabs[vocab_space(col)] = vocab
        columns[idx_column(col)] = pa.array(map_nullable(vocab, values))
    mm_missing = 0
    if MM_EMB_COLUMN in good.column_names:
        value_type = table.mm_emb_value_type or pa.float32()
        emb = good[MM_EMB_COLUMN].combine_chunks()
        mm_missing = emb.null_count
        columns[MM_EMB_COLUMN] = emb.cast(mm_emb_type(dim, value_type))  # type: ignore[arg-type]
    pq.write_table(pa.table(columns), items_path(out))
    cate_of_item = np.zeros(len(item_vocab) + FIRST_IDX, np.int32)
    cate_of_item[FIRST_IDX:] = cate_idx
    return {
        "vocabs": vocabs,
        "cate_of_item": cate_of_item,
        "rows_in": items.num_rows,
        "rows_out": good.num_rows,
        "quarantine_reasons": reason_counts(reason),
        "mm_emb": {"dim": dim, "dtype": str(table.mm_emb_value_type), "missing": mm_missing} if dim else None,
        "attributes": [idx_column(c) for c in table.extra_int64],
    }
