"""The sequence store as flat arrays: every user's behaviors concatenated in user order, plus offsets by user.

`sequences/*.parquet` (one row per user, list columns) is the store's durable form; training needs random access by
`user_idx`, so the first reader converts it once into a CSR cache next to the dataset::

    DATA_DIR/_cache/sequence_store/
      offsets.npy   int64 [n_user_vocab + 1]   behaviors of user u are rows offsets[u]:offsets[u + 1]
      item_idx.npy  int32 [n_behaviors]
      cate_idx.npy  int32 [n_behaviors]
      ts.npy        int64 [n_behaviors]
      btype.npy     int8  [n_behaviors]        (when the dataset has btype)
      meta.json     which build of the dataset the cache belongs to
      item_counts-<ts>.npy  int64 [n_items]    behaviors per item before ts (`SequenceStore.item_counts`, on use)

The arrays are opened memory-mapped, so DataLoader workers (and several ranks on one host) share one copy through
the page cache, and a 100M-behavior store does not have to fit in each process. The cache is written aside and
moved into place, and rebuilt when the dataset's manifest says it was built again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .dataset import read_manifest, sequences_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1
COUNT_CHUNK = 1 << 24  # rows of the store read at a time by `SequenceStore.item_counts`
_COLUMNS = {"item_idx": np.int32, "cate_idx": np.int32, "ts": np.int64, "btype": np.int8}


def _fingerprint(data_dir: Path) -> dict:
    manifest = read_manifest(data_dir)
    return {
        "cache_version": CACHE_VERSION,
        "created_at": manifest.get("created_at"),
        "sequence_files": manifest.get("sequence_files"),
        "n_users": manifest["vocab_sizes"]["user"],
    }


def ragged_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate `arange(s, s + n)` for each (s, n), vectorized."""
    lengths = lengths.astype(np.int64, copy=False)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    row_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=row_starts[1:])
    return np.repeat(starts.astype(np.int64) - row_starts, lengths) + np.arange(total, dtype=np.int64)


def row_tails(columns: list[np.ndarray], lengths: np.ndarray, n: np.ndarray) -> list[np.ndarray]:
    """The last ``n[r]`` values of each jagged row r (rows of ``lengths``) of every column; the columns themselves
    where every row keeps all of its values. A shorter view of the prefix is the tail of a longer one: both are the
    last behaviors strictly before the sample."""
    if np.array_equal(n, lengths):
        return list(columns)
    at = ragged_ranges(np.cumsum(lengths) - n, n)
    return [c[at] for c in columns]


@dataclass
class SequenceStore:
    """Flat behavior arrays with per-user offsets (see the module docstring)."""

    offsets: np.ndarray
    item_idx: np.ndarray
    cate_idx: np.ndarray
    ts: np.ndarray
    btype: np.ndarray | None
    cache: Path | None = None  # the cache folder the arrays were opened from (None: arrays given directly)

    @property
    def n_behaviors(self) -> int:
        return int(self.offsets[-1])

    def user_length(self, user_idx: np.ndarray) -> np.ndarray:
        return self.offsets[user_idx + 1] - self.offsets[user_idx]

    def item_counts(self, n_items: int, before_ts: int | None, chunk: int = COUNT_CHUNK) -> np.ndarray:
        """int64 [n_items]: how many stored behaviors of each item id are strictly before ``before_ts`` (every
        behavior when None). One pass over the store in chunks of `chunk` rows (a billion-behavior store is not
        copied whole); kept in the cache folder, so the loader's workers and later runs read it instead."""
        tag = "all" if before_ts is None else str(int(before_ts))
        path = None if self.cache is None else self.cache / f"item_counts-{tag}.npy"
        if path is not None and path.exists():
            counts = np.load(path)
            if counts.shape == (n_items,):
                return counts
        counts = np.zeros(n_items, dtype=np.int64)
        for start in range(0, self.n_behaviors, chunk):
            item = np.asarray(self.item_idx[start : start + chunk])
            if before_ts is not None:
                item = item[np.asarray(self.ts[start : start + chunk]) < before_ts]
            if item.size and (item.min() < 0 or item.max() >= n_items):
                raise ValueError(
                    f"{self.cache}: item_idx outside [0, {n_items}) in the sequence store; the store and the "
                    "manifest's vocabulary come from different builds: rebuild the dataset"
                )
            counts += np.bincount(item, minlength=n_items)
        if path is not None:  # written aside and moved into place: a reader never sees half a file
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
            try:
                np.save(tmp, counts)
                os.replace(tmp, path)
            except OSError as e:  # a read-only dataset: counted again by the next reader
                log.warning("could not keep the item counts at %s (%s); they are counted again next time", path, e)
                tmp.unlink(missing_ok=True)
        return counts

    @classmethod
    def open(cls, data_dir: Path | str, cache_dir: Path | str | None = None) -> SequenceStore:
        """Open the CSR cache of `data_dir`, building it first when it is missing or stale."""
        data_dir = Path(data_dir)
        cache = Path(cache_dir) if cache_dir else data_dir / "_cache" / "sequence_store"
        want = _fingerprint(data_dir)
        meta_path = cache / "meta.json"
        if not (meta_path.exists() and json.loads(meta_path.read_text()) == want):
            # Built once: two processes opening a fresh dataset (ranks, loader workers, an evaluation) take turns on
            # a lock file, and the second finds the first's cache when it gets the lock.
            cache.parent.mkdir(parents=True, exist_ok=True)
            with open(cache.parent / f".{cache.name}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if not (meta_path.exists() and json.loads(meta_path.read_text()) == want):
                        _build_cache(data_dir, cache, want)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        arrays = {
            name: np.load(cache / f"{name}.npy", mmap_mode="r")
            for name in ("offsets", *_COLUMNS)
            if (cache / f"{name}.npy").exists()
        }
        return cls(
            offsets=arrays["offsets"],
            item_idx=arrays["item_idx"],
            cate_idx=arrays["cate_idx"],
            ts=arrays["ts"],
            btype=arrays.get("btype"),
            cache=cache,
        )


def _build_cache(data_dir: Path, cache: Path, fingerprint: dict) -> None:
    files = [sequences_dir(data_dir) / f for f in fingerprint["sequence_files"]]
    n_users = int(fingerprint["n_users"])
    log.info("building the sequence-store cache of %s (%d files)", data_dir, len(files))
    lengths = np.zeros(n_users, dtype=np.int64)
    has_btype = False
    for f in files:
        t = pq.read_table(f, columns=["user_idx", "item_idx"])
        users = t["user_idx"].to_numpy()
        if users.size and (users.min() < 0 or users.max() >= n_users):
            raise ValueError(f"{f}: column user_idx has values outside [0, {n_users}); rebuild the dataset")
        lengths[users] = pc.list_value_length(t["item_idx"]).to_numpy(zero_copy_only=False)
        has_btype = has_btype or "btype" in pq.read_schema(f).names
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sequence_store.tmp-", dir=cache.parent))
    try:
        np.save(tmp / "offsets.npy", offsets)
        columns = [c for c in _COLUMNS if c != "btype" or has_btype]
        out = {
            c: np.lib.format.open_memmap(tmp / f"{c}.npy", mode="w+", dtype=_COLUMNS[c], shape=(total,))
            for c in columns
        }
        for f in files:
            t = pq.read_table(f, columns=["user_idx", *columns])
            users = t["user_idx"].to_numpy()
            lens = lengths[users]
            n = int(lens.sum())
            if n == 0:
                continue
            dest = ragged_ranges(offsets[users], lens)  # each user's slots in the flat arrays, file order
            for c in columns:
                flat = pc.list_flatten(t[c]).to_numpy(zero_copy_only=False)
                out[c][dest] = flat.astype(_COLUMNS[c], copy=False)
        for arr in out.values():
            arr.flush()
        del out
        (tmp / "meta.json").write_text(json.dumps(fingerprint))
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:  # another process finished the same cache first
            if not (cache / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("sequence-store cache: %d users, %d behaviors at %s", n_users, total, cache)
