"""The readable reference of the reduce side of `ctr build` (`pipelines.partition.reduce_partition`): the same
outputs, one user and one row at a time, as the rules are written. Tests compare the two; nothing else calls it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from features.schema import FIRST_IDX, idx_column
from pipelines.rows import SOURCE_ROW_BITS
from pipelines.validate import R_DUP_BEHAVIOR, R_DUP_IMPRESSION
from pipelines.vocab import ItemLookup


def reference_partition(
    beh: pa.Table, imp: pa.Table, items: ItemLookup, context_vocabs: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Per user (ascending user_id): behaviors in (ts, input order), a behavior equal to an earlier one on
    (ts, item, btype) is a duplicate; impressions likewise on (ts, item); an impression's hist_len is the number of
    the user's kept behaviors with ts strictly before its ts."""
    b_rows = sorted(beh.to_pylist(), key=lambda r: r["source"])  # input order: (file, row)
    i_rows = sorted(imp.to_pylist(), key=lambda r: r["source"])
    for r in b_rows + i_rows:
        r["cate_idx"] = int(items.cate_of_item[r["item_idx"]])
        r["item_id"] = int(items.vocab[r["item_idx"] - FIRST_IDX])
        r["source_file"], r["source_row"] = r["source"] >> SOURCE_ROW_BITS, r["source"] & ((1 << SOURCE_ROW_BITS) - 1)
    users = sorted({r["user_id"] for r in b_rows} | {r["user_id"] for r in i_rows})
    has_btype = "btype" in beh.column_names
    seqs: dict[str, list] = {"user_id": [], "item_idx": [], "cate_idx": [], "ts": []} | (
        {"btype": []} if has_btype else {}
    )
    samples: dict[str, list] = {k: [] for k in ("user_local", "item_idx", "cate_idx", "ts", "label", "hist_len")}
    if "p_true" in imp.column_names:
        samples["p_true"] = []
    for col in context_vocabs:
        samples[idx_column(col)] = []
    dups: dict[str, list] = {"behaviors": [], "impressions": []}
    for local, user in enumerate(users):
        seq, seen = [], set()
        for r in sorted((r for r in b_rows if r["user_id"] == user), key=lambda r: r["ts"]):  # stable: input order
            key = (r["ts"], r["item_idx"], (r["btype"] or 0) if has_btype else 0)
            if key in seen:
                dups["behaviors"].append(r)
            else:
                seen.add(key)
                seq.append(r)
        seqs["user_id"].append(user)
        seqs["item_idx"].append([r["item_idx"] for r in seq])
        seqs["cate_idx"].append([r["cate_idx"] for r in seq])
        seqs["ts"].append([r["ts"] for r in seq])
        if has_btype:
            seqs["btype"].append([r["btype"] or 0 for r in seq])
        seen = set()
        for r in sorted((r for r in i_rows if r["user_id"] == user), key=lambda r: r["ts"]):
            if (r["ts"], r["item_idx"]) in seen:
                dups["impressions"].append(r)
                continue
            seen.add((r["ts"], r["item_idx"]))
            samples["user_local"].append(local)
            for k in ("item_idx", "cate_idx", "ts", "label"):
                samples[k].append(r[k])
            samples["hist_len"].append(sum(1 for b in seq if b["ts"] < r["ts"]))
            if "p_true" in samples:
                samples["p_true"].append(r["p_true"])
            for col, vocab in context_vocabs.items():
                v = r[col]
                pos = int(np.searchsorted(vocab, v)) if v is not None else 0
                known = v is not None and pos < len(vocab) and vocab[pos] == v
                samples[idx_column(col)].append(0 if v is None else (pos + 2 if known else 1))
    duplicates = {}
    for name, reason in (("behaviors", R_DUP_BEHAVIOR), ("impressions", R_DUP_IMPRESSION)):
        if dups[name]:
            duplicates[name] = pa.table(
                {
                    "user_id": [r["user_id"] for r in dups[name]],
                    "item_id": [r["item_id"] for r in dups[name]],
                    "ts": [r["ts"] for r in dups[name]],
                    "reason": [reason] * len(dups[name]),
                    "source_file": pa.array([r["source_file"] for r in dups[name]], pa.int32()),
                    "source_row": [r["source_row"] for r in dups[name]],
                }
            )
    return {"sequences": seqs, "samples": samples, "duplicates": duplicates}
