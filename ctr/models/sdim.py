"""SDIM: Sampling-based Deep Interest Modeling (Cao et al., "Sampling Is All You Need on Modeling Long-Term User
Behaviors for CTR Prediction", CIKM 2022, arXiv 2205.10249; models.md §7.3). No search and no attention over the
long history:

    u_long = mean over h = 1..m of  Σ_{i : bucket_h(e_i) = bucket_h(e_t)} e_i        (`SimHashBucketPool`)

with m = ``num_hashes`` SimHash functions of τ = ``hash_bits`` bits each (bucket = the code read as an integer), over
the whole searched prefix; the short DIN branch and the tower are the two-stage frame's. The paper shows the bucket
sum approximates target attention with the kernel (1 − θ/π)^τ. Its models share everything but the long-term module,
the short-term interest by DIN (§4.4, §5.2); FuxiCTR's SDIM has its LongCTR zoo's multi-head target attention there
instead (``short_attention: mhta``).

Choices and where the sources differ:

* ``num_hashes: 2``, ``hash_bits: 4``: FuxiCTR's defaults (the paper uses more functions; raise ``num_hashes`` to
  sample the kernel more finely). ``normalize: false``: FuxiCTR's ``l2_norm`` option, off by default.
* The behaviors' buckets depend only on the behavior, so the paper computes them offline (its BSE server); here
  they are recomputed every step from the live embeddings, without gradient; the pooled embeddings keep theirs.
* ``k`` is 0: there is no top-K, so `select` returns no slot. ``dare: true`` hashes DARE's attention embeddings and
  pools the representation embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from features.dataset import DatasetInfo
from features.loader import Batch

from ..modules.gsu import Selection
from ..modules.hashing import SimHashBucketPool
from .base import register
from .two_stage import StageInput, TwoStageModel, TwoStageParams


class SDIMParams(TwoStageParams):
    k: int = 0  # no top-K: every behavior of the searched prefix is hashed
    num_hashes: int = Field(2, ge=1, description="m, SimHash functions (FuxiCTR num_hashes: 2)")
    hash_bits: int = Field(4, ge=1, le=62, description="τ, bits per function (FuxiCTR hash_bits: 4)")
    normalize: bool = False  # L2-normalize each function's bucket sum (FuxiCTR l2_norm)
    hash_seed: int = 0  # seed of the fixed random rotations

    @field_validator("k")
    @classmethod
    def _no_topk(cls, v: int) -> int:
        if v != 0:
            raise ValueError("SDIM has no top-K (it pools the target's hash buckets); leave k at 0")
        return v


@register
class SDIM(TwoStageModel):
    name = "sdim"
    Params = SDIMParams
    embeds_prefix = True

    def __init__(self, params: SDIMParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        d = 2 * self.dim
        self.pool = SimHashBucketPool(
            self.att_width, params.num_hashes, params.hash_bits, params.hash_seed, params.normalize
        )
        self.long_dim = 2 * d if params.target_cross else d
        self.build_tower()

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        empty = torch.zeros(batch.size, 0, dtype=torch.int64, device=offsets.device)
        return Selection(positions=empty, scores=empty.float()), {}

    def long_interest(self, inp: StageInput) -> list[torch.Tensor]:
        lr = inp.long_rows  # the looked-up prefix's [e(item); e(cate)] rows (and attention rows), built once
        assert lr.values is not None and lr.values_att is not None and not lr.compact
        values, keys = lr.values, lr.values_att
        u = self.pool(inp.target_att, keys, inp.long_offsets, values=values)
        return [u, u * inp.target] if self.p.target_cross else [u]


__all__ = ["SDIM", "SDIMParams"]
