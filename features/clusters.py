"""TWIN-V2's cluster store and the loader's view of a history as virtual items (`ctr cluster`, pipelines/cluster.py).

A user's clusters are built block after block (``block`` behaviors each, oldest first). A sample with ``hist_len = h``
sees the clusters of the blocks that end at or before its snapshot ``s = (h // block) * block``, then its behaviors
``[s, h)`` one by one (singletons, ``n_c = 1``): nothing it sees holds a behavior at or after its own time. Of those
virtual items the view keeps the most recent ``length``: the singletons first, then the latest clusters.

Each virtual item is a row of the sequence store (the cluster's representative behavior, nearest its centroid, or
the behavior itself), its size ``n_c`` and its time gap to the sample (to the cluster's mean behavior time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .dataset import DatasetInfo, clusters_dir
from .errors import DatasetError
from .sequence_store import ragged_ranges

KEY_SHIFT = 40  # behaviors per user < 2^40


@dataclass
class ClusterStore:
    """Every user's clusters as flat arrays with per-user offsets (by user_idx)."""

    offsets: np.ndarray  # [n_users + 1] int64
    rep: np.ndarray  # [C] int64 position of the representative in its user's sequence
    size: np.ndarray  # [C] int32
    mean_ts: np.ndarray  # [C] float64
    block_end: np.ndarray  # [C] int64
    block: int
    key: np.ndarray  # [C] int64 user_idx * 2^40 + block_end, ascending: one searchsorted finds every sample's count

    @classmethod
    def open(cls, info: DatasetInfo) -> ClusterStore:
        meta = info.manifest.get("clusters")
        if not meta:
            raise DatasetError(
                f"{info.data_dir}: the dataset has no clusters (no manifest clusters block); "
                f"run `ctr cluster --data {info.data_dir}` first"
            )
        n_users = info.vocab_sizes["user"]
        t = pq.read_table(clusters_dir(info.data_dir), columns=["user_idx", "rep", "size", "mean_ts", "block_end"])
        users = t["user_idx"].to_numpy().astype(np.int64)
        counts = np.zeros(n_users, dtype=np.int64)
        counts[users] = pc.list_value_length(t["size"]).to_numpy(zero_copy_only=False)
        offsets = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        dtypes = {"rep": np.int64, "size": np.int32, "mean_ts": np.float64, "block_end": np.int64}
        arrays = {c: np.zeros(total, dtype=d) for c, d in dtypes.items()}
        dest = ragged_ranges(offsets[users], counts[users])
        for c, arr in arrays.items():
            arr[dest] = pc.list_flatten(t[c]).to_numpy(zero_copy_only=False)
        key = (np.repeat(np.arange(n_users, dtype=np.int64), counts) << KEY_SHIFT) + arrays["block_end"]
        return cls(offsets=offsets, block=int(meta["block"]), key=key, **arrays)

    def visible(self, users: np.ndarray, hist_len: np.ndarray) -> np.ndarray:
        """How many of each user's clusters each sample sees: those of the blocks ending at or before its snapshot."""
        snapshot = (hist_len // self.block) * self.block
        return np.searchsorted(self.key, (users << KEY_SHIFT) + snapshot, side="right") - self.offsets[users]

    def view(
        self, users: np.ndarray, base: np.ndarray, hist_len: np.ndarray, ts: np.ndarray, seq_ts: np.ndarray, length: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The most recent ``length`` virtual items of each sample, oldest first.

        Args: users, base (the user's first row in the sequence store), hist_len, ts (the sample's time) ``[B]``;
        seq_ts the sequence store's behavior times. Returns (rows of the sequence store ``[M]``, n_c ``[M]``,
        time gap to the sample ``[M]`` (> 0), per-sample counts ``[B]``)."""
        users, base, hist_len = users.astype(np.int64), base.astype(np.int64), hist_len.astype(np.int64)
        snapshot = (hist_len // self.block) * self.block
        n_tail = np.minimum(hist_len - snapshot, length)
        visible = self.visible(users, hist_len)
        n_clu = np.minimum(visible, length - n_tail)
        c_idx = ragged_ranges(self.offsets[users] + visible - n_clu, n_clu)
        t_idx = ragged_ranges(base + hist_len - n_tail, n_tail)
        sample_c, sample_t = np.repeat(np.arange(len(users)), n_clu), np.repeat(np.arange(len(users)), n_tail)
        rows = np.concatenate([base[sample_c] + self.rep[c_idx], t_idx])
        size = np.concatenate([self.size[c_idx], np.ones(len(t_idx), dtype=np.int32)])
        gap_c = np.maximum(1, np.floor(ts[sample_c] - self.mean_ts[c_idx])).astype(np.int64)
        gap = np.concatenate([gap_c, ts[sample_t].astype(np.int64) - np.asarray(seq_ts[t_idx], dtype=np.int64)])
        # per sample: its clusters (older), then its singletons; a stable sort by sample keeps each part's order
        order = np.argsort(np.concatenate([sample_c, sample_t]), kind="stable")
        return rows[order], size[order], gap[order], n_clu + n_tail
