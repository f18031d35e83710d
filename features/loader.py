"""Dataset directory -> training batches: samples streamed by Parquet row group, joined to the sequence store.

Data flow per batch (all vectorized numpy, in DataLoader workers)::

    samples/<split>/*.parquet row groups --(shuffle window)--> B samples (user_idx, item_idx, hist_len, ...)
    sequence store (memory-mapped CSR) --> for each view V of length L_V:
        behaviors seq[max(0, hist_len - L_V) : hist_len] of the sample's user   (never at or after the sample's ts)

A *view* is a named slice of the prefix: `hist` (the last 50 for DIN), `short` (the last S), `long` (the whole prefix
up to max_len for a GSU). Each view gives jagged `<view>_item` / `<view>_cate` (and optionally sampled negatives
`<view>_neg_item` / `<view>_neg_cate` for DIEN's auxiliary loss) as KeyedJaggedTensor features, plus the jagged
`<view>_ts_gap` (sample ts minus behavior ts, seconds, > 0) and `<view>_lengths` as dense tensors. Behaviors are
oldest first inside each jagged row (the newest is last). A view no longer than one already read (`short` beside
`long`) is cut from that view's rows (`row_tails`), not read from the store again.

Order and sharding. A split is a list of row groups ("units"). Training shuffles the units with a seed and the
epoch; the epoch's row order is the concatenation of the (shuffled) units. Rank r of W takes the contiguous rows
[r·N/W, (r+1)·N/W) of that order (N rows in the split), so ranks differ by at most one row and every row belongs to
exactly one rank whatever W is (sharding by rows, not by units: with units[r::W], unequal row groups or a W that
does not divide their number left rows out of every epoch). A rank's share is a list of "pieces" (a unit, or the
part of one that falls in the rank's range); DataLoader worker w takes every `num_workers`-th piece, reads them in
windows of `shuffle_window` pieces and permutes the rows inside each window (training only); the DataLoader
interleaves workers in a fixed order, so a seed fixes the whole batch order. Ranks can get a batch more or fewer
than each other; the trainer pads a rank that ran dry with a zero-weight batch (training) or a dummy batch whose
scores are dropped (evaluation), so nothing is dropped or seen twice.

Memory is bounded by work, not by who the users are: besides `batch_size` samples, a batch holds at most
`max_behaviors` padded behaviors, Σ over views of (samples × the longest slice of that view in the batch), the size
of the dense [B, L, ·] tensors a model builds. A batch over the budget is cut into consecutive smaller batches (one
sample at least each), so one 100K-behavior user shares a batch with few others.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .clusters import ClusterStore
from .dataset import DatasetInfo, samples_dir
from .negatives import NEGATIVE_SAMPLING, PopularityTable, sample_negatives, training_popularity
from .procs import die_with_parent, exit_when_gone
from .sequence_store import SequenceStore, ragged_ranges, row_tails

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("user_idx", "item_idx", "cate_idx", "ts", "label", "hist_len")


@dataclass(frozen=True)
class SequenceView:
    """The last `length` behaviors of each sample's prefix, under the name `name`."""

    name: str
    length: int
    negatives: bool = False  # also sample one non-clicked item per position (DIEN's auxiliary loss)
    # how the negatives are drawn: "popularity" (each item as often as it occurs among the training period's
    # behaviors, as DIEN's official code draws from its list of every review) or "uniform" over the catalog
    negative_sampling: str = "popularity"
    btype: bool = False  # also the behavior types, `<view>_btype` (zeros when the dataset has none; TWIN's cross bias)
    # the history as TWIN-V2's virtual items (`features.clusters`): clusters then singletons, `<view>_size` = n_c
    clusters: bool = False

    def __post_init__(self) -> None:
        if self.negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"view {self.name!r}: negative_sampling must be one of {NEGATIVE_SAMPLING}, "
                f"got {self.negative_sampling!r}"
            )


# `data.num_workers: null` loads in the training process when a rank has at most this many cores. Measured on 2
# cores (MovieLens, L = 50, batch 1,024, `ctr train`'s logged windows, two pairs each, in-process against one
# worker): DIN 14,487 / 15,621 against 13,325 / 13,981 samples/s, SIM-soft 10,601 / 9,834 against 10,077 / 9,369,
# DIEN 7,951 / 6,768 against 7,836 / 6,612; on the demo world's 10,000-behavior windows (batch 512) SIM-soft and
# TWIN moved by less than the pairs' noise either way. A worker process only helps when a core is free for it;
# here the step's two threads and the worker share two, and every batch crosses processes through shared memory.
# The batches and their order are the same either way (module docstring; tests/test_loader.py).
IN_PROCESS_MAX_CORES = 2


def loader_workers(setting: int | None, world_size: int = 1, cores: int | None = None) -> int:
    """Loader worker processes per rank: `setting` when given, else 0 when a rank has at most
    `IN_PROCESS_MAX_CORES` cores (the loader runs in the training process), 1 otherwise."""
    if setting is not None:
        return setting
    per_rank = (cores or os.cpu_count() or 1) // max(1, world_size)
    return 0 if per_rank <= IN_PROCESS_MAX_CORES else 1


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 256
    views: tuple[SequenceView, ...] = ()
    shuffle: bool = False
    seed: int = 0
    num_workers: int = 0
    shuffle_window: int = 8  # row groups mixed together when shuffling
    drop_last: bool = False
    max_behaviors: int | None = None  # padded behaviors per batch (samples x longest slice, summed over views)
    # draw the sampled negatives of views that ask for them (training); False (evaluation): empty negatives
    sample_negatives: bool = True


@dataclass
class Batch:
    """One batch: sparse id features (KeyedJaggedTensor) for the embedding tables, everything else dense.

    `dense` holds `label` (float32 [B]), `hist_len` [B], `ts` [B], `user_idx` / `item_idx` [B] (for predictions),
    per view `<view>_lengths` [B], `<view>_ts_gap` (jagged values) and `<view>_btype` when the view asks, and
    `p_true` when the dataset has it (for the oracle metric only: models never read it).
    """

    sparse: Any  # torchrec KeyedJaggedTensor
    dense: dict[str, torch.Tensor]
    size: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            sparse=self.sparse.to(device, non_blocking=True),
            dense={k: v.to(device, non_blocking=True) for k, v in self.dense.items()},
            size=self.size,
        )


def split_units(data_dir: Path, split: str) -> list[tuple[str, int, int]]:
    """The row groups of a split as (file, row_group, num_rows), in file order."""
    folder = samples_dir(data_dir, split)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such split folder; expected samples/{{train,valid,test}} from `ctr build`"
        )
    units = []
    for f in sorted(folder.glob("*.parquet")):
        md = pq.ParquetFile(f).metadata
        units.extend((str(f), g, md.row_group(g).num_rows) for g in range(md.num_row_groups))
    return units


class BatchAssembler:
    """Turns a table of samples into the numpy arrays of one batch (runs in DataLoader workers)."""

    def __init__(
        self,
        info: DatasetInfo,
        views: Sequence[SequenceView],
        store: SequenceStore | None = None,
        sample_negatives: bool = True,
    ) -> None:
        self.info = info
        self.sample_negatives = sample_negatives
        self._clusters: ClusterStore | None = None
        self.views = tuple(views)
        self._store = store
        self.n_items = info.vocab_sizes["item"]
        self._item_cate: np.ndarray | None = None
        self._popularity: PopularityTable | None = None  # popularity(), once read (None too when there is none)
        self._popularity_read = False

    @property
    def store(self) -> SequenceStore:
        if self._store is None:
            self._store = SequenceStore.open(self.info.data_dir)
        return self._store

    def negatives(self, item: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, sampling: str) -> np.ndarray:
        """One sampled negative per behavior of a view, by `sampling` (`features.negatives.sample_negatives`)."""
        table = self.popularity() if sampling == "popularity" else None
        return sample_negatives(item, lengths, rng, self.n_items, table)

    def popularity(self) -> PopularityTable | None:
        """The training period's item popularity (`features.negatives.training_popularity`), read once."""
        if not self._popularity_read:
            self._popularity, self._popularity_read = training_popularity(self.info, self.store), True
        return self._popularity

    @property
    def cluster_store(self) -> ClusterStore:
        if self._clusters is None:
            self._clusters = ClusterStore.open(self.info)
        return self._clusters

    @property
    def item_cate(self) -> np.ndarray:
        if self._item_cate is None:
            self._item_cate = self.info.item_categories()
        return self._item_cate

    def assemble(self, cols: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        store = self.store
        users = cols["user_idx"].astype(np.int64)
        hist_len = cols["hist_len"].astype(np.int64)
        out: dict[str, np.ndarray] = dict(cols)
        base = np.asarray(store.offsets[users])
        # The prefix never exceeds the user's stored sequence (hist_len counts stored behaviors strictly before ts).
        avail = np.asarray(store.offsets[users + 1]) - base
        if np.any(hist_len > avail):
            bad = int(np.argmax(hist_len > avail))
            raise ValueError(
                f"sample of user_idx {users[bad]} has hist_len {hist_len[bad]} > its {avail[bad]} stored behaviors; "
                "the sample index and the sequence store come from different builds: rebuild the dataset"
            )
        plain: list[tuple[SequenceView, np.ndarray]] = []  # views read from the store so far, with their lengths
        for v in self.views:
            if v.clusters:  # virtual items: each a row of the store (a cluster's representative or a behavior)
                idx, size, gap, n = self.cluster_store.view(users, base, hist_len, cols["ts"], store.ts, v.length)
                out[f"{v.name}_size"] = size
                item, cate = np.asarray(store.item_idx[idx]), np.asarray(store.cate_idx[idx])
                btype = self._btype(idx) if v.btype else None
            else:
                n = np.minimum(hist_len, v.length)
                src = next(((s, sn) for s, sn in plain if s.length >= v.length and (s.btype or not v.btype)), None)
                if src is not None:  # the tail of a longer view already read: the same behaviors, not read again
                    # (where every slice is the whole of src's, src's own arrays: the collator and models only read)
                    names = ("item", "cate", "ts_gap", "btype")[: 4 if v.btype else 3]
                    item, cate, gap, *bt = row_tails([out[f"{src[0].name}_{c}"] for c in names], src[1], n)
                    btype = bt[0] if v.btype else None
                else:
                    idx = ragged_ranges(base + hist_len - n, n)
                    gap = np.repeat(cols["ts"], n) - np.asarray(store.ts[idx])
                    item, cate = np.asarray(store.item_idx[idx]), np.asarray(store.cate_idx[idx])
                    btype = self._btype(idx) if v.btype else None
                plain.append((v, n))
            out[f"{v.name}_item"] = item
            out[f"{v.name}_cate"] = cate
            out[f"{v.name}_lengths"] = n.astype(np.int32)
            out[f"{v.name}_ts_gap"] = gap
            if btype is not None:
                out[f"{v.name}_btype"] = btype
            if v.negatives:
                if self.sample_negatives:
                    neg = self.negatives(item, n, rng, v.negative_sampling)
                else:  # evaluation: no draw (the auxiliary loss is a training loss), empty lists
                    neg = np.zeros(0, np.int32)
                    out[f"{v.name}_neg_lengths"] = np.zeros(len(n), np.int32)
                out[f"{v.name}_neg_item"] = neg
                out[f"{v.name}_neg_cate"] = self.item_cate[neg]
        return out

    def _btype(self, idx: np.ndarray) -> np.ndarray:
        """The behavior types of store rows `idx` (zeros where the dataset has none)."""
        btype = self.store.btype
        return np.asarray(btype[idx]) if btype is not None else np.zeros(len(idx), np.int8)


class SampleStream(IterableDataset):
    """Batches of one split for one rank (see the module docstring for order and sharding)."""

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        columns: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.info = info
        self.split = split
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.units = split_units(info.data_dir, split)
        extra = list(info.context_columns) + (["p_true"] if info.has_p_true else [])
        self.columns = list(columns) if columns is not None else [*SAMPLE_KEYS, *extra]
        self.assembler = BatchAssembler(info, cfg.views, sample_negatives=cfg.sample_negatives)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_units(self) -> list[tuple[str, int, int]]:
        """The split's units in this epoch's order (shuffled by seed and epoch when training)."""
        units = list(self.units)
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units

    def rank_pieces(self) -> list[tuple[str, int, int, int]]:
        """This rank's share of the epoch as (file, row_group, first_row, stop_row) pieces: the contiguous rows
        [rank·N/W, (rank+1)·N/W) of the epoch order."""
        units = self.epoch_units()
        total = sum(u[2] for u in units)
        lo, hi = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
        pieces, start = [], 0
        for f, g, n in units:
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                pieces.append((f, g, a - start, b - start))
            start += n
        return pieces

    def rank_rows(self) -> int:
        return sum(b - a for _, _, a, b in self.rank_pieces())

    def _cost(self, hist_len: np.ndarray) -> np.ndarray:
        """Per sample, its slice length in each view: [n, views]."""
        lengths = np.array([v.length for v in self.cfg.views], dtype=np.int64)
        return np.minimum(hist_len.astype(np.int64)[:, None], lengths[None, :])

    def budget_cuts(self, hist_len: np.ndarray) -> list[int]:
        """End positions of consecutive chunks of a batch whose padded size (rows × longest slice, summed over
        views) stays within `max_behaviors`; one sample at least per chunk."""
        budget = self.cfg.max_behaviors
        n = len(hist_len)
        if budget is None or not self.cfg.views or n == 0:
            return [n]
        cost = self._cost(hist_len)
        cuts, start = [], 0
        while start < n:
            running = np.maximum.accumulate(cost[start:], axis=0).sum(axis=1)  # padded width of [start, i]
            padded = running * np.arange(1, n - start + 1)
            fits = int(np.searchsorted(padded > budget, True))  # padded is nondecreasing: first overflow
            start += max(1, fits)
            cuts.append(start)
        return cuts

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        wi = get_worker_info()
        worker, n_workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        pieces = self.rank_pieces()[worker::n_workers]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker])
        bs = self.cfg.batch_size
        window = self.cfg.shuffle_window if self.cfg.shuffle else 1
        pending: list[pa.Table] = []
        pending_rows = 0
        files: dict[str, pq.ParquetFile] = {}

        def flush(table: pa.Table) -> Iterator[dict[str, np.ndarray]]:
            cols = {c: table[c].to_numpy() for c in self.columns}
            start = 0
            for stop in self.budget_cuts(cols["hist_len"]):
                yield self.assembler.assemble({c: v[start:stop] for c, v in cols.items()}, rng)
                start = stop

        for start in range(0, len(pieces), window):
            parts = []
            for f, g, a, b in pieces[start : start + window]:
                pf = files.get(f) or files.setdefault(f, pq.ParquetFile(f))
                part = pf.read_row_group(g, columns=self.columns)
                parts.append(part if (a, b) == (0, part.num_rows) else part.slice(a, b - a))
            table = pa.concat_tables([*pending, *parts]) if pending else pa.concat_tables(parts)
            if self.cfg.shuffle:
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            n_full = table.num_rows // bs
            for b in range(n_full):
                yield from flush(table.slice(b * bs, bs))
            rest = table.slice(n_full * bs)
            pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if pending_rows and not self.cfg.drop_last:
            yield from flush(pa.concat_tables(pending))


def sparse_feature_names(views: Sequence[SequenceView], context_columns: Sequence[str]) -> list[str]:
    """Every sparse feature a batch can carry, in the order the KeyedJaggedTensor lists them."""
    names = ["user", "item", "cate", *[c.removesuffix("_idx") for c in context_columns]]
    for v in views:
        names += [f"{v.name}_item", f"{v.name}_cate"]
        if v.negatives:
            names += [f"{v.name}_neg_item", f"{v.name}_neg_cate"]
    return names


def _worker_init(client_pid: int, _worker_id: int) -> None:
    """A loader worker's parent is the forkserver, not the process that iterates the loader: it exits with that
    process (checked every second), however that process ends, so a killed training leaves no worker behind."""
    die_with_parent()
    exit_when_gone(client_pid)


def _as_is(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return arrays


class BatchCollator:
    """numpy arrays from a worker -> Batch with a KeyedJaggedTensor holding exactly `features` (in that order)."""

    def __init__(self, features: Sequence[str], views: Sequence[SequenceView]) -> None:
        self.features = list(features)
        self.views = {v.name: v for v in views}

    def _jagged(self, arrays: dict[str, np.ndarray], name: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
        for view in self.views:
            part = name[len(view) + 1 :] if name.startswith(view + "_") else None
            if part in ("item", "cate"):
                return arrays[name], arrays[f"{view}_lengths"]
            if part in ("neg_item", "neg_cate"):  # empty at evaluation (no negatives drawn)
                return arrays[name], arrays.get(f"{view}_neg_lengths", arrays[f"{view}_lengths"])
        column = f"{name}_idx"
        if column not in arrays:
            raise KeyError(f"sparse feature {name!r}: the batch has no column {column!r} and no view named so")
        return arrays[column], np.ones(batch, dtype=np.int32)

    def __call__(self, arrays: dict[str, np.ndarray]) -> Batch:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        size = len(arrays["label"])
        parts = [self._jagged(arrays, name, size) for name in self.features]
        # every feature's ids written once into the KeyedJaggedTensor's one buffer (int32 ids widened on the way),
        # instead of an int64 copy of each then their concatenation
        values = np.empty(sum(len(v) for v, _ in parts), dtype=np.int64)
        lengths = np.empty(len(parts) * size, dtype=np.int32)
        at = 0
        for i, (v, n) in enumerate(parts):
            values[at : at + len(v)] = v
            lengths[i * size : (i + 1) * size] = n
            at += len(v)
        sparse = KeyedJaggedTensor(
            keys=self.features, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
        )
        dense: dict[str, torch.Tensor] = {
            "label": torch.from_numpy(arrays["label"].astype(np.float32)),
            "hist_len": torch.from_numpy(arrays["hist_len"].astype(np.int64)),
            "ts": torch.from_numpy(arrays["ts"].astype(np.int64)),
            "user_idx": torch.from_numpy(arrays["user_idx"].astype(np.int64)),
            "item_idx": torch.from_numpy(arrays["item_idx"].astype(np.int64)),
        }
        if "p_true" in arrays:
            dense["p_true"] = torch.from_numpy(arrays["p_true"].astype(np.float64))
        for view in self.views:
            dense[f"{view}_lengths"] = torch.from_numpy(arrays[f"{view}_lengths"].astype(np.int64))
            # the loader's own int64 gaps as they are; a read-only (Parquet) or other-typed array copied
            dense[f"{view}_ts_gap"] = torch.from_numpy(np.require(arrays[f"{view}_ts_gap"], np.int64, ("C", "W")))
            for extra in ("btype", "size"):
                if f"{view}_{extra}" in arrays:
                    dense[f"{view}_{extra}"] = torch.from_numpy(arrays[f"{view}_{extra}"].astype(np.int64))
        return Batch(sparse=sparse, dense=dense, size=size)


def _worker_context() -> multiprocessing.context.BaseContext:
    """The DataLoader workers' start method: forkserver (a clean single-threaded server forks them; this module and
    numpy are preloaded there, so a worker starts in milliseconds), or spawn where forkserver does not exist."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "pyarrow.parquet", __name__])
    return ctx


@dataclass
class SplitLoader:
    """A DataLoader over one split for one rank, yielding `Batch`es; `set_epoch` reshuffles."""

    info: DatasetInfo
    split: str
    cfg: LoaderConfig
    features: list[str]
    rank: int = 0
    world_size: int = 1
    stream: SampleStream = field(init=False)

    def __post_init__(self) -> None:
        self.stream = SampleStream(self.info, self.split, self.cfg, rank=self.rank, world_size=self.world_size)
        self.collate = BatchCollator(self.features, self.cfg.views)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        # Workers send plain numpy arrays (pickled through the pipe) and the Batch / KeyedJaggedTensor is made here:
        # torch tensors from a worker travel by file-descriptor passing, whose resource-sharer thread can deadlock a
        # worker forked while another DataLoader's feeder thread holds its lock (seen in `ctr demo`'s evaluation).
        # Workers start from a forkserver, never by forking this process: it may run other threads (Ray's, tqdm's,
        # an earlier loader's feeder), and a child forked while one of them holds a lock waits on it forever (seen:
        # a worker stuck inside numpy's header parsing after `ctr demo` had built its dataset with Ray in-process).
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            collate_fn=_as_is,
            persistent_workers=False,
            prefetch_factor=4 if self.cfg.num_workers else None,
            multiprocessing_context=_worker_context() if self.cfg.num_workers else None,
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if self.cfg.num_workers else None,
            # its own generator: iter() of a DataLoader otherwise draws a seed from torch's global RNG, which would
            # shift the dropout stream of a resumed run (which opens the loader after restoring that RNG)
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.stream.epoch),
        )
        for arrays in loader:
            yield self.collate(arrays)

    def num_rows(self) -> int:
        return self.stream.rank_rows()
