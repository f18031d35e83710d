"""DIEN's sampled negatives: popularity-proportional over the training period's behaviors (the official code's draw
from its list of every review), or uniform over the catalog; never one of the sample's window items."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ctr.config import ConfigError, resolve_train_config
from ctr.models import get_model_class
from features.dataset import DatasetInfo, sequences_dir
from features.loader import BatchAssembler, SequenceView
from features.negatives import PopularityTable
from features.schema import FIRST_IDX
from features.sequence_store import SequenceStore


def _counts_from_parquet(info: DatasetInfo, before_ts: int | None) -> np.ndarray:
    """The reference: every stored behavior read back from the sequence files (not the store's cache), counted."""
    counts = np.zeros(info.vocab_sizes["item"], np.int64)
    for f in sorted(sequences_dir(info.data_dir).glob("*.parquet")):
        t = pq.read_table(f, columns=["item_idx", "ts"])
        item = pc.list_flatten(t["item_idx"]).to_numpy(zero_copy_only=False)
        ts = pc.list_flatten(t["ts"]).to_numpy(zero_copy_only=False)
        keep = ts < before_ts if before_ts is not None else np.ones(len(ts), bool)
        counts += np.bincount(item[keep], minlength=len(counts))
    return counts


def test_item_counts_are_the_behaviors_before_the_split_and_kept(tiny_data, tmp_path):
    info = DatasetInfo.load(tiny_data)
    n_items, before = info.vocab_sizes["item"], int(info.manifest["split"]["valid_start_ts"])
    store = SequenceStore.open(tiny_data, cache_dir=tmp_path / "store")
    assert store.n_behaviors > 3000  # several chunks below
    counts = store.item_counts(n_items, before, chunk=1000)
    want = _counts_from_parquet(info, before)
    np.testing.assert_array_equal(counts, want)
    assert 0 < counts.sum() < store.n_behaviors  # the validation and test periods' behaviors are left out
    every = store.item_counts(n_items, None, chunk=997)
    np.testing.assert_array_equal(every, _counts_from_parquet(info, None))
    assert every.sum() == store.n_behaviors
    # kept in the cache folder: a second reader (a loader worker, the next run) does not read the store again
    assert (tmp_path / "store" / f"item_counts-{before}.npy").exists()
    again = SequenceStore.open(tiny_data, cache_dir=tmp_path / "store")
    again.item_idx = again.ts = None  # type: ignore[assignment]  (reading them would fail)
    np.testing.assert_array_equal(again.item_counts(n_items, before), want)


def _window_batch(item_id: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """`samples` windows of one behavior each, all the same item."""
    return np.full(samples, item_id, np.int32), np.ones(samples, np.int64)


def test_popularity_negatives_follow_the_training_counts(tiny_data):
    info = DatasetInfo.load(tiny_data)
    view = SequenceView("hist", 50, negatives=True)
    assert view.negative_sampling == "popularity"  # the default: DIEN's official draw
    asm = BatchAssembler(info, (view,))
    counts = asm.store.item_counts(asm.n_items, int(info.manifest["split"]["valid_start_ts"])).astype(np.float64)
    counts[:FIRST_IDX] = 0
    top = int(np.argmax(counts))  # the window holds the most popular item: it must never be drawn
    item, lengths = _window_batch(top, 200_000)
    neg = asm.negatives(item, lengths, np.random.default_rng(0), "popularity")
    assert (neg != top).all() and (neg >= FIRST_IDX).all()
    assert counts[neg].min() > 0  # an item never seen in the training period is never a negative
    expected = counts.copy()
    expected[top] = 0
    expected /= expected.sum()
    seen = np.bincount(neg, minlength=len(counts)) / len(neg)
    tv = 0.5 * np.abs(seen - expected).sum()
    uniform = np.zeros(len(counts))
    uniform[FIRST_IDX:] = 1.0
    uniform[top] = 0
    uniform /= uniform.sum()
    # sampling noise of 200K draws over the tiny world's items, most of them on its popular ones, is a TV distance
    # of about 0.02; the uniform draw is far from the counts (Zipf popularity)
    assert tv < 0.03, tv
    assert 0.5 * np.abs(uniform - expected).sum() > 0.2
    # the most drawn items are the most popular ones
    assert set(np.argsort(-seen)[:5]) <= set(np.argsort(-expected)[:10])


def test_uniform_negatives_cover_the_catalog(tiny_data):
    info = DatasetInfo.load(tiny_data)
    asm = BatchAssembler(info, (SequenceView("hist", 50, negatives=True, negative_sampling="uniform"),))
    item, lengths = _window_batch(FIRST_IDX, 200_000)
    neg = asm.negatives(item, lengths, np.random.default_rng(0), "uniform")
    assert (neg != FIRST_IDX).all() and (neg >= FIRST_IDX).all() and (neg < asm.n_items).all()
    seen = np.bincount(neg, minlength=asm.n_items)[FIRST_IDX + 1 :] / len(neg)
    assert seen.min() > 0  # every other item drawn, popular or not
    # 100 draws an item: a TV distance of about 0.4 sqrt(items / draws) = 0.04 from sampling noise alone
    assert 0.5 * np.abs(seen - 1 / len(seen)).sum() < 0.06
    counts = asm.store.item_counts(asm.n_items, int(info.manifest["split"]["valid_start_ts"]))[FIRST_IDX + 1 :]
    assert 0.5 * np.abs(seen - counts / counts.sum()).sum() > 0.2  # far from the popularity draw


def test_popularity_negatives_avoid_a_window_of_popular_items(tiny_data):
    """A window holding 80% of the popularity mass: a fifth of the draws still clash after the popularity rounds
    and are drawn again uniformly; no negative is one of the window's items."""
    info = DatasetInfo.load(tiny_data)
    asm = BatchAssembler(info, (SequenceView("hist", 50, negatives=True),))
    table = asm.popularity()
    assert table is not None and table.ids.min() >= FIRST_IDX  # padding and out of vocabulary count 0
    counts = np.zeros(asm.n_items, np.int64)
    counts[table.ids] = np.diff(table.cdf, prepend=0)
    cdf = np.cumsum(counts)
    order = np.argsort(-counts, kind="stable")
    top = order[: int(np.searchsorted(np.cumsum(counts[order]) / cdf[-1], 0.8)) + 1]
    assert len(top) < asm.n_items // 3
    samples = 100
    item = np.tile(top, samples).astype(np.int32)
    lengths = np.full(samples, len(top), np.int64)
    neg = asm.negatives(item, lengths, np.random.default_rng(1), "popularity")
    assert not np.isin(neg, top).any()
    assert (counts[neg] == 0).any()  # only the uniform redraws reach items the training period never saw


def test_dien_chooses_its_negatives():
    cls = get_model_class("dien")
    assert cls.Params().aux_negatives == "popularity"
    _, params = resolve_train_config("dien", None, ["model.aux_negatives=uniform"])
    assert params.aux_negatives == "uniform"
    with pytest.raises(ConfigError, match="aux_negatives"):
        resolve_train_config("dien", None, ["model.aux_negatives=frequency"])
    with pytest.raises(ValueError, match="negative_sampling"):
        SequenceView("hist", 5, negatives=True, negative_sampling="frequency")


@pytest.mark.parametrize("sampling", ["popularity", "uniform"])
def test_dien_views_carry_the_choice(info, sampling):
    from tests.model_helpers import build

    (view,) = build(info, "dien", aux_negatives=sampling).views()
    assert view.negatives and view.negative_sampling == sampling


def test_popularity_table_is_the_whole_catalog_search():
    """The bucketed search finds the item `np.searchsorted(cdf, p, "right")` finds, for every position kind: Zipf
    counts (a few huge, a long tail), counts of 0 to 2 (flat runs of zeros), rare spikes among zeros."""
    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(1, 3000))
        kind = trial % 3
        if kind == 0:
            counts = np.minimum(rng.zipf(1.3, n), 10**6)
        elif kind == 1:
            counts = rng.integers(0, 3, n)
        else:
            counts = rng.integers(0, 1000, n) * (rng.random(n) < 0.05)
        table = PopularityTable.from_counts(counts)
        if counts.sum() == 0:
            assert table is None
            continue
        cdf = np.cumsum(counts)  # the whole catalog's, zeros included
        edges = cdf[:-1][cdf[:-1] < cdf[-1]]  # every item's first position
        p = np.concatenate([rng.integers(0, cdf[-1], 3000), [0, cdf[-1] - 1], edges, np.maximum(edges - 1, 0)])
        np.testing.assert_array_equal(table.items_at(p), np.searchsorted(cdf, p, side="right"))
    with pytest.raises(ValueError):
        PopularityTable.from_counts(np.array([1, -1]))
