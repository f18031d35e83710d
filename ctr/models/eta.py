"""ETA: End-to-end Target Attention (Chen et al., "Efficient Long Sequential User Data Modeling for Click-Through
Rate Prediction", arXiv 2108.04468; models.md §7.2). The GSU is locality-sensitive hashing instead of a learned
search or a category index:

    s_t = SimHash(e_t), s_i = SimHash(e_i)        hash_bits (32) bits from fixed random rotations (`SimHashGSU`)
    K   = the k behaviors of the searched prefix at the smallest Hamming distance to s_t, ties to the most recent
    ESU = SIM's time-aware multi-head target attention over the K (`SIMBase`), the short DIN branch and the tower.

Choices and where the sources differ:

* The paper trains end to end: the hashed embeddings are the model's live embeddings, rehashed every step, with
  the SimHash computed in the serving path. We do the same: every step hashes the current embeddings of the
  target and of the whole searched prefix, without gradient (a sign has none); the selected behaviors reach the
  ESU with their live, differentiable embeddings.
* The rotations are drawn once from ``hash_seed`` and kept (FuxiCTR ``reuse_hash: True``), and saved with the model
  so that evaluation hashes as training did.
* Ties (equal Hamming distance, frequent with 32 bits) go to the most recent behavior; FuxiCTR's ``torch.topk``
  leaves them unspecified.
* ESU: SIM's, with the log2 time-gap embedding (``time_buckets: 0`` gives FuxiCTR's plain MHTA). ``dare: true``
  hashes DARE's attention embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from features.dataset import DatasetInfo
from features.loader import Batch

from ..modules.gsu import Selection
from ..modules.hashing import SimHashGSU
from .base import register
from .sim import SIMBase, SIMParams


class ETAParams(SIMParams):
    hash_bits: int = Field(32, ge=1, le=256, description="SimHash bits per behavior (FuxiCTR hash_bits: 32)")
    hash_seed: int = 0  # seed of the fixed random rotations


@register
class ETA(SIMBase):
    name = "eta"
    Params = ETAParams
    embeds_prefix = True  # the hashes are of the live embeddings of the whole searched prefix
    prefix_grad = False  # the ESU reads the selected only
    keeps_all_within_k = True  # a top-k over every behavior of the prefix

    def __init__(self, params: ETAParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        self.gsu = SimHashGSU(self.att_width, params.hash_bits, params.hash_seed, backend=params.backend)
        self.build_tower()

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        assert emb is not None
        target, behaviors = self.pair(emb, "", att=True), self.pair(emb, "long_", att=True)
        return self.gsu(offsets, target, behaviors, self.p.k), {}


__all__ = ["ETA", "ETAParams"]
