"""The loader: point-in-time slices of the sequence store, determinism, rank/worker sharding, nothing lost."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from features.loader import (
    BatchCollator,
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


def test_a_view_read_as_the_tail_of_a_longer_one_is_the_view_read_alone(tiny_data):
    """A view no longer than one read before it is taken from that view's rows (not read from the store again): the
    same items, categories, gaps, types and lengths as the view read on its own, for a shorter view, one of the same
    length, and one with behavior types after a view without them (read from the store)."""
    info = DatasetInfo.load(tiny_data)
    views = (
        SequenceView("long", 30),
        SequenceView("short", 7),
        SequenceView("same", 30),
        SequenceView("typed", 5, btype=True),
        SequenceView("short_typed", 3, btype=True),
    )

    def batches(vs: tuple[SequenceView, ...]) -> list:
        cfg = LoaderConfig(batch_size=128, views=vs, shuffle=False)
        return list(SplitLoader(info, "train", cfg, sparse_feature_names(vs, info.context_columns)))

    together = batches(views)
    assert sum(b.size for b in together) > 500
    for v in views:
        alone = batches((v,))
        assert len(alone) == len(together)
        for a, b in zip(alone, together, strict=True):
            for f in (f"{v.name}_item", f"{v.name}_cate"):
                assert torch.equal(a.sparse[f].values(), b.sparse[f].values())
                assert torch.equal(a.sparse[f].lengths(), b.sparse[f].lengths())
            for k in a.dense:
                assert torch.equal(a.dense[k], b.dense[k]), (v.name, k)
    gaps = together[0].dense
    assert torch.equal(gaps["same_ts_gap"], gaps["long_ts_gap"]) and (gaps["short_ts_gap"] > 0).all()


def test_collator_lays_out_every_feature_as_given():
    """The collator writes each feature's ids (int32 or int64, read-only Parquet views too) into the one int64 buffer
    of the KeyedJaggedTensor, in `features` order, each with its lengths; a view's int64 gaps are taken as they are
    where torch can share them and copied where they are read-only."""
    views = (SequenceView("long", 10), SequenceView("short", 3))
    b = 3
    ro = np.array([7, 8, 9], dtype=np.int64)
    ro.flags.writeable = False  # as pyarrow's zero-copy columns arrive
    gap = np.arange(1, 7, dtype=np.int64)
    arrays = {
        "label": np.array([1, 0, 1], np.int8),
        "hist_len": np.array([2, 0, 4], np.int64),
        "ts": ro,
        "user_idx": ro,
        "item_idx": np.array([4, 5, 6], np.int32),
        "cate_idx": ro,
        "long_item": np.array([11, 12, 13, 14, 15, 16], np.int32),
        "long_cate": np.array([1, 2, 1, 2, 1, 2], np.int32),
        "long_lengths": np.array([2, 0, 4], np.int32),
        "long_ts_gap": gap,
        "short_item": np.array([11, 12, 14, 15, 16], np.int32),
        "short_cate": np.array([1, 2, 2, 1, 2], np.int32),
        "short_lengths": np.array([2, 0, 3], np.int32),
        "short_ts_gap": ro[[0, 1, 2, 0, 1]],
    }
    arrays["short_ts_gap"].flags.writeable = False
    names = sparse_feature_names(views, [])
    batch = BatchCollator(names, views)(arrays)
    kjt = batch.sparse
    assert kjt.keys() == names and kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
    for f in names:
        col = arrays[f] if f.startswith(("long", "short")) else arrays[f"{f}_idx"]
        n = arrays[f"{f.split('_')[0]}_lengths"] if f.startswith(("long", "short")) else np.ones(b, np.int32)
        assert kjt[f].values().tolist() == col.tolist(), f
        assert kjt[f].lengths().tolist() == n.tolist(), f
    assert np.shares_memory(batch.dense["long_ts_gap"].numpy(), gap)  # the loader's own array, not copied
    short_gap = batch.dense["short_ts_gap"]
    assert short_gap.tolist() == arrays["short_ts_gap"].tolist() and short_gap.numpy().flags.writeable


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


def _split_keys(data, split: str) -> Counter:
    cols = pq.read_table(data / "samples" / split, columns=["user_idx", "item_idx", "ts"])
    return Counter(zip(*(cols[c].to_pylist() for c in ("user_idx", "item_idx", "ts")), strict=True))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_partition_the_split_by_rows(tiny_data, world, workers):
    """Every train sample exactly once per epoch over W ranks (any W), ranks within one row of each other."""
    per_rank = [
        Counter(_keys(_loader(tiny_data, shuffle=True, seed=1, rank=r, world_size=world, num_workers=workers)))
        for r in range(world)
    ]
    assert sum(per_rank, Counter()) == _split_keys(tiny_data, "train")  # nothing lost, nothing twice
    assert all(max(c.values()) == 1 for c in per_rank)
    sizes = [c.total() for c in per_rank]
    assert max(sizes) - min(sizes) <= 1, sizes
    streams = [
        SampleStream(DatasetInfo.load(tiny_data), "train", LoaderConfig(shuffle=True, seed=1), rank=r, world_size=world)
        for r in range(world)
    ]
    assert [st.rank_rows() for st in streams] == sizes


def test_more_ranks_than_row_groups(tiny_data):
    info = DatasetInfo.load(tiny_data)
    n_units = len(SampleStream(info, "valid", LoaderConfig()).units)
    world = n_units + 3
    per_rank = [Counter(_keys(_loader(tiny_data, "valid", rank=r, world_size=world))) for r in range(world)]
    assert sum(per_rank, Counter()) == _split_keys(tiny_data, "valid")
    assert all(per_rank), "every rank gets rows when there are more ranks than row groups"


def test_behavior_budget_caps_padded_batches(tiny_data):
    """A batch never holds more than max_behaviors padded behaviors, and the budget loses or repeats nothing."""
    views = (SequenceView("long", 100_000),)
    info = DatasetInfo.load(tiny_data)
    features = sparse_feature_names(views, info.context_columns)
    budget = 4_000
    capped = SplitLoader(info, "valid", LoaderConfig(batch_size=256, views=views, max_behaviors=budget), features)
    sizes = []
    for b in capped:
        lengths = b.dense["long_lengths"].numpy()
        assert b.size == 1 or b.size * int(lengths.max()) <= budget
        sizes.append(b.size)
    assert Counter(_keys(capped)) == _split_keys(tiny_data, "valid")
    plain = [b.size for b in SplitLoader(info, "valid", LoaderConfig(batch_size=256, views=views), features)]
    assert len(sizes) > len(plain) and sum(sizes) == sum(plain)


def test_budget_cuts_are_greedy_and_exact():
    views = (SequenceView("long", 100), SequenceView("short", 10))
    info = DatasetInfo(
        data_dir=None,
        manifest={},
        vocab_sizes={"item": 10},
        context_columns=[],  # type: ignore[arg-type]
        item_attributes=[],
        split_rows={},
        has_p_true=False,
    )
    stream = SampleStream.__new__(SampleStream)
    stream.cfg = LoaderConfig(views=views, max_behaviors=330)
    stream.info = info
    hist = np.array([5, 200, 3, 1, 1, 1000, 0, 0])
    # widths: [5+5], then 100+10 per row once a 200 joins: rows 0-2 cost 3 x 110 = 330 fits, a 4th would not
    assert stream.budget_cuts(hist) == [3, 6, 8]
    stream.cfg = LoaderConfig(views=views, max_behaviors=50)
    assert stream.budget_cuts(hist) == [1, 2, 5, 6, 8]  # a row over the budget alone goes alone
    stream.cfg = LoaderConfig(views=views)
    assert stream.budget_cuts(hist) == [8]


def test_workers_keep_a_fixed_order(tiny_data):
    a = _keys(_loader(tiny_data, shuffle=True, seed=2, num_workers=2))
    b = _keys(_loader(tiny_data, shuffle=True, seed=2, num_workers=2))
    assert a == b
    assert Counter(a) == Counter(_keys(_loader(tiny_data, shuffle=True, seed=2)))


def test_one_worker_gives_the_batches_of_none(tiny_data):
    """The demo loads in its training process (`data.num_workers=0`): the batches, their order and DIEN's sampled
    negatives are those of one loader worker, value for value."""

    def content(workers: int) -> list[tuple]:
        out = []
        for b in _loader(tiny_data, shuffle=True, seed=5, num_workers=workers, sample_negatives=True):
            sparse = b.sparse.to_dict()
            out.append(
                tuple(sorted((k, v.numpy().tobytes()) for k, v in b.dense.items()))
                + tuple(sorted((k, jt.values().numpy().tobytes(), jt.lengths().numpy().tobytes())
                               for k, jt in sparse.items()))
            )  # fmt: skip
        return out

    inline = content(0)
    assert len(inline) > 1 and inline == content(1)


def test_loader_workers_default_rule():
    """`data.num_workers: null` (the default): in the training process with at most 2 cores per rank, one worker
    process otherwise; a number set is kept as it is."""
    from ctr.config import DataSection
    from features.loader import loader_workers

    assert DataSection().num_workers is None
    assert loader_workers(None, 1, cores=2) == 0
    assert loader_workers(None, 1, cores=1) == 0
    assert loader_workers(None, 1, cores=16) == 1
    assert loader_workers(None, 2, cores=4) == 0  # two ranks on four cores: two cores each
    assert loader_workers(None, 2, cores=8) == 1
    assert loader_workers(0, 1, cores=16) == 0 and loader_workers(3, 1, cores=2) == 3


def test_drop_last_and_batch_sizes(tiny_data):
    sizes = [b.size for b in _loader(tiny_data, "valid", batch_size=100)]
    assert all(s == 100 for s in sizes[:-1]) and 0 < sizes[-1] <= 100
    stream = SampleStream(DatasetInfo.load(tiny_data), "valid", LoaderConfig(batch_size=100, drop_last=True))
    assert all(len(b["label"]) == 100 for b in stream)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        DatasetInfo.load(tmp_path)


def test_a_batch_of_one_whale_trains():
    """The behavior budget can leave one sample in a batch: batch-norm layers (Dice, MLP) must accept it."""
    import torch

    from ctr.modules.mlp import MLP

    mlp = MLP(3, [5, 4], activation="dice", batch_norm=True)
    mlp.train()
    before = [b.clone() for b in mlp.buffers()]
    mlp(torch.randn(1, 3)).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.buffers(), strict=True))  # one value: no statistics
    mlp(torch.randn(8, 3)).sum().backward()
    assert not all(torch.equal(a, b) for a, b in zip(before, mlp.buffers(), strict=True))


_OPEN_STORE = """
import sys, time
from pathlib import Path
import features.sequence_store as ss
built = []
inner = ss._build_cache
def counting(*a, **k):
    built.append(1)
    time.sleep(1.0)  # hold the lock long enough for the other process to arrive
    return inner(*a, **k)
ss._build_cache = counting
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
store = ss.SequenceStore.open(sys.argv[1])
print(len(built), store.n_behaviors)
"""


def test_sequence_store_cache_is_built_once_by_two_processes(tiny_data, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("_cache", ".*lock"))
    go = tmp_path / "go"
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(data), str(go)], cwd=root, stdout=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    go.touch()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == [0, 1]  # one built it, the other found it built when it got the lock
    assert outs[0][1] == outs[1][1] == str(SequenceStore.open(tiny_data).n_behaviors)


def test_negatives_avoid_the_window_and_are_not_drawn_at_evaluation(tiny_data):
    """DIEN's sampled negatives: never one of the sample's window items; no draw (empty lists) at evaluation."""
    from features.dataset import DatasetInfo

    info = DatasetInfo.load(tiny_data)
    view = SequenceView("hist", 50, negatives=True)
    feats = ["hist_item", "hist_cate", "hist_neg_item", "hist_neg_cate"]
    train = SplitLoader(info, "train", LoaderConfig(batch_size=128, views=(view,), shuffle=True), feats)
    batch = next(iter(train))
    items = batch.sparse["hist_item"].values().numpy()
    neg = batch.sparse["hist_neg_item"].values().numpy()
    lengths = batch.dense["hist_lengths"].numpy()
    assert len(neg) == len(items) and (neg >= 2).all()
    start = 0
    for n in lengths:
        assert not set(neg[start : start + n]) & set(items[start : start + n])
        start += n
    evaluation = SplitLoader(info, "valid", LoaderConfig(batch_size=128, views=(view,), sample_negatives=False), feats)
    batch = next(iter(evaluation))
    assert batch.sparse["hist_neg_item"].values().numel() == 0 and batch.sparse["hist_item"].values().numel() > 0
