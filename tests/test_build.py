"""The dataset builder end to end: the point-in-time rule, reconciliation, the contract other tools rely on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from rawlog import random_raw

from features.dataset import samples_dir, sequences_dir
from features.schema import FIRST_IDX, SAMPLE_BASE_SCHEMA, SEQUENCE_BTYPE_FIELD, SEQUENCE_SCHEMA, SPLITS
from pipelines.build import build_dataset
from pipelines.config import load_build_config


def _cfg(*extra: str):
    return load_build_config(None, ["ray.num_partitions=3", "ray.rows_per_task=150", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("build")
    raw = random_raw(root / "raw", seed=3)
    manifest = build_dataset(raw, root / "data", _cfg())
    return raw, root / "data", manifest


def _read_dir(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path / "*.parquet") if any(path.glob("*.parquet")) else pl.DataFrame()


def test_layout_and_manifest(built):
    _, data, manifest = built
    for name in ("manifest.json", "items.parquet", "sequences", "vocab", "samples/train", "samples/valid"):
        assert (data / name).exists(), name
    on_disk = json.loads((data / "manifest.json").read_text())
    assert on_disk["tables"] == manifest["tables"]
    assert set(manifest["vocab_sizes"]) >= {"user", "item", "cate", "brand", "user_segment"}
    assert not list(data.parent.glob(".data.tmp-*")), "the temporary build directory was left behind"
    assert manifest["config"]["split"]["valid_fraction"] == 0.1


def test_files_follow_the_column_schemas(built):
    """Sequence and sample files begin with the columns, in the order and types, of `features.schema`."""
    _, data, _ = built
    seq = pq.read_schema(next(sequences_dir(data).glob("*.parquet")))
    assert list(seq)[: len(SEQUENCE_SCHEMA)] == list(SEQUENCE_SCHEMA)
    assert seq.field("btype") == SEQUENCE_BTYPE_FIELD
    for split in SPLITS:
        for f in samples_dir(data, split).glob("*.parquet"):
            assert list(pq.read_schema(f))[: len(SAMPLE_BASE_SCHEMA)] == list(SAMPLE_BASE_SCHEMA), f


def test_counts_reconcile(built):
    _, data, manifest = built
    for name, t in manifest["tables"].items():
        assert t["rows_in"] == t["rows_out"] + t["rows_quarantined"], name
        assert t["rows_quarantined"] == sum(t["quarantine_reasons"].values())
    seqs = _read_dir(data / "sequences")
    assert seqs["item_idx"].list.len().sum() == manifest["tables"]["behaviors"]["rows_out"]
    samples = sum(len(_read_dir(data / "samples" / s)) for s in SPLITS)
    assert samples == manifest["tables"]["impressions"]["rows_out"]


def test_vocab_contract(built):
    raw, data, _ = built
    for space in ("user", "item", "cate"):
        vocab = pl.read_parquet(data / "vocab" / f"{space}.parquet")
        assert vocab.schema == {"raw": pl.Int64, "idx": pl.Int32}
        assert vocab["idx"].to_list() == list(range(FIRST_IDX, FIRST_IDX + len(vocab)))
        assert vocab["raw"].is_unique().all()
    items = pl.read_parquet(data / "items.parquet")
    assert items["item_idx"].to_list() == list(range(FIRST_IDX, FIRST_IDX + len(items)))
    raw_items = pl.read_parquet(raw / "items.parquet")
    item_vocab = pl.read_parquet(data / "vocab" / "item.parquet")
    cate_vocab = pl.read_parquet(data / "vocab" / "cate.parquet")
    joined = (
        raw_items.join(item_vocab, left_on="item_id", right_on="raw")
        .join(cate_vocab.rename({"idx": "cate_idx"}), left_on="cate_id", right_on="raw")
        .sort("idx")
    )
    assert joined["cate_idx"].to_list() == items["cate_idx"].to_list()
    assert items.schema["mm_emb"] == pl.Array(pl.Float32, 4)


def _expected_samples(raw: Path, data: Path) -> pl.DataFrame:
    """Brute force from the raw files: every impression with the count of its user's distinct behaviors strictly
    before its ts."""
    b = pl.read_parquet(raw / "behaviors" / "*.parquet").unique(["user_id", "item_id", "ts", "btype"])
    imp = pl.read_parquet(raw / "impressions.parquet").unique(["user_id", "item_id", "ts"], keep="first")
    counts = (
        imp.select("user_id", "item_id", "ts")
        .join(b.select("user_id", pl.col("ts").alias("b_ts")), on="user_id", how="left")
        .group_by("user_id", "item_id", "ts")
        .agg((pl.col("b_ts") < pl.col("ts")).sum().alias("expected"))
    )
    users = pl.read_parquet(data / "vocab" / "user.parquet").rename({"raw": "user_id", "idx": "user_idx"})
    items = pl.read_parquet(data / "vocab" / "item.parquet").rename({"raw": "item_id", "idx": "item_idx"})
    return counts.join(users, on="user_id").join(items, on="item_id")


def test_hist_len_counts_strictly_earlier_behaviors(built):
    raw, data, _ = built
    got = pl.concat([_read_dir(data / "samples" / s) for s in SPLITS])
    expected = _expected_samples(raw, data)
    joined = got.join(expected, on=["user_idx", "item_idx", "ts"], how="full", coalesce=True)
    assert len(joined) == len(got) == len(expected)
    assert (joined["hist_len"] == joined["expected"]).all()


def test_prefix_is_strictly_before_every_sample(built):
    _, data, _ = built
    seqs = _read_dir(data / "sequences")
    ts_of = dict(zip(seqs["user_idx"].to_list(), seqs["ts"].to_list(), strict=True))
    for split in SPLITS:
        for row in _read_dir(data / "samples" / split).iter_rows(named=True):
            seq = ts_of[row["user_idx"]]
            assert all(t < row["ts"] for t in seq[: row["hist_len"]])
            assert all(t >= row["ts"] for t in seq[row["hist_len"] :])


def test_sequences_sorted_one_row_per_user(built):
    _, data, manifest = built
    seqs = _read_dir(data / "sequences")
    assert seqs["user_idx"].is_unique().all()
    assert len(seqs) == manifest["users"]
    for ts in seqs["ts"].to_list():
        assert ts == sorted(ts)
    assert set(seqs.columns) == {"user_idx", "item_idx", "cate_idx", "ts", "btype"}


def test_split_by_time(built):
    _, data, manifest = built
    sp = manifest["split"]
    train, valid, test = (_read_dir(data / "samples" / s) for s in SPLITS)
    assert train["ts"].max() < sp["valid_start_ts"] <= valid["ts"].min()
    assert valid["ts"].max() < sp["test_start_ts"] <= test["ts"].min()
    cols = ["user_idx", "item_idx", "cate_idx", "ts", "label", "hist_len", "p_true", "user_segment_idx"]
    assert train.columns == cols
    assert train.schema["label"] == pl.Int8 and train.schema["hist_len"] == pl.Int32


def test_explicit_split_and_existing_output(tmp_path, ray_local):
    raw = random_raw(tmp_path / "raw", seed=5, behaviors=100, impressions=60, with_context=False)
    manifest = build_dataset(raw, tmp_path / "data", _cfg("split.valid_start_ts=20", "split.test_start_ts=30"))
    assert manifest["split"]["valid_start_ts"] == 20 and manifest["split"]["test_start_ts"] == 30
    assert pq.read_table(tmp_path / "data" / "samples" / "test").column("ts").to_numpy().min() >= 30
    from features.outputs import OutputError

    with pytest.raises(OutputError, match="already there.*--overwrite"):
        build_dataset(raw, tmp_path / "data", _cfg())
    build_dataset(raw, tmp_path / "data", _cfg("output.overwrite=true"))
    assert not list(tmp_path.glob(".data.*"))


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import pipelines.build as build

    raw = random_raw(tmp_path / "raw", seed=1, behaviors=50, impressions=20)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "build_items", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build.build_dataset(raw, tmp_path / "data", _cfg())
    assert not (tmp_path / "data").exists()
    assert not list(tmp_path.glob(".data*"))


def test_deterministic_content(tmp_path, ray_local, built):
    raw, data, _ = built
    again = build_dataset(raw, tmp_path / "again", _cfg())
    for split in SPLITS:
        a = _read_dir(data / "samples" / split).sort("user_idx", "ts", "item_idx")
        b = _read_dir(tmp_path / "again" / "samples" / split).sort("user_idx", "ts", "item_idx")
        assert a.equals(b)
    assert again["vocab_sizes"] == json.loads((data / "manifest.json").read_text())["vocab_sizes"]


def test_sequence_lists_match_raw(built):
    raw, data, _ = built
    b = pl.read_parquet(raw / "behaviors" / "*.parquet").unique(["user_id", "item_id", "ts", "btype"])
    seqs = _read_dir(data / "sequences").explode("item_idx", "cate_idx", "ts", "btype")
    assert len(seqs) == len(b)
    np.testing.assert_array_equal(np.sort(seqs["ts"].to_numpy()), np.sort(b["ts"].to_numpy()))


def test_hist_len_percentiles_per_split(built):
    """Each split records its own hist_len percentiles (a model's L0 comes from the train split only)."""
    _, data, manifest = built
    for split in SPLITS:
        hist = _read_dir(data / "samples" / split)["hist_len"].to_numpy()
        stats = manifest["split"][split]["hist_len"]
        if len(hist):
            assert stats["p50"] == pytest.approx(float(np.percentile(hist, 50)))
            assert stats["p100"] == hist.max()
    from features.dataset import DatasetInfo

    assert DatasetInfo.load(data).median_hist_len == manifest["split"]["train"]["hist_len"]["p50"]
