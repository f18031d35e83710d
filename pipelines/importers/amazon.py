"""`ctr import amazon SRC --out RAW_DIR`: Amazon reviews (the DIN/DIEN source) as a lifelong log and CTR samples.

Accepted sources:

* McAuley's review dumps: a reviews file of JSON lines with `reviewerID, asin, unixReviewTime` (the 2014 5-core
  `reviews_<Cat>_5.json`, the full `reviews_<Cat>.json`, the 2018 `<Cat>_5.json`; plain or `.gz`) and a meta file
  `meta_<Cat>.json[.gz]` with `asin` and `categories` (2014: a list of category paths) or `category` (2018: one
  path). The 2014 meta lines are Python literals, not JSON (DIN's script used `eval`): each line is tried with
  `json.loads`, then `ast.literal_eval` (never `eval`). SRC is the folder holding both, or the reviews file (the
  meta file is then looked up beside it, or given with `meta=`).
* The flat CSV `user_id,item_id,time,cate_id` (torch-rechub's Amazon Electronics sample: ids already integers,
  time in unix seconds). SRC is the CSV file, or a folder holding exactly one CSV.
* torch-rechub's Beauty/Books CSVs (`user_id,item_id,time,label`) are rejected by default: there every column was
  passed through a LabelEncoder, so `time` is only a rank of the distinct timestamps, `label` an encoded class of
  unknown meaning, and there is no category. `ordinal_time=True` imports them anyway with ts = that rank
  (LabelEncoder sorts, so the order of time is kept but not the gaps), `label` ignored and cate_id = 0.

Ids: string ids (reviewerID, asin, category name) become stable int64 ids: the first 8 bytes of
BLAKE2b(utf-8 string), little-endian, masked to 63 bits (so >= 0). The same string gives the same id in every
import; `id_map.parquet` (space, raw, id) in RAW_DIR maps them back. A collision inside a space raises.
The category of an item is, as in DIN's `remap_id.py` (`categories[-1][-1]`), the last (most specific) entry of the
LAST category path (`category_path="last"`; `"first"` takes the first path); items without meta get cate_id 0.

Protocol (DIN's, adapted to timestamps; DIN builds samples from the review order, we from the review time):

* behaviors: every review (user, item, ts = unixReviewTime; no btype).
* impressions: every review of a user that is strictly later than the user's first review is a positive
  impression (label 1) at its ts, plus `neg_per_pos` (default 1) negatives (label 0) at the same ts, drawn
  uniformly over all reviewed items (`negative_sampling="popularity"`: proportional to review counts) and redrawn
  while the item is any item the user reviewed (DIN's rule). "Strictly later" matters because review times are
  whole days: a review on the user's first day would see no history (ties count as after), so it is not a sample.
  Draws are a hash of (seed, user, item, ts, k, attempt): deterministic and independent of row order.
* DIN's own split (each user's last review is the test sample) is not a time split; the builder's time split
  is the closest equivalent, so no `recommended_split` is written.
* Lines that cannot be parsed or lack a field go to `import_rejects.csv` with the reason; meta lines of items
  nobody reviewed are skipped (counted), as DIN keeps only reviewed items.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.importers._common import (
    ImportSourceError,
    Rejects,
    finish_import,
    parse_columns,
    prepare_out_dir,
    raw_schema,
    read_text_lines,
    require_columns,
    require_src,
    resolve_item_cates,
    stable_id,
    stable_ids,
    write_raw_table,
)
from pipelines.importers.negatives import interleave, sample_negatives

log = logging.getLogger(__name__)

NAME = "amazon"
PROTOCOL = (
    "Amazon reviews, DIN protocol: every review is a behavior at unixReviewTime; each review strictly later than "
    "the user's first review is a positive impression at its ts plus neg_per_pos negatives at the same ts, drawn "
    "uniformly over reviewed items excluding every item the user reviewed (seeded hash, order-independent). "
    "String ids -> BLAKE2b-64 masked to 63 bits; cate = last entry of the last category path (DIN). Accepts "
    "reviews JSON lines (+gz) with meta (python-literal ok), or the flat CSV user_id,item_id,time,cate_id."
)

_REVIEW_GLOBS = ("reviews_*.json", "reviews_*.json.gz", "*_5.json", "*_5.json.gz")
_META_GLOBS = ("meta_*.json", "meta_*.json.gz")
_ASIN_RE = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")
_FIX = (
    "Expected a folder with reviews_<Cat>[_5].json[.gz] and meta_<Cat>.json[.gz], a reviews file (meta beside it "
    "or meta=PATH), or a CSV user_id,item_id,time,cate_id."
)


def _is_json_name(p: Path) -> bool:
    return p.name.endswith(".json") or p.name.endswith(".json.gz")


def _glob(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})


def _find_meta(folder: Path, reviews: Path) -> Path | None:
    metas = _glob(folder, _META_GLOBS)
    if len(metas) <= 1:
        return metas[0] if metas else None
    cat = re.sub(r"^reviews_|(_5)?\.json(\.gz)?$", "", reviews.name)
    match = [m for m in metas if re.sub(r"^meta_|\.json(\.gz)?$", "", m.name) == cat]
    if len(match) == 1:
        return match[0]
    raise ImportSourceError(
        f"{folder}: several meta files {[m.name for m in metas]} and none matches {reviews.name}; pass meta=PATH."
    )


def _locate(src: Path, meta: str | Path | None) -> tuple[str, Path, Path | None]:
    """('json', reviews, meta) or ('csv', csv, None)."""
    if src.is_file():
        if src.suffix == ".csv":
            return "csv", src, None
        if _is_json_name(src):
            m = Path(meta) if meta is not None else _find_meta(src.parent, src)
            return "json", src, m
        raise ImportSourceError(f"{src}: not a .csv, .json or .json.gz file. {_FIX}")
    reviews = [p for p in _glob(src, _REVIEW_GLOBS) if not p.name.startswith("meta_")]
    if len(reviews) > 1:
        raise ImportSourceError(f"{src}: several review files {[p.name for p in reviews]}; pass the one to import.")
    if reviews:
        m = Path(meta) if meta is not None else _find_meta(src, reviews[0])
        return "json", reviews[0], m
    csvs = sorted(src.glob("*.csv"))
    if len(csvs) == 1:
        return "csv", csvs[0], None
    if len(csvs) > 1:
        raise ImportSourceError(f"{src}: several CSV files {[p.name for p in csvs]}; pass the one to import as SRC.")
    raise ImportSourceError(f"{src}: no Amazon review file found. {_FIX}")


def _parse_obj(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return ast.literal_eval(line)  # the 2014 meta files are Python dict literals


def _read_reviews(path: Path, rejects: Rejects) -> pl.DataFrame:
    users: list[str] = []
    asins: list[str] = []
    times: list[int] = []
    for lineno, line in read_text_lines(path):
        if not line.strip():
            rejects.add(path.name, lineno, "empty line", "")
            continue
        try:
            obj = _parse_obj(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            rejects.add(path.name, lineno, f"not a JSON or Python-literal object ({type(e).__name__})", line[:500])
            continue
        if not isinstance(obj, dict):
            rejects.add(path.name, lineno, "not a JSON object", line[:500])
            continue
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if obj.get(k) in (None, "")]
        if missing:
            rejects.add(path.name, lineno, f"missing {', '.join(missing)}", line[:500])
            continue
        try:
            t = int(obj["unixReviewTime"])
        except (TypeError, ValueError):
            rejects.add(path.name, lineno, f"unparsable unixReviewTime: {obj['unixReviewTime']!r}", line[:500])
            continue
        users.append(str(obj["reviewerID"]))
        asins.append(str(obj["asin"]))
        times.append(t)
    return pl.DataFrame(
        {"reviewer": users, "asin": asins, "ts": times},
        schema={"reviewer": pl.String, "asin": pl.String, "ts": pl.Int64},
    )


def _category(obj: dict[str, Any], category_path: str) -> str | None:
    cats = obj.get("categories")
    if isinstance(cats, list) and cats:
        path = cats[-1] if category_path == "last" else cats[0]
        if isinstance(path, list | tuple) and path:
            return str(path[-1])
        if isinstance(path, str):  # a flat list of names
            return str(cats[-1])
        return None
    cat = obj.get("category")  # the 2018 meta: one path as a flat list
    if isinstance(cat, list) and cat:
        return str(cat[-1])
    if isinstance(cat, str) and cat:
        return cat
    return None


def _read_meta(path: Path, reviewed: set[str], category_path: str, rejects: Rejects) -> tuple[dict[str, str], dict]:
    cates: dict[str, str] = {}
    stats = {"meta_rows_not_reviewed": 0, "meta_rows_without_category": 0, "meta_duplicate_asins": 0}
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue  # blank lines in meta carry no item
        m = _ASIN_RE.search(line)
        if m is not None and m.group(1) not in reviewed:
            stats["meta_rows_not_reviewed"] += 1
            continue
        try:
            obj = _parse_obj(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            rejects.add(path.name, lineno, f"not a JSON or Python-literal object ({type(e).__name__})", line[:500])
            continue
        if not isinstance(obj, dict) or not obj.get("asin"):
            rejects.add(path.name, lineno, "meta line without asin", line[:500])
            continue
        asin = str(obj["asin"])
        if asin not in reviewed:
            stats["meta_rows_not_reviewed"] += 1
            continue
        if asin in cates:
            stats["meta_duplicate_asins"] += 1
            continue
        cat = _category(obj, category_path)
        if cat is None:
            stats["meta_rows_without_category"] += 1
            cat = ""
        cates[asin] = cat
    return cates, stats


def _din_impressions(
    reviews: pl.DataFrame, neg_per_pos: int, seed: int, negative_sampling: str
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Positives (reviews strictly after the user's first review) + sampled negatives at the same ts."""
    first = reviews.group_by("user_id").agg(pl.col("ts").min().alias("_first"))
    flagged = reviews.join(first, on="user_id", how="left", maintain_order="left")
    pos = flagged.filter(pl.col("ts") > pl.col("_first")).select("user_id", "item_id", "ts")
    counts = reviews.group_by("item_id").len().sort("item_id")
    weights = counts["len"].to_numpy().astype(np.float64) if negative_sampling == "popularity" else None
    pairs = reviews.select("user_id", "item_id").unique()
    neg = sample_negatives(
        pos["user_id"].to_numpy(),
        pos["item_id"].to_numpy(),
        pos["ts"].to_numpy(),
        counts["item_id"].to_numpy(),
        weights,
        neg_per_pos,
        seed,
        exclude_pairs=pairs,
    )
    imps = interleave(pos, neg)
    stats = {
        "positives": pos.height,
        "negatives": len(neg.item_id),
        "negatives_unsampleable": neg.unsampleable,
        "reviews_at_user_first_ts": reviews.height - pos.height,
    }
    return imps, stats


def import_amazon(
    src: str | Path,
    out_dir: str | Path,
    *,
    meta: str | Path | None = None,
    neg_per_pos: int = 1,
    seed: int = 1234,
    negative_sampling: str = "uniform",
    category_path: str = "last",
    ordinal_time: bool = False,
) -> dict[str, Any]:
    """Import Amazon reviews (JSON lines + meta, or a flat CSV) into RAW_DIR; returns the summary."""
    if negative_sampling not in ("uniform", "popularity"):
        raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', got {negative_sampling!r}")
    if category_path not in ("last", "first"):
        raise ValueError(f"category_path must be 'last' (DIN) or 'first', got {category_path!r}")
    if neg_per_pos < 0:
        raise ValueError(f"neg_per_pos must be >= 0, got {neg_per_pos}")
    src_path = require_src(src, NAME)
    flavour, reviews_path, meta_path = _locate(src_path, meta)
    if flavour == "json" and (meta_path is None or not meta_path.exists()):
        raise ImportSourceError(
            f"{reviews_path}: no meta file found ({meta_path or 'meta_<Cat>.json[.gz] beside it'}). The categories "
            "come from McAuley's meta_<Cat>.json(.gz); put it in the same folder or pass meta=PATH."
        )
    if flavour == "csv":
        header = pl.read_csv(reviews_path, n_rows=0, infer_schema=False).columns
        if "cate_id" not in header and "label" in header and not ordinal_time:
            raise ImportSourceError(
                f"{reviews_path}: columns {header} look like torch-rechub's Beauty/Books sample, where every column "
                "(time and label included) went through a LabelEncoder: `time` is only the rank of the distinct "
                "timestamps, `label` an encoded class of unknown meaning, and there is no category. It cannot be "
                "imported as real timestamps. Use the raw ratings/reviews instead, or pass ordinal_time=True to "
                "import it with ts = that rank (order kept, gaps lost), label ignored and cate_id = 0."
            )
        require_columns(
            header,
            ["user_id", "item_id", "time"] + ([] if ordinal_time else ["cate_id"]),
            reviews_path,
            "The flat Amazon CSV is user_id,item_id,time,cate_id (integers, time in unix seconds).",
        )
    out = prepare_out_dir(out_dir, src_path, NAME)
    rejects = Rejects(out)
    extra: dict[str, Any] = {"flavour": flavour}

    if flavour == "json":
        raw = _read_reviews(reviews_path, rejects)
        if raw.height == 0:
            raise ImportSourceError(f"{reviews_path}: no parsable review line. {_FIX}")
        user_id, umap = stable_ids(raw["reviewer"], "user")
        item_id, imap = stable_ids(raw["asin"], "item")
        reviews = pl.DataFrame({"user_id": user_id, "item_id": item_id, "ts": raw["ts"]})
        assert meta_path is not None
        cates, meta_stats = _read_meta(meta_path, set(imap["raw"].to_list()), category_path, rejects)
        extra.update(meta_stats)
        cat_names = sorted({c for c in cates.values() if c})
        cmap = pl.DataFrame(
            {"space": ["cate"] * len(cat_names), "raw": cat_names, "id": [stable_id(c) for c in cat_names]},
            schema={"space": pl.String, "raw": pl.String, "id": pl.Int64},
        )
        if cmap["id"].n_unique() != cmap.height:
            raise ValueError("stable id collision among category names")
        cate_of = {a: (stable_id(c) if c else 0) for a, c in cates.items()}
        items = imap.select(
            pl.col("id").alias("item_id"),
            pl.col("raw").replace_strict(cate_of, default=0, return_dtype=pl.Int64).alias("cate_id"),
        ).sort("item_id")
        extra["items_without_meta"] = int(imap.height - len(cates))
        extra["items_without_category"] = int(extra["items_without_meta"] + meta_stats["meta_rows_without_category"])
        pl.concat([umap, imap, cmap]).write_parquet(out / "id_map.parquet")
    else:
        df = pl.read_csv(reviews_path, infer_schema=False)
        types = {"user_id": pl.Int64, "item_id": pl.Int64, "time": pl.Int64}
        if not ordinal_time or "cate_id" in df.columns:
            types["cate_id"] = pl.Int64
        parsed, bad = parse_columns(df.select(list(types)), types, source_file=reviews_path.name, first_row=2)
        rejects.add_frame(bad)
        if "cate_id" not in parsed.columns:
            parsed = parsed.with_columns(pl.lit(0, pl.Int64).alias("cate_id"))
        reviews = parsed.select("user_id", "item_id", pl.col("time").alias("ts"))
        items, conflicts = resolve_item_cates(parsed.select("item_id", "cate_id"))
        extra["items_with_conflicting_categories"] = conflicts
        extra["ts_is_ordinal"] = bool(ordinal_time and "label" in df.columns)

    impressions, stats = _din_impressions(reviews, neg_per_pos, seed, negative_sampling)
    extra.update(stats)
    rows = {
        "items": write_raw_table(items, out / "items.parquet", raw_schema("items")),
        "behaviors": write_raw_table(reviews, out / "behaviors.parquet", raw_schema("behaviors")),
        "impressions": write_raw_table(impressions, out / "impressions.parquet", raw_schema("impressions")),
    }
    options = {
        "meta": str(meta_path) if meta_path else None,
        "reviews": reviews_path.name,
        "neg_per_pos": neg_per_pos,
        "seed": seed,
        "negative_sampling": negative_sampling,
        "category_path": category_path,
        "ordinal_time": ordinal_time,
    }
    return finish_import(
        out,
        importer=NAME,
        src=src_path,
        protocol=PROTOCOL,
        options=options,
        rows=rows,
        rejects=rejects,
        extra=extra,
    )
