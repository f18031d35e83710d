"""`ctr import taobao-mm SRC --out RAW_DIR`: the Taobao-MM release of MUSE (alimama-tech/MUSE, arXiv 2512.07216).

Source folder (each table is `<name>.parquet`, `<name>.full.parquet` as MUSE's preprocess names it,
`<name>.part_*.parquet`, or a folder `<name>/` of Parquet files):

* `train_samples`, `test_samples`: `label_0` = [1-y, y] (list<int8>), `129_1` user id, `205` target item id.
* `train_user_features`, `test_user_features`: one row per user: `129_1`, attributes `130_1..130_5`, the lifelong
  item list `150_2_180` (up to 1000, oldest first, 0 = padding) and its categories `151_2_180`.
* `item_features`: `205` item id, `206` category, `213`, `214` attributes.
* optional `scl_embedding_int8_p90` (or any `scl_embedding*`): `205` item id, `205_c` the 128-d SCL embedding
  (int8; float lists are written as float32).

The release has no timestamps: the order of a list is the only time. Protocol (synthetic clock, seconds):

* Train samples are impressions at `T_train = train_ts` (default 1_700_000_000), test samples at
  `T_test = T_train + test_gap_s` (default one day). `label = label_0[1]`; a `label_0` that is not [1,0] or [0,1]
  is rejected. User attributes `130_1..130_5` become int64 impression columns `user_attr_1..user_attr_5`, taken
  from the user-feature row of the same split; 0 (MUSE's own fill value for a failed join) when the user has no row.
* The train list of a user (padding 0 dropped, counted in `padding_dropped`; not quarantined: it is padding) becomes
  behaviors at `T_train - (n - i)` for the i-th of n kept items (0-based, oldest first): every behavior is strictly
  before every sample of that user, and the order is kept.
* The test list of a user who has no train row becomes behaviors at `T_test - (m - i)`.
* A user in both train and test user features: the test list is taken as the continuation of the same history
  (a later window of it). The longest suffix of the train list that equals a prefix of the test list is the
  overlap: those behaviors are already in the log (at their train timestamps) and are not written twice
  (`overlap_behaviors_deduplicated`); the rest of the test list (the newer behaviors) is written at
  `T_test - (m - i)`, which lies in [T_train, T_test) (checked: `test_gap_s` must exceed the number of new
  behaviors). So train samples see exactly the train list and test samples see the train list plus the newer
  behaviors. Without any overlap the whole test list counts as newer.
* A user-feature row whose two lists differ in length is rejected (`import_rejects.csv`); a repeated user row in
  the same split is skipped (first kept, counted).
* items: every `item_features` row (`cate_id = 206`, attributes `attr_213`, `attr_214`). Items that occur only in
  behaviors still get a row, with the category the `151_2_180` lists give them (most frequent, ties smallest) and
  attributes 0, so no behavior is lost; target items found nowhere else and embedding-only items get cate_id 0
  (MUSE's fill value). `mm_emb` = the SCL embedding as fixed_size_list<int8>[128]; items without one have a null
  `mm_emb` (the builder reports the nulls). The 10-row demo files do not join, so most rows there are such fills.
* `source.json` gets `recommended_split = {test_start_ts: T_test, train_ts: T_train}`. All train samples share one
  ts, so a time split cannot carve a valid split out of train.

Memory: user-feature files are streamed in batches; the train lists of users who also appear in the test user
features are held in memory (8 bytes per item) to find the overlap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.importers._common import (
    ImportSourceError,
    RawTableWriter,
    Rejects,
    finish_import,
    prepare_out_dir,
    raw_schema,
    require_columns,
    require_src,
    resolve_item_cates,
    tmp_dir,
    write_raw_table,
)
from pipelines.importers.taobao_mm_files import (
    EMB,
    HIST_CATES,
    HIST_ITEMS,
    ITEM,
    ITEM_ATTRS,
    USER,
    USER_ATTRS,
    attr_name,
    column_names,
    find_files,
    iter_batches,
    list_overlap,
    read_columns,
    user_attributes,
)

log = logging.getLogger(__name__)

NAME = "taobao-mm"
PROTOCOL = (
    "Taobao-MM (MUSE): no timestamps, so train samples are impressions at T_train and test samples at T_test = "
    "T_train + gap; each user's lifelong list (150_2_180, oldest first, 0-padding dropped) becomes behaviors at "
    "T_train - (n - i) (test-only users: T_test - (m - i)); for a user in both splits the test list's overlap with "
    "the end of the train list is deduplicated and its newer part placed in [T_train, T_test). label = label_0[1]; "
    "130_1..5 -> user_attr_1..5; items from 205/206/213/214 plus behavior items (cate from 151_2_180), "
    "mm_emb = 205_c int8[128] (null when absent). recommended_split.test_start_ts = T_test."
)


class _SplitStats:
    def __init__(self) -> None:
        self.rows = 0
        self.duplicate_rows = 0
        self.rejected_rows = 0
        self.padding = 0
        self.behaviors = 0
        self.overlap = 0
        self.users_in_both = 0
        self.max_new = 0


def _write_lists(
    split: str,
    files: list[Path],
    first_mask: np.ndarray,
    t_split: int,
    writer: RawTableWriter,
    pairs_dir: Path,
    rejects: Rejects,
    batch_rows: int,
    stash_users: pl.Series | None,
    stash: dict[int, np.ndarray],
    train_lists: dict[int, np.ndarray] | None,
) -> _SplitStats:
    """Stream one split's user features into behaviors; (item, cate) counts to `pairs_dir`."""
    st = _SplitStats()
    global_row = 0
    for part, (f, row0, batch) in enumerate(iter_batches(files, [USER, HIST_ITEMS, HIST_CATES], batch_rows)):
        nrows = batch.num_rows
        st.rows += nrows
        keep_row = first_mask[global_row : global_row + nrows].copy()
        global_row += nrows
        null_user = pc.is_null(batch.column(USER)).to_numpy(zero_copy_only=False)
        st.duplicate_rows += int((~keep_row & ~null_user).sum())
        for r in np.flatnonzero(null_user):
            rejects.add(f.name, row0 + int(r) + 1, f"missing {USER} (user id)", "")
        st.rejected_rows += int(null_user.sum())
        items_col = batch.column(HIST_ITEMS)
        cates_col = batch.column(HIST_CATES)
        n_items = pc.fill_null(pc.list_value_length(items_col), 0).to_numpy(zero_copy_only=False)
        n_cates = pc.fill_null(pc.list_value_length(cates_col), 0).to_numpy(zero_copy_only=False)
        users = pc.fill_null(batch.column(USER), 0).to_numpy(zero_copy_only=False)
        bad = keep_row & (n_items != n_cates)
        for r in np.flatnonzero(bad):
            rejects.add(
                f.name,
                row0 + int(r) + 1,
                f"{HIST_ITEMS} and {HIST_CATES} differ in length",
                f"{USER}={users[r]} len({HIST_ITEMS})={n_items[r]} len({HIST_CATES})={n_cates[r]}",
            )
        st.rejected_rows += int(bad.sum())
        keep_row &= ~bad
        # flatten the kept rows' lists (null lists count as empty, null elements as padding)
        kept = np.flatnonzero(keep_row)
        idx = pa.array(kept, type=pa.int64())
        items_k, cates_k, users_k = items_col.take(idx), cates_col.take(idx), users[kept]
        flat_items = pc.fill_null(pc.list_flatten(items_k), 0).to_numpy(zero_copy_only=False)
        flat_cates = pc.fill_null(pc.list_flatten(cates_k), 0).to_numpy(zero_copy_only=False)
        parent = pc.list_parent_indices(items_k).to_numpy(zero_copy_only=False)
        st.padding += int((flat_items == 0).sum())
        sel = flat_items != 0
        it, ct, par = flat_items[sel], flat_cates[sel], parent[sel]
        n_nz = np.bincount(par, minlength=len(kept))
        starts = np.cumsum(n_nz) - n_nz
        rank = np.arange(len(it)) - starts[par]
        if stash_users is not None:  # train pass: remember the lists of users who are also in test
            in_other = pl.Series(users_k).is_in(stash_users.implode()).to_numpy()
            for r in np.flatnonzero(in_other):
                stash[int(users_k[r])] = it[starts[r] : starts[r] + n_nz[r]].copy()
        write = np.ones(len(it), dtype=bool)
        if train_lists:  # test pass: drop the overlap with the train list
            k_row = np.zeros(len(kept), dtype=np.int64)
            for r in range(len(kept)):
                prev = train_lists.get(int(users_k[r]))
                if prev is None:
                    continue
                st.users_in_both += 1
                k_row[r] = list_overlap(prev, it[starts[r] : starts[r] + n_nz[r]])
                st.max_new = max(st.max_new, int(n_nz[r] - k_row[r]))
            write = rank >= k_row[par]
            st.overlap += int((~write).sum())
        ts = t_split - (n_nz[par] - rank)
        chunk = pl.DataFrame(
            {"user_id": users_k[par][write], "item_id": it[write], "ts": ts[write]},
            schema={"user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Int64},
        )
        writer.write(chunk)
        st.behaviors += chunk.height
        pl.DataFrame({"item_id": it, "cate_id": ct}, schema={"item_id": pl.Int64, "cate_id": pl.Int64}).group_by(
            "item_id", "cate_id"
        ).len("n").write_parquet(pairs_dir / f"{split}-{part:06d}.parquet")
    return st


def _write_samples(
    files: list[Path],
    ts: int,
    attrs: pl.DataFrame,
    attr_cols: list[str],
    writer: RawTableWriter,
    rejects: Rejects,
    batch_rows: int,
) -> dict[str, Any]:
    stats = {"rows": 0, "rejected": 0, "positives": 0, "without_user_features": 0}
    targets: list[pl.Series] = []
    for f, row0, batch in iter_batches(files, ["label_0", USER, ITEM], batch_rows):
        stats["rows"] += batch.num_rows
        lab = batch.column("label_0")
        n = pc.fill_null(pc.list_value_length(lab), 0).to_numpy(zero_copy_only=False)
        y = np.full(batch.num_rows, -1, dtype=np.int64)
        two = n == 2
        if two.any():
            vals = pc.list_flatten(pc.filter(lab, pa.array(two))).to_numpy(zero_copy_only=False).reshape(-1, 2)
            ok = ((vals[:, 0] == 1) & (vals[:, 1] == 0)) | ((vals[:, 0] == 0) & (vals[:, 1] == 1))
            y[np.flatnonzero(two)[ok]] = vals[ok, 1]
        users = batch.column(USER)
        items = batch.column(ITEM)
        valid = (
            (y >= 0)
            & pc.is_valid(users).to_numpy(zero_copy_only=False)
            & pc.is_valid(items).to_numpy(zero_copy_only=False)
        )
        for r in np.flatnonzero(~valid):
            label = lab[int(r)].as_py()
            why = "missing 129_1 or 205" if y[r] >= 0 else f"label_0 is not [1, 0] or [0, 1]: {label}"
            rejects.add(f.name, row0 + int(r) + 1, why, f"label_0={label} 129_1={users[int(r)]} 205={items[int(r)]}")
        stats["rejected"] += int((~valid).sum())
        m = pa.array(valid)
        df = pl.DataFrame(
            {
                "user_id": pc.filter(users, m).to_numpy(zero_copy_only=False),
                "item_id": pc.filter(items, m).to_numpy(zero_copy_only=False),
                "label": y[valid],
            },
            schema={"user_id": pl.Int64, "item_id": pl.Int64, "label": pl.Int8},
        ).with_columns(pl.lit(ts, pl.Int64).alias("ts"))
        if attr_cols:
            df = df.join(attrs, on="user_id", how="left", maintain_order="left")
            stats["without_user_features"] += int(df[attr_cols[0]].null_count())
            df = df.with_columns(pl.col(c).fill_null(0) for c in attr_cols)
        else:
            stats["without_user_features"] += int(df.join(attrs, on="user_id", how="anti").height)
        writer.write(df)
        stats["positives"] += int(df["label"].sum())
        targets.append(df["item_id"].unique())
    stats["target_items"] = pl.concat(targets).unique() if targets else pl.Series("item_id", [], pl.Int64)
    return stats


def _embeddings(files: list[Path], rejects: Rejects) -> tuple[pl.DataFrame | None, int | None, pa.DataType, dict]:
    """(item_id, mm_emb as Array[D]) rows, D, value type, stats."""
    stats = {"embedding_rows": 0, "embedding_duplicates": 0, "embedding_rejected": 0}
    if not files:
        return None, None, pa.int8(), stats
    require_columns(
        column_names(files), [ITEM, EMB], files[0], "The SCL embedding table is 205 (item id), 205_c (list)."
    )
    t = read_columns(files, [ITEM, EMB])
    stats["embedding_rows"] = t.num_rows
    value_type = t.schema.field(EMB).type.value_type
    out_type = pa.int8() if value_type == pa.int8() else pa.float32()
    lens = pc.fill_null(pc.list_value_length(t.column(EMB)), 0).to_numpy(zero_copy_only=False)
    dim = int(np.bincount(lens[lens > 0]).argmax()) if (lens > 0).any() else None
    if dim is None:
        return None, None, out_type, stats
    ok = (lens == dim) & pc.is_valid(t.column(ITEM)).to_numpy(zero_copy_only=False)
    for r in np.flatnonzero(~ok):
        rejects.add(
            files[0].name if len(files) == 1 else files[0].parent.name,
            int(r) + 1,
            f"205_c has {lens[r]} values, expected {dim}",
            f"205={t.column(ITEM)[int(r)]}",
        )
    stats["embedding_rejected"] = int((~ok).sum())
    t = t.filter(pa.array(ok))
    values = pc.list_flatten(t.column(EMB).combine_chunks()).cast(out_type)
    emb = pa.FixedSizeListArray.from_arrays(values, dim)
    df = pl.from_arrow(pa.table({"item_id": t.column(ITEM).combine_chunks(), "mm_emb": emb}))
    assert isinstance(df, pl.DataFrame)
    before = df.height
    df = df.unique(subset="item_id", keep="first", maintain_order=True)
    stats["embedding_duplicates"] = before - df.height
    return df, dim, out_type, stats


def import_taobao_mm(
    src: str | Path,
    out_dir: str | Path,
    *,
    train_ts: int = 1_700_000_000,
    test_gap_s: int = 86_400,
    batch_rows: int = 4096,
) -> dict[str, Any]:
    """Import a Taobao-MM folder into RAW_DIR; returns the summary (see module docstring for the protocol)."""
    if test_gap_s < 1:
        raise ValueError(f"test_gap_s must be >= 1, got {test_gap_s}")
    src_path = require_src(src, NAME)
    if not src_path.is_dir():
        raise ImportSourceError(f"{src_path}: pass the Taobao-MM folder (not a file) as SRC.")
    files = {
        stem: find_files(src_path, stem, required=True)
        for stem in ("train_samples", "test_samples", "train_user_features", "test_user_features", "item_features")
    }
    emb_files = find_files(src_path, "scl_embedding_int8_p90", required=False) or sorted(
        src_path.glob("scl_embedding*.parquet")
    )
    for stem in ("train_samples", "test_samples"):
        require_columns(
            column_names(files[stem]), ["label_0", USER, ITEM], files[stem][0], "Samples are label_0, 129_1, 205."
        )
    uf_cols = {}
    for stem in ("train_user_features", "test_user_features"):
        cols = column_names(files[stem])
        require_columns(
            cols,
            [USER, HIST_ITEMS, HIST_CATES],
            files[stem][0],
            "User features are 129_1, 130_1..130_5, 150_2_180, 151_2_180.",
        )
        uf_cols[stem] = [a for a in USER_ATTRS if a in cols]
    item_cols = column_names(files["item_features"])
    require_columns(item_cols, [ITEM, "206"], files["item_features"][0], "Item features are 205, 206, 213, 214.")
    item_attr_cols = [a for a in ITEM_ATTRS if a in item_cols]

    out = prepare_out_dir(out_dir, src_path, NAME)
    tmp = tmp_dir(out)
    rejects = Rejects(out)
    t_train, t_test = int(train_ts), int(train_ts) + int(test_gap_s)

    # ---- user features -> behaviors
    attrs_train, first_train = user_attributes(files["train_user_features"], uf_cols["train_user_features"])
    attrs_test, first_test = user_attributes(files["test_user_features"], uf_cols["test_user_features"])
    stash: dict[int, np.ndarray] = {}
    with RawTableWriter(out / "behaviors.parquet", raw_schema("behaviors")) as bw:
        st_train = _write_lists(
            "train",
            files["train_user_features"],
            first_train,
            t_train,
            bw,
            tmp,
            rejects,
            batch_rows,
            stash_users=attrs_test["user_id"],
            stash=stash,
            train_lists=None,
        )
        st_test = _write_lists(
            "test",
            files["test_user_features"],
            first_test,
            t_test,
            bw,
            tmp,
            rejects,
            batch_rows,
            stash_users=None,
            stash={},
            train_lists=stash,
        )
        n_behaviors = bw.rows
    if st_test.max_new > test_gap_s:
        raise ValueError(
            f"a user in both splits has {st_test.max_new} behaviors newer than the train list, more than "
            f"test_gap_s={test_gap_s}; pass a larger test_gap_s so they fit in [T_train, T_test)."
        )
    stash.clear()

    # ---- samples -> impressions
    attr_names = [attr_name(a) for a in USER_ATTRS if a in uf_cols["train_user_features"]]
    attr_names_test = [attr_name(a) for a in USER_ATTRS if a in uf_cols["test_user_features"]]
    attr_cols = [a for a in attr_names if a in attr_names_test]
    with RawTableWriter(out / "impressions.parquet", raw_schema("impressions", extra_int64=attr_cols)) as iw:
        s_train = _write_samples(
            files["train_samples"],
            t_train,
            attrs_train.select("user_id", *attr_cols),
            attr_cols,
            iw,
            rejects,
            batch_rows * 16,
        )
        s_test = _write_samples(
            files["test_samples"],
            t_test,
            attrs_test.select("user_id", *attr_cols),
            attr_cols,
            iw,
            rejects,
            batch_rows * 16,
        )
        n_impressions = iw.rows

    # ---- items
    it = pl.from_arrow(read_columns(files["item_features"], [ITEM, "206", *item_attr_cols]))
    assert isinstance(it, pl.DataFrame)
    it = it.rename({ITEM: "item_id", "206": "cate_id", **{a: attr_name(a) for a in item_attr_cols}})
    null_ids = it.with_row_index("_r", offset=1).filter(pl.col("item_id").is_null())
    for r in null_ids["_r"].to_list():
        rejects.add(files["item_features"][0].name, int(r), "missing 205 (item id)", "")
    it = it.filter(pl.col("item_id").is_not_null())
    n_item_dups = it.height - it["item_id"].n_unique()
    item_attr_names = [attr_name(a) for a in item_attr_cols]
    features = it.unique(subset="item_id", keep="first", maintain_order=True).with_columns(
        pl.col("cate_id").fill_null(0), *(pl.col(c).fill_null(0) for c in item_attr_names)
    )
    pair_files = sorted(tmp.glob("*.parquet"))
    if pair_files:
        beh_items, cate_conflicts = resolve_item_cates(pl.scan_parquet(pair_files))
    else:
        beh_items, cate_conflicts = pl.DataFrame(schema={"item_id": pl.Int64, "cate_id": pl.Int64}), 0
    beh_only = beh_items.join(features.select("item_id"), on="item_id", how="anti")
    known = pl.concat([features.select("item_id"), beh_only.select("item_id")])
    targets = pl.concat([s_train.pop("target_items"), s_test.pop("target_items")]).unique().sort()
    target_only = targets.to_frame("item_id").join(known, on="item_id", how="anti")
    emb, dim, emb_type, emb_stats = _embeddings(emb_files, rejects)
    parts = [features, beh_only, target_only.with_columns(pl.lit(0, pl.Int64).alias("cate_id"))]
    emb_only = pl.DataFrame(schema={"item_id": pl.Int64})
    if emb is not None:
        emb_only = emb.select("item_id").join(pl.concat([known, target_only]), on="item_id", how="anti")
        parts.append(emb_only.with_columns(pl.lit(0, pl.Int64).alias("cate_id")))
    items = pl.concat(
        [p.with_columns(pl.lit(0, pl.Int64).alias(c) for c in item_attr_names if c not in p.columns) for p in parts],
        how="diagonal_relaxed",
    ).select("item_id", "cate_id", *item_attr_names)
    if emb is not None:
        items = items.join(emb, on="item_id", how="left", maintain_order="left")
    schema = raw_schema("items", extra_int64=item_attr_names, mm_emb_dim=dim, mm_emb_value_type=emb_type)
    n_items = write_raw_table(items, out / "items.parquet", schema)
    n_with_emb = int(items["mm_emb"].is_not_null().sum()) if emb is not None else 0

    extra = {
        "train_user_rows": st_train.rows,
        "test_user_rows": st_test.rows,
        "users_in_both_splits": st_test.users_in_both,
        "duplicate_user_rows": st_train.duplicate_rows + st_test.duplicate_rows,
        "user_rows_rejected": st_train.rejected_rows + st_test.rejected_rows,
        "padding_dropped": st_train.padding + st_test.padding,
        "behaviors_from_train_lists": st_train.behaviors,
        "behaviors_from_test_lists": st_test.behaviors,
        "overlap_behaviors_deduplicated": st_test.overlap,
        "train_samples": s_train,
        "test_samples": s_test,
        "item_feature_rows": it.height,
        "item_feature_duplicates": n_item_dups,
        "items_from_features": features.height,
        "items_from_behaviors_only": beh_only.height,
        "items_from_targets_only": target_only.height,
        "items_from_embedding_only": emb_only.height,
        "behavior_items_with_conflicting_categories": cate_conflicts,
        "embedding_dim": dim,
        "items_with_embedding": n_with_emb,
        "items_without_embedding": n_items - n_with_emb,
        **emb_stats,
        "T_train": t_train,
        "T_test": t_test,
    }
    rows = {"items": n_items, "behaviors": n_behaviors, "impressions": n_impressions}
    options = {
        "train_ts": t_train,
        "test_gap_s": int(test_gap_s),
        "files": {k: [p.name for p in v] for k, v in files.items()},
        "embedding_files": [p.name for p in emb_files],
        "user_attribute_columns": {a: attr_name(a) for a in USER_ATTRS},
        "item_attribute_columns": {a: attr_name(a) for a in item_attr_cols},
    }
    split = {
        "test_start_ts": t_test,
        "train_ts": t_train,
        "note": "train samples are all at train_ts and test samples at test_start_ts; no natural valid split",
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
        recommended_split=split,
    )
