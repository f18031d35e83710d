"""The loader: point-in-time slices of the sequence store, determinism, rank/worker sharding, nothing lost."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from features.loader import (
    DatasetInfo,
    LoaderConfig,
    SampleStream,
    SequenceView,
    SplitLoader,
    ragged_ranges,
    sparse_feature_names,
)
from features.sequence_store import SequenceStore

VIEWS = (SequenceView("hist", 20, negatives=True), SequenceView("long", 100_000))


def _keys(batches) -> list[tuple[int, int, int]]:
    return [
        (int(u), int(i), int(t))
        for b in batches
        for u, i, t in zip(b.dense["user_idx"], b.dense["item_idx"], b.dense["ts"], strict=True)
    ]


def _loader(data, split="train", **kw) -> SplitLoader:
    info = DatasetInfo.load(data)
    rank = kw.pop("rank", 0)
    world = kw.pop("world_size", 1)
    cfg = LoaderConfig(**{"batch_size": 64, "views": VIEWS, **kw})
    return SplitLoader(info, split, cfg, sparse_feature_names(VIEWS, info.context_columns), rank, world)


def test_ragged_ranges():
    got = ragged_ranges(np.array([5, 0, 10]), np.array([2, 0, 3]))
    assert got.tolist() == [5, 6, 10, 11, 12]
    assert ragged_ranges(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).size == 0


def test_sequence_store_matches_parquet(tiny_data):
    store = SequenceStore.open(tiny_data)
    for f in sorted((tiny_data / "sequences").glob("*.parquet"))[:2]:
        t = pq.read_table(f).to_pylist()
        for row in t[:50]:
            u = row["user_idx"]
            s, e = store.offsets[u], store.offsets[u + 1]
            assert store.item_idx[s:e].tolist() == row["item_idx"]
            assert store.ts[s:e].tolist() == row["ts"]
    # a second open reuses the cache
    again = SequenceStore.open(tiny_data)
    assert again.n_behaviors == store.n_behaviors


def test_views_are_exact_strictly_before_prefixes(tiny_data):
    """Each view is exactly the last L behaviors with ts < the sample's ts, oldest first (brute force from Parquet)."""
    seqs = {}
    for f in (tiny_data / "sequences").glob("*.parquet"):
        for row in pq.read_table(f).to_pylist():
            seqs[row["user_idx"]] = row
    batch = next(iter(_loader(tiny_data, "test", batch_size=400)))
    hist = batch.sparse["hist_item"]
    long = batch.sparse["long_item"]
    h_off = np.concatenate([[0], np.cumsum(hist.lengths().numpy())])
    l_off = np.concatenate([[0], np.cumsum(long.lengths().numpy())])
    gaps = batch.dense["long_ts_gap"].numpy()
    assert (gaps > 0).all() and (batch.dense["hist_ts_gap"].numpy() > 0).all()
    for j in range(batch.size):
        u, ts = int(batch.dense["user_idx"][j]), int(batch.dense["ts"][j])
        row = seqs.get(u, {"item_idx": [], "ts": []})
        before = [i for i, t in zip(row["item_idx"], row["ts"], strict=True) if t < ts]
        assert int(batch.dense["hist_len"][j]) == len(before)
        assert long.values()[l_off[j] : l_off[j + 1]].tolist() == before
        assert hist.values()[h_off[j] : h_off[j + 1]].tolist() == before[-20:]
        assert int(batch.dense["hist_lengths"][j]) == min(20, len(before))


def test_negatives_differ_from_positives(tiny_data):
    b = next(iter(_loader(tiny_data, batch_size=256, shuffle=True)))
    pos, neg = b.sparse["hist_item"].values(), b.sparse["hist_neg_item"].values()
    assert pos.shape == neg.shape and bool((pos != neg).all()) and int(neg.min()) >= 2


def test_eval_order_reads_every_sample_once(tiny_data):
    info = DatasetInfo.load(tiny_data)
    keys = _keys(_loader(tiny_data, "valid"))
    assert len(keys) == info.split_rows["valid"]
    cols = pq.read_table(tiny_data / "samples" / "valid", columns=["user_idx", "item_idx", "ts"])
    expected = Counter(zip(*(cols[c].to_pylist() for c in ("user_idx", "item_idx", "ts")), strict=True))
    assert Counter(keys) == expected


def test_shuffle_is_deterministic_under_a_seed(tiny_data):
    a = _keys(_loader(tiny_data, shuffle=True, seed=3))
    b = _keys(_loader(tiny_data, shuffle=True, seed=3))
    c = _keys(_loader(tiny_data, shuffle=True, seed=4))
    assert a == b
    assert a != c and Counter(a) == Counter(c)
    loader = _loader(tiny_data, shuffle=True, seed=3)
    loader.set_epoch(1)
    assert _keys(loader) != a  # a new epoch, a new order


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_partition_the_split(tiny_data, world):
    per_rank = [
        Counter(_keys(_loader(tiny_data, shuffle=True, seed=1, rank=r, world_size=world))) for r in range(world)
    ]
    total = sum(per_rank, Counter())
    assert total == Counter(_keys(_loader(tiny_data, shuffle=True, seed=1)))  # disjoint, and nothing lost
    assert all(per_rank)


def test_workers_keep_a_fixed_order(tiny_data):
    a = _keys(_loader(tiny_data, shuffle=True, seed=2, num_workers=2))
    b = _keys(_loader(tiny_data, shuffle=True, seed=2, num_workers=2))
    assert a == b
    assert Counter(a) == Counter(_keys(_loader(tiny_data, shuffle=True, seed=2)))


def test_drop_last_and_batch_sizes(tiny_data):
    sizes = [b.size for b in _loader(tiny_data, "valid", batch_size=100)]
    assert all(s == 100 for s in sizes[:-1]) and 0 < sizes[-1] <= 100
    stream = SampleStream(DatasetInfo.load(tiny_data), "valid", LoaderConfig(batch_size=100, drop_last=True))
    assert all(len(b["label"]) == 100 for b in stream)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        DatasetInfo.load(tmp_path)
