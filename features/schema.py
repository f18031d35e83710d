"""Data contracts shared by the generator, the importers, the dataset builder and the loader.

Raw directory (what a user brings, or what `ctr generate` / `ctr import` write)::

    RAW_DIR/
      items.parquet        or items/*.parquet        item_id int64, cate_id int64, [attr int64 ...], [mm_emb]
      behaviors.parquet    or behaviors/*.parquet    user_id int64, item_id int64, ts int64, [btype int8]
      impressions.parquet  or impressions/*.parquet  user_id int64, item_id int64, ts int64, label int8,
                                                     [user/context int64 ...], [p_true float64]
      source.json          optional: where the raw data came from (generator preset and seed, importer protocol)

`mm_emb` is a fixed_size_list<float32 | int8>[D]. `cate_id` 0 means "no category" (the importers write it for items
without one); models that match categories do not match it (`DatasetInfo.placeholder_categories`). `p_true` is the
generator's true click probability: it is carried into the samples for the oracle metric and no model may read it.

The dataset directory `ctr build` writes from them, its layout and its readers: `features.dataset`; the column
schemas of its sequence and sample files are `SEQUENCE_SCHEMA` and `SAMPLE_BASE_SCHEMA` below.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

# Indices of every vocabulary: 0 = padding, OOV_IDX = an id the vocabulary does not know, then the real ids.
OOV_IDX = 1
FIRST_IDX = 2  # the first index given to a real id

RAW_TABLES = ("items", "behaviors", "impressions")


@dataclass(frozen=True)
class RawTableSpec:
    """Required columns of one raw table and which extra columns it may carry."""

    name: str
    required: dict[str, pa.DataType]
    optional: dict[str, pa.DataType]
    extra_int64_allowed: bool  # extra int64 columns are categorical attributes (items) or user/context (impressions)


RAW_SPECS: dict[str, RawTableSpec] = {
    "items": RawTableSpec(
        name="items",
        required={"item_id": pa.int64(), "cate_id": pa.int64()},
        optional={},  # mm_emb is checked separately: fixed_size_list<float32 | int8>[D]
        extra_int64_allowed=True,
    ),
    "behaviors": RawTableSpec(
        name="behaviors",
        required={"user_id": pa.int64(), "item_id": pa.int64(), "ts": pa.int64()},
        optional={"btype": pa.int8()},
        extra_int64_allowed=False,
    ),
    "impressions": RawTableSpec(
        name="impressions",
        required={"user_id": pa.int64(), "item_id": pa.int64(), "ts": pa.int64(), "label": pa.int8()},
        optional={"p_true": pa.float64()},
        extra_int64_allowed=True,
    ),
}

MM_EMB_COLUMN = "mm_emb"
MM_EMB_VALUE_TYPES = (pa.float32(), pa.int8())


def mm_emb_type(dim: int, value_type: pa.DataType | None = None) -> pa.DataType:
    """The Arrow type of the multimodal embedding column (float32 unless `value_type` says int8)."""
    return pa.list_(pa.field("item", value_type or pa.float32()), dim)


def vocab_space(column: str) -> str:
    """The id space of a raw id column: `user_id` -> `user`, `brand_id` -> `brand`, `age` -> `age`."""
    return column[: -len("_id")] if column.endswith("_id") and len(column) > 3 else column


def idx_column(column: str) -> str:
    """The dataset column holding the indexed form of a raw id column: `user_id` -> `user_idx`."""
    return f"{vocab_space(column)}_idx"


SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.list_(pa.int32())),
        ("cate_idx", pa.list_(pa.int32())),
        ("ts", pa.list_(pa.int64())),
    ]
)
SEQUENCE_BTYPE_FIELD = pa.field("btype", pa.list_(pa.int8()))

SAMPLE_BASE_SCHEMA = pa.schema(
    [
        ("user_idx", pa.int32()),
        ("item_idx", pa.int32()),
        ("cate_idx", pa.int32()),
        ("ts", pa.int64()),
        ("label", pa.int8()),
        ("hist_len", pa.int32()),
    ]
)

SPLITS = ("train", "valid", "test")
