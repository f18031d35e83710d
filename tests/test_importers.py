"""Tests of `ctr import` importers: real shared files where present, small files written here, types, protocols."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from paths import SHARED_DATA

from features.schema import MM_EMB_COLUMN, MM_EMB_VALUE_TYPES, RAW_SPECS
from pipelines.importers import IMPORTERS, PROTOCOLS, ImportSourceError
from pipelines.importers._common import stable_id
from pipelines.importers.amazon import import_amazon
from pipelines.importers.movielens import import_movielens
from pipelines.importers.negatives import sample_negatives
from pipelines.importers.taobao_mm import import_taobao_mm
from pipelines.importers.taobao_userbehavior import import_taobao_userbehavior

SHARED = SHARED_DATA


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def check_raw_dir(out: Path) -> dict[str, pl.DataFrame]:
    """Every raw table has exactly the contract's types; source.json is there. Returns the tables."""
    tables = {}
    for name, spec in RAW_SPECS.items():
        schema = pq.read_schema(out / f"{name}.parquet")
        for col, typ in spec.required.items():
            assert col in schema.names, f"{name}.{col} missing"
            assert schema.field(col).type == typ, f"{name}.{col}: {schema.field(col).type} != {typ}"
        for f in schema:
            if f.name in spec.required:
                continue
            if f.name in spec.optional:
                assert f.type == spec.optional[f.name], f"{name}.{f.name}: {f.type}"
            elif name == "items" and f.name == MM_EMB_COLUMN:
                assert pa.types.is_fixed_size_list(f.type) and f.type.value_type in MM_EMB_VALUE_TYPES
            else:
                assert spec.extra_int64_allowed and f.type == pa.int64(), f"{name}.{f.name}: {f.type}"
        tables[name] = pl.read_parquet(out / f"{name}.parquet")
        for col in spec.required:
            assert tables[name][col].null_count() == 0, f"{name}.{col} has nulls"
    assert tables["items"]["item_id"].is_unique().all()
    assert set(tables["impressions"]["label"].unique().to_list()) <= {0, 1}
    src = json.loads((out / "source.json").read_text())
    for key in ("source", "importer", "protocol", "options", "counts", "recommended_split"):
        assert key in src
    return tables


def history_before(imps: pl.DataFrame, behaviors: pl.DataFrame) -> pl.Series:
    """Per impression: the number of the user's behaviors strictly before its ts (the builder's hist_len)."""
    b = behaviors.select("user_id", "ts").sort("user_id", "ts")
    counts = (
        imps.with_row_index("_i")
        .join(b.rename({"ts": "bts"}), on="user_id", how="left")
        .group_by("_i", maintain_order=True)
        .agg((pl.col("bts") < pl.col("ts")).sum().alias("h"))
        .sort("_i")
    )
    return counts["h"]


def read_all(out: Path) -> dict[str, pa.Table]:
    return {t: pq.read_table(out / f"{t}.parquet") for t in RAW_SPECS}


def assert_same_output(a: Path, b: Path) -> None:
    ta, tb = read_all(a), read_all(b)
    for t in RAW_SPECS:
        assert ta[t].equals(tb[t]), f"{t} differs between two identical imports"
    ja, jb = json.loads((a / "source.json").read_text()), json.loads((b / "source.json").read_text())
    ja["counts"].pop("out_dir", None)
    jb["counts"].pop("out_dir", None)
    assert ja["counts"] == jb["counts"]


def rejects_csv(out: Path) -> pl.DataFrame:
    return pl.read_csv(out / "import_rejects.csv", infer_schema=False)


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(IMPORTERS) == {"taobao-mm", "amazon", "taobao-userbehavior", "movielens"}
    assert set(PROTOCOLS) == set(IMPORTERS)
    for name, text in PROTOCOLS.items():
        assert isinstance(text, str) and 100 < len(text) < 1200, name
        assert callable(IMPORTERS[name])


@pytest.mark.parametrize("name", sorted(IMPORTERS))
def test_missing_source_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(ImportSourceError, match="does not exist"):
        IMPORTERS[name](tmp_path / "nope", tmp_path / "out")


def test_negative_sampler_is_order_independent() -> None:
    rng = np.random.default_rng(0)
    u, i, t = rng.integers(0, 50, 400), rng.integers(0, 30, 400), rng.integers(0, 10**6, 400)
    cands = np.arange(30)
    a = sample_negatives(u, i, t, cands, None, 3, seed=7)
    perm = rng.permutation(400)
    b = sample_negatives(u[perm], i[perm], t[perm], cands, None, 3, seed=7)
    key_a = sorted(zip(a.user_id, a.ts, a.item_id, strict=True))
    key_b = sorted(zip(b.user_id, b.ts, b.item_id, strict=True))
    assert key_a == key_b
    assert (a.item_id != np.repeat(i, 3)).all()
    c = sample_negatives(u, i, t, cands, None, 3, seed=8)
    assert not np.array_equal(a.item_id, c.item_id)


# ----------------------------------------------------------------------------------------------------------------
# movielens
# ----------------------------------------------------------------------------------------------------------------


def test_movielens_latest_small_real(tmp_path: Path) -> None:
    src = shared("movielens-latest-small")
    s = import_movielens(src, tmp_path / "raw")
    assert s["rows"] == {"items": 9742, "behaviors": 100836, "impressions": 100836}
    assert s["users"] == 610 and s["items"] == 9742 and s["rejected"]["count"] == 0
    assert s["positives"] == 48580  # 48.2% of ratings are >= 4
    t = check_raw_dir(tmp_path / "raw")
    b, imp = t["behaviors"], t["impressions"]
    # each impression is exactly one rating; label = rating >= 4 (btype = 2 * rating)
    joined = imp.join(b, on=["user_id", "item_id", "ts"], how="inner")
    assert joined.height == imp.height
    assert ((joined["btype"] >= 8).cast(pl.Int8) == joined["label"]).all()
    assert b["btype"].min() >= 1 and b["btype"].max() <= 10
    # a sample never sees its own rating: strictly-earlier behaviors of the user exclude the rated movie itself
    own_before = imp.join(b.rename({"ts": "bts"}), on=["user_id", "item_id"]).filter(pl.col("bts") < pl.col("ts"))
    assert own_before.height == 0
    items = t["items"]
    assert {"genre_2", "genre_count", "year"} <= set(items.columns)
    src_json = json.loads((tmp_path / "raw" / "source.json").read_text())
    toy = items.filter(pl.col("item_id") == 1).row(0, named=True)  # Adventure|Animation|Children|Comedy|Fantasy
    assert toy["cate_id"] == src_json["codes"]["genre"]["Adventure"]
    assert toy["genre_2"] == src_json["codes"]["genre"]["Animation"] and toy["genre_count"] == 5
    assert toy["year"] == 1995


def test_movielens_100k_recbole_real(tmp_path: Path) -> None:
    src = shared("movielens-100k")
    s = import_movielens(src / "ml-100k.inter", tmp_path / "raw")
    assert s["rows"] == {"items": 1682, "behaviors": 100000, "impressions": 100000}
    assert s["users"] == 943 and s["positives"] == 55375 and s["flavour"] == "recbole"
    t = check_raw_dir(tmp_path / "raw")
    imp = t["impressions"]
    assert {"age", "gender", "occupation"} <= set(imp.columns)
    assert imp["age"].min() > 0 and imp["gender"].n_unique() == 2 and imp["occupation"].n_unique() == 21
    src_json = json.loads((tmp_path / "raw" / "source.json").read_text())
    first = imp.filter(pl.col("user_id") == 1).row(0, named=True)  # user 1: 24, M, technician
    assert first["age"] == 24
    assert first["gender"] == src_json["codes"]["gender"]["M"]
    assert first["occupation"] == src_json["codes"]["occupation"]["technician"]
    goldeneye = t["items"].filter(pl.col("item_id") == 2).row(0, named=True)  # Action Adventure Thriller
    assert goldeneye["cate_id"] == src_json["codes"]["genre"]["Action"] and goldeneye["genre_count"] == 3


def _write_small_movielens(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4.0,1000\n"
        "1,20,3.5,1000\n"  # same second as the first rating: neither sees the other
        "1,30,5.0,1005\n"
        "2,10,abc,1001\n"  # unparsable rating
        "2,20,7.0,1002\n"  # out of range
        "2,40,0.5,1003\n"  # movie missing from movies.csv
        "3,,4.0,1004\n"  # missing movieId
    )
    (root / "movies.csv").write_text(
        'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n20,Solo (2001),Drama\n30,NoYear,(no genres listed)\n'
    )


def test_movielens_small_written(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    _write_small_movielens(src)
    s = import_movielens(src, tmp_path / "raw")
    assert s["rows"]["behaviors"] == 4 and s["rows"]["impressions"] == 4
    assert s["rejected"]["count"] == 3
    assert s["rejected"]["reasons"] == {
        "missing item_id": 1,
        "rating outside 0.5..5": 1,
        "unparsable rating: 'abc'": 1,
    }
    assert s["items_without_metadata"] == 1 and s["items"] == 4
    rej = rejects_csv(tmp_path / "raw")
    assert rej["source_row"].to_list() == ["5", "6", "8"] and set(rej["source_file"]) == {"ratings.csv"}
    t = check_raw_dir(tmp_path / "raw")
    imp = t["impressions"].sort("user_id", "ts", "item_id")
    assert imp["label"].to_list() == [1, 0, 1, 0]
    assert history_before(imp, t["behaviors"]).to_list() == [0, 0, 2, 0]  # ties count as after
    items = t["items"].sort("item_id")
    assert items["cate_id"].to_list()[-1] == 0  # movie 40 has no metadata
    assert items.filter(pl.col("item_id") == 10)["year"].item() == 1995
    assert items.filter(pl.col("item_id") == 30)["year"].item() == 0
    # deterministic
    import_movielens(src, tmp_path / "raw2")
    assert_same_output(tmp_path / "raw", tmp_path / "raw2")


def test_movielens_content_vectors(tmp_path: Path) -> None:
    """``content_emb=true``: a unit-norm genre multi-hot, the scaled year and an unknown-year flag per movie; a
    null vector for a rated movie without metadata; the raw directory passes the checks (`ctr build` reads it)."""
    src = tmp_path / "ml"
    _write_small_movielens(src)
    s = import_movielens(src, tmp_path / "raw", content_emb=True)
    assert s["rows"]["items"] == 4
    codes = json.loads((tmp_path / "raw" / "source.json").read_text())["codes"]["genre"]
    items = check_raw_dir(tmp_path / "raw")["items"].sort("item_id")
    emb = {r["item_id"]: r["mm_emb"] for r in items.iter_rows(named=True)}
    g = len(codes)
    heat = np.asarray(emb[10])
    assert heat.shape == (g + 2,)
    want = np.zeros(g + 2)
    want[[codes["Action"] - 1, codes["Crime"] - 1]] = 1 / np.sqrt(2)
    want[g] = (1995 - 1990) / 20
    np.testing.assert_allclose(heat, want, rtol=1e-6)
    assert emb[30][g] == 0.0 and emb[30][g + 1] == 1.0  # no year: the flag
    assert emb[40] is None  # rated, missing from movies.csv
    import_movielens(src, tmp_path / "raw2")  # off by default: the standard import is unchanged
    assert "mm_emb" not in check_raw_dir(tmp_path / "raw2")["items"].columns


def test_movielens_errors(tmp_path: Path) -> None:
    src = tmp_path / "ml"
    _write_small_movielens(src)
    (src / "movies.csv").unlink()
    with pytest.raises(ImportSourceError, match="movies.csv"):
        import_movielens(src, tmp_path / "raw")
    _write_small_movielens(src)
    (src / "ratings.csv").write_text("userId,movieId,stars,timestamp\n1,10,4,100\n")
    with pytest.raises(ImportSourceError, match=r"ratings.csv: missing column\(s\) \['rating'\]"):
        import_movielens(src, tmp_path / "raw")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImportSourceError, match="no MovieLens files"):
        import_movielens(empty, tmp_path / "raw")


# ----------------------------------------------------------------------------------------------------------------
# amazon
# ----------------------------------------------------------------------------------------------------------------


def _check_din_protocol(t: dict[str, pl.DataFrame], neg_per_pos: int) -> None:
    b, imp = t["behaviors"], t["impressions"]
    pos, neg = imp.filter(pl.col("label") == 1), imp.filter(pl.col("label") == 0)
    assert neg.height == neg_per_pos * pos.height
    # each positive is a review strictly after the user's first review, so it sees >= 1 behavior
    assert pos.join(b, on=["user_id", "item_id", "ts"], how="semi").height == pos.height
    assert (history_before(pos, b) >= 1).all()
    first = b.group_by("user_id").agg(pl.col("ts").min().alias("f"))
    n_expected = b.join(first, on="user_id").filter(pl.col("ts") > pl.col("f")).height
    assert pos.height == n_expected
    # negatives: never an item the user reviewed, at a positive's ts
    assert neg.join(b.select("user_id", "item_id"), on=["user_id", "item_id"], how="semi").height == 0
    assert neg.join(pos.select("user_id", "ts").unique(), on=["user_id", "ts"], how="semi").height == neg.height
    assert set(neg["item_id"].to_list()) <= set(b["item_id"].to_list())


def test_amazon_electronics_csv_real(tmp_path: Path) -> None:
    src = shared("torch-rechub-amazon-samples") / "amazon_electronics_sample.csv"
    s = import_amazon(src, tmp_path / "raw")
    assert s["rows"]["behaviors"] == 100 and s["rejected"]["count"] == 0
    assert s["rows"]["impressions"] == s["positives"] + s["negatives"] and s["negatives_unsampleable"] == 0
    t = check_raw_dir(tmp_path / "raw")
    _check_din_protocol(t, 1)
    raw = pl.read_csv(src)
    assert s["users"] == raw["user_id"].n_unique() and s["items"] == raw["item_id"].n_unique()
    assert t["items"].join(raw.select("item_id", "cate_id").unique(), on=["item_id", "cate_id"]).height == s["items"]
    import_amazon(src, tmp_path / "raw2")
    assert_same_output(tmp_path / "raw", tmp_path / "raw2")
    s3 = import_amazon(src, tmp_path / "raw3", neg_per_pos=3, seed=5)
    _check_din_protocol(check_raw_dir(tmp_path / "raw3"), 3)
    assert s3["negatives"] == 3 * s3["positives"]


def test_amazon_label_encoded_samples_rejected(tmp_path: Path) -> None:
    folder = shared("torch-rechub-amazon-samples")
    with pytest.raises(ImportSourceError, match="LabelEncoder"):
        import_amazon(folder / "amazon_beauty_sample.csv", tmp_path / "raw")
    with pytest.raises(ImportSourceError, match="several CSV files"):
        import_amazon(folder, tmp_path / "raw")
    s = import_amazon(folder / "amazon_books_sample.csv", tmp_path / "raw", ordinal_time=True)
    assert s["ts_is_ordinal"] and s["rows"]["behaviors"] == 100
    t = check_raw_dir(tmp_path / "raw")
    assert (t["items"]["cate_id"] == 0).all()
    _check_din_protocol(t, 1)


def _write_amazon_json(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    reviews = [
        {"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 86400},
        {"reviewerID": "U1", "asin": "A2", "overall": 4.0, "unixReviewTime": 86400},  # same day as the first
        {"reviewerID": "U1", "asin": "A3", "overall": 3.0, "unixReviewTime": 3 * 86400},
        {"reviewerID": "U2", "asin": "A1", "overall": 5.0, "unixReviewTime": 86400},
        {"reviewerID": "U2", "asin": "A4", "overall": 2.0, "unixReviewTime": 5 * 86400},
        {"reviewerID": "U2", "asin": "A5", "overall": 1.0, "unixReviewTime": 6 * 86400},
    ]
    lines = [json.dumps(r) for r in reviews]
    lines += [
        '{"reviewerID": "U3", "asin": "A1"}',  # no time
        "this is not json",
        "{'reviewerID': 'U3', 'asin': 'A2', 'unixReviewTime': 7}",  # python literal review: accepted
    ]
    with gzip.open(root / "reviews_Toys_5.json.gz", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    meta = [
        "{'asin': 'A1', 'title': \"Kid's Bike\", 'categories': [['Toys', 'Bikes'], ['Sports', 'Cycling', 'Kids']]}",
        json.dumps({"asin": "A2", "categories": [["Toys", "Puzzles"]]}),
        "{'asin': 'A3', 'categories': [['Toys']], 'price': 3.5}",
        "{'asin': 'A4', 'salesRank': {'Toys': 5}}",  # no categories
        "{'asin': 'ZZ', 'categories': [['Unreviewed']]}",
        "{'asin': 'A5', 'categories': [['Toys', 'Dolls'",  # broken
    ]
    (root / "meta_Toys.json").write_text("\n".join(meta) + "\n")


def test_amazon_json_gz_and_literal_meta(tmp_path: Path) -> None:
    src = tmp_path / "amz"
    _write_amazon_json(src)
    s = import_amazon(src, tmp_path / "raw")
    assert s["flavour"] == "json"
    assert s["rows"]["behaviors"] == 7 and s["users"] == 3 and s["items"] == 5
    assert s["rejected"]["count"] == 3
    assert s["rejected"]["reasons"]["missing unixReviewTime"] == 1
    assert s["meta_rows_not_reviewed"] == 1 and s["items_without_meta"] == 1
    t = check_raw_dir(tmp_path / "raw")
    _check_din_protocol(t, 1)
    assert s["positives"] == 3  # U1: A3; U2: A4, A5 (U1's A2 is on the first day; U3 has one review)
    cate = dict(t["items"].select("item_id", "cate_id").iter_rows())
    assert cate[stable_id("A1")] == stable_id("Kids")  # DIN: categories[-1][-1]
    assert cate[stable_id("A2")] == stable_id("Puzzles")
    assert cate[stable_id("A3")] == stable_id("Toys")
    assert cate[stable_id("A4")] == 0 and cate[stable_id("A5")] == 0
    assert set(t["behaviors"]["user_id"].to_list()) == {stable_id(u) for u in ("U1", "U2", "U3")}
    idmap = pl.read_parquet(tmp_path / "raw" / "id_map.parquet")
    assert idmap.filter(pl.col("space") == "item").height == 5
    rej = rejects_csv(tmp_path / "raw")
    assert set(rej["source_file"]) == {"reviews_Toys_5.json.gz", "meta_Toys.json"}
    s_first = import_amazon(src, tmp_path / "raw_first", category_path="first")
    assert s_first["rows"] == s["rows"]
    cate_first = dict(pl.read_parquet(tmp_path / "raw_first" / "items.parquet").iter_rows())
    assert cate_first[stable_id("A1")] == stable_id("Bikes")
    import_amazon(src / "reviews_Toys_5.json.gz", tmp_path / "raw2")
    assert_same_output(tmp_path / "raw", tmp_path / "raw2")


def test_amazon_errors(tmp_path: Path) -> None:
    src = tmp_path / "amz"
    _write_amazon_json(src)
    (src / "meta_Toys.json").unlink()
    with pytest.raises(ImportSourceError, match="no meta file"):
        import_amazon(src, tmp_path / "raw")
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,cate_id\n1,2,3\n")
    with pytest.raises(ImportSourceError, match=r"missing column\(s\) \['time'\]"):
        import_amazon(bad, tmp_path / "raw")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImportSourceError, match="no Amazon review file"):
        import_amazon(empty, tmp_path / "raw")


# ----------------------------------------------------------------------------------------------------------------
# taobao-userbehavior
# ----------------------------------------------------------------------------------------------------------------


def test_taobao_userbehavior_real_slice(tmp_path: Path) -> None:
    src = shared("taobao-userbehavior-flink-slice")
    s = import_taobao_userbehavior(src, tmp_path / "raw")
    assert s["rows"]["behaviors"] == 96168 and s["rejected"]["count"] == 0
    assert s["users"] == 58732 and s["items"] == 75384 and s["categories"] == 3757
    assert s["behaviors_by_type"] == {"pv": 85773, "cart": 5292, "fav": 2959, "buy": 2144}
    assert s["rows"]["impressions"] == 2 * s["positives"] and s["negatives_unsampleable"] == 0
    t = check_raw_dir(tmp_path / "raw")
    b, imp = t["behaviors"], t["impressions"]
    assert b["btype"].value_counts().sort("btype")["count"].to_list() == [85773, 5292, 2959, 2144]
    pos, neg = imp.filter(pl.col("label") == 1), imp.filter(pl.col("label") == 0)
    assert pos.join(b.filter(pl.col("btype") == 1), on=["user_id", "item_id", "ts"], how="semi").height == pos.height
    assert (history_before(pos, b) >= 1).all()
    assert (neg["item_id"].to_numpy() != pos["item_id"].to_numpy()).all()  # interleaved: pos, its negative
    assert (neg["ts"].to_numpy() == pos["ts"].to_numpy()).all()
    import_taobao_userbehavior(src / "UserBehavior_slice.csv", tmp_path / "raw2")
    assert_same_output(tmp_path / "raw", tmp_path / "raw2")


def test_taobao_userbehavior_bad_lines(tmp_path: Path) -> None:
    src = tmp_path / "UserBehavior.csv"
    src.write_text(
        "1,10,100,pv,1000\n"
        "1,11,100,pv,1001\n"
        "\n"
        "1,12,101,click,1002\n"
        "2,10,100,pv\n"
        "2,x,100,pv,1003\n"
        "2,13,100,buy,1004,9\n"
        "2,13,100,cart,1005\n"
        "2,13,101,pv,1006\n"
        "3,14,102,fav,abc\n"
        "3,15,102,fav,1007\n"
    )
    s = import_taobao_userbehavior(src, tmp_path / "raw", neg_per_pos=2)  # --out may not lie inside a source folder
    assert s["rows"]["behaviors"] == 5
    assert s["rejected"]["count"] == 6
    assert s["rejected"]["reasons"] == {
        "empty line": 1,
        "expected 5 fields, got 4": 1,
        "expected 5 fields, got 6": 1,
        "unknown behavior 'click'": 1,
        "unparsable item_id": 1,
        "unparsable timestamp": 1,
    }
    rej = rejects_csv(tmp_path / "raw").sort(pl.col("source_row").cast(pl.Int64))
    assert rej["source_row"].to_list() == ["3", "4", "5", "6", "7", "10"]
    assert rej.filter(pl.col("source_row") == "4")["raw"].item() == "1,12,101,click,1002"
    assert s["items_with_conflicting_categories"] == 1  # item 13: 100 once, 101 once -> 100
    t = check_raw_dir(tmp_path / "raw")
    assert t["items"].filter(pl.col("item_id") == 13)["cate_id"].item() == 100
    # positives: user 1's pv at 1001, user 2's pv at 1006 (user 3 has no pv)
    pos = t["impressions"].filter(pl.col("label") == 1)
    assert sorted(pos.select("user_id", "item_id", "ts").rows()) == [(1, 11, 1001), (2, 13, 1006)]
    assert s["negatives"] == 4
    ranged = import_taobao_userbehavior(src, tmp_path / "raw3", ts_range=(1000, 1006))
    assert ranged["rejected"]["reasons"]["timestamp outside ts_range [1000, 1006)"] == 2


def test_taobao_userbehavior_errors(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("1,2,3,pv,4\n")
    (tmp_path / "b.csv").write_text("1,2,3,pv,4\n")
    with pytest.raises(ImportSourceError, match="expected UserBehavior.csv"):
        import_taobao_userbehavior(tmp_path, tmp_path / "raw")
    (tmp_path / "c.csv").write_text("garbage\nmore garbage\n")
    with pytest.raises(ImportSourceError, match="no parsable row"):
        import_taobao_userbehavior(tmp_path / "c.csv", tmp_path / "raw")


# ----------------------------------------------------------------------------------------------------------------
# taobao-mm
# ----------------------------------------------------------------------------------------------------------------


def test_taobao_mm_demo_real(tmp_path: Path) -> None:
    src = shared("taobao-mm-demo")
    s = import_taobao_mm(src, tmp_path / "raw")
    assert s["rows"]["impressions"] == 20 and s["rows"]["behaviors"] == 19351  # 19 x 1000 + one list of 351
    assert s["padding_dropped"] == 0 and s["users_in_both_splits"] == 0 and s["rejected"]["count"] == 0
    assert s["embedding_dim"] == 128 and s["items_with_embedding"] == 10
    assert (
        s["items"]
        == s["items_from_features"]
        + s["items_from_behaviors_only"]
        + s["items_from_targets_only"]
        + (s["items_from_embedding_only"])
    )
    t = check_raw_dir(tmp_path / "raw")
    schema = pq.read_schema(tmp_path / "raw" / "items.parquet")
    assert schema.field("mm_emb").type.value_type == pa.int8() and schema.field("mm_emb").type.list_size == 128
    assert {f"user_attr_{i}" for i in range(1, 6)} <= set(t["impressions"].columns)
    assert {"attr_213", "attr_214"} <= set(t["items"].columns)
    src_json = json.loads((tmp_path / "raw" / "source.json").read_text())
    split = src_json["recommended_split"]
    imp = t["impressions"]
    assert imp.filter(pl.col("ts") >= split["test_start_ts"]).height == 10
    # behaviors of every user precede all of that user's samples of the split its list came from
    b = t["behaviors"]
    assert b["ts"].max() < split["test_start_ts"]
    # every behavior item and every target item is in items
    items = set(t["items"]["item_id"].to_list())
    assert set(b["item_id"].unique().to_list()) <= items and set(imp["item_id"].to_list()) <= items
    emb_src = pq.read_table(src / "scl_embedding_int8_p90.parquet").to_pylist()
    got = dict(t["items"].filter(pl.col("mm_emb").is_not_null()).select("item_id", "mm_emb").iter_rows())
    assert all(list(got[r["205"]]) == r["205_c"] for r in emb_src)
    import_taobao_mm(src, tmp_path / "raw2")
    assert_same_output(tmp_path / "raw", tmp_path / "raw2")


def _write_mm(root: Path, extra_train_rows: list[dict] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    i64, lst = pa.int64(), pa.list_(pa.int64())

    def users(rows: list[dict]) -> pa.Table:
        cols = {"129_1": [r["u"] for r in rows]}
        for k in range(1, 6):
            cols[f"130_{k}"] = [r["u"] * 10 + k for r in rows]
        cols["150_2_180"] = [r["items"] for r in rows]
        cols["151_2_180"] = [r["cates"] for r in rows]
        return pa.table(
            cols,
            schema=pa.schema(
                [("129_1", i64)] + [(f"130_{k}", i64) for k in range(1, 6)] + [("150_2_180", lst), ("151_2_180", lst)]
            ),
        )

    def cat(items: list[int]) -> list[int]:
        return [0 if i == 0 else 1000 + i % 3 for i in items]

    train_rows = [
        {"u": 1, "items": [0, 0, 11, 12, 13, 14, 15], "cates": cat([0, 0, 11, 12, 13, 14, 15])},  # left padding
        {"u": 2, "items": [21, 22, 0], "cates": cat([21, 22, 0])},
        {"u": 5, "items": [51, 52], "cates": [1]},  # lengths differ: rejected
        {"u": 2, "items": [99], "cates": [9]},  # repeated user row: skipped
    ] + (extra_train_rows or [])
    test_rows = [
        {"u": 1, "items": [13, 14, 15, 16, 17], "cates": cat([13, 14, 15, 16, 17])},  # continues the train list
        {"u": 3, "items": [31, 32, 33], "cates": cat([31, 32, 33])},  # test only
    ]
    pq.write_table(users(train_rows), root / "train_user_features.parquet")
    pq.write_table(users(test_rows), root / "test_user_features.parquet")
    lab = pa.list_(pa.int8())

    def samples(rows: list[tuple]) -> pa.Table:
        return pa.table(
            {"label_0": [r[0] for r in rows], "129_1": [r[1] for r in rows], "205": [r[2] for r in rows]},
            schema=pa.schema([("label_0", lab), ("129_1", i64), ("205", i64)]),
        )

    pq.write_table(
        samples([([0, 1], 1, 16), ([1, 0], 1, 900), ([1, 0], 2, 11), ([1, 1], 2, 12)]), root / "train_samples.parquet"
    )
    pq.write_table(samples([([0, 1], 1, 17), ([1, 0], 3, 31), ([0, 1], 4, 11)]), root / "test_samples.parquet")
    pq.write_table(
        pa.table({"205": [11, 12, 31], "206": [7, 7, 8], "213": [1, 2, 3], "214": [4, 5, 6]}),
        root / "item_features.parquet",
    )
    emb = pa.list_(pa.int8())
    pq.write_table(
        pa.table(
            {"205": [11, 16, 777, 12], "205_c": [[1, 2, 3, 4], [-1, -2, -3, -4], [9, 9, 9, 9], [1, 2]]},
            schema=pa.schema([("205", i64), ("205_c", emb)]),
        ),
        root / "scl_embedding_int8_p90.parquet",
    )


def test_taobao_mm_protocol(tmp_path: Path) -> None:
    src = tmp_path / "mm"
    _write_mm(src)
    s = import_taobao_mm(src, tmp_path / "raw", train_ts=10_000, test_gap_s=100)
    T_train, T_test = 10_000, 10_100
    t = check_raw_dir(tmp_path / "raw")
    b, imp, items = t["behaviors"], t["impressions"], t["items"]
    assert s["padding_dropped"] == 3 and s["duplicate_user_rows"] == 1 and s["user_rows_rejected"] == 1
    assert s["users_in_both_splits"] == 1 and s["overlap_behaviors_deduplicated"] == 3
    assert s["train_samples"]["rejected"] == 1 and s["test_samples"]["without_user_features"] == 1
    assert s["rejected"]["count"] == 3  # the list-length row, the [1, 1] label, the 2-value embedding
    # user 1: train list at T_train - 5 .. T_train - 1, the two newer test behaviors at T_test - 2, T_test - 1
    u1 = b.filter(pl.col("user_id") == 1).sort("ts")
    assert u1["item_id"].to_list() == [11, 12, 13, 14, 15, 16, 17]
    assert u1["ts"].to_list() == [
        T_train - 5,
        T_train - 4,
        T_train - 3,
        T_train - 2,
        T_train - 1,
        T_test - 2,
        T_test - 1,
    ]
    assert b.filter(pl.col("user_id") == 2).sort("ts")["ts"].to_list() == [T_train - 2, T_train - 1]
    assert b.filter(pl.col("user_id") == 3).sort("ts")["item_id"].to_list() == [31, 32, 33]
    assert b.filter(pl.col("user_id") == 5).height == 0
    # what each sample sees (the builder's hist_len): train sees the train list, test the train list + newer
    imp = imp.with_columns(history_before(imp, b).alias("h"))
    got = {(r["user_id"], r["item_id"], r["ts"]): (r["label"], r["h"]) for r in imp.iter_rows(named=True)}
    assert got == {
        (1, 16, T_train): (1, 5),
        (1, 900, T_train): (0, 5),
        (2, 11, T_train): (0, 2),
        (1, 17, T_test): (1, 7),
        (3, 31, T_test): (0, 3),
        (4, 11, T_test): (1, 0),
    }
    # user attributes from the same split's user row; 0 when the user has none
    row = imp.filter((pl.col("user_id") == 1) & (pl.col("ts") == T_test)).row(0, named=True)
    assert [row[f"user_attr_{k}"] for k in range(1, 6)] == [11, 12, 13, 14, 15]
    assert imp.filter(pl.col("user_id") == 4)["user_attr_1"].item() == 0
    # items: features; behavior-only items with their list category; target-only and embedding-only with cate 0
    cate = dict(items.select("item_id", "cate_id").iter_rows())
    assert cate[11] == 7 and cate[31] == 8  # from item_features even though lists say otherwise
    assert cate[13] == 1000 + 13 % 3 and cate[21] == 1000 and cate[33] == 1000
    assert cate[900] == 0 and cate[777] == 0
    assert 51 not in cate and 99 not in cate  # only in rejected / skipped rows
    assert items.filter(pl.col("item_id") == 11)["attr_213"].item() == 1
    emb = dict(items.select("item_id", "mm_emb").iter_rows())
    assert list(emb[11]) == [1, 2, 3, 4] and list(emb[16]) == [-1, -2, -3, -4] and emb[12] is None
    assert pq.read_schema(tmp_path / "raw" / "items.parquet").field("mm_emb").type.list_size == 4
    split = json.loads((tmp_path / "raw" / "source.json").read_text())["recommended_split"]
    assert split["test_start_ts"] == T_test and split["train_ts"] == T_train
    # the newer behaviors must fit in the gap
    with pytest.raises(ValueError, match="test_gap_s"):
        import_taobao_mm(src, tmp_path / "raw_small_gap", train_ts=10_000, test_gap_s=1)


def test_taobao_mm_errors(tmp_path: Path) -> None:
    src = tmp_path / "mm"
    _write_mm(src)
    (src / "item_features.parquet").unlink()
    with pytest.raises(ImportSourceError, match="item_features.parquet not found"):
        import_taobao_mm(src, tmp_path / "raw")
    _write_mm(src)
    pq.write_table(pa.table({"129_1": [1], "205": [2]}), src / "test_samples.parquet")
    with pytest.raises(ImportSourceError, match=r"test_samples.parquet: missing column\(s\) \['label_0'\]"):
        import_taobao_mm(src, tmp_path / "raw")
