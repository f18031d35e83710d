"""`ctr import movielens SRC --out RAW_DIR`: MovieLens ratings as a lifelong log and CTR samples.

Accepted sources (SRC is the folder, or one of its files):

* GroupLens CSV (ml-latest, ml-latest-small, ml-25m, ml-20m): `ratings.csv` (`userId,movieId,rating,timestamp`)
  and `movies.csv` (`movieId,title,genres`, genres `|`-separated).
* RecBole atomic files (ml-100k, ml-1m, ...): `<name>.inter` (`user_id, item_id, rating, timestamp`) and
  `<name>.item` (`item_id`, genres in `class` or `genre`, space-separated, optional `release_year`), tab-separated
  with `name:type` headers; optional `<name>.user` (`user_id, age, gender, occupation`).

Protocol:

* behaviors: every rating is a behavior (user, movie, ts = the rating's timestamp in seconds) with
  `btype = round(rating * 2)` as int8 (0.5 stars -> 1 ... 5 stars -> 10), so the rating is kept.
* impressions: every rating is also an impression of that movie at the same ts with `label = rating >= 4`
  (`like_threshold`). Its own rating has the same ts, and ties count as "after", so a sample never sees its own
  rating (nor any rating the user gave in the same second): its history is the strictly earlier ratings.
* items: every movie of the movie file. `cate_id` = the code of the FIRST listed genre; extra attributes
  `genre_2` (code of the second listed genre, 0 if none), `genre_count` (number of listed genres) and `year`
  (release year from `release_year` or from the "(YYYY)" at the end of the title, 0 if unknown). Genre codes are
  1-based ranks of the sorted distinct genre strings of that file (written to source.json); 0 = unknown.
  Rated movies missing from the movie file still get an item row with cate_id 0 (counted).
* RecBole `.user` attributes become int64 impression columns: `age` (the age itself), `gender` and `occupation`
  (1-based codes of the sorted distinct strings, in source.json); 0 for users missing from `.user`.
* Rows that cannot be parsed (missing/unparsable fields, rating outside 0.5..5) go to `import_rejects.csv`.
* No natural split: split by time in the builder.
* ``content_emb=true`` (off by default, so the standard import is unchanged): an ``mm_emb`` content vector per movie
  from its metadata, for `ctr sid` (semantic IDs need a content embedding and MovieLens has no other): the listed
  genres as a multi-hot vector scaled to unit norm, then ``(year - 1990) / 20`` and an unknown-year flag (float32,
  G + 2 values). Movies with equal genres and year get equal vectors (their semantic IDs differ only by the
  collision suffix); rated movies missing from the movie file get a null ``mm_emb``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.importers._common import (
    ImportSourceError,
    Rejects,
    code_map,
    finish_import,
    parse_columns,
    prepare_out_dir,
    raw_schema,
    require_columns,
    require_src,
    write_raw_table,
)

log = logging.getLogger(__name__)

NAME = "movielens"
PROTOCOL = (
    "MovieLens: every rating is a behavior at its timestamp (btype = rating*2 as int8) and also an impression of "
    "that movie at the same ts with label = rating >= 4 (ties count as after, so its own rating is never in its "
    "history). cate_id = code of the first listed genre (+ genre_2, genre_count, year item attributes); RecBole "
    ".user age/gender/occupation become int64 impression columns. Accepts ratings.csv+movies.csv or RecBole "
    "<name>.inter+<name>.item[+.user]."
)

_FIX = (
    "Expected either GroupLens ratings.csv + movies.csv (ml-latest-small layout) or RecBole atomic "
    "<name>.inter + <name>.item (+ <name>.user) in the SRC folder."
)


def _locate(src: Path) -> tuple[str, dict[str, Path]]:
    """('grouplens'|'recbole', files) for a source folder or a file inside it."""
    folder = src if src.is_dir() else src.parent
    if src.is_file() and src.suffix == ".inter":
        inters = [src]
    else:
        inters = sorted(folder.glob("*.inter"))
    ratings = folder / "ratings.csv"
    if ratings.exists() and not (src.is_file() and src.suffix == ".inter"):
        movies = folder / "movies.csv"
        if not movies.exists():
            raise ImportSourceError(
                f"{movies}: not found. The GroupLens layout needs movies.csv (movieId,title,genres) beside "
                f"{ratings.name}; put it in {folder}."
            )
        return "grouplens", {"ratings": ratings, "movies": movies}
    if inters:
        if len(inters) > 1:
            raise ImportSourceError(
                f"{folder}: several RecBole .inter files {[p.name for p in inters]}; pass the one to import as SRC."
            )
        inter = inters[0]
        item = inter.with_suffix(".item")
        if not item.exists():
            raise ImportSourceError(
                f"{item}: not found. The RecBole layout needs {item.name} (item_id, class|genre) beside {inter.name}."
            )
        files = {"inter": inter, "item": item}
        user = inter.with_suffix(".user")
        if user.exists():
            files["user"] = user
        return "recbole", files
    found = sorted(p.name for p in folder.iterdir())[:20] if folder.is_dir() else []
    raise ImportSourceError(f"{src}: no MovieLens files found (folder holds {found}). {_FIX}")


def _read_recbole(path: Path) -> pl.DataFrame:
    df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, truncate_ragged_lines=True)
    return df.rename({c: c.split(":", 1)[0] for c in df.columns})


def _genre_columns(genres: pl.Expr, codes: dict[str, int]) -> list[pl.Expr]:
    """cate_id, genre_2, genre_count from a list<str> expression of genres."""

    def code(e: pl.Expr) -> pl.Expr:
        return e.replace_strict(codes, default=0, return_dtype=pl.Int64)

    return [
        code(genres.list.get(0, null_on_oob=True)).fill_null(0).alias("cate_id"),
        code(genres.list.get(1, null_on_oob=True)).fill_null(0).alias("genre_2"),
        genres.list.len().cast(pl.Int64).fill_null(0).alias("genre_count"),
    ]


def _content_vectors(items: pl.DataFrame, genres: pl.Series, genre_codes: dict[str, int]) -> pl.Series:
    """``mm_emb`` of ``content_emb=true`` (see the module docstring): [genres multi-hot / sqrt(count), year, flag]."""
    g = len(genre_codes)
    out = np.zeros((items.height, g + 2), dtype=np.float32)
    for row, names in enumerate(genres.to_list()):
        cols = [genre_codes[n] - 1 for n in (names or []) if n in genre_codes]
        if cols:
            out[row, cols] = 1.0 / np.sqrt(len(cols))
    year = items["year"].to_numpy()
    out[:, g] = np.where(year > 0, (year - 1990) / 20.0, 0.0)
    out[:, g + 1] = (year <= 0).astype(np.float32)
    return pl.Series("mm_emb", out, dtype=pl.Array(pl.Float32, g + 2))


def import_movielens(
    src: str | Path, out_dir: str | Path, *, like_threshold: float = 4.0, content_emb: bool = False
) -> dict[str, Any]:
    """Import MovieLens (GroupLens CSV or RecBole atomic) into RAW_DIR; returns the summary (see module docstring)."""
    src_path = require_src(src, NAME)
    flavour, files = _locate(src_path)
    out = prepare_out_dir(out_dir, src_path, NAME)
    rejects = Rejects(out)
    options = {"like_threshold": like_threshold, "content_emb": content_emb}
    codes_out: dict[str, dict[str, int]] = {}

    # ---- ratings
    if flavour == "grouplens":
        rf = files["ratings"]
        df = pl.read_csv(rf, infer_schema=False)
        require_columns(df.columns, ["userId", "movieId", "rating", "timestamp"], rf, _FIX)
        df = df.rename({"userId": "user_id", "movieId": "item_id", "timestamp": "ts"})
    else:
        rf = files["inter"]
        df = _read_recbole(rf)
        require_columns(df.columns, ["user_id", "item_id", "rating", "timestamp"], rf, _FIX)
        df = df.rename({"timestamp": "ts"})
    df = df.select("user_id", "item_id", "rating", "ts")
    ratings, bad = parse_columns(
        df,
        {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "ts": pl.Float64},
        source_file=rf.name,
        first_row=2,
        checks=[
            (~pl.col("rating").is_between(0.5, 5.0), "rating outside 0.5..5"),
            (pl.col("ts") != pl.col("ts").floor(), "timestamp is not whole seconds"),
        ],
    )
    rejects.add_frame(bad)
    ratings = ratings.with_columns(
        pl.col("ts").cast(pl.Int64),
        (pl.col("rating") * 2).round(0).cast(pl.Int8).alias("btype"),
        (pl.col("rating") >= like_threshold).cast(pl.Int8).alias("label"),
    )

    # ---- movies
    if flavour == "grouplens":
        mf = files["movies"]
        mdf = pl.read_csv(mf, infer_schema=False)
        require_columns(mdf.columns, ["movieId", "title", "genres"], mf, _FIX)
        mdf = mdf.rename({"movieId": "item_id"})
        genres = pl.col("genres").fill_null("").str.split("|")
        year = pl.col("title").str.extract(r"\((\d{4})\)\s*$", 1)
    else:
        mf = files["item"]
        mdf = _read_recbole(mf)
        genre_col = "class" if "class" in mdf.columns else "genre"
        require_columns(
            mdf.columns, ["item_id", genre_col], mf, _FIX + " The .item file needs a class or genre column."
        )
        genres = pl.col(genre_col).fill_null("").str.split(" ")
        year = pl.col("release_year") if "release_year" in mdf.columns else pl.lit(None, dtype=pl.String)
    genres = genres.list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
    movies, bad = parse_columns(mdf, {"item_id": pl.Int64}, source_file=mf.name, first_row=2)
    rejects.add_frame(bad)
    movies = movies.with_columns(genres.alias("_genres"), year.alias("_year")).select("item_id", "_genres", "_year")
    n_dup_movies = movies.height - movies["item_id"].n_unique()
    movies = movies.unique(subset="item_id", keep="first", maintain_order=True)
    genre_codes = code_map(movies["_genres"].explode().drop_nulls().to_list())
    codes_out["genre"] = genre_codes
    items = movies.select(
        "item_id",
        *_genre_columns(pl.col("_genres"), genre_codes),
        pl.col("_year").str.strip_chars().cast(pl.Int64, strict=False).fill_null(0).alias("year"),
    )
    mm_dim = None
    if content_emb:
        items = items.with_columns(_content_vectors(items, movies["_genres"], genre_codes))
        mm_dim = len(genre_codes) + 2
    missing = ratings.select("item_id").unique().join(items.select("item_id"), on="item_id", how="anti").sort("item_id")
    if missing.height:
        log.warning("%d rated movies are missing from %s; their cate_id is 0", missing.height, mf.name)
        items = pl.concat(
            [
                items,
                missing.with_columns(
                    pl.lit(0, pl.Int64).alias("cate_id"),
                    pl.lit(0, pl.Int64).alias("genre_2"),
                    pl.lit(0, pl.Int64).alias("genre_count"),
                    pl.lit(0, pl.Int64).alias("year"),
                    *([pl.lit(None, pl.Array(pl.Float32, mm_dim)).alias("mm_emb")] if mm_dim else []),
                ),
            ]
        )

    # ---- users (RecBole .user)
    user_cols: list[str] = []
    impressions = ratings.select("user_id", "item_id", "ts", "label")
    n_users_without_attrs = 0
    if "user" in files:
        uf = files["user"]
        udf = _read_recbole(uf)
        require_columns(udf.columns, ["user_id"], uf, "A RecBole .user file needs a user_id column.")
        user_cols = [c for c in ("age", "gender", "occupation") if c in udf.columns]
        users, bad = parse_columns(
            udf.select("user_id", *user_cols),
            {"user_id": pl.Int64, **({"age": pl.Int64} if "age" in user_cols else {})},
            source_file=uf.name,
            first_row=2,
        )
        rejects.add_frame(bad)
        for c in ("gender", "occupation"):
            if c in user_cols:
                cm = code_map(users[c].drop_nulls().to_list())
                codes_out[c] = cm
                users = users.with_columns(pl.col(c).replace_strict(cm, default=0, return_dtype=pl.Int64))
        users = users.unique(subset="user_id", keep="first", maintain_order=True)
        impressions = impressions.join(users, on="user_id", how="left", maintain_order="left")
        n_users_without_attrs = int(
            ratings.select("user_id").unique().join(users.select("user_id"), on="user_id", how="anti").height
        )
        impressions = impressions.with_columns(pl.col(c).fill_null(0) for c in user_cols)

    # ---- write
    item_attrs = ["genre_2", "genre_count", "year"]
    rows = {
        "items": write_raw_table(
            items, out / "items.parquet", raw_schema("items", extra_int64=item_attrs, mm_emb_dim=mm_dim)
        ),
        "behaviors": write_raw_table(
            ratings.select("user_id", "item_id", "ts", "btype"),
            out / "behaviors.parquet",
            raw_schema("behaviors", btype=True),
        ),
        "impressions": write_raw_table(
            impressions, out / "impressions.parquet", raw_schema("impressions", extra_int64=user_cols)
        ),
    }
    extra = {
        "flavour": flavour,
        "positives": int(ratings["label"].sum()),
        "items_without_metadata": int(missing.height),
        "duplicate_movie_rows": int(n_dup_movies),
        "users_without_attributes": n_users_without_attrs,
        "item_attributes": item_attrs,
        "impression_attributes": user_cols,
    }
    return finish_import(
        out,
        importer=NAME,
        src=src_path,
        protocol=PROTOCOL,
        options={**options, "flavour": flavour, "files": {k: v.name for k, v in files.items()}},
        rows=rows,
        rejects=rejects,
        extra=extra,
        source_extra={"codes": codes_out},
    )
