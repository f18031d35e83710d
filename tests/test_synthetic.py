"""The synthetic lifelong world: contract, determinism, planted signals, and the no-look-ahead rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from features.schema import MM_EMB_COLUMN, RAW_SPECS, mm_emb_type
from pipelines.synthetic import (
    PRESETS,
    auc,
    build_items,
    build_users,
    click_probability,
    generate,
    impression_features,
    resolve_config,
    sample_history_lengths,
)

SEED = 7


def _read(raw: Path, table: str) -> pa.Table:
    if table == "items":
        return pq.read_table(raw / "items.parquet")
    parts = sorted((raw / table).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _index_of(raw_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Internal index of each raw id in `values` (`raw_ids[index] == value`)."""
    order = np.argsort(raw_ids)
    pos = order[np.searchsorted(raw_ids[order], values)]
    assert np.array_equal(raw_ids[pos], values)
    return pos


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny")
    summary = generate("tiny", SEED, out)
    return out, summary


@pytest.fixture(scope="module")
def world(tiny: tuple[Path, dict]) -> dict:
    """The raw tables plus the generator's hidden state (items, users) mapped onto them."""
    raw, _ = tiny
    cfg = resolve_config("tiny")
    items = build_items(cfg, SEED)
    users = build_users(cfg, items, SEED)
    beh = _read(raw, "behaviors").to_pydict()
    imp = _read(raw, "impressions").to_pydict()
    b = {k: np.asarray(v) for k, v in beh.items()}
    i = {k: np.asarray(v) for k, v in imp.items()}
    b["u"] = _index_of(users.user_ids, b["user_id"])
    b["i"] = _index_of(items.item_ids, b["item_id"])
    i["u"] = _index_of(users.user_ids, i["user_id"])
    i["i"] = _index_of(items.item_ids, i["item_id"])
    return {"cfg": cfg, "items": items, "users": users, "beh": b, "imp": i}


def test_schema_matches_raw_contract(tiny: tuple[Path, dict]) -> None:
    raw, summary = tiny
    for name, spec in RAW_SPECS.items():
        table = _read(raw, name)
        for col, typ in spec.required.items():
            assert table.schema.field(col).type == typ, (name, col)
        for col in table.column_names:
            if col in spec.required:
                continue
            typ = table.schema.field(col).type
            if col in spec.optional:
                assert typ == spec.optional[col], (name, col)
            elif name == "items" and col == MM_EMB_COLUMN:
                assert typ == mm_emb_type(64)
            else:
                assert spec.extra_int64_allowed and typ == pa.int64(), (name, col)
        assert table.num_rows == summary["rows"][name]
    assert len(list((raw / "behaviors").glob("part-*.parquet"))) > 1  # several parts
    items = _read(raw, "items")
    assert set(items.column_names) >= {
        "item_id",
        "cate_id",
        "topic_id",
        MM_EMB_COLUMN,
    }
    item_ids = items["item_id"].to_numpy()
    assert len(np.unique(item_ids)) == len(item_ids) == PRESETS["tiny"].n_items
    # raw ids are non-contiguous and far from 0..n (the builder's vocabularies must really map them)
    for table, col in [("items", "item_id"), ("items", "cate_id"), ("behaviors", "user_id")]:
        ids = np.unique(_read(raw, table)[col].to_numpy())
        assert ids.min() > len(ids) and (np.diff(ids) > 1).any()
    assert not np.isnan(_read(raw, "impressions")["p_true"].to_numpy()).any()
    source = json.loads((raw / "source.json").read_text())
    assert source["preset"] == "tiny" and source["seed"] == SEED
    assert source["params"]["n_users"] == PRESETS["tiny"].n_users
    assert source["rows"] == summary["rows"]


def test_deterministic_under_seed(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    raw, summary = tiny
    again = generate("tiny", SEED, tmp_path / "again")
    other = generate("tiny", SEED + 1, tmp_path / "other")
    for table in ("items", "behaviors", "impressions"):
        assert _read(raw, table).equals(_read(tmp_path / "again", table)), table
        assert not _read(raw, table).equals(_read(tmp_path / "other", table)), table
    for f in sorted(raw.rglob("*.parquet")) + [raw / "source.json"]:
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(raw)).read_bytes(), f
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in summary.items() if k != "seconds"}
    assert other["rows"] != summary["rows"]


def test_overrides(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        resolve_config("tiny", no_such_parameter=1)
    with pytest.raises(ValueError):
        resolve_config("huge")
    s = generate("tiny", 0, tmp_path, n_users=40, mm_dim=8)
    assert s["users"] == 40
    assert pq.read_schema(tmp_path / "items.parquet").field(MM_EMB_COLUMN).type == mm_emb_type(8)


def test_oracle_beats_popularity(tiny: tuple[Path, dict], world: dict) -> None:
    _, summary = tiny
    imp, items = world["imp"], world["items"]
    label, p_true = imp["label"], imp["p_true"]
    assert 0.05 <= label.mean() <= 0.2
    assert abs(label.mean() - p_true.mean()) < 0.02  # labels are Bernoulli(p_true)
    oracle = roc_auc_score(label, p_true)
    pop = roc_auc_score(label, items.pop_score[imp["i"]])
    assert oracle > 0.75 and oracle > pop + 0.1
    assert summary["oracle_auc"] == pytest.approx(oracle, abs=1e-9)
    assert summary["popularity_auc"] == pytest.approx(pop, abs=1e-9)
    # the tie-aware AUC agrees with sklearn on heavily tied scores
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 500), rng.integers(0, 5, 500).astype(float)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))


@pytest.mark.parametrize("preset", ["demo", "lifelong"])
def test_history_lengths_heavy_tailed(preset: str) -> None:
    cfg = PRESETS[preset]
    lengths = sample_history_lengths(cfg, cfg.n_users, np.random.default_rng(0))
    p50, p99 = np.percentile(lengths, [50, 99])
    assert 100 <= p50 <= 300
    assert p99 >= 10_000
    assert lengths.max() <= 100_000
    assert (lengths == 0).any()  # cold users
    if preset == "demo":
        assert 3e6 <= lengths.sum() <= 5.5e6
    else:
        assert (lengths == 100_000).sum() >= cfg.n_whales
        assert lengths.sum() <= 20e6


def test_time_layout(tiny: tuple[Path, dict], world: dict) -> None:
    beh, imp = world["beh"], world["imp"]
    # behaviors are sorted by (user, ts) and contain same-second ties
    order = np.lexsort((beh["ts"], beh["u"]))
    assert np.array_equal(order, np.arange(len(order)))
    same_user = beh["u"][1:] == beh["u"][:-1]
    assert (same_user & (np.diff(beh["ts"]) == 0)).any()
    # impressions: more in the later part of the span, some tied with a behavior, some with an empty history
    lo, hi = min(beh["ts"].min(), imp["ts"].min()), imp["ts"].max()
    assert (imp["ts"] > lo + 2 * (hi - lo) / 3).mean() > 0.45
    beh_keys = set(zip(beh["u"].tolist(), beh["ts"].tolist(), strict=True))
    tied = np.array([(u, t) in beh_keys for u, t in zip(imp["u"].tolist(), imp["ts"].tolist(), strict=True)])
    assert tied.mean() > 0.03
    first = {u: t for u, t in zip(beh["u"][::-1].tolist(), beh["ts"][::-1].tolist(), strict=True)}
    empty = np.array([t <= first.get(u, np.iinfo(np.int64).max) for u, t in zip(imp["u"], imp["ts"], strict=True)])
    assert empty.sum() > 10
    cold = world["users"].lengths == 0
    assert np.isin(np.flatnonzero(cold), imp["u"]).all()  # users without history still get impressions


def test_dormant_interests(world: dict) -> None:
    users, items, beh, imp = world["users"], world["items"], world["beh"], world["imp"]
    beh_cate = items.item_cate[beh["i"]]
    dormant = users.dormant_categories()
    n_checked = 0
    for u in np.flatnonzero((users.lengths >= 100) & (dormant >= 0).any(axis=1)):
        rows = np.flatnonzero(beh["u"] == u)
        tail = beh_cate[rows[int(0.7 * len(rows)) :]]
        head = beh_cate[rows[: len(rows) // 2]]
        for c in dormant[u][dormant[u] >= 0]:
            assert not (tail == c).any()  # absent from the last 30% ...
            n_checked += int((head == c).sum() >= 3)  # ... yet present early on
    assert n_checked >= 20
    # impressions of dormant categories click more than items outside the user's interests
    imp_cate = items.item_cate[imp["i"]][:, None]
    is_dormant = (dormant[imp["u"]] == imp_cate).any(axis=1)
    is_interest = (users.interests[imp["u"]] == imp_cate).any(axis=1)
    assert is_dormant.sum() > 300
    assert imp["label"][is_dormant].mean() > 1.5 * imp["label"][~is_interest].mean()
    assert imp["p_true"][is_dormant].mean() > 1.5 * imp["p_true"][~is_interest].mean()


def test_p_true_only_depends_on_the_past(world: dict) -> None:
    """Recompute p_true by brute force from behaviors with ts < impression ts (ties count as after)."""
    cfg, users, items, beh, imp = world["cfg"], world["users"], world["items"], world["beh"], world["imp"]
    beh_keys = set(zip(beh["u"].tolist(), beh["ts"].tolist(), strict=True))
    tied = np.array([(u, t) in beh_keys for u, t in zip(imp["u"].tolist(), imp["ts"].tolist(), strict=True)])
    rng = np.random.default_rng(1)
    pick = np.concatenate([rng.choice(np.flatnonzero(tied), 40, replace=False), rng.choice(len(tied), 60)])
    heavy_user = np.argmax(users.lengths)
    pick = np.concatenate([pick, np.flatnonzero(imp["u"] == heavy_user)[-5:]])
    for j in pick:
        u, t, item = imp["u"][j], imp["ts"][j], imp["i"][j]
        rows = np.flatnonzero((beh["u"] == u) & (beh["ts"] < t))  # file order = (ts, input order)
        n = len(rows)
        assert cfg.lt_mode == "semantic"
        mass = float(np.exp((items.unit[beh["i"][rows]] @ items.unit[item] - 1.0) / cfg.lt_tau).sum())
        a_lt = np.log1p(mass) / np.log1p(n + cfg.lt_kappa)
        recent = beh["i"][rows[-cfg.short_window :]]
        a_st = float(np.mean(items.unit[recent] @ items.unit[item])) if n else 0.0
        logit = cfg.b0 + cfg.w_lt * a_lt + cfg.w_st * a_st + cfg.w_pop * items.pop_score[item] + users.bias[u]
        assert imp["p_true"][j] == pytest.approx(1.0 / (1.0 + np.exp(-logit)), rel=1e-9, abs=1e-12)


def _brute_features(beh_user, beh_ts, beh_item, u, t, item, item_cate, unit, short_window, kappa, mode, tau):
    rows = np.flatnonzero((beh_user == u) & (beh_ts < t))
    n_c = int((item_cate[beh_item[rows]] == item_cate[item]).sum())
    if mode == "category":
        mass = float(n_c)
    else:
        mass = sum(float(np.exp((unit[b] @ unit[item] - 1.0) / tau)) for b in beh_item[rows])
    recent = beh_item[rows[-short_window:]]
    a_st = float(np.mean(unit[recent] @ unit[item])) if len(rows) else 0.0
    return len(rows), n_c, mass, np.log1p(mass) / np.log1p(len(rows) + kappa), a_st


@pytest.mark.parametrize("mode", ["semantic", "category"])
@pytest.mark.parametrize("seed", range(5))
def test_impression_features_on_random_logs_with_ties(seed: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items, n_beh, n_imp = 6, 12, 300, 80
    item_cate = rng.integers(0, 4, n_items)
    unit = rng.normal(size=(n_items, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    beh_user = rng.integers(0, n_users - 1, n_beh)  # the last user has no behaviors
    beh_ts = rng.integers(0, 30, n_beh)  # a small range: many ties
    order = np.lexsort((beh_ts, beh_user))
    beh_user, beh_ts, beh_item = beh_user[order], beh_ts[order], rng.integers(0, n_items, n_beh)
    imp_user, imp_ts, imp_item = (
        rng.integers(0, n_users, n_imp),
        rng.integers(-2, 33, n_imp),
        rng.integers(0, 12, n_imp),
    )
    f = impression_features(
        beh_user,
        beh_ts,
        beh_item,
        imp_user,
        imp_ts,
        imp_item,
        item_cate,
        unit,
        short_window=5,
        kappa=3.0,
        lt_mode=mode,
        lt_tau=0.3,
    )
    for j in range(n_imp):
        n, n_c, mass, a_lt, a_st = _brute_features(
            beh_user, beh_ts, beh_item, imp_user[j], imp_ts[j], imp_item[j], item_cate, unit, 5, 3.0, mode, 0.3
        )
        assert (f["hist_len"][j], f["n_same_cate"][j]) == (n, n_c)
        assert f["lt_mass"][j] == pytest.approx(mass, rel=1e-12, abs=1e-12)
        assert f["a_lt"][j] == pytest.approx(a_lt) and f["a_st"][j] == pytest.approx(a_st, abs=1e-12)
    p = click_probability(PRESETS["tiny"], f["a_lt"], f["a_st"], np.zeros(n_imp), np.zeros(n_imp))
    assert ((p > 0) & (p < 1)).all()
