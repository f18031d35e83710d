"""Dataset directory -> training batches: samples streamed by Parquet row group, joined to the sequence store.

Data flow per batch (all vectorized numpy, in DataLoader workers)::

    samples/<split>/*.parquet row groups --(shuffle window)--> B samples (user_idx, item_idx, hist_len, ...)
    sequence store (memory-mapped CSR) --> for each view V of length L_V:
        behaviors seq[max(0, hist_len - L_V) : hist_len] of the sample's user   (never at or after the sample's ts)

A *view* is a named slice of the prefix: `hist` (the last 50 for DIN), `short` (the last S), `long` (the whole prefix
up to max_len for a GSU). Each view gives jagged `<view>_item` / `<view>_cate` (and optionally sampled negatives
`<view>_neg_item` / `<view>_neg_cate` for DIEN's auxiliary loss) as KeyedJaggedTensor features, plus the jagged
`<view>_ts_gap` (sample ts minus behavior ts, seconds, > 0) and `<view>_lengths` as dense tensors. Behaviors are
oldest first inside each jagged row (the newest is last).

Order and sharding. A split is a list of row groups ("units"). Training shuffles the units with a seed and the
epoch, reads them in windows of `shuffle_window` units and permutes the rows inside each window; evaluation reads
them in file order. Rank r of W takes units r, r + W, ...; inside a rank, DataLoader worker w takes every
`num_workers`-th of the rank's units, and the DataLoader interleaves workers in a fixed order, so a seed fixes the
whole batch order. Ranks can get a few batches more or fewer than each other; the trainer handles that (it stops a
training epoch when the first rank runs dry and pads evaluation with a dummy batch), so no sample is duplicated or
dropped in evaluation.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.context
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .schema import FIRST_IDX
from .sequence_store import SequenceStore

log = logging.getLogger(__name__)

SAMPLE_KEYS = ("user_idx", "item_idx", "cate_idx", "ts", "label", "hist_len")


@dataclass(frozen=True)
class SequenceView:
    """The last `length` behaviors of each sample's prefix, under the name `name`."""

    name: str
    length: int
    negatives: bool = False  # also sample one non-clicked item per position (DIEN's auxiliary loss)


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 256
    views: tuple[SequenceView, ...] = ()
    shuffle: bool = False
    seed: int = 0
    num_workers: int = 0
    shuffle_window: int = 8  # row groups mixed together when shuffling
    drop_last: bool = False


@dataclass
class DatasetInfo:
    """What the loader and the models need to know about a dataset directory (from manifest.json)."""

    data_dir: Path
    manifest: dict[str, Any]
    vocab_sizes: dict[str, int]
    context_columns: list[str]
    item_attributes: list[str]
    split_rows: dict[str, int]
    has_p_true: bool

    @classmethod
    def load(cls, data_dir: Path | str) -> DatasetInfo:
        data_dir = Path(data_dir)
        path = data_dir / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no manifest.json; DATA_DIR must be a dataset directory written by `ctr build`"
            )
        m = json.loads(path.read_text())
        return cls(
            data_dir=data_dir,
            manifest=m,
            vocab_sizes=dict(m["vocab_sizes"]),
            context_columns=list(m.get("context_columns", [])),
            item_attributes=list(m.get("item_attributes", [])),
            split_rows={s: int(v["rows"]) for s, v in m["split"].items() if isinstance(v, dict)},
            has_p_true=bool(m.get("has_p_true")),
        )


@dataclass
class Batch:
    """One batch: sparse id features (KeyedJaggedTensor) for the embedding tables, everything else dense.

    `dense` holds `label` (float32 [B]), `hist_len` [B], `ts` [B], `user_idx` / `item_idx` [B] (for predictions),
    per view `<view>_lengths` [B] and `<view>_ts_gap` (jagged values), and `p_true` when the dataset has it (for the
    oracle metric only: models never read it).
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


def ragged_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate `arange(s, s + n)` for each (s, n), vectorized."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=row_starts[1:])
    return np.repeat(starts.astype(np.int64) - row_starts, lengths) + np.arange(total, dtype=np.int64)


def split_units(data_dir: Path, split: str) -> list[tuple[str, int, int]]:
    """The row groups of a split as (file, row_group, num_rows), in file order."""
    folder = Path(data_dir) / "samples" / split
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

    def __init__(self, info: DatasetInfo, views: Sequence[SequenceView], store: SequenceStore | None = None) -> None:
        self.info = info
        self.views = tuple(views)
        self._store = store
        self.n_items = info.vocab_sizes["item"]
        self._item_cate: np.ndarray | None = None

    @property
    def store(self) -> SequenceStore:
        if self._store is None:
            self._store = SequenceStore.open(self.info.data_dir)
        return self._store

    @property
    def item_cate(self) -> np.ndarray:
        if self._item_cate is None:
            t = pq.read_table(self.info.data_dir / "items.parquet", columns=["item_idx", "cate_idx"])
            cate = np.zeros(self.n_items, dtype=np.int32)
            cate[t["item_idx"].to_numpy()] = t["cate_idx"].to_numpy()
            self._item_cate = cate
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
        for v in self.views:
            n = np.minimum(hist_len, v.length)
            idx = ragged_ranges(base + hist_len - n, n)
            item = np.asarray(store.item_idx[idx])
            out[f"{v.name}_item"] = item
            out[f"{v.name}_cate"] = np.asarray(store.cate_idx[idx])
            out[f"{v.name}_lengths"] = n.astype(np.int32)
            out[f"{v.name}_ts_gap"] = np.repeat(cols["ts"], n) - np.asarray(store.ts[idx])
            if v.negatives:
                neg = rng.integers(FIRST_IDX, self.n_items, size=item.shape[0]).astype(np.int32)
                clash = neg == item
                neg[clash] = FIRST_IDX + (neg[clash] - FIRST_IDX + 1) % max(1, self.n_items - FIRST_IDX)
                out[f"{v.name}_neg_item"] = neg
                out[f"{v.name}_neg_cate"] = self.item_cate[neg]
        return out


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
        self.assembler = BatchAssembler(info, cfg.views)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_units(self) -> list[tuple[str, int, int]]:
        units = list(self.units)
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units[self.rank :: self.world_size]

    def rank_rows(self) -> int:
        return sum(u[2] for u in self.rank_units())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        wi = get_worker_info()
        worker, n_workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        units = self.rank_units()[worker::n_workers]
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker])
        bs = self.cfg.batch_size
        window = self.cfg.shuffle_window if self.cfg.shuffle else 1
        pending: list[pa.Table] = []
        pending_rows = 0
        files: dict[str, pq.ParquetFile] = {}

        def flush(table: pa.Table) -> Iterator[dict[str, np.ndarray]]:
            cols = {c: table[c].to_numpy() for c in self.columns}
            yield self.assembler.assemble(cols, rng)

        for start in range(0, len(units), window):
            parts = []
            for f, g, _ in units[start : start + window]:
                pf = files.get(f) or files.setdefault(f, pq.ParquetFile(f))
                parts.append(pf.read_row_group(g, columns=self.columns))
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


def _as_is(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return arrays


class BatchCollator:
    """numpy arrays from a worker -> Batch with a KeyedJaggedTensor holding exactly `features` (in that order)."""

    def __init__(self, features: Sequence[str], views: Sequence[SequenceView]) -> None:
        self.features = list(features)
        self.views = {v.name: v for v in views}

    def _jagged(self, arrays: dict[str, np.ndarray], name: str, batch: int) -> tuple[np.ndarray, np.ndarray]:
        for view in self.views:
            if name.startswith(view + "_") and name[len(view) + 1 :] in ("item", "cate", "neg_item", "neg_cate"):
                return arrays[name], arrays[f"{view}_lengths"]
        column = f"{name}_idx"
        if column not in arrays:
            raise KeyError(f"sparse feature {name!r}: the batch has no column {column!r} and no view named so")
        return arrays[column], np.ones(batch, dtype=np.int32)

    def __call__(self, arrays: dict[str, np.ndarray]) -> Batch:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        size = len(arrays["label"])
        values, lengths = [], []
        for name in self.features:
            v, n = self._jagged(arrays, name, size)
            values.append(torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)))
            lengths.append(torch.from_numpy(np.ascontiguousarray(n, dtype=np.int32)))
        sparse = KeyedJaggedTensor(
            keys=self.features,
            values=torch.cat(values) if values else torch.zeros(0, dtype=torch.int64),
            lengths=torch.cat(lengths) if lengths else torch.zeros(0, dtype=torch.int32),
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
            dense[f"{view}_ts_gap"] = torch.from_numpy(arrays[f"{view}_ts_gap"].astype(np.int64))
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
        )
        for arrays in loader:
            yield self.collate(arrays)

    def num_rows(self) -> int:
        return self.stream.rank_rows()
