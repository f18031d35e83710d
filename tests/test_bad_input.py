"""Bad input: a clear error (file, column, what was expected, how to fix) or quarantine with a reason; counts
reconcile and nothing is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rawlog import random_raw

from cli.main import main as ctr_main
from pipelines import validate as V
from pipelines.build import build_dataset
from pipelines.config import load_build_config
from pipelines.scan import scan_raw
from pipelines.validate import DataError


def _cfg(*extra: str):
    return load_build_config(None, ["ray.num_partitions=2", *extra])


@pytest.fixture
def raw(tmp_path) -> Path:
    return random_raw(tmp_path / "raw", seed=11, behaviors=80, impressions=40)


def _rewrite(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def _expect_error(raw: Path, out: Path, *patterns: str) -> str:
    with pytest.raises(DataError) as info:
        build_dataset(raw, out, _cfg())
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    assert "How to fix" in msg
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return msg


def test_missing_path(tmp_path):
    _expect_error(tmp_path / "nope", tmp_path / "data", "does not exist", "--raw")


def test_missing_table(raw, tmp_path):
    (raw / "impressions.parquet").unlink()
    _expect_error(raw, tmp_path / "data", "no impressions table")


def test_missing_column(raw, tmp_path):
    f = raw / "behaviors" / "part-1.parquet"
    _rewrite(f, lambda t: t.drop_columns(["ts"]))
    _expect_error(raw, tmp_path / "data", str(f), "missing required column", "'ts'")


def test_extra_column(raw, tmp_path):
    f = raw / "behaviors" / "part-0.parquet"
    _rewrite(f, lambda t: t.append_column("comment", pa.array(["x"] * t.num_rows)))
    _expect_error(raw, tmp_path / "data", str(f), "'comment'", "unexpected column")


def test_wrong_dtype(raw, tmp_path):
    f = raw / "impressions.parquet"
    _rewrite(f, lambda t: t.set_column(0, "user_id", t["user_id"].cast(pa.string())))
    _expect_error(raw, tmp_path / "data", str(f), "'user_id'", "expected int64, found string")


def test_float_timestamps(raw, tmp_path):
    f = raw / "behaviors" / "part-0.parquet"
    _rewrite(f, lambda t: t.set_column(2, "ts", t["ts"].cast(pa.float64())))
    _expect_error(raw, tmp_path / "data", "'ts'", "expected int64, found double", "integer seconds")


def test_narrow_integer_ids_are_accepted(raw):
    f = raw / "behaviors" / "part-0.parquet"
    _rewrite(f, lambda t: t.set_column(2, "ts", t["ts"].cast(pa.int32())))
    assert scan_raw(raw)["behaviors"].rows == 80


def test_empty_file(raw, tmp_path):
    (raw / "behaviors" / "part-1.parquet").write_bytes(b"")
    _expect_error(raw, tmp_path / "data", "part-1.parquet", "empty (0 bytes)")


def test_table_without_rows(raw, tmp_path):
    _rewrite(raw / "impressions.parquet", lambda t: t.slice(0, 0))
    _expect_error(raw, tmp_path / "data", "has no rows")


def test_truncated_parquet(raw, tmp_path):
    f = raw / "items.parquet"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _expect_error(raw, tmp_path / "data", str(f), "not a readable Parquet file", "truncated or corrupt")


def test_corrupt_parquet(raw, tmp_path):
    f = raw / "behaviors" / "part-0.parquet"
    f.write_bytes(np.random.default_rng(0).bytes(4096))
    _expect_error(raw, tmp_path / "data", str(f), "not a readable Parquet file")


def test_embedding_of_wrong_type(raw, tmp_path):
    f = raw / "items.parquet"
    _rewrite(f, lambda t: t.set_column(3, "mm_emb", pa.array([["a"]] * t.num_rows)))
    _expect_error(raw, tmp_path / "data", "'mm_emb'", "fixed_size_list<float32 or int8>[D]")


def test_embedding_dimension_differs_between_files(raw, tmp_path):
    items = pq.read_table(raw / "items.parquet")
    (raw / "items.parquet").unlink()
    (raw / "items").mkdir()
    pq.write_table(items.slice(0, 25), raw / "items" / "a.parquet")
    wide = np.ones((25, 8), np.float32)
    other = items.slice(25).set_column(3, "mm_emb", pa.FixedSizeListArray.from_arrays(pa.array(wide.ravel()), 8))
    pq.write_table(other, raw / "items" / "b.parquet")
    _expect_error(raw, tmp_path / "data", "b.parquet", "differs from")


def test_cli_reports_error_and_exit_code(raw, tmp_path, capsys):
    shutil.rmtree(raw / "behaviors")
    assert ctr_main(["build", "--raw", str(raw), "--out", str(tmp_path / "data")]) == 2
    assert "no behaviors table" in capsys.readouterr().err


def test_bad_config_names_the_key():
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="split.valid_fractoin: unknown key"):
        load_build_config(None, ["split.valid_fractoin=0.2"])
    with pytest.raises(ConfigError, match="ray.num_partitions"):
        load_build_config(None, ["ray.num_partitions=many"])


# --------------------------------------------------------------------------------------------------------------------
# row-level problems: one build with every kind of bad row, each quarantined with its reason
# --------------------------------------------------------------------------------------------------------------------
def _bad_rows_world(root: Path) -> dict[str, dict[str, int]]:
    """A raw directory whose rows contain every row-level problem; returns the expected reason counts."""
    rng = np.random.default_rng(0)
    items = 20
    item_ids = np.arange(items, dtype=np.int64) * 10 + 1000
    emb = [list(rng.normal(size=4).astype(np.float32)) for _ in range(items)]
    emb[3][1] = float("nan")
    emb[4][0] = float("inf")
    emb[5] = emb[5][:3]  # wrong dimension (a variable-length list column is accepted, checked per row)
    item_col = list(item_ids) + [None, 1010]  # a null id, a duplicate of item 1010
    cate_col = list(rng.integers(0, 3, items)) + [1, 2]
    cate_col[6] = None
    emb += [list(np.zeros(4, np.float32))] * 2
    root.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(item_col, pa.int64()),
                "cate_id": pa.array(cate_col, pa.int64()),
                "mm_emb": pa.array(emb, pa.list_(pa.float32())),
            }
        ),
        root / "items.parquet",
    )
    good_items = [int(i) for k, i in enumerate(item_ids) if k not in (3, 4, 5, 6)]
    users = [1, 2, 3]
    b = {
        "user_id": [1, 1, 2, 2, 3, None, 1, 2, 3, 3],
        "item_id": [
            good_items[0],
            good_items[1],
            good_items[2],
            good_items[2],
            good_items[3],
            good_items[0],
            int(item_ids[3]),
            99999,
            good_items[4],
            good_items[4],
        ],
        "ts": [10, 20, 10, 10, 5, 7, 8, 9, -3, None],
    }
    # row 3 duplicates row 2; row 5 null user; row 6 item quarantined (NaN emb); row 7 unknown; row 8 negative ts;
    # row 9 null ts
    pq.write_table(pa.table({k: pa.array(v, pa.int64()) for k, v in b.items()}), root / "behaviors.parquet")
    imp = {
        "user_id": pa.array(users + [1, 2, 3, 1, 1, 2], pa.int64()),
        "item_id": pa.array(
            good_items[:3] + [good_items[0], good_items[5], 12345, good_items[6], None, good_items[7]], pa.int64()
        ),
        "ts": pa.array([30, 30, 30, 30, 31, 31, 32, 33, -1], pa.int64()),
        "label": pa.array([1, 0, 1, 1, 2, 0, None, 0, 0], pa.int8()),
    }
    # row 3 duplicates row 0 (same user, item, ts); row 4 label 2; row 5 unknown item; row 6 null label;
    # row 7 null item; row 8 negative ts
    pq.write_table(pa.table(imp), root / "impressions.parquet")
    return {
        "items": {
            V.R_EMB_NONFINITE: 2,
            V.R_EMB_DIM: 1,
            V.R_NULL.format(col="item_id"): 1,
            V.R_NULL.format(col="cate_id"): 1,
            V.R_DUP_ITEM: 1,
        },
        "behaviors": {
            V.R_DUP_BEHAVIOR: 1,
            V.R_NULL.format(col="user_id"): 1,
            V.R_UNKNOWN_ITEM: 2,
            V.R_NEGATIVE_TS: 1,
            V.R_NULL.format(col="ts"): 1,
        },
        "impressions": {
            V.R_DUP_IMPRESSION: 1,
            V.R_LABEL: 1,
            V.R_UNKNOWN_ITEM: 1,
            V.R_NULL.format(col="label"): 1,
            V.R_NULL.format(col="item_id"): 1,
            V.R_NEGATIVE_TS: 1,
        },
    }


def test_bad_rows_are_quarantined_with_reasons(tmp_path, ray_local):
    expected = _bad_rows_world(tmp_path / "raw")
    manifest = build_dataset(tmp_path / "raw", tmp_path / "data", _cfg())
    for name, reasons in expected.items():
        t = manifest["tables"][name]
        assert t["quarantine_reasons"] == reasons, name
        assert t["rows_in"] == t["rows_out"] + t["rows_quarantined"]
    q = pl.read_parquet(tmp_path / "data" / "quarantine" / "behaviors" / "*.parquet")
    assert set(q.columns) >= {"user_id", "item_id", "ts", "reason", "source_file", "source_row"}
    negative = q.filter(pl.col("reason") == V.R_NEGATIVE_TS)
    assert negative["source_row"].to_list() == [8]
    assert negative["source_file"].to_list() == [str(tmp_path / "raw" / "behaviors.parquet")]
    dup = q.filter(pl.col("reason") == V.R_DUP_BEHAVIOR)
    assert dup["source_row"].to_list() == [3]  # the later copy is quarantined, the first kept
    qi = pl.read_parquet(tmp_path / "data" / "quarantine" / "items" / "*.parquet")
    assert qi.filter(pl.col("reason") == V.R_DUP_ITEM)["source_row"].to_list() == [21]
    items = pl.read_parquet(tmp_path / "data" / "items.parquet")
    assert len(items) == 16 and items.schema["mm_emb"] == pl.Array(pl.Float32, 4)
