"""TWIN-V2's history clustering (pipelines/cluster.py): size cap, purity on planted topics, compression, virtual
items, and the point-in-time rule of snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.cluster import (
    cluster_history,
    cluster_user,
    kmeans,
    snapshot_length,
    virtual_items,
    visible_clusters,
)


def planted(n: int, topics: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n behaviors over `topics` well-separated topics with Zipf-like sizes (unit vectors + small noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(topics, 16))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, topics + 1)
    topic = rng.choice(topics, size=n, p=weights / weights.sum())
    x = centers[topic] + 0.05 * rng.normal(size=(n, 16))
    return x, topic


def test_every_cluster_within_the_cap_and_pure():
    x, topic = planted(20_000, 50, seed=0)
    labels = cluster_history(x, max_size=20, seed=0)
    sizes = np.bincount(labels)
    assert sizes.max() <= 20 and sizes.sum() == len(x)
    # purity: the share of behaviors in their cluster's majority topic
    majority = sum(np.bincount(topic[labels == c]).max() for c in range(len(sizes)))
    assert majority / len(x) >= 0.9
    # compression: about n / max_size clusters, not one per behavior
    assert len(sizes) < 0.15 * len(x)
    # labels are numbered by first appearance, deterministic for a seed
    assert labels[0] == 0 and np.array_equal(labels, cluster_history(x, max_size=20, seed=0))


def test_identical_vectors_are_cut_into_chunks():
    x = np.ones((55, 4))
    labels = cluster_history(x, max_size=10)
    assert np.bincount(labels).tolist() == [10, 10, 10, 10, 10, 5]


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
    """Snapshots are built from their prefix alone; a sample uses the last snapshot <= hist_len plus singletons, so
    changing any behavior at or after hist_len changes nothing it sees."""
    x, _ = planted(40, 4, seed=5)
    every = 10

    def snapshots(vectors: np.ndarray) -> dict[int, np.ndarray]:
        return {s: cluster_history(vectors[:s], max_size=4, seed=0) for s in range(every, len(vectors) + 1, every)}

    labels, count = visible_clusters(hist_len, every, snapshots(x))
    assert len(labels) == hist_len and (count == 0 or labels.max() == count - 1)
    s = snapshot_length(hist_len, every)
    in_snapshot = int(labels[:s].max()) + 1 if s else 0
    assert np.array_equal(labels[s:], np.arange(in_snapshot, count))  # the behaviors after it: singletons
    changed = x.copy()
    changed[hist_len:] = np.random.default_rng(9).normal(size=changed[hist_len:].shape) * 100
    again, count_again = visible_clusters(hist_len, every, snapshots(changed))
    assert np.array_equal(labels, again) and count == count_again
