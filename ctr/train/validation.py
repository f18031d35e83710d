"""Scoring a split across ranks during training (validation): every sample exactly once, whatever the ranks hold.

A rank that runs out of batches before the others keeps stepping on a dummy batch whose scores are dropped, so the
collectives inside the sharded forward stay matched; rank 0 gathers the scores and computes the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from features.loader import Batch, SplitLoader

from ..evaluation.metrics import auc, gauc, logloss
from ..evaluation.scoring import Scores
from .distributed import DistContext


def _batches_with_padding(loader: SplitLoader, ctx: DistContext, dummy: Batch | None) -> Iterator[tuple[Batch, bool]]:
    """Yield (batch, real) until every rank is done; a rank that ran dry yields a dummy (real=False) so the
    collectives inside the sharded forward stay matched across ranks. Evaluation only: nothing is dropped."""
    it = iter(loader)
    last = dummy
    while True:
        batch = next(it, None)
        if ctx.all_reduce_int(0 if batch is None else 1, "max") == 0:
            return
        if batch is None:
            if last is None:
                raise RuntimeError("rank has no batch to pad with")
            yield last, False
        else:
            last = batch
            yield batch, True


@torch.no_grad()
def predict_distributed(
    model: torch.nn.Module,
    loader: SplitLoader,
    ctx: DistContext,
    dummy: Batch | None,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray] | None:
    """Score a split across ranks; rank 0 gets the concatenated arrays (others None)."""
    model.eval()
    scores = Scores(loader.info.has_p_true)
    for i, (batch, real) in enumerate(_batches_with_padding(loader, ctx, dummy)):
        if max_batches is not None and i >= max_batches:
            break  # every rank is at the same iteration here, so the cap keeps the collectives matched
        out = model(batch.to(ctx.device))
        if on_batch is not None:
            on_batch(i)
        if real:
            scores.add(out.logit, batch)
    local = scores.arrays()
    gathered = ctx.gather_objects(local)
    model.train()
    if gathered is None:
        return None
    return {k: np.concatenate([g[k] for g in gathered]) for k in local}


def validation_metrics(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    g = gauc(arrays["label"], arrays["score"], arrays["user_idx"])
    return {
        "auc": float(auc(arrays["label"], arrays["score"])),
        "gauc": float(g.value),
        "logloss": float(logloss(arrays["label"], arrays["score"])),
        "samples": int(len(arrays["label"])),
    }
