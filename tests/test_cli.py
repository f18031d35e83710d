"""The `ctr` command end to end: the main job (`ctr demo --quick`) and a real import -> build."""

from __future__ import annotations

import json

import pytest
from paths import SHARED_DATA

from cli.main import main as ctr


def _reconciles(manifest: dict) -> None:
    for name, t in manifest["tables"].items():
        assert t["rows_in"] == t["rows_out"] + t["rows_quarantined"], name


def test_demo_quick(tmp_path, ray_local, capsys):
    assert ctr(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo finished" in out and "rows in" in out
    manifest = json.loads((tmp_path / "demo" / "data" / "manifest.json").read_text())
    _reconciles(manifest)
    assert manifest["source"]["preset"] == "tiny"
    assert manifest["has_p_true"] and manifest["mm_emb"]["dim"] == 64
    assert all(manifest["split"][s]["rows"] > 0 for s in ("train", "valid", "test"))


@pytest.mark.skipif(not (SHARED_DATA / "movielens-latest-small").exists(), reason="shared data folder not present")
def test_movielens_import_then_build(tmp_path, ray_local, capsys):
    raw, data = tmp_path / "raw", tmp_path / "data"
    assert ctr(["import", "movielens", str(SHARED_DATA / "movielens-latest-small"), "--out", str(raw)]) == 0
    assert ctr(["build", "--raw", str(raw), "--out", str(data), "--set", "ray.num_partitions=2"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    _reconciles(manifest)
    assert manifest["tables"]["behaviors"]["rows_in"] == 100_836
    assert manifest["tables"]["impressions"]["rows_in"] == 100_836
    assert manifest["users"] == 610
    assert manifest["sequence_length"]["p100"] == 2_698


def test_import_error_is_clear(tmp_path, capsys):
    assert ctr(["import", "movielens", str(tmp_path / "missing"), "--out", str(tmp_path / "raw")]) == 2
    assert "error:" in capsys.readouterr().err
