"""The one per-batch scorer: what validation (during training, across ranks) and `ctr evaluate` keep of a batch.

Both collect the same columns, the prediction-file contract of `ctr.evaluation.evaluate.REQUIRED_COLUMNS` (+ the
generator's ``p_true`` when the dataset has it): the sample's identity, its label, the model's probability and the
sample's full history length (for the per-length buckets).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from features.loader import Batch

PREDICTION_TYPES: dict[str, pa.DataType] = {
    "user_idx": pa.int32(),
    "item_idx": pa.int32(),
    "ts": pa.int64(),
    "label": pa.int8(),
    "score": pa.float32(),
    "hist_len": pa.int32(),
    "p_true": pa.float64(),
}


class Scores:
    """Accumulates ``(identity, label, score)`` of scored batches; `arrays()` / `table()` concatenate them."""

    def __init__(self, has_p_true: bool) -> None:
        cols = [c for c in PREDICTION_TYPES if c != "p_true" or has_p_true]
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}

    def add(self, logit: torch.Tensor, batch: Batch) -> None:
        """Keep one scored batch: ``sigmoid(logit)`` beside the batch's columns."""
        for c, parts in self.parts.items():
            if c == "score":
                parts.append(torch.sigmoid(logit.detach().float()).cpu().numpy())
            else:
                parts.append(batch.dense[c].numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column concatenated, in the dtypes of the prediction file."""
        out = {}
        for c, parts in self.parts.items():
            dtype = PREDICTION_TYPES[c].to_pandas_dtype()
            out[c] = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        return out

    def table(self) -> pa.Table:
        """The prediction file's table (column order and types of `PREDICTION_TYPES`)."""
        return pa.table({c: pa.array(v, type=PREDICTION_TYPES[c]) for c, v in self.arrays().items()})

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts["label"])
