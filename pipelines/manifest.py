"""Stage 5 of `ctr build`, the manifest: row counts that must reconcile, vocabulary sizes, length distributions,
split boundaries and sizes, raw file checksums, stage timings and the config, from the small summaries the Ray
tasks returned (the driver reads no dataset rows to write it; quarantine files are counted from their Parquet
footers, as a check of the summaries)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from features.dataset import quarantine_dir, samples_dir, sequences_dir
from features.schema import FIRST_IDX, SCHEMA_VERSION, SPLITS, idx_column
from pipelines.config import BuildConfig
from pipelines.outdirs import read_source
from pipelines.scan import RawTable

LENGTH_PERCENTILES = (50, 90, 99, 99.9, 100)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import version

    return version("lifelong-ctr")


def merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum (values, counts) pairs of several partitions into one sorted (values, counts)."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inv = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)


def percentiles(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """`np.percentile(x, p)` (linear) for p in LENGTH_PERCENTILES and the mean of the multiset x given as sorted
    distinct values with counts, with numpy's own float steps (so the numbers equal those of the expanded array)."""
    n = int(counts.sum())
    if n == 0:
        return {}
    cum = np.cumsum(counts)

    def at(rank: int) -> np.float64:
        return np.float64(values[int(np.searchsorted(cum, rank, side="right"))])

    out = {}
    for p in LENGTH_PERCENTILES:
        q = np.true_divide(p, 100)
        virtual = (n - 1) * q
        below = int(np.floor(virtual))
        above = min(below + 1, n - 1)
        t = virtual - np.floor(virtual)
        a, b = at(below), at(above)
        diff = b - a
        out[f"p{p:g}"] = float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)
    total = float(np.sum(values.astype(np.float64) * counts))
    return out | {"mean": total / n}


def quarantine_rows_on_disk(table_dir: Path) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in table_dir.glob("*.parquet")) if table_dir.exists() else 0


def build_manifest(
    raw_dir: Path,
    out: Path,
    tables: dict[str, RawTable],
    cfg: BuildConfig,
    items: dict[str, Any],
    vocab_sizes: dict[str, int],
    reasons: dict[str, dict[str, int]],
    written: list[dict[str, Any]],
    lengths: dict[str, tuple[np.ndarray, np.ndarray]],
    split_bounds: tuple[int, int],
    sha256: dict[str, list[str]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a build; raises when the row counts do not reconcile (rows in = rows out + quarantined, per
    table) or when the quarantine files hold other counts than the tasks reported."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        parts = [w["splits"][split] for w in written if split in w["splits"]]
        rows = sum(p["rows"] for p in parts)
        splits[split] = {
            "rows": rows,
            "positive_rate": sum(p["label_sum"] for p in parts) / rows if rows else None,
            "ts_min": min(p["ts_min"] for p in parts) if rows else None,
            "ts_max": max(p["ts_max"] for p in parts) if rows else None,
            "files": sorted(p.name for p in samples_dir(out, split).glob("*.parquet")),
            "hist_len": percentiles(*lengths[f"hist_len_{split}"]),
        }
    rows_out = {
        "items": items["rows_out"],
        "behaviors": sum(w["behaviors"] for w in written),
        "impressions": sum(s["rows"] for s in splits.values()),
    }
    table_counts = {}
    for name, t in tables.items():
        counts = dict(sorted(reasons.get(name, {}).items()))
        q = sum(counts.values())
        on_disk = quarantine_rows_on_disk(quarantine_dir(out, name))
        if on_disk != q:
            raise RuntimeError(f"quarantine/{name} holds {on_disk} rows, but the build's tasks quarantined {q}")
        if t.rows != rows_out[name] + q:
            raise RuntimeError(
                f"row counts of {name} do not reconcile: in {t.rows} != out {rows_out[name]} + quarantined {q}"
            )
        table_counts[name] = {
            "rows_in": t.rows,
            "rows_out": rows_out[name],
            "rows_quarantined": q,
            "quarantine_reasons": counts,
            "files": [
                {"path": str(f.path.relative_to(raw_dir)), "rows": f.rows, "sha256": digest}
                for f, digest in zip(t.files, sha256[name], strict=True)
            ],
        }
    valid_start, test_start = split_bounds
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": code_version(),
        "raw_dir": str(raw_dir.resolve()),
        "source": read_source(raw_dir),
        "tables": table_counts,
        "vocab_sizes": vocab_sizes,
        "item_attributes": items["attributes"],
        "context_columns": [idx_column(c) for c in tables["impressions"].extra_int64],
        "has_p_true": "p_true" in tables["impressions"].optional,
        "has_btype": "btype" in tables["behaviors"].optional,
        "mm_emb": items["mm_emb"],
        "users": vocab_sizes["user"] - FIRST_IDX,
        "sequence_length": percentiles(*lengths["sequence_length"]),
        "hist_len": percentiles(*lengths["hist_len"]),
        "split": {"valid_start_ts": valid_start, "test_start_ts": test_start, **splits},
        "sequence_files": sorted(p.name for p in sequences_dir(out).glob("*.parquet")),
        "config": cfg.model_dump(),
        **extra,
    }
