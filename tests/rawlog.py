"""Small random raw directories for builder tests (independent of the synthetic generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import mm_emb_type


def random_raw(
    root: Path,
    *,
    seed: int = 0,
    users: int = 30,
    items: int = 50,
    behaviors: int = 600,
    impressions: int = 200,
    ts_range: int = 40,
    emb_dim: int = 4,
    behavior_files: int = 2,
    with_context: bool = True,
) -> Path:
    """Write items/behaviors/impressions with many timestamp ties (small ts_range) and raw ids far from 0..n."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    item_ids = rng.choice(10**9, size=items, replace=False).astype(np.int64) + 10**9
    user_ids = rng.choice(10**6, size=users, replace=False).astype(np.int64) + 7
    emb = rng.normal(size=(items, emb_dim)).astype(np.float32)
    pq.write_table(
        pa.table(
            {
                "item_id": item_ids,
                "cate_id": rng.integers(100, 110, items).astype(np.int64),
                "brand_id": rng.integers(0, 5, items).astype(np.int64),
                "mm_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb_dim).cast(mm_emb_type(emb_dim)),
            }
        ),
        root / "items.parquet",
    )
    bdir = root / "behaviors"
    bdir.mkdir(exist_ok=True)
    for part, idx in enumerate(np.array_split(np.arange(behaviors), behavior_files)):
        n = len(idx)
        pq.write_table(
            pa.table(
                {
                    "user_id": rng.choice(user_ids, n),
                    "item_id": rng.choice(item_ids, n),
                    "ts": rng.integers(0, ts_range, n).astype(np.int64),
                    "btype": rng.integers(0, 3, n).astype(np.int8),
                }
            ),
            bdir / f"part-{part}.parquet",
            row_group_size=max(1, n // 3),
        )
    imp = {
        "user_id": rng.choice(user_ids, impressions),
        "item_id": rng.choice(item_ids, impressions),
        "ts": rng.integers(0, ts_range + 5, impressions).astype(np.int64),
        "label": rng.integers(0, 2, impressions).astype(np.int8),
        "p_true": rng.random(impressions),
    }
    if with_context:
        imp["user_segment"] = rng.integers(0, 4, impressions).astype(np.int64)
    pq.write_table(pa.table(imp), root / "impressions.parquet")
    return root
