"""Embedding + sum pooling + MLP: the baseline every sequence model must beat ("BaseModel" in DIN's paper).

Input: [e(item_t); e(cate_t); Σ_i e(item_i); Σ_i e(cate_i); context embeddings] over the last `seq_len` behaviors,
with `Σ` the unweighted sum (mean pooling with `pooling: mean`). Tower: MLP → 1 logit.
"""

from __future__ import annotations

from typing import Literal

import torch

from features.loader import Batch, SequenceView

from ..modules.mlp import MLP
from .base import CTRModel, ModelOutput, ModelParams, pair_values, register


class SumPoolParams(ModelParams):
    seq_len: int = 50
    pooling: Literal["sum", "mean"] = "sum"
    hidden: list[int] = [200, 80]
    activation: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.0


@register
class SumPool(CTRModel):
    name = "sum_pool"
    Params = SumPoolParams

    def __init__(self, params: SumPoolParams, info, device=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, info, device)
        self.p = params
        n_in = 4 * self.dim + self.dim * len(self.context_features()) + (self.dim if params.use_user else 0)
        self.tower = MLP(
            n_in,
            params.hidden,
            activation=params.activation,
            batch_norm=params.batch_norm,
            dropout=params.dropout,
            out_dim=1,
        )

    def views(self) -> tuple[SequenceView, ...]:
        return (SequenceView("hist", self.params.seq_len),)  # type: ignore[attr-defined]

    def forward(self, batch: Batch) -> ModelOutput:
        emb = self.lookup(batch)
        target = pair_values(emb, "item", "cate")
        seq = pair_values(emb, "hist_item", "hist_cate")
        lengths = batch.dense["hist_lengths"]
        segment = torch.repeat_interleave(torch.arange(batch.size, device=seq.device), lengths)
        pooled = seq.new_zeros(batch.size, seq.shape[-1]).index_add_(0, segment, seq)
        if self.p.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(pooled.dtype)
        x = torch.cat([target, pooled, *self.context_vector(emb)], dim=-1)
        return ModelOutput(logit=self.tower(x).squeeze(-1))
