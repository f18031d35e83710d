"""`benchmarks/peers.py`'s quality comparison: ours minus FuxiCTR with a paired bootstrap over the test users, only
when the two prediction sets are the same samples in the same order; and FuxiCTR's learning rate (`--fuxictr-lr`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctr.evaluation.metrics import auc

ROOT = Path(__file__).resolve().parents[1]


def _peers_modules():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
        import peers_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return peers, peers_report


def _write(path: Path, users: np.ndarray, labels: np.ndarray, scores: np.ndarray, user_col: str) -> Path:
    pq.write_table(pa.table({user_col: users, "label": labels, "score": scores}), path)
    return path


def _test_set(n_users: int = 60, per_user: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    signal = rng.normal(size=users.size)
    labels = (signal + rng.normal(size=users.size) > 0.8).astype(np.int64)
    return users, labels, signal, rng


def test_paired_quality_is_ours_minus_fuxictr_with_an_interval(tmp_path):
    _, report = _peers_modules()
    users, labels, signal, rng = _test_set()
    good = 1 / (1 + np.exp(-(signal + 0.3 * rng.normal(size=users.size))))  # ours: close to the signal
    poor = 1 / (1 + np.exp(-(signal + 3.0 * rng.normal(size=users.size))))  # FuxiCTR here: much noisier
    q = report.paired_quality(
        _write(tmp_path / "ours.parquet", users, labels, good, "user_idx"),
        _write(tmp_path / "fx.parquet", users, labels.astype(np.int8), poor, "user_index"),
        resamples=50,
    )
    assert q["paired"] and q["resamples"] == 50
    assert q["auc"]["delta"] == auc(labels, good) - auc(labels, poor)
    assert q["auc"]["lo"] <= q["auc"]["delta"] <= q["auc"]["hi"]
    assert q["auc"]["delta"] > 0.1 and q["auc"]["significant"] and q["gauc"]["significant"]
    text = report.delta_text(q)
    assert text.startswith(f"{q['auc']['delta']:+.4f} [") and report.delta_text(q, "gauc") != text
    # the same scores on both sides: a delta of exactly 0 and an interval of [0, 0], not significant
    twin = _write(tmp_path / "same.parquet", users, labels, good, "user_index")
    same = report.paired_quality(tmp_path / "ours.parquet", twin, resamples=20)
    assert same["paired"] and same["auc"] == {"delta": 0.0, "lo": 0.0, "hi": 0.0, "significant": False}


def test_paired_quality_refuses_rows_that_are_not_the_same_samples(tmp_path):
    _, report = _peers_modules()
    users, labels, signal, _ = _test_set()
    ours = _write(tmp_path / "ours.parquet", users, labels, signal, "user_idx")
    shuffled = np.random.default_rng(1).permutation(users.size)
    fx = _write(tmp_path / "fx.parquet", users[shuffled], labels[shuffled], signal[shuffled], "user_index")
    q = report.paired_quality(ours, fx, resamples=10)
    assert q == {"paired": False, "why": q["why"]} and "differ first at test row" in q["why"]
    short = _write(tmp_path / "short.parquet", users[:-1], labels[:-1], signal[:-1], "user_index")
    q = report.paired_quality(ours, short, resamples=10)
    assert not q["paired"] and "test rows" in q["why"]
    assert report.delta_text(q) == "not paired" and report.delta_text(None) == "-"


def test_fuxictr_learning_rate_is_chosen_on_validation_not_test():
    """`--fuxictr-lr 0.001,0.01`: one FuxiCTR run per rate, the row keeps the best validation gAUC even where
    another rate's test AUC is higher, and every rate's outcome is kept."""
    peers, _ = _peers_modules()
    assert peers.lr_expid("DIN_peers", 0.001, [0.001], 0.001) == "DIN_peers"  # ours' rate alone: the plain id
    assert peers.lr_expid("DIN_peers", 0.01, [0.001, 0.01], 0.001) == "DIN_peers_lr0.01"

    def run(valid: float, test: float, sps: float) -> dict:
        return {"best_valid_gauc": valid, "metrics": {"auc": test, "gauc": test}, "samples_per_s": sps}

    best = peers.best_by_validation({0.001: run(0.70, 0.80, 9000.0), 0.01: run(0.78, 0.75, 9100.0)})
    assert best["learning_rate"] == 0.01 and best["metrics"]["auc"] == 0.75 and best["samples_per_s"] == 9100.0
    assert [r["learning_rate"] for r in best["lr_search"]] == [0.001, 0.01]
    assert best["lr_search"][0]["test_auc"] == 0.80


def test_our_table_learning_rate_is_chosen_on_validation_too():
    peers, report = _peers_modules()

    def run(valid: float, test: float) -> dict:
        return {"best_valid_gauc": valid, "metrics": {"auc": test, "gauc": test}, "samples_per_s": 1.0}

    best = peers.best_by_validation({0.05: run(0.79, 0.82), 0.2: run(0.75, 0.83)}, rate="sparse_lr")
    assert best["sparse_lr"] == 0.05 and best["metrics"]["auc"] == 0.82
    assert [r["sparse_lr"] for r in best["lr_search"]] == [0.05, 0.2]
    row = {
        "model": "din",
        "peer": "DIN",
        "variant": "as shipped",
        "ours_variant": "defaults",
        "ours": best,
        "fuxictr": {"learning_rate": 0.01, "metrics": run(0, 0.81)["metrics"], "samples_per_s": 1.0},
    }
    assert "| din | defaults, tables' lr 0.05 | DIN (as shipped, lr 0.01) |" in report.table([row])


def test_both_our_rates_are_chosen_on_validation_as_a_pair():
    """`--ours-dense-lr` with `--ours-sparse-lr`: one run per (dense, tables) pair, the best validation GAUC kept
    and named by both rates in the table."""
    peers, report = _peers_modules()

    def run(valid: float, test: float) -> dict:
        return {"best_valid_gauc": valid, "metrics": {"auc": test, "gauc": test}, "samples_per_s": 1.0}

    runs = {(0.001, 0.2): run(0.75, 0.83), (0.01, 0.2): run(0.79, 0.80), (0.01, 0.05): run(0.70, 0.85)}
    best = peers.best_by_validation(runs, rate=("dense_lr", "sparse_lr"))
    assert (best["dense_lr"], best["sparse_lr"], best["metrics"]["auc"]) == (0.01, 0.2, 0.80)
    assert [(r["dense_lr"], r["sparse_lr"]) for r in best["lr_search"]] == list(runs)
    row = {"model": "dien", "peer": "DIEN", "variant": "as shipped", "ours_variant": "defaults", "ours": best,
           "fuxictr": {"learning_rate": 0.01, "metrics": run(0, 0.81)["metrics"], "samples_per_s": 1.0}}  # fmt: skip
    assert "| dien | defaults, dense lr 0.01, tables' lr 0.2 | DIEN (as shipped, lr 0.01) |" in report.table([row])


def test_the_tables_optimizer_is_searched_with_its_own_rates():
    """`--ours-sparse adagrad,adam` with `--ours-sparse-lr adagrad:... adam:...`: each optimizer trains at its own
    rates, the points name the optimizer, and the row keeps (and says) the one with the best validation GAUC."""
    peers, report = _peers_modules()
    opts, rates = peers.sparse_search("adagrad,adam", ["adagrad:0.05,0.2", "adam:0.001"])
    assert opts == ["adagrad", "adam"] and rates == {"adagrad": [0.05, 0.2], "adam": [0.001]}
    grid, names = peers.search_grid(opts, [0.003], rates)
    assert names == ("sparse", "dense_lr", "sparse_lr")
    assert grid == [("adagrad", 0.003, 0.05), ("adagrad", 0.003, 0.2), ("adam", 0.003, 0.001)]
    # one list for every optimizer; one optimizer alone is no search dimension; nothing searched: one run
    assert peers.sparse_search("adagrad,adam", ["0.1"])[1] == {"adagrad": [0.1], "adam": [0.1]}
    assert peers.search_grid(["adam"], None, {"adam": [0.01]}) == ([(0.01,)], ("sparse_lr",))
    assert peers.search_grid([None], None, None) == ([()], ())
    for bad in (("adagrad,adamw", None), ("adagrad,adam", ["adagrad:0.1"]), ("adagrad", ["adam:0.1"])):
        with pytest.raises(ValueError):
            peers.sparse_search(*bad)

    def run(valid: float, test: float) -> dict:
        return {"best_valid_gauc": valid, "metrics": {"auc": test, "gauc": test}, "samples_per_s": 1.0}

    runs = dict(zip(grid, (run(0.70, 0.80), run(0.72, 0.81), run(0.75, 0.79)), strict=True))
    best = peers.best_by_validation(runs, rate=names)
    assert (best["sparse"], best["sparse_lr"], best["metrics"]["auc"]) == ("adam", 0.001, 0.79)
    assert [r["sparse"] for r in best["lr_search"]] == ["adagrad", "adagrad", "adam"]
    row = {"model": "eta", "peer": "ETA", "variant": "as shipped", "ours_variant": "defaults", "ours": best,
           "fuxictr": {"learning_rate": 0.01, "metrics": run(0, 0.81)["metrics"], "samples_per_s": 1.0}}  # fmt: skip
    assert "| eta | defaults, tables' adam, dense lr 0.003, tables' lr 0.001 | ETA (as shipped, lr 0.01) |" in (
        report.table([row])
    )
