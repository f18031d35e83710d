"""Evaluation metrics against sklearn and hand-computed answers."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from ctr.evaluation import evaluate_predictions
from ctr.evaluation.metrics import (
    GAUC_DEFINITION,
    LENGTH_BUCKET_LABELS,
    auc,
    calibration,
    calibration_curve,
    compute_metrics,
    gauc,
    length_buckets,
    logloss,
    roc_curve_points,
    to_jsonable,
)


def _gauc_loop(labels, scores, groups, weighting="impressions"):
    """Reference GAUC: a plain loop over users with sklearn's AUC per user (test-only)."""
    num = den = 0.0
    used = skipped = 0
    for u in np.unique(groups):
        m = groups == u
        y, s = labels[m], scores[m]
        if y.min() == y.max():
            skipped += 1
            continue
        used += 1
        w = {"impressions": m.sum(), "uniform": 1.0, "clicks": y.sum()}[weighting]
        num += w * roc_auc_score(y, s)
        den += w
    return (num / den if den else math.nan), used, skipped


def _random_case(rng, n, n_users, n_levels):
    labels = (rng.random(n) < 0.3).astype(np.int8)
    scores = rng.integers(0, n_levels, n) / n_levels  # few levels: many ties, inside and across users
    users = rng.integers(0, n_users, n).astype(np.int32)
    return labels, scores, users


# ---------------------------------------------------------------------------------------------------------------- AUC


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 1], [0.1, 0.9], 1.0),
        ([1, 0], [0.1, 0.9], 0.0),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all tied
        ([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8], 0.875),  # (1 + 0.5 + 1 + 1) / 4 pairs
        ([1, 0, 0], [0.3, 0.3, 0.1], 0.75),
    ],
)
def test_auc_fixed_cases(labels, scores, expected):
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-15)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)


def test_auc_single_class_and_empty_is_nan():
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=1, max_size=60),
)
def test_auc_matches_sklearn_with_ties(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=np.float64) / 7
    if labels.min() == labels.max():
        assert math.isnan(auc(labels, scores))
    else:
        assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_large_random_with_ties_matches_sklearn():
    rng = np.random.default_rng(1)
    labels, scores, _ = _random_case(rng, 20_000, 10, 37)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # float32 scores (what a trainer writes) are compared exactly as stored
    s32 = scores.astype(np.float32)
    assert auc(labels, s32) == pytest.approx(roc_auc_score(labels, s32), abs=1e-12)


def test_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        auc([0, 1], [0.1])


# --------------------------------------------------------------------------------------------------------------- GAUC


def test_gauc_hand_computed():
    # user 7: labels [1,0,0], scores [.8,.3,.8]: positive .8 beats .3 (1) and ties .8 (1/2) -> AUC = 1.5/2 = 0.75
    # user 3: labels [0,1,1,0], scores [.2,.6,.1,.4]: .6 beats both negatives (2), .1 beats none (0) -> 2/4 = 0.5
    # user 5: labels [1,1] -> single class, skipped
    # impressions: (3 * 0.75 + 4 * 0.5) / 7 = 4.25 / 7;  uniform: (0.75 + 0.5) / 2;  clicks: (1 * 0.75 + 2 * 0.5) / 3
    users = np.array([7, 7, 7, 3, 3, 3, 3, 5, 5])
    labels = np.array([1, 0, 0, 0, 1, 1, 0, 1, 1])
    scores = np.array([0.8, 0.3, 0.8, 0.2, 0.6, 0.1, 0.4, 0.9, 0.9])
    r = gauc(labels, scores, users)
    assert r.value == pytest.approx(4.25 / 7, abs=1e-15)
    assert (r.users_total, r.users_used, r.users_skipped, r.weight_sum) == (3, 2, 1, 7.0)
    assert gauc(labels, scores, users, "uniform").value == pytest.approx(0.625, abs=1e-15)
    r_clicks = gauc(labels, scores, users, "clicks")
    assert r_clicks.value == pytest.approx(1.75 / 3, abs=1e-15)
    assert r_clicks.weight_sum == 3.0


@pytest.mark.parametrize("weighting", ["impressions", "uniform", "clicks"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gauc_matches_per_user_sklearn_loop(weighting, seed):
    rng = np.random.default_rng(seed)
    labels, scores, users = _random_case(rng, 600, 80, 5)  # ~7 impressions/user: many single-class users
    expected, used, skipped = _gauc_loop(labels, scores, users, weighting)
    r = gauc(labels, scores, users, weighting)
    assert skipped > 0 and used > 0
    assert r.value == pytest.approx(expected, abs=1e-12)
    assert (r.users_used, r.users_skipped, r.users_total) == (used, skipped, used + skipped)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=60),
    st.sampled_from(["impressions", "uniform", "clicks"]),
)
def test_gauc_property(rows, weighting):
    labels = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    users = np.array([r[2] * 1_000_003 for r in rows], dtype=np.int64)  # non-contiguous ids
    expected, used, skipped = _gauc_loop(labels, scores, users, weighting)
    r = gauc(labels, scores, users, weighting)
    if used == 0:
        assert math.isnan(r.value)
    else:
        assert r.value == pytest.approx(expected, abs=1e-12)
    assert (r.users_used, r.users_skipped) == (used, skipped)


def test_gauc_unsorted_string_groups_and_bad_weighting():
    labels = np.array([1, 0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.5])
    groups = np.array(["b", "a", "a", "b", "c", "c"])
    # a: pos .2 > neg .1 -> 1; b: pos .9 > neg .8 -> 1; c: tie -> 0.5
    assert gauc(labels, scores, groups).value == pytest.approx((2 + 2 + 1) / 6)
    with pytest.raises(ValueError, match="weighting"):
        gauc(labels, scores, groups, "users")  # type: ignore[arg-type]


def test_gauc_no_usable_user_is_nan():
    r = gauc([1, 0], [0.3, 0.2], [1, 2])
    assert math.isnan(r.value) and r.users_skipped == 2 and r.users_used == 0


# ------------------------------------------------------------------------------------------- logloss and calibration


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.01, 0.99, 5_000)
    y = (rng.random(5_000) < p).astype(np.int8)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
    # extreme probabilities are clipped, not infinite
    assert math.isfinite(logloss([1, 0], [0.0, 1.0]))


def test_calibration_ratio():
    c = calibration([1, 0, 0, 0], [0.5, 0.5, 0.25, 0.25])
    assert (c.mean_predicted, c.observed_ctr, c.ratio) == (0.375, 0.25, 1.5)
    assert math.isnan(calibration([0, 0], [0.1, 0.2]).ratio)


# ---------------------------------------------------------------------------------------------------------- buckets


def test_length_bucket_edges():
    h = np.array([0, 49, 50, 199, 200, 999, 1000, 9999, 10_000, 100_000])
    assert length_buckets(h).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert LENGTH_BUCKET_LABELS[length_buckets([50])[0]] == "50-200"
    with pytest.raises(ValueError):
        length_buckets([-1])


# ----------------------------------------------------------------------------------------------------------- curves


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(4)
    labels, scores, _ = _random_case(rng, 2_000, 1, 50)
    fpr, tpr = roc_curve_points(labels, scores, max_points=10_000)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(labels, scores), abs=1e-12)
    fpr_s, tpr_s = roc_curve_points(labels, scores, max_points=20)
    assert fpr_s.size <= 20 and fpr_s[-1] == 1.0 and tpr_s[0] == 0.0


def test_calibration_curve_bins():
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 0.2, 10_000)
    y = (rng.random(10_000) < p).astype(np.int8)
    mp, obs, cnt = calibration_curve(y, p, n_bins=10)
    assert cnt.sum() == 10_000 and mp.size == 10
    assert np.all(np.diff(mp) > 0)
    assert np.abs(mp - obs).max() < 0.03  # truthful probabilities are calibrated


# -------------------------------------------------------------------------------------------------- compute_metrics


def _frame(n=2_000, seed=6, with_p_true=True):
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(0.02, 0.5, n)
    label = (rng.random(n) < p_true).astype(np.int8)
    data = {
        "user_idx": rng.integers(2, 60, n).astype(np.int32),
        "item_idx": rng.integers(2, 1000, n).astype(np.int32),
        "ts": np.arange(n, dtype=np.int64),
        "label": label,
        "score": np.clip(p_true + rng.normal(0, 0.1, n), 0.001, 0.999).astype(np.float32),
        "hist_len": rng.choice([0, 10, 50, 120, 300, 5_000, 20_000], n).astype(np.int32),
    }
    if with_p_true:
        data["p_true"] = p_true
    return pl.DataFrame(data)


def test_compute_metrics_structure_and_oracle():
    df = _frame()
    m = compute_metrics(df)
    assert m["samples"] == df.height and m["positives"] == int(df["label"].sum())
    assert m["auc"] == pytest.approx(roc_auc_score(df["label"], df["score"]), abs=1e-12)
    assert m["gauc"] == pytest.approx(
        _gauc_loop(df["label"].to_numpy(), df["score"].to_numpy(), df["user_idx"].to_numpy())[0], abs=1e-12
    )
    assert m["gauc_definition"] == GAUC_DEFINITION
    assert set(m["buckets"]) == set(LENGTH_BUCKET_LABELS)
    assert sum(b["samples"] for b in m["buckets"].values()) == df.height
    assert m["buckets"]["50-200"]["samples"] == int(df["hist_len"].is_in([50, 120]).sum())
    assert set(m["oracle"]) == {"auc", "gauc", "logloss"}
    assert m["oracle"]["auc"] == pytest.approx(roc_auc_score(df["label"], df["p_true"]), abs=1e-12)
    assert set(m["oracle_buckets"]) == set(LENGTH_BUCKET_LABELS)
    assert m["oracle"]["auc"] > m["auc"]  # noisy scores rank worse than the truth

    no_truth = compute_metrics(df.drop("p_true"))
    assert "oracle" not in no_truth and "oracle_buckets" not in no_truth
    # same answer from a dict of arrays, a pyarrow table, and keyword arrays
    assert compute_metrics({c: df[c].to_numpy() for c in df.columns})["gauc"] == m["gauc"]
    assert compute_metrics(pa.table({c: df[c].to_numpy() for c in df.columns}))["auc"] == m["auc"]
    kw = compute_metrics(label=df["label"], score=df["score"], user_idx=df["user_idx"], hist_len=df["hist_len"])
    assert kw["logloss"] == m["logloss"] and "oracle" not in kw


def test_compute_metrics_rejects_logits_and_missing_columns():
    df = _frame(200)
    with pytest.raises(ValueError, match="probabilities"):
        compute_metrics(df.with_columns(pl.col("score") * 10 - 5))
    with pytest.raises(ValueError, match="hist_len"):
        compute_metrics(df.drop("hist_len"))


def test_nan_serializes_as_null():
    # every sample in bucket "0-50": the other buckets are empty and their metrics NaN
    m = compute_metrics(label=[0, 1, 1], score=[0.2, 0.7, 0.9], user_idx=[1, 1, 2], hist_len=[0, 3, 4])
    assert math.isnan(m["buckets"]["10K+"]["auc"])
    js = to_jsonable(m)
    text = json.dumps(js, allow_nan=False)  # would raise on NaN
    back = json.loads(text)
    assert back["buckets"]["10K+"]["auc"] is None and back["buckets"]["10K+"]["samples"] == 0
    assert back["gauc_users_skipped"] == 1 and back["auc"] == 1.0
    assert to_jsonable({"a": np.float32("nan"), "b": [np.int64(3), float("inf")]}) == {"a": None, "b": [3, None]}


def test_evaluate_predictions_writes_json_and_names_missing_column(tmp_path):
    df = _frame(500)
    path = tmp_path / "predictions.parquet"
    df.write_parquet(path)
    out = tmp_path / "metrics.json"
    m = evaluate_predictions(path, out, split="test")
    on_disk = json.loads(out.read_text())
    assert on_disk == m and on_disk["split"] == "test" and "oracle" in on_disk
    bad = tmp_path / "bad.parquet"
    df.drop("hist_len").write_parquet(bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*hist_len"):
        evaluate_predictions(bad, None)


def test_paired_bootstrap():
    from ctr.evaluation.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(300), 20)
    y = (rng.random(users.size) < 0.3).astype(np.int8)
    good = y + rng.normal(0, 1.0, users.size)  # informative
    noise = rng.normal(0, 1.0, users.size)  # random
    same = paired_bootstrap(y, good, 3 * good + 1, users)  # a monotone transform: the same ranking
    assert same.delta == 0 and same.lo == 0 and same.hi == 0 and not same.significant
    for metric in ("auc", "gauc"):
        d = paired_bootstrap(y, good, noise, users, metric=metric, resamples=50)
        assert d.lo < d.delta < d.hi and d.significant and d.lo > 0.1
        flipped = paired_bootstrap(y, noise, good, users, metric=metric, resamples=50)
        assert flipped.delta == pytest.approx(-d.delta) and flipped.hi < 0
    again = paired_bootstrap(y, good, noise, users, resamples=50)
    assert again == paired_bootstrap(y, good, noise, users, resamples=50)  # seeded
    # a small true difference on few users is not significant
    slight = paired_bootstrap(y[:200], good[:200], good[:200] + rng.normal(0, 0.3, 200), users[:200], resamples=100)
    assert slight.lo < 0 < slight.hi and not slight.significant
