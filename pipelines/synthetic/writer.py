"""Writing a synthetic raw directory: `generate` (tables, source.json, summary) and the command line `main`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.schema import MM_EMB_COLUMN, mm_emb_type
from features.stats import auc
from pipelines.outdirs import OutputLock, prepare_raw_dir
from pipelines.synthetic.config import (
    GENERATOR_NAME,
    GENERATOR_VERSION,
    PRESETS,
    SyntheticConfig,
    parse_overrides,
    resolve_config,
)
from pipelines.synthetic.simulation import plan_chunks, simulate_chunk
from pipelines.synthetic.world import _CHUNK, ItemWorld, _rng, build_items, build_users

# the name the single-module generator logged under when imported (`ctr generate`)
logger = logging.getLogger("pipelines.synthetic")


def _items_table(items: ItemWorld, cfg: SyntheticConfig) -> pa.Table:
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(items.mm_emb.ravel(), type=pa.float32()), type=mm_emb_type(cfg.mm_dim)
    )
    return pa.table(
        {
            "item_id": pa.array(items.item_ids, type=pa.int64()),
            "cate_id": pa.array(items.cate_ids[items.item_cate], type=pa.int64()),
            "topic_id": pa.array(items.topic_ids[items.item_topic], type=pa.int64()),
            MM_EMB_COLUMN: emb,
        }
    )


def _percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(np.max(x))}


def generate(preset: str, seed: int, out_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """Write the synthetic raw directory `out_dir` and return its summary (rows, lengths, CTR, oracle AUC).

    `overrides` replace preset parameters by name (see `SyntheticConfig`). `out_dir` must be new, empty, or a raw
    directory that `ctr generate` or `ctr import` wrote (it holds source.json); anything else is an OutputError.
    Generating again into a raw directory replaces its tables and source.json (only those, see
    `pipelines.outdirs.RAW_OUTPUTS`), so a rerun never mixes worlds; until the new source.json is written the
    directory is marked incomplete and `ctr build` refuses it.
    """
    t_start = time.perf_counter()
    cfg = resolve_config(preset, **overrides)
    with OutputLock(out_dir, "raw directory"):
        return _generate_into(prepare_raw_dir(out_dir, "ctr generate"), cfg, preset, seed, t_start)


def _generate_into(out: Path, cfg: SyntheticConfig, preset: str, seed: int, t_start: float) -> dict[str, Any]:
    items = build_items(cfg, seed)
    users = build_users(cfg, items, seed)
    pq.write_table(_items_table(items, cfg), out / "items.parquet")
    beh_dir, imp_dir = out / "behaviors", out / "impressions"
    beh_dir.mkdir()
    imp_dir.mkdir()
    chunks = plan_chunks(users.lengths, cfg.chunk_behaviors, cfg.chunk_users)
    n_beh = 0
    labels, p_true, pop, hist_len = [], [], [], []
    for ci, (u0, u1) in enumerate(chunks):
        beh, imp = simulate_chunk(cfg, items, users, u0, u1, _rng(seed, _CHUNK, ci))
        name = f"part-{ci:05d}.parquet"
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(users.user_ids[beh["user"]], type=pa.int64()),
                    "item_id": pa.array(items.item_ids[beh["item"]], type=pa.int64()),
                    "ts": pa.array(beh["ts"], type=pa.int64()),
                    "btype": pa.array(beh["btype"], type=pa.int8()),
                }
            ),
            beh_dir / name,
        )
        pq.write_table(
            pa.table(
                {
                    "user_id": pa.array(users.user_ids[imp["user"]], type=pa.int64()),
                    "item_id": pa.array(items.item_ids[imp["item"]], type=pa.int64()),
                    "ts": pa.array(imp["ts"], type=pa.int64()),
                    "label": pa.array(imp["label"], type=pa.int8()),
                    "user_segment": pa.array(users.segment_ids[users.segment[imp["user"]]], type=pa.int64()),
                    "p_true": pa.array(imp["p_true"], type=pa.float64()),
                }
            ),
            imp_dir / name,
        )
        n_beh += len(beh["user"])
        labels.append(imp["label"])
        p_true.append(imp["p_true"])
        pop.append(items.pop_score[imp["item"]])
        hist_len.append(imp["hist_len"])
        logger.info(
            "chunk %d/%d: users [%d, %d), %d behaviors, %d impressions",
            ci + 1,
            len(chunks),
            u0,
            u1,
            len(beh["user"]),
            len(imp["user"]),
        )
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int8)
    pt = np.concatenate(p_true) if p_true else np.zeros(0)
    hl = np.concatenate(hist_len) if hist_len else np.zeros(0, np.int64)
    summary: dict[str, Any] = {
        "generator": GENERATOR_NAME,
        "preset": preset,
        "seed": seed,
        "rows": {"items": cfg.n_items, "behaviors": n_beh, "impressions": int(len(lab))},
        "users": cfg.n_users,
        "items": cfg.n_items,
        "behavior_parts": len(chunks),
        "history_length": _percentiles(users.lengths),
        "impression_hist_len": _percentiles(hl),
        "impressions_with_empty_history": int((hl == 0).sum()),
        "base_ctr": float(lab.mean()) if len(lab) else float("nan"),
        "mean_p_true": float(pt.mean()) if len(pt) else float("nan"),
        "oracle_auc": auc(lab, pt),
        "popularity_auc": auc(lab, np.concatenate(pop) if pop else np.zeros(0)),
    }
    source = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": seed,
        "params": asdict(cfg),
        "click_model": "p_true = sigmoid(b0 + w_lt*A_lt + w_st*A_st + w_pop*pop + user_bias); "
        + (
            "A_lt = log1p(M)/log1p(hist_len + lt_kappa), M = sum over past behaviors of "
            "exp((cosine(z_target, z_b) - 1)/lt_tau); "
            if cfg.lt_mode == "semantic"
            else "A_lt = log1p(n_same_cate)/log1p(hist_len + lt_kappa); "
        )
        + "A_st = mean cosine(target, last short_window behaviors); all over behaviors with ts < impression ts",
        "rows": summary["rows"],
        "summary": summary,
    }
    (out / "source.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    logger.info("generated %s (seed %d) into %s in %.1f s", preset, seed, out, summary["seconds"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.synthetic --preset tiny --seed 0 --out RAW_DIR [--set name=value ...]`."""
    from pipelines import synthetic

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic", description=(synthetic.__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], help="override a parameter: name=value (JSON value)")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = generate(args.preset, args.seed, args.out, **overrides)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0
