"""benchmarks/peers.py's conversion to FuxiCTR's LongCTR input, checked against our sequence store on the tiny world.

No FuxiCTR here: the collator's view of a sample is `benchmarks.peers_convert.longctr_window` (FuxiCTR's
`BatchCollator.padding_seqs` without the padding: `full_item_seq[:seq_len]`, the last max_len of it)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from benchmarks.peers_convert import SPLITS, convert_dataset, longctr_window
from features.sequence_store import SequenceStore


def test_longctr_input_matches_the_sequence_store(tiny_data, tmp_path):
    conv = convert_dataset(tiny_data, tmp_path / "longctr")
    manifest_vocab = conv["vocab_sizes"]

    items = pq.read_table(conv["item_info"]).to_pydict()
    # the collator looks item_info up by position and pads sequences with 0: row i is item i, row 0 is padding
    assert items["item_index"] == list(range(manifest_vocab["item"]))
    assert items["item_id"][0] == 0 and items["cate_id"][0] == 0
    cate_of = np.asarray(items["cate_id"])

    users = pq.read_table(conv["user_info"])
    assert users["user_index"].to_pylist() == list(range(users.num_rows))  # row u is user u
    full = users["full_item_seq"].to_pylist()

    store = SequenceStore.open(tiny_data, cache_dir=tmp_path / "store")
    assert [len(s) for s in full] == list(np.diff(store.offsets))
    for split in SPLITS:
        ours = pq.read_table(tiny_data / "samples" / split)
        theirs = pq.read_table(conv[split])
        assert theirs.num_rows == ours.num_rows == conv["rows"][split]
        u, h, ts = ours["user_idx"].to_numpy(), ours["hist_len"].to_numpy(), ours["ts"].to_numpy()
        np.testing.assert_array_equal(theirs["user_index"].to_numpy(), u)
        np.testing.assert_array_equal(theirs["item_index"].to_numpy(), ours["item_idx"].to_numpy())
        np.testing.assert_array_equal(theirs["seq_len"].to_numpy(), h)
        np.testing.assert_array_equal(theirs["label"].to_numpy(), ours["label"].to_numpy())
        for c in conv["context_columns"]:
            np.testing.assert_array_equal(theirs[c].to_numpy(), ours[c].to_numpy())
        # the target's item features through item_info are the sample's own
        np.testing.assert_array_equal(cate_of[theirs["item_index"].to_numpy()], ours["cate_idx"].to_numpy())

        for max_len in (1, 50):
            for i in range(ours.num_rows):
                end = store.offsets[u[i]] + h[i]
                start = max(store.offsets[u[i]], end - max_len)
                assert longctr_window(full[u[i]], h[i], max_len) == store.item_idx[start:end].tolist()
                # strictly before the sample: every fed behavior earlier, the next one (if any) not
                assert (store.ts[start:end] < ts[i]).all()
                assert end == store.offsets[u[i] + 1] or store.ts[end] >= ts[i]
