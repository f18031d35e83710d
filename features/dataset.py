"""The dataset directory: what `ctr build` (and `ctr sid`) write and training reads, in one place.

::

    DATA_DIR/
      manifest.json                written last by `ctr build` (its presence marks a finished build); `ctr sid`
                                   adds its `semantic_ids` block; schema version, counts, split, vocab sizes, ...
      sequences/*.parquet          user_idx int32, item_idx list<int32>, cate_idx list<int32>, ts list<int64>,
                                   [btype list<int8>]; one row per user, lists sorted by (ts, input order)
      samples/{train,valid,test}/*.parquet
                                   user_idx, item_idx, cate_idx int32, ts int64, label int8, hist_len int32,
                                   [<context>_idx int32 ...], [p_true float64]
      items.parquet                item_idx int32, cate_idx int32, [<attr>_idx int32 ...], [mm_emb],
                                   [sid_0 .. sid_{L-1} int32 after `ctr sid`]
      vocab/<space>.parquet        raw int64, idx int32    (idx 0 = padding, 1 = out-of-vocabulary)
      quarantine/<table>/*.parquet every rejected input row with `reason`, `source_file`, `source_row`
      clusters/*.parquet           after `ctr cluster` (TWIN-V2): user_idx int32, rep / size / block_end list<int32>,
                                   mean_ts list<float64>; one row per user with a complete block, clusters oldest first

`hist_len` counts the user's behaviors with ts strictly before the sample's ts (ties count as after), so the
behaviors a sample may see are `sequence[0:hist_len]`. Column schemas are in `features.schema`.

Every writer (`pipelines.build` and its stages, `pipelines.sid`) and reader (the loader, the sequence store, the
models through `DatasetInfo`'s item tables) takes its paths from here; models and their modules read no files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DatasetError
from .schema import OOV_IDX, SCHEMA_VERSION

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ITEMS = "items.parquet"
SEQUENCES = "sequences"
SAMPLES = "samples"
VOCAB = "vocab"
QUARANTINE = "quarantine"
CLUSTERS = "clusters"

SID_HINT = "run `ctr sid --data {data}` first (it adds sid_0 .. sid_{{L-1}} to items.parquet)"


class SemanticIDsMissing(DatasetError, ValueError):
    """The dataset has no semantic IDs (or fewer levels than asked): `ctr sid` has not run on it."""


def manifest_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / MANIFEST


def items_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / ITEMS


def sequences_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / SEQUENCES


def samples_dir(data_dir: Path | str, split: str) -> Path:
    return Path(data_dir) / SAMPLES / split


def vocab_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / VOCAB


def clusters_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / CLUSTERS


def quarantine_dir(data_dir: Path | str, table: str | None = None) -> Path:
    root = Path(data_dir) / QUARANTINE
    return root if table is None else root / table


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's content: changes with every build of the dataset and with `ctr sid`."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def read_manifest(data_dir: Path | str) -> dict[str, Any]:
    """DATA_DIR/manifest.json, checked to be of the schema version this code reads."""
    path = manifest_path(data_dir)
    if not path.exists():
        raise DatasetError(
            f"{path}: no manifest.json; DATA_DIR must be a dataset directory written by `ctr build` "
            "(a build that did not finish leaves none)"
        )
    m = json.loads(path.read_text())
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: dataset schema version {version}, this code reads version {SCHEMA_VERSION}. How to fix: "
            f"rebuild it with this version: ctr build --raw {m.get('raw_dir', 'RAW_DIR')} --out {data_dir} "
            "--overwrite"
        )
    return m


def write_manifest(data_dir: Path | str, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (a reader sees the old one or the new one, never half of one)."""
    path = manifest_path(data_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


@dataclass
class DatasetInfo:
    """What the loader and the models need to know about a dataset directory (from manifest.json), and its item
    tables (`mm_table`, `sid_codes`), read here so that models receive arrays, not paths."""

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
        m = read_manifest(data_dir)
        return cls(
            data_dir=data_dir,
            manifest=m,
            vocab_sizes=dict(m["vocab_sizes"]),
            context_columns=list(m.get("context_columns", [])),
            item_attributes=list(m.get("item_attributes", [])),
            split_rows={s: int(v["rows"]) for s, v in m["split"].items() if isinstance(v, dict)},
            has_p_true=bool(m.get("has_p_true")),
        )

    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest's content: changes with every build of the dataset and with `ctr sid`."""
        return manifest_fingerprint(self.manifest)

    def placeholder_categories(self) -> tuple[int, ...]:
        """Category indices that stand for "no category": out of vocabulary, and the raw ``cate_id`` 0 the
        importers write for items without one (`features.schema`), when the dataset has it."""
        out = [OOV_IDX]
        vocab = vocab_dir(self.data_dir) / "cate.parquet"
        if vocab.exists():
            t = pq.read_table(vocab, filters=[("raw", "=", 0)])
            out += [int(i) for i in t["idx"].to_pylist()]
        return tuple(out)

    @property
    def has_btype(self) -> bool:
        """Whether the behaviors carry a type (``btype``: click, cart, ...)."""
        return bool(self.manifest.get("has_btype"))

    @property
    def median_hist_len(self) -> float | None:
        """The median ``hist_len`` of the **train** split (manifest ``split.train.hist_len.p50``): a model's
        statistics must not come from the samples it is evaluated on. A dataset built before the per-split
        statistics has only the median over every split; it is used then, with a warning."""
        train = self.manifest.get("split", {}).get("train", {})
        stats = train.get("hist_len") if isinstance(train, dict) else None
        if isinstance(stats, dict) and stats.get("p50") is not None:
            return float(stats["p50"])
        stats = self.manifest.get("hist_len")
        if isinstance(stats, dict) and stats.get("p50") is not None:
            log.warning("%s: no train-split hist_len in the manifest (built before it); using every split's median",
                        self.data_dir)  # fmt: skip
            return float(stats["p50"])
        return None

    def mm_table(self) -> np.ndarray:
        """The frozen multimodal table ``[vocab_sizes["item"], D]`` float32 or int8 (as stored), row = ``item_idx``;
        padding, out-of-vocabulary and items without an embedding (null ``mm_emb``) are zero rows."""
        meta = self.manifest.get("mm_emb")
        if not meta:
            raise DatasetError(
                f"{self.data_dir}: the dataset has no multimodal item embeddings (manifest mm_emb is empty); "
                "build it from items with an mm_emb column (fixed_size_list<float32 | int8>[D])"
            )
        dim = int(meta["dim"])
        t = pq.read_table(items_path(self.data_dir), columns=["item_idx", "mm_emb"])
        col = t["mm_emb"].combine_chunks()
        if isinstance(col, pa.ChunkedArray):  # pragma: no cover - combine_chunks on a column gives one chunk
            col = col.chunk(0)
        np_dtype = np.int8 if col.type.value_type == pa.int8() else np.float32
        valid = np.asarray(pc.is_valid(col)) if col.null_count else np.ones(len(col), dtype=bool)
        flat = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False).astype(np_dtype, copy=False)
        table = np.zeros((self.vocab_sizes["item"], dim), dtype=np_dtype)
        table[t["item_idx"].to_numpy()[valid]] = flat.reshape(-1, dim)
        return table

    def sid_codes(self, levels: int | None = None) -> tuple[np.ndarray, int]:
        """The semantic-ID table ``[vocab_sizes["item"], levels]`` int64 (row = ``item_idx``) and the number of
        codes per level ``K + 1`` (the last one, ``K``, is the reserved code of padding, OOV and items without an
        embedding). ``levels`` None = every level ``ctr sid`` wrote; fewer keeps the coarsest ones."""
        block = self.manifest.get("semantic_ids")
        path = items_path(self.data_dir)
        hint = SID_HINT.format(data=self.data_dir)
        if not block:
            raise SemanticIDsMissing(f"{self.data_dir}: the dataset has no semantic IDs (no manifest block); {hint}")
        have = int(block["levels"])
        use = have if levels is None else int(levels)
        if not 1 <= use <= have:
            raise ValueError(f"sid_levels={levels}: the dataset's semantic IDs have {have} levels ({hint}, --levels)")
        names = [f"sid_{j}" for j in range(use)]
        present = set(pq.read_schema(path).names)
        if missing := [c for c in names if c not in present]:
            raise SemanticIDsMissing(f"{path}: no column(s) {', '.join(missing)}; {hint}")
        num_codes = int(block["num_codes"])
        reserved = num_codes - 1
        t = pq.read_table(path, columns=["item_idx", *names])
        table = np.full((self.vocab_sizes["item"], use), reserved, dtype=np.int64)
        idx = t["item_idx"].to_numpy()
        for j, c in enumerate(names):
            col = t[c].to_numpy(zero_copy_only=False).astype(np.int64)
            if col.size and (col.min() < 0 or col.max() > reserved):
                raise ValueError(f"{path}: {c} has codes outside [0, {reserved}]; rebuild with `ctr sid --data ...`")
            table[idx, j] = col
        return table, num_codes

    def item_impressions(self, split: str = "train") -> np.ndarray:
        """Impressions of every ``item_idx`` in a split's samples (``[vocab_sizes["item"]]`` int64)."""
        counts = np.zeros(self.vocab_sizes["item"], dtype=np.int64)
        for f in sorted(samples_dir(self.data_dir, split).glob("*.parquet")):
            items = pq.read_table(f, columns=["item_idx"])["item_idx"].to_numpy()
            counts += np.bincount(items, minlength=len(counts))[: len(counts)]
        return counts

    def item_first_seen(self) -> np.ndarray:
        """The earliest ts at which each ``item_idx`` appears anywhere in the dataset: as a behavior (sequences) or
        as an impression (the samples of every split); ``[vocab_sizes["item"]]`` int64, the int64 maximum for an
        item that never appears. An item whose first appearance is at or after ``split.test_start_ts`` is new in
        the test period (the cold-start slice of the semantic-ID experiment, the paper's CTR/1D)."""
        never = np.iinfo(np.int64).max
        first = np.full(self.vocab_sizes["item"], never, dtype=np.int64)
        for f in sorted(sequences_dir(self.data_dir).glob("*.parquet")):
            t = pq.read_table(f, columns=["item_idx", "ts"])
            items = pc.list_flatten(t["item_idx"]).to_numpy()
            ts = pc.list_flatten(t["ts"]).to_numpy()
            np.minimum.at(first, items, ts)
        for split in self.split_rows:
            for f in sorted(samples_dir(self.data_dir, split).glob("*.parquet")):
                t = pq.read_table(f, columns=["item_idx", "ts"])
                np.minimum.at(first, t["item_idx"].to_numpy(), t["ts"].to_numpy())
        return first

    def item_categories(self) -> np.ndarray:
        """``cate_idx`` of every ``item_idx`` (``[vocab_sizes["item"]]`` int32; 0 for padding and OOV)."""
        t = pq.read_table(items_path(self.data_dir), columns=["item_idx", "cate_idx"])
        cate = np.zeros(self.vocab_sizes["item"], dtype=np.int32)
        cate[t["item_idx"].to_numpy()] = t["cate_idx"].to_numpy()
        return cate
