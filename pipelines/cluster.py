"""TWIN-V2's offline compression of a lifelong history (Si et al., CIKM 2024; models-wave2.md C.3): hierarchical
k-means over the items of one user's behaviors, every cluster at most ``max_size`` behaviors, each cluster then
stands for its behaviors as one "virtual item".

What the paper's abstract and the secondary sources agree on, and the choices where they do not say:

* Recursive k-means with an adaptive k until every cluster holds at most γ = ``max_size`` behaviors: a node of n
  behaviors is split into ``k = min(branching, ceil(n / max_size))`` clusters (at least 2; ``branching`` 16), and
  every child still over γ is split again. Behaviors with identical vectors that k-means cannot separate are cut
  into consecutive chunks of γ.
* The vectors are the items' frozen multimodal embeddings (``mm_emb``, L2-normalized), available before any model is
  trained; the paper clusters its (collaborative) item embeddings. Items without an embedding form one group of
  their own, clustered by category.
* The paper first splits the history into M groups by play-completion ratio; this library has no play ratio, so the
  groups are the behavior types (``btype``) when the dataset has them, else one group.
* Virtual item (two sources agree): the categorical ids of the behavior nearest to the cluster's centroid, the mean
  of the numeric features (here the behavior time), and the cluster size ``n_c`` (attention adds ``ln n_c``).

Point in time. Clusters are built over **snapshots** of the history: for snapshot length ``s`` (a multiple of
``snapshot_every``), the clusters of behaviors ``[0, s)``. A sample with ``hist_len = h`` uses the last snapshot
with ``s <= h`` plus its behaviors ``[s, h)`` as singleton clusters (``n_c = 1``), so it never sees a cluster that
holds a behavior at or after its own time. Each block is clustered once, from its own behaviors (`cluster_blocks`),
so a sample's clusters are a prefix of its user's list (`visible_count`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# `cluster_history`'s one-call form: (x, max_size, seed, iters, branching) -> labels, or None to decline
TreeFn = Callable[[np.ndarray, int, int, int, int], "np.ndarray | None"]


def sum_by_label(labels: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """``[k, D]``: the rows of ``x [n, D]`` summed by ``labels [n]`` (float64), as one bincount over (label, column)
    bins. The same additions in the same order as ``np.add.at(sums, labels, x)``, so the same sums bit for bit,
    without add.at's per-element dispatch: TWIN-V2's clustering of the demo world took 20 s instead of 67, writing
    the same files."""
    d = x.shape[1]
    flat = (labels[:, None] * d + np.arange(d)).ravel()
    return np.bincount(flat, weights=x.ravel(), minlength=k * d).reshape(k, d)


_MASK = (1 << 64) - 1


def _unit(seed: int, j: int) -> float:
    """The ``j``-th draw in ``[0, 1)`` of k-means number ``seed``: SplitMix64 of ``seed · φ + (j + 1) · c``, top 53
    bits. A counter-based draw instead of a generator's stream, so that the native form (`ctr/native/kmeans_tree.cpp`)
    draws the same numbers."""
    z = (seed * 0x9E3779B97F4A7C15 + (j + 1) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return (z >> 11) / 9007199254740992.0


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 10) -> np.ndarray:
    """Lloyd's k-means on rows of ``x [n, D]`` (float64) from a k-means++ start; returns labels ``[n]`` in
    ``0..k-1``.

    Deterministic for a seed; an empty cluster keeps its previous centroid; among equal distances the first center
    wins. The readable form of `ctr/native/kmeans_tree.cpp`'s, step for step."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    centers = np.empty((k, x.shape[1]), dtype=np.float64)
    centers[0] = x[min(int(_unit(seed, 0) * n), n - 1)]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for j in range(1, k):  # k-means++: the next center with probability ∝ squared distance
        cum = np.cumsum(d2)
        total, u = cum[-1], _unit(seed, j)
        pick = int(u * n) if total <= 0 else int(np.searchsorted(cum, u * total))
        centers[j] = x[min(pick, n - 1)]
        d2 = np.minimum(d2, ((x - centers[j]) ** 2).sum(1))
    labels = np.zeros(n, dtype=np.int64)
    xx = (x**2).sum(1, keepdims=True)
    for _ in range(iters):
        dist = (xx - 2 * x @ centers.T) + (centers**2).sum(1)
        new = dist.argmin(1)
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        sums = sum_by_label(labels, x, k)
        counts = np.bincount(labels, minlength=k)
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty, None]
    return labels


def cluster_history(
    x: np.ndarray,
    max_size: int,
    seed: int = 0,
    iters: int = 10,
    branching: int = 16,
    tree: TreeFn | None = None,
) -> np.ndarray:
    """Hierarchical k-means: labels ``[n]`` (0..C-1, in order of first appearance) with every cluster at most
    ``max_size`` rows of ``x [n, D]``. A node of n rows splits into ``min(branching, ceil(n / max_size))`` (at
    least 2): the cost is O(n · branching · depth), not O(n²/max_size) as one flat k-means with k = n / max_size.

    ``tree``: the same steps in one call, ``tree(x, max_size, seed, iters, branching)`` giving the labels or None to
    decline (`ctr.native.kmeans_tree`, about 7x faster; the CLI passes it, so this package stays free of the
    project's native build; its labels equal this function's wherever float rounding cannot flip a comparison);
    None runs the NumPy form below.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    if tree is not None and len(x) > max_size:
        labels = tree(x, max_size, seed, iters, max(2, branching))
        if labels is not None:
            return labels
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64)
    next_label = 0
    stack = [np.arange(n)]
    while stack:
        idx = stack.pop()
        if len(idx) <= max_size:
            labels[idx] = next_label
            next_label += 1
            continue
        k = max(2, min(branching, math.ceil(len(idx) / max_size)))
        sub = kmeans(x[idx], k, seed + next_label, iters)
        parts = [idx[sub == j] for j in range(k) if (sub == j).any()]
        if len(parts) == 1:  # identical vectors: k-means cannot split them, cut into chunks of max_size
            parts = [idx[i : i + max_size] for i in range(0, len(idx), max_size)]
        stack.extend(reversed(parts))
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))  # relabel by first appearance (oldest behavior first)
    return order[labels]


@dataclass
class VirtualItems:
    """One row per cluster: the representative behavior (nearest its centroid), its size, mean and last time."""

    rep: np.ndarray  # [C] index (into the clustered behaviors) of the behavior nearest the centroid
    size: np.ndarray  # [C] n_c
    mean_ts: np.ndarray  # [C] float64
    last_ts: np.ndarray  # [C] int64


def virtual_items(labels: np.ndarray, x: np.ndarray, ts: np.ndarray) -> VirtualItems:
    """The virtual item of every cluster of ``labels [n]`` over vectors ``x [n, D]`` and times ``ts [n]``."""
    c = int(labels.max()) + 1 if len(labels) else 0
    size = np.bincount(labels, minlength=c)
    centers = sum_by_label(labels, x, c) / np.maximum(size, 1)[:, None]
    dist = ((x - centers[labels]) ** 2).sum(1)
    # nearest per cluster, ties to the most recent behavior: sort by (cluster, distance, -position)
    order = np.lexsort((-np.arange(len(labels)), dist, labels))
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep = order[first]
    mean_ts = np.bincount(labels, weights=ts.astype(np.float64), minlength=c) / np.maximum(size, 1)
    last_ts = np.full(c, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last_ts, labels, ts.astype(np.int64))
    return VirtualItems(rep=rep, size=size, mean_ts=mean_ts, last_ts=last_ts)


def snapshot_length(hist_len: int, snapshot_every: int) -> int:
    """The length of the last snapshot a sample with ``hist_len`` behaviors may use (a multiple of the period)."""
    return (hist_len // snapshot_every) * snapshot_every


def cluster_user(
    x: np.ndarray,
    has_vector: np.ndarray,
    cate: np.ndarray,
    max_size: int,
    group: np.ndarray | None = None,
    seed: int = 0,
    iters: int = 10,
    tree: TreeFn | None = None,
) -> np.ndarray:
    """Labels ``[n]`` of one user's behaviors (oldest first): within each ``group`` value (behavior types; None =
    one group), hierarchical k-means of the behaviors with a vector (``tree``: see `cluster_history`), and the
    behaviors without one cut by category (chunks of ``max_size``). Clusters never mix groups; labels are numbered
    by first appearance."""
    n = len(x)
    labels = np.full(n, -1, dtype=np.int64)
    offset = 0
    groups = np.zeros(n, dtype=np.int64) if group is None else group
    for g in np.unique(groups):
        in_group = groups == g
        with_vec = np.flatnonzero(in_group & has_vector)
        if len(with_vec):
            sub = cluster_history(x[with_vec], max_size, seed=seed + int(g), iters=iters, tree=tree)
            labels[with_vec] = sub + offset
            offset += int(sub.max()) + 1
        without = np.flatnonzero(in_group & ~has_vector)
        for c in np.unique(cate[without]):
            rows = without[cate[without] == c]
            for i in range(0, len(rows), max_size):
                labels[rows[i : i + max_size]] = offset
                offset += 1
    _, first = np.unique(labels, return_index=True)
    return np.argsort(np.argsort(first))[labels]


# --------------------------------------------------------------------------------------------------------------------
# incremental blocks: every behavior is clustered once, with the behaviors of its block
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class UserClusters:
    """One user's clusters, block after block (oldest first): a sample sees a prefix of them (`visible_count`)."""

    rep: np.ndarray  # [C] position (in the user's sequence) of the behavior nearest the cluster's centroid
    size: np.ndarray  # [C] n_c
    mean_ts: np.ndarray  # [C] float64 mean behavior time
    block_end: np.ndarray  # [C] the end (exclusive) of the block the cluster was built from


def cluster_blocks(
    x: np.ndarray,
    has_vector: np.ndarray,
    cate: np.ndarray,
    ts: np.ndarray,
    block: int,
    max_size: int,
    group: np.ndarray | None = None,
    seed: int = 0,
    tree: TreeFn | None = None,
) -> UserClusters:
    """The clusters of the complete blocks ``[j·block, (j+1)·block)`` of one user's history, each block clustered
    from its own behaviors only (`cluster_user`): the snapshot of length ``s`` (a multiple of ``block``) is then the
    clusters of the blocks before ``s``, built once for every later snapshot, so the whole history costs one pass.
    Clusters never span two blocks (a small loss of compression against re-clustering each snapshot)."""
    parts = []
    for start in range(0, (len(x) // block) * block, block):
        end = start + block
        sl = slice(start, end)
        grp = None if group is None else group[sl]
        labels = cluster_user(x[sl], has_vector[sl], cate[sl], max_size, grp, seed, tree=tree)
        v = virtual_items(labels, x[sl], ts[sl])
        parts.append(UserClusters(v.rep + start, v.size, v.mean_ts, np.full(len(v.size), end, dtype=np.int64)))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return UserClusters(empty, empty, np.zeros(0), empty)
    return UserClusters(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("rep", "size", "mean_ts", "block_end"))
    )


def visible_count(block_end: np.ndarray, hist_len: int, block: int) -> int:
    """How many of a user's clusters a sample with ``hist_len`` behaviors sees: those of the blocks that end at or
    before its snapshot ``snapshot_length(hist_len, block)``; its behaviors after the snapshot are singletons."""
    return int(np.searchsorted(block_end, snapshot_length(hist_len, block), side="right"))


# --------------------------------------------------------------------------------------------------------------------
# `ctr cluster`: Ray tasks over the sequence files of a dataset directory
# --------------------------------------------------------------------------------------------------------------------


def _item_vectors(info: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L2-normalized mm_emb [N, D] float32, has-a-vector [N] bool, cate_idx [N]) of every item_idx. A dataset
    without multimodal embeddings (MovieLens) has no vector for any item: every behavior is clustered by category."""
    if not info.manifest.get("mm_emb"):
        n = info.vocab_sizes["item"]
        return np.zeros((n, 1), dtype=np.float32), np.zeros(n, dtype=bool), info.item_categories()
    mm = info.mm_table().astype(np.float32)
    norm = np.linalg.norm(mm, axis=1)
    has = norm > 0
    mm[has] /= norm[has, None]
    return mm, has, info.item_categories()


def cluster_file(path: str, out_dir: str, tables: tuple[np.ndarray, np.ndarray, np.ndarray], spec: dict) -> dict:
    """Ray task: the clusters of every user of one sequence file, written as one Parquet file; returns counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    vectors, has, cate_of = tables
    names = ["user_idx", "item_idx", "ts"] + (["btype"] if spec["by_btype"] else [])
    t = pq.read_table(path, columns=[c for c in names if c in pq.read_schema(path).names])
    # flat numpy arrays with per-user offsets (no Python list per behavior)
    lengths = pc.list_value_length(t["item_idx"]).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = {c: pc.list_flatten(t[c]).to_numpy(zero_copy_only=False).astype(np.int64) for c in t.column_names[1:]}
    rows: dict[str, list] = {"user_idx": [], "rep": [], "size": [], "mean_ts": [], "block_end": []}
    covered = clusters = 0
    for i, user in enumerate(t["user_idx"].to_numpy()):  # k-means is per user: one iteration per user
        if lengths[i] < spec["block"]:
            continue
        sl = slice(offsets[i], offsets[i + 1])
        items, ts = flat["item_idx"][sl], flat["ts"][sl]
        group = flat["btype"][sl] if "btype" in flat else None
        uc = cluster_blocks(
            vectors[items],
            has[items],
            cate_of[items],
            ts,
            spec["block"],
            spec["max_size"],
            group,
            spec["seed"],
            tree=spec["tree"],
        )
        rows["user_idx"].append(int(user))
        for f in ("rep", "size", "mean_ts", "block_end"):
            rows[f].append(getattr(uc, f))
        covered += int(uc.size.sum())
        clusters += len(uc.size)
    table = pa.table(
        {
            "user_idx": pa.array(rows["user_idx"], pa.int32()),
            "rep": pa.array([r.tolist() for r in rows["rep"]], pa.list_(pa.int32())),
            "size": pa.array([r.tolist() for r in rows["size"]], pa.list_(pa.int32())),
            "mean_ts": pa.array([r.tolist() for r in rows["mean_ts"]], pa.list_(pa.float64())),
            "block_end": pa.array([r.tolist() for r in rows["block_end"]], pa.list_(pa.int32())),
        }
    )
    target = Path(out_dir) / Path(path).name
    pq.write_table(table, target)
    return {"users": len(rows["user_idx"]), "clusters": clusters, "behaviors": covered, "file": target.name}


def build_clusters(
    data_dir: str | Path,
    *,
    max_size: int = 20,
    block: int = 1000,
    seed: int = 0,
    by_btype: bool = True,
    address: str | None = None,
    tree: TreeFn | None = None,
) -> dict[str, Any]:
    """`ctr cluster`: TWIN-V2's clusters of every user's complete blocks of ``block`` behaviors into
    ``DATA_DIR/clusters/`` (replacing earlier ones) and a ``clusters`` block in the manifest; returns that block.
    ``tree``: `cluster_history`'s one-call form for the Ray tasks (the CLI passes `ctr.native.kmeans_tree`; an
    importable function, so the tasks unpickle it by name)."""
    import shutil
    import time

    import ray

    from features.dataset import CLUSTERS, DatasetInfo, clusters_dir, read_manifest, sequences_dir, write_manifest

    if max_size < 1 or block < 1:
        raise ValueError(f"max_size and block must be >= 1, got {max_size}, {block}")
    t0 = time.time()
    data_dir = Path(data_dir)
    info = DatasetInfo.load(data_dir)
    tables = _item_vectors(info)
    files = [str(sequences_dir(data_dir) / f) for f in info.manifest["sequence_files"]]
    out = clusters_dir(data_dir)
    tmp = data_dir / f".{CLUSTERS}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    spec = {"block": block, "max_size": max_size, "seed": seed, "by_btype": by_btype and info.has_btype, "tree": tree}
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ref = ray.put(tables)
        task = ray.remote(cluster_file)
        results = ray.get([task.remote(f, str(tmp), ref, spec) for f in files])
    finally:
        if started:
            ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    block_info = {
        "max_size": max_size,
        "block": block,
        "seed": seed,
        "by_btype": spec["by_btype"],
        "vectors": "mm_emb (L2-normalized)" if info.manifest.get("mm_emb") else "none (every item by category)",
        "users": sum(r["users"] for r in results),
        "clusters": sum(r["clusters"] for r in results),
        "behaviors": sum(r["behaviors"] for r in results),
        "files": sorted(r["file"] for r in results),
        "seconds": round(time.time() - t0, 2),
    }
    manifest = read_manifest(data_dir)
    manifest["clusters"] = block_info
    write_manifest(data_dir, manifest)
    return block_info
