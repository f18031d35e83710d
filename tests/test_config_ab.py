"""`benchmarks/config_ab.py`: variants parse, each is trained and scored, the differences are paired on the same
test samples, and a rerun reuses finished runs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.config_ab import compare, parse_variant, summarize  # noqa: E402


def test_parse_variant():
    assert parse_variant("pop:model.aux_negatives=popularity,train.epochs=2") == (
        "pop", ["model.aux_negatives=popularity", "train.epochs=2"]
    )  # fmt: skip
    assert parse_variant("defaults:") == ("defaults", [])
    for bad in ("model.x=1", ":model.x=1", "a:model.x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(bad)


def _predictions(path: Path, users, labels, scores) -> None:
    path.mkdir(parents=True)
    n = len(users)
    t = pa.table({"user_idx": users, "item_idx": np.arange(n), "ts": np.arange(n), "label": labels, "score": scores})
    pq.write_table(t, path / "predictions.parquet")


def test_compare_pairs_the_same_samples(tmp_path):
    rng = np.random.default_rng(0)
    n = 2000
    users = rng.integers(0, 50, n).astype(np.int32)
    labels = rng.integers(0, 2, n).astype(np.int8)
    _predictions(tmp_path / "ref", users, labels, rng.random(n))
    _predictions(tmp_path / "better", users, labels, labels + rng.random(n))  # ranks every positive first
    d = compare(tmp_path / "ref", tmp_path / "better")
    assert d["auc"]["delta"] > 0.4 and d["auc"]["lo"] > 0 and d["gauc"]["lo"] > 0
    _predictions(tmp_path / "other", users[::-1].copy(), labels, rng.random(n))
    with pytest.raises(ValueError, match="same test samples"):
        compare(tmp_path / "ref", tmp_path / "other")


def test_summarize_counts_seeds():
    def d(delta, lo, hi):
        return {"delta": delta, "lo": lo, "hi": hi}

    result = {
        "variants": {"a": [], "b": []},
        "seeds": {
            "0": {"delta": {"b": {"auc": d(0.02, 0.01, 0.03), "gauc": d(-0.01, -0.02, 0.01)}}},
            "1": {"delta": {"b": {"auc": d(0.01, -0.01, 0.02), "gauc": d(-0.03, -0.05, -0.01)}}},
        },
    }
    s = summarize(result)["b"]
    assert s["auc"]["seeds_ahead"] == 2 and s["auc"]["seeds_significantly_ahead"] == 1
    assert s["gauc"]["seeds_ahead"] == 0 and s["gauc"]["seeds_significantly_behind"] == 1
    assert s["auc"]["mean_delta"] == pytest.approx(0.015)


def test_config_ab_end_to_end(tiny_data, tmp_path):
    results = tmp_path / "ab.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "config_ab.py"), "--data", str(tiny_data), "--model", "dien",
           "--seeds", "0", "--set", "train.max_steps=3", "--set", "data.batch_size=64", "--set", "train.epochs=1",
           "--variant", "uniform:model.aux_negatives=uniform", "--variant", "popularity:",
           "--work", str(tmp_path / "work"), "--results", str(results)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(results.read_text())
    runs = res["seeds"]["0"]["runs"]
    assert set(runs) == {"uniform", "popularity"} and res["reference"] == "uniform"
    cfg = json.loads((tmp_path / "work" / "popularity-s0" / "config.json").read_text())["model"]
    assert cfg["aux_negatives"] == "popularity"  # the default, with no override of the variant's own
    assert json.loads((tmp_path / "work" / "uniform-s0" / "config.json").read_text())["model"]["aux_negatives"] == (
        "uniform"
    )  # fmt: skip
    delta = res["seeds"]["0"]["delta"]["popularity"]
    for metric in ("auc", "gauc"):
        assert delta[metric]["lo"] <= delta[metric]["delta"] <= delta[metric]["hi"]
        want = runs["popularity"][metric] - runs["uniform"][metric]
        assert delta[metric]["delta"] == pytest.approx(want, abs=1e-12)
    assert "| 0 |" in out.stdout
    # a rerun reuses the finished runs (nothing trained again: the run folders are not rewritten)
    stamp = (tmp_path / "work" / "uniform-s0" / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "work" / "uniform-s0" / "metrics.json").stat().st_mtime_ns == stamp
