"""TIN: Temporal Interest Network (Zhou et al., "Temporal Interest Network for User Response Prediction", WWW 2024,
arXiv 2308.08487; models.md §7.5). Over the last `seq_len` behaviors (the ``hist`` view, as DIN)::

    p_i = T[bucket(Δt_i)]        the behavior's time gap to the sample, log2 buckets 1..n-1 (`time_gap_bucket`)
    p_t = T[0]                   the target's own slot of the same table ("now")
    w_i = softmax_i((e_t + p_t) · (e_i + p_i) / sqrt(2d))                 target-aware temporal encoding + attention
    u   = Σ_i w_i (e_i + p_i)
    logit = MLP([u; e_t; u ⊙ e_t; context]) (+ b_item)                    target-aware representation

Choices and where the sources differ (the official code, zhouxy1003/TIN ``model/tin/tin.py``):

* The code's temporal table has 431 rows indexed by the behavior's **position** (its distance from the target in
  the sequence); the paper describes a temporal encoding of the target-behavior relation. This library keeps the
  time gap in seconds for every behavior, so ``encoding: time`` (default) buckets the gap (log2 seconds, as SIM's
  ESU); ``encoding: position`` indexes the table by the distance in the sequence (1 = the most recent), the code's
  form. The target takes row 0 in both.
* The code passes ``u`` through BatchNorm and a Dense(128) and the tower is BN → 80 → 40 sigmoid with an item bias;
  here the tower is the library's (``hidden: [200, 80]``, Dice, as DIN) and ``item_bias`` / ``input_batch_norm`` are
  options. Values are ``e_i + p_i`` (the code attends over the encoded behaviors).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from features.dataset import DatasetInfo
from features.loader import Batch, SequenceView

from ..modules.activations import BatchNorm1dAnySize
from ..modules.dense_embedding import DenseEmbedding
from ..modules.esu import TemporalTargetAttention, time_gap_bucket
from ..modules.gsu import to_slots
from ..modules.mlp import MLP
from .base import CTRModel, ModelOutput, ModelParams, pair_values, register


class TINParams(ModelParams):
    seq_len: int = 50
    encoding: Literal["time", "position"] = "time"  # what indexes the temporal table (see the module docstring)
    buckets: int = Field(32, ge=2, description="rows of the temporal table (row 0: the target)")
    hidden: list[int] = [200, 80]
    activation: str = "dice"
    batch_norm: bool = False
    input_batch_norm: bool = False  # official code: BatchNorm on the tower input
    dropout: float = 0.0
    item_bias: bool = False  # official code: a learned per-item bias added to the logit


@register
class TIN(CTRModel):
    name = "tin"
    Params = TINParams

    def __init__(self, params: TINParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        self.p = params
        d = 2 * self.dim
        # the table starts at zero: drawn N(0, 1) (nn.Embedding's default) it drowned the item embeddings, which
        # TorchRec starts at ±sqrt(1 / rows) (the first demo measurement: TIN below sum pooling)
        self.attention = TemporalTargetAttention(d, params.buckets)
        n_ctx = len(self.context_features()) + (1 if params.use_user else 0)
        n_in = 3 * d + self.dim * n_ctx
        self.input_norm = BatchNorm1dAnySize(n_in) if params.input_batch_norm else nn.Identity()
        self.tower = MLP(
            n_in, params.hidden, activation=params.activation, batch_norm=params.batch_norm,
            dropout=params.dropout, out_dim=1,
        )  # fmt: skip
        self.item_bias = DenseEmbedding(info.vocab_sizes["item"], 1) if params.item_bias else None
        if self.item_bias is not None:
            nn.init.zeros_(self.item_bias.weight)

    def views(self) -> tuple[SequenceView, ...]:
        return (SequenceView("hist", self.params.seq_len),)  # type: ignore[attr-defined]

    def temporal_index(self, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` row of the temporal table for every padded slot (0 where not mask)."""
        if self.p.encoding == "time":
            gap, _ = self.padded_values(batch.dense["hist_ts_gap"], batch.dense["hist_lengths"], mask.shape[1])
            index = time_gap_bucket(gap, self.p.buckets)
        else:  # the distance from the target in the sequence: 1 = the most recent behavior
            n = mask.sum(1, keepdim=True)
            index = (n - torch.arange(mask.shape[1], device=mask.device)).clamp(1, self.p.buckets - 1)
        return torch.where(mask, index, 0)

    @staticmethod
    def padded_values(values: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Jagged dense ``values [sum L]`` -> right-padded ``[B, width]`` and its mask."""
        pos = torch.arange(width, device=values.device)
        mask = pos.unsqueeze(0) < lengths.unsqueeze(1)
        return to_slots(values, mask), mask

    def forward(self, batch: Batch) -> ModelOutput:
        emb = self.lookup(batch)
        target = pair_values(emb, "item", "cate")  # [B, 2d]
        keys, mask = self.padded(self.pair_jagged(emb, "hist_item", "hist_cate"), self.p.seq_len)
        u = self.attention(target, keys, mask, self.temporal_index(batch, mask))
        x = torch.cat([u, target, u * target, *self.context_vector(emb)], dim=-1)
        logit = self.tower(self.input_norm(x)).squeeze(-1)
        if self.item_bias is not None:
            logit = logit + self.item_bias(batch.sparse["item"].values()).squeeze(-1)
        return ModelOutput(logit=logit)


__all__ = ["TIN", "TINParams"]
