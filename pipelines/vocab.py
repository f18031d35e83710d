"""Vocabularies of `ctr build`: raw ids sorted ascending, idx = FIRST_IDX + rank (0 = padding, 1 = out of vocabulary).

Every stage maps ids through `map_ids` (one searchsorted) or, for the item vocabulary that every log row goes
through, an `IdMap`, which uses a dense lookup table when the ids are compact enough and searchsorted otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.dataset import vocab_dir
from features.outputs import check_identifier, ensure_under
from features.schema import FIRST_IDX, OOV_IDX

# A dense lookup table costs 4 bytes per id in [min, max]; it is used while that stays under this many bytes and
# under 16 ids of range per vocabulary entry (hashed 64-bit ids fall back to searchsorted).
LUT_MAX_BYTES = 256 * 2**20


def map_ids(vocab: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to indices with a sorted vocabulary; returns (idx int32, OOV_IDX for unknown ids; known mask)."""
    pos = np.searchsorted(vocab, raw)
    pos_c = np.minimum(pos, max(len(vocab) - 1, 0))
    known = (vocab[pos_c] == raw) if len(vocab) else np.zeros(len(raw), dtype=bool)
    idx = np.where(known, pos_c + FIRST_IDX, OOV_IDX).astype(np.int32)
    return idx, known


class IdMap:
    """`map_ids` for one vocabulary, with a lookup table when [min id, max id] is small (O(1) per row)."""

    def __init__(self, vocab: np.ndarray) -> None:
        self.vocab = np.asarray(vocab, dtype=np.int64)
        self.lut: np.ndarray | None = None
        self.lo = 0
        if len(self.vocab):
            self.lo = int(self.vocab[0])
            span = int(self.vocab[-1]) - self.lo + 1
            # 0 <= lo <= 2**62: `raw - lo` cannot wrap around into [0, span) for any int64 raw id
            if 0 <= self.lo <= 2**62 and span * 4 <= LUT_MAX_BYTES and span <= 16 * len(self.vocab) + 2**20:
                self.lut = np.ones(span, dtype=np.int32)  # 1 = unknown
                self.lut[self.vocab - self.lo] = np.arange(len(self.vocab), dtype=np.int32) + FIRST_IDX

    def __call__(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.lut is None:
            return map_ids(self.vocab, raw)
        off = raw - self.lo
        inside = (off >= 0) & (off < len(self.lut))
        idx = np.where(inside, self.lut[np.where(inside, off, 0)], 1).astype(np.int32)
        return idx, idx != 1


class ItemLookup(NamedTuple):
    """What follows from an item idx: its raw id (vocab[idx - FIRST_IDX]) and its cate idx (cate_of_item[idx])."""

    vocab: np.ndarray
    cate_of_item: np.ndarray


def map_nullable(vocab: np.ndarray, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An optional categorical column -> idx (0 where null, 1 where unknown)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    idx, _ = map_ids(vocab, np.asarray(values.fill_null(0), dtype=np.int64))
    return np.where(np.asarray(values.is_null(), dtype=bool), 0, idx).astype(np.int32)


def vocab_table(vocab: np.ndarray, first_idx: int = FIRST_IDX) -> pa.Table:
    """The on-disk form of a vocabulary (or of a slice of one that starts at `first_idx`)."""
    return pa.table(
        {"raw": pa.array(vocab, pa.int64()), "idx": pa.array(np.arange(len(vocab)) + first_idx, pa.int32())}
    )


def write_vocab(path: Path, vocab: np.ndarray) -> None:
    pq.write_table(vocab_table(vocab), path)


def vocab_path(out: Path, space: str) -> Path:
    """vocab/<space>.parquet: the space is named after a raw column (checked at scan); checked again here, where
    it becomes a path."""
    check_identifier(space, f"vocabulary {space!r}")
    return ensure_under(vocab_dir(out) / f"{space}.parquet", vocab_dir(out))
