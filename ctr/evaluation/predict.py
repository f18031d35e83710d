"""`ctr evaluate`: score one split with a run's best weights, write predictions and metrics.

The trained model is loaded unsharded (`model.pt`), so evaluation runs in one process whatever number of ranks
trained it. Samples are read in file order, every one exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.errors import DatasetError
from features.loader import LoaderConfig, SplitLoader

from .evaluate import evaluate_predictions

log = logging.getLogger(__name__)


def output_names(split: str) -> tuple[str, str]:
    """File names of a split's predictions and metrics: the test split gets the plain names."""
    if split == "test":
        return "predictions.parquet", "metrics.json"
    return f"predictions-{split}.parquet", f"metrics-{split}.json"


@torch.no_grad()
def predict_split(run_dir: Path, split: str = "test", *, batch_size: int = 2048, num_workers: int = 1) -> Path:
    """Score `split` with the run's model; writes the predictions Parquet file and returns its path."""
    from ctr.train.rundir import load_trained

    model, cfg, info = load_trained(run_dir)
    if not info.split_rows.get(split):
        raise DatasetError(
            f"{info.data_dir}: the {split} split has no samples (see split in its manifest.json); nothing to evaluate. "
            "How to fix: evaluate another --split, or rebuild with split fractions or boundaries that give it rows"
        )
    lcfg = LoaderConfig(
        batch_size=batch_size,
        views=model.views(),
        shuffle=False,
        num_workers=num_workers,
        max_behaviors=cfg.data.eval_max_batch_behaviors,  # memory bounded by behaviors, not by who the users are
    )
    loader = SplitLoader(info, split, lcfg, model.features())
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user_idx", "item_idx", "ts", "label", "score", "hist_len")}
    if info.has_p_true:
        cols["p_true"] = []
    t0 = time.time()
    for batch in loader:
        out = model(batch)
        cols["score"].append(torch.sigmoid(out.logit.float()).numpy())
        for k in ("user_idx", "item_idx", "ts", "hist_len"):
            cols[k].append(batch.dense[k].numpy())
        cols["label"].append(batch.dense["label"].numpy())
        if info.has_p_true:
            cols["p_true"].append(batch.dense["p_true"].numpy())
    types = {
        "user_idx": pa.int32(),
        "item_idx": pa.int32(),
        "ts": pa.int64(),
        "label": pa.int8(),
        "score": pa.float32(),
        "hist_len": pa.int32(),
        "p_true": pa.float64(),
    }
    table = pa.table(
        {k: pa.array(np.concatenate(v) if v else np.zeros(0), type=types[k]).cast(types[k]) for k, v in cols.items()}
    )
    expected = info.split_rows.get(split)
    if expected is not None and table.num_rows != expected:
        raise RuntimeError(f"scored {table.num_rows} samples of split {split!r}, the manifest says {expected}")
    path = run_dir / output_names(split)[0]
    pq.write_table(table, path)
    log.info("scored %d %s samples in %.1f s -> %s", table.num_rows, split, time.time() - t0, path)
    return path


def evaluate_run(run_dir: Path, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """predict_split + metrics.json (with the run's identity added)."""
    pred = predict_split(run_dir, split, **kwargs)
    metrics_path = run_dir / output_names(split)[1]
    metrics = evaluate_predictions(pred, None, split=split)
    resolved = json.loads((run_dir / "config.json").read_text())
    metrics["model"] = resolved["model"]["name"]
    metrics["run_name"] = resolved.get("run_name")
    from .metrics import to_jsonable

    metrics_path.write_text(json.dumps(to_jsonable(metrics), indent=2))
    return metrics
