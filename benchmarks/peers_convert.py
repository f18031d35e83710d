"""benchmarks/peers.py's conversion of a dataset directory of ours into FuxiCTR 2.3.10's LongCTR input (user_info,
item_info, train / valid / test samples), and what its collator reads for one sample. numpy / pyarrow only:
importable and testable without FuxiCTR (tests/test_peers_convert.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SPLITS = ("train", "valid", "test")


def _manifest(data: Path) -> dict[str, Any]:
    return json.loads((Path(data) / "manifest.json").read_text())


def user_info_table(data: Path) -> pa.Table:
    """FuxiCTR's `user_info`: row u is user u (the collator looks users up by position), `full_item_seq` = every
    behavior of the user, item indices in sequence order; users without behaviors (padding, OOV) get an empty list."""
    n_users = int(_manifest(data)["vocab_sizes"]["user"])
    seqs = pq.read_table(Path(data) / "sequences", columns=["user_idx", "item_idx"])
    seqs = seqs.take(pc.sort_indices(seqs["user_idx"]))
    users = seqs["user_idx"].to_numpy()
    lengths = np.zeros(n_users, dtype=np.int64)
    lengths[users] = pc.list_value_length(seqs["item_idx"]).to_numpy(zero_copy_only=False)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{data}: {offsets[-1]} behaviors do not fit a list<int32> column")
    values = pc.list_flatten(seqs["item_idx"].combine_chunks()).cast(pa.int32())
    full = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.table({"user_index": pa.array(np.arange(n_users, dtype=np.int32)), "full_item_seq": full})


def item_info_table(data: Path) -> pa.Table:
    """FuxiCTR's `item_info`: row i is item i (positional lookup: the padded sequence positions hold 0, so row 0 must
    be padding), with the features our models embed for an item: item_id (= item_idx) and cate_id (= cate_idx).
    Rows absent from items.parquet (0 = padding, 1 = OOV) get item_id = index and cate_id 0."""
    n_items = int(_manifest(data)["vocab_sizes"]["item"])
    items = pq.read_table(Path(data) / "items.parquet", columns=["item_idx", "cate_idx"])
    cate = np.zeros(n_items, dtype=np.int32)
    cate[items["item_idx"].to_numpy()] = items["cate_idx"].to_numpy()
    index = np.arange(n_items, dtype=np.int32)
    return pa.table({"item_index": index, "item_id": index, "cate_id": cate})


def samples_table(data: Path, split: str, context_columns: list[str]) -> pa.Table:
    """One split as FuxiCTR's LongCTR samples: user_index, item_index, seq_len (= hist_len: the behaviors strictly
    before the sample), the context columns, label. All integers: the loader stacks every column into one array, and
    a float label would turn user_index into a float that can no longer index user_info."""
    t = pq.read_table(
        Path(data) / "samples" / split, columns=["user_idx", "item_idx", "hist_len", *context_columns, "label"]
    )
    cols = {
        "user_index": t["user_idx"].cast(pa.int32()),
        "item_index": t["item_idx"].cast(pa.int32()),
        "seq_len": t["hist_len"].cast(pa.int32()),
        **{c: t[c].cast(pa.int32()) for c in context_columns},
        "label": t["label"].cast(pa.int8()),
    }
    return pa.table(cols)


def convert_dataset(data: Path, out: Path) -> dict[str, Any]:
    """Write DATA's LongCTR form into `out` (user_info, item_info, train/valid/test .parquet); returns their paths,
    the vocabulary sizes and the context columns the configs need."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(data)
    context = list(manifest.get("context_columns", []))
    paths: dict[str, Any] = {"user_info": str(out / "user_info.parquet"), "item_info": str(out / "item_info.parquet")}
    pq.write_table(user_info_table(data), paths["user_info"])
    pq.write_table(item_info_table(data), paths["item_info"])
    rows = {}
    for split in SPLITS:
        if not (data / "samples" / split).is_dir():
            continue
        t = samples_table(data, split, context)
        paths[split] = str(out / f"{split}.parquet")
        pq.write_table(t, paths[split])
        rows[split] = t.num_rows
    vocab = manifest["vocab_sizes"]
    return {
        **paths,
        "rows": rows,
        "context_columns": context,
        "vocab_sizes": {
            "item": int(vocab["item"]),
            "cate": int(vocab["cate"]),
            **{c: int(vocab[c.removesuffix("_idx")]) for c in context},
        },  # fmt: skip
    }


def longctr_window(full_item_seq: Any, seq_len: int, max_len: int) -> list[int]:
    """What FuxiCTR's LongCTR collator feeds for one sample, before padding (`BatchCollator.padding_seqs`:
    `seq[:seq_len]`, then `pad_sequences(truncating="pre")` keeps the last max_len)."""
    seq = list(full_item_seq)[: int(seq_len)]
    return seq[-max_len:] if max_len > 0 else []
