"""`ctr evaluate`'s scoring: one split with a run's best weights into its predictions file.

The trained model is loaded unsharded (`model.pt`), so evaluation runs in one process whatever number of ranks
trained it. Samples are read in file order, every one exactly once (checked against the manifest).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from features.errors import DatasetError
from features.loader import LoaderConfig, SplitLoader, loader_workers

from ..malloc import keep_freed_memory
from ..runs import load_trained, prediction_path
from .scoring import Scores

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_split(
    run_dir: Path, split: str = "test", *, batch_size: int = 2048, num_workers: int | None = None
) -> Path:
    """Score `split` with the run's model; writes the predictions Parquet file and returns its path.
    `num_workers`: loader worker processes (None: the run's `data.num_workers`, `loader_workers`'s rule)."""
    keep_freed_memory()
    model, cfg, info = load_trained(run_dir)
    num_workers = loader_workers(num_workers if num_workers is not None else cfg.data.num_workers)
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
        sample_negatives=False,  # DIEN's auxiliary negatives are a training input
    )
    loader = SplitLoader(info, split, lcfg, model.features())
    scores = Scores(info.has_p_true)
    t0 = time.time()
    for batch in loader:
        scores.add(model(batch).logit, batch)
    table = scores.table()
    expected = info.split_rows.get(split)
    if expected is not None and table.num_rows != expected:
        raise RuntimeError(f"scored {table.num_rows} samples of split {split!r}, the manifest says {expected}")
    path = prediction_path(run_dir, split)
    pq.write_table(table, path)
    log.info("scored %d %s samples in %.1f s -> %s", table.num_rows, split, time.time() - t0, path)
    return path
