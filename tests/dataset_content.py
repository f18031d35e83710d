"""What a dataset directory says, independent of how the build cut it into files (for tests that compare builds)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from features.schema import SPLITS

MANIFEST_CONTENT = ("tables", "vocab_sizes", "users", "sequence_length", "hist_len", "item_attributes", "mm_emb")


def _frame(directory: Path) -> pl.DataFrame | None:
    if not any(directory.glob("*.parquet")):
        return None
    df = pl.read_parquet(directory / "*.parquet")
    return df.sort([c for c, t in df.schema.items() if not t.is_nested()])


def dataset_content(data: Path) -> dict[str, Any]:
    """What a dataset says, independent of how it was cut into files: every table sorted, the manifest's counts."""
    content: dict[str, Any] = {
        "sequences": _frame(data / "sequences"),
        "items": pl.read_parquet(data / "items.parquet"),
        **{f"samples/{s}": _frame(data / "samples" / s) for s in SPLITS},
        **{f"vocab/{f.stem}": pl.read_parquet(f) for f in sorted((data / "vocab").glob("*.parquet"))},
    }
    manifest = json.loads((data / "manifest.json").read_text())
    quarantine = data / "quarantine"
    for table in sorted(p for p in quarantine.iterdir() if p.is_dir()) if quarantine.exists() else []:
        rows = _frame(table)  # source_file is the raw file's path: keep the part below the raw directory
        content[f"quarantine/{table.name}"] = rows.with_columns(
            pl.col("source_file").str.strip_prefix(manifest["raw_dir"] + os.sep)
        ).sort(rows.columns)
    content["manifest"] = {k: manifest[k] for k in MANIFEST_CONTENT}
    content["split"] = {k: v for k, v in manifest["split"].items() if not isinstance(v, dict)} | {
        s: {k: v for k, v in manifest["split"][s].items() if k != "files"} for s in SPLITS
    }
    return content


def assert_same_content(a: Path, b: Path) -> None:
    ca, cb = dataset_content(a), dataset_content(b)
    assert ca.keys() == cb.keys()
    for key, value in ca.items():
        if isinstance(value, pl.DataFrame):
            assert value.equals(cb[key]), f"{key} differs between {a} and {b}"
        else:
            assert value == cb[key], f"{key} differs between {a} and {b}"
    assert ca["sequences"].height > 0 and ca["samples/train"].height > 0
