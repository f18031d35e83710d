"""TWIN-V2's history clustering (pipelines/cluster.py): size cap, purity on planted topics, compression, virtual
items, and the point-in-time rule of snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from ctr import native
from pipelines.cluster import (
    cluster_blocks,
    cluster_history,
    cluster_user,
    kmeans,
    snapshot_length,
    virtual_items,
    visible_count,
)

TREE = native.kmeans_tree  # the native form (`ctr/native/kmeans_tree.cpp`); None: the NumPy reference


def planted(n: int, topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n behaviors over `topics` well-separated topics with Zipf-like sizes (unit vectors + small noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(topics, 16))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, topics + 1)
    topic = rng.choice(topics, size=n, p=weights / weights.sum())
    x = centers[topic] + 0.05 * rng.normal(size=(n, 16))
    return x, topic


@pytest.mark.parametrize("native", [True, False])
def test_every_cluster_within_the_cap_and_pure(native):
    x, topic = planted(20_000 if native else 5_000, 50, seed=0)
    labels = cluster_history(x, max_size=20, seed=0, tree=TREE if native else None)
    sizes = np.bincount(labels)
    assert sizes.max() <= 20 and sizes.sum() == len(x)
    # purity: the share of behaviors in their cluster's majority topic
    majority = sum(np.bincount(topic[labels == c]).max() for c in range(len(sizes)))
    assert majority / len(x) >= 0.9
    # compression: about n / max_size clusters, not one per behavior
    assert len(sizes) < 0.15 * len(x)
    # labels are numbered by first appearance, deterministic for a seed
    assert labels[0] == 0 and np.array_equal(labels, cluster_history(x, 20, seed=0, tree=TREE if native else None))


@pytest.mark.parametrize("native", [True, False])
def test_identical_vectors_are_cut_into_chunks(native):
    x = np.ones((55, 4))
    labels = cluster_history(x, max_size=10, tree=TREE if native else None)
    assert np.bincount(labels).tolist() == [10, 10, 10, 10, 10, 5]


def test_native_tree_equals_the_numpy_reference():
    """`ctr/native/kmeans_tree.cpp` takes the reference's steps: the same draws, distances, tie rules and order of
    parts, so the same labels on data where float rounding of a dot product cannot flip a comparison: continuous
    vectors. (Where one vector repeats, two centroids can be means of its copies a rounding apart, and the order of
    a dot product's additions picks between them: there both forms only keep the cap.)"""
    from ctr import native

    assert native.available(), native.unavailable_reason()
    rng = np.random.default_rng(0)
    for case in range(40):
        n, d, max_size = int(rng.integers(1, 700)), int(rng.integers(1, 40)), int(rng.integers(1, 30))
        x = rng.normal(size=(n, d)).astype(np.float32)
        if case % 4 == 1:
            x, _ = planted(n, int(rng.integers(1, 12)), seed=case)
        repeats = case % 4 == 0
        if repeats:
            x[: n // 2] = x[0]  # half the history one item
        want = cluster_history(x, max_size, seed=case)
        got = cluster_history(x, max_size, seed=case, tree=native.kmeans_tree)
        if repeats:
            assert got[0] == 0 and np.bincount(got).max() <= max_size and np.bincount(got).min() >= 1
        else:
            assert np.array_equal(got, want), (case, n, d, max_size)
    assert len(native.kmeans_tree(np.zeros((0, 3)), 4, 0, 10, 16)) == 0
    assert native.kmeans_tree(np.zeros((3, 3)), 2, 0, 10, 16).tolist() == [0, 0, 1]  # identical rows: chunks


def test_kmeans_separates_two_blobs():
    x = np.concatenate([np.zeros((30, 2)), np.full((20, 2), 10.0)])
    labels = kmeans(x, 2, seed=1)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[-1]


def test_groups_and_items_without_vectors():
    """Clusters never mix behavior types; behaviors without an embedding are grouped by category."""
    rng = np.random.default_rng(3)
    x, _ = planted(600, 5, seed=3)
    has = rng.random(600) > 0.2
    cate = rng.integers(0, 4, 600)
    group = rng.integers(0, 2, 600)
    labels = cluster_user(x, has, cate, max_size=15, group=group)
    for c in np.unique(labels):
        rows = labels == c
        assert rows.sum() <= 15 and len(set(group[rows])) == 1 and len(set(has[rows])) == 1
        if not has[rows][0]:
            assert len(set(cate[rows])) == 1


def test_virtual_items():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    labels = np.array([0, 0, 0, 1, 1])
    ts = np.array([1, 2, 3, 10, 20])
    v = virtual_items(labels, x, ts)
    assert v.size.tolist() == [3, 2]
    assert v.rep.tolist() == [1, 4]  # nearest the centroid; cluster 1: a tie (10 vs 11 around 10.5), the most recent
    assert v.mean_ts.tolist() == [2.0, 15.0] and v.last_ts.tolist() == [3, 20]


@pytest.mark.parametrize("hist_len", [0, 7, 10, 25, 40])
def test_a_sample_sees_only_clusters_of_earlier_behaviors(hist_len):
    """A sample uses the clusters of the blocks before its snapshot plus singletons, so changing any behavior at or
    after hist_len changes nothing it sees."""
    x, _ = planted(40, 4, seed=5)
    every, ones, zeros, ts = 10, np.ones(40, bool), np.zeros(40, np.int64), np.arange(40)
    uc = cluster_blocks(x, ones, zeros, ts, block=every, max_size=4)
    count = visible_count(uc.block_end, hist_len, every)
    s = snapshot_length(hist_len, every)
    assert uc.size[:count].sum() == s and (uc.block_end[:count] <= hist_len).all()
    assert (uc.size[:count] <= 4).all() and (uc.rep[:count] < max(s, 1)).all()
    changed = x.copy()
    changed[hist_len:] = np.random.default_rng(9).normal(size=changed[hist_len:].shape) * 100
    again = cluster_blocks(changed, ones, zeros, ts, block=every, max_size=4)
    assert visible_count(again.block_end, hist_len, every) == count
    assert np.array_equal(again.rep[:count], uc.rep[:count]) and np.array_equal(again.size[:count], uc.size[:count])


def test_blocks_are_clustered_once_and_seen_as_a_prefix():
    """Each complete block is clustered from its own behaviors; a sample sees the clusters of the blocks before its
    snapshot (a prefix of the user's clusters), and later behaviors do not change them."""
    x, _ = planted(250, 4, seed=7)
    has, cate, ts = np.ones(250, bool), np.zeros(250, np.int64), np.arange(250)
    uc = cluster_blocks(x, has, cate, ts, block=60, max_size=8)
    assert uc.size.sum() == 240 and uc.size.max() <= 8  # the last 10 behaviors are not in a complete block
    assert set(uc.block_end.tolist()) == {60, 120, 180, 240} and (np.diff(uc.block_end) >= 0).all()
    for end in (60, 120, 180, 240):
        in_block = uc.block_end == end
        assert uc.size[in_block].sum() == 60 and ((uc.rep[in_block] >= end - 60) & (uc.rep[in_block] < end)).all()
    for h in (0, 59, 60, 130, 250):
        n = visible_count(uc.block_end, h, 60)
        assert (uc.block_end[:n] <= h).all() and uc.size[:n].sum() == snapshot_length(h, 60)
    changed = x.copy()
    changed[130:] *= -1
    again = cluster_blocks(changed, has, cate, ts, block=60, max_size=8)
    n = visible_count(uc.block_end, 130, 60)
    assert np.array_equal(again.rep[:n], uc.rep[:n]) and np.array_equal(again.size[:n], uc.size[:n])


def test_ctr_cluster_on_a_built_dataset(tiny_data, tmp_path):
    """The Ray step: every user's complete blocks covered once, the manifest's block, a rerun replaces the files."""
    import shutil

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from cli.main import main as ctr
    from features.dataset import DatasetInfo, sequences_dir

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    before = DatasetInfo.load(data).fingerprint
    assert ctr(["cluster", "--data", str(data), "--block", "40", "--max-size", "6"]) == 0
    info = DatasetInfo.load(data)
    block = info.manifest["clusters"]
    assert info.fingerprint != before and block["block"] == 40 and block["max_size"] == 6
    seqs = pq.read_table(sequences_dir(data), columns=["user_idx", "item_idx"])
    lengths = dict(zip(seqs["user_idx"].to_pylist(), pc.list_value_length(seqs["item_idx"]).to_pylist(), strict=True))
    clusters = pq.read_table(data / "clusters")
    assert clusters.num_rows == block["users"] == sum(n >= 40 for n in lengths.values())
    for user, sizes in zip(clusters["user_idx"].to_pylist(), clusters["size"].to_pylist(), strict=True):
        assert sum(sizes) == (lengths[user] // 40) * 40 and max(sizes) <= 6
    assert sum(sum(s) for s in clusters["size"].to_pylist()) == block["behaviors"]
    assert ctr(["cluster", "--data", str(data), "--block", "80"]) == 0  # again: replaced, not appended
    assert pq.read_table(data / "clusters").num_rows == DatasetInfo.load(data).manifest["clusters"]["users"]


def test_loader_view_of_virtual_items(tiny_data, tmp_path):
    """The clusters view: every virtual item strictly before the sample, clusters only of blocks before its
    snapshot, every behavior of the prefix counted once (Σ n_c = hist_len when the view is long enough), and a
    short view keeps the most recent items (the singletons first)."""
    import shutil

    from cli.main import main as ctr
    from features.clusters import ClusterStore
    from features.dataset import DatasetInfo
    from features.loader import LoaderConfig, SequenceView, SplitLoader
    from features.sequence_store import SequenceStore

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    assert ctr(["cluster", "--data", str(data), "--block", "40", "--max-size", "6"]) == 0
    info = DatasetInfo.load(data)
    store, clusters = SequenceStore.open(data), ClusterStore.open(info)
    for length in (100_000, 8):
        view = SequenceView("long", length, clusters=True)
        cfg = LoaderConfig(batch_size=256, views=(view,), shuffle=False)
        batch = next(iter(SplitLoader(info, "test", cfg, ["long_item", "long_cate"])))
        n = batch.dense["long_lengths"].numpy()
        size = batch.dense["long_size"].numpy()
        gap = batch.dense["long_ts_gap"].numpy()
        items = batch.sparse["long_item"].values().numpy()
        users, hist = batch.dense["user_idx"].numpy(), batch.dense["hist_len"].numpy()
        assert (gap > 0).all() and (size >= 1).all()
        start, checked = 0, 0
        for u, h, k in zip(users, hist, n, strict=True):
            sl = slice(start, start + k)
            snapshot = (h // 40) * 40
            tail = min(h - snapshot, length)
            assert (size[sl][k - tail :] == 1).all()  # the behaviors after the snapshot, one by one, newest last
            assert np.array_equal(
                items[sl][k - tail :], np.asarray(store.item_idx[store.offsets[u] + h - tail : store.offsets[u] + h])
            )
            if length > h:
                assert size[sl].sum() == h  # every behavior of the prefix, once
            checked += k > tail
            start += k
        assert checked > 0  # some samples see clusters
        assert k <= length
    assert clusters.block == 40


def test_ctr_cluster_without_multimodal_embeddings(tiny_data, tmp_path):
    """A dataset without mm_emb (MovieLens) is clustered by category (purity: `test_groups_and_items_without_vectors`):
    the manifest says so, and every complete block is still covered within the cap."""
    import shutil

    import pyarrow.parquet as pq

    from cli.main import main as ctr
    from features.dataset import DatasetInfo, read_manifest, sequences_dir, write_manifest

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = read_manifest(data)
    manifest["mm_emb"] = {}
    write_manifest(data, manifest)
    assert ctr(["cluster", "--data", str(data), "--block", "40", "--max-size", "6"]) == 0
    info = DatasetInfo.load(data)
    assert info.manifest["clusters"]["vectors"].startswith("none")
    seqs = pq.read_table(sequences_dir(data), columns=["user_idx", "item_idx"]).to_pydict()
    items = dict(zip(seqs["user_idx"], seqs["item_idx"], strict=True))
    t = pq.read_table(data / "clusters").to_pydict()
    assert t["user_idx"]
    for user, sizes in zip(t["user_idx"], t["size"], strict=True):
        assert sum(sizes) == (len(items[user]) // 40) * 40 and max(sizes) <= 6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_by_label_is_add_at_bit_for_bit(dtype):
    """k-means' centers and the virtual items' centroids: one bincount gives np.add.at's sums exactly (same order of
    additions), including labels that never occur and a single row."""
    from pipelines.cluster import sum_by_label

    rng = np.random.default_rng(3)
    for n, d, k in [(1, 4, 3), (257, 32, 5), (2000, 64, 16)]:
        x = (rng.standard_normal((n, d)) * 10 ** rng.uniform(-3, 3, size=(n, 1))).astype(dtype)
        labels = rng.integers(0, max(1, k - 1), n)  # the last label never occurs
        expected = np.zeros((k, d))
        np.add.at(expected, labels, x)
        got = sum_by_label(labels, x, k)
        assert got.dtype == np.float64 and np.array_equal(got, expected)
