"""MUSE: MUltimodal SEarch-based lifelong user interest modeling (Wu et al., arXiv 2512.07216, Taobao display ads;
official code alimama-tech/MUSE). See models.md §4.

* GSU (§4.2): ``r_i = cos(v_t, v_i)`` on **frozen** multimodal item vectors (the paper: SCL; here the dataset's
  ``items.parquet`` ``mm_emb``, float32 or int8), top K, no learnable parameters (`ctr.modules.gsu.CosineGSU`, through
  ``kernels.gsu_topk``). The table is a non-persistent buffer loaded at construction (not in checkpoints).
* ESU (§4.3), two paths whose outputs go to the tower:
  1. **SimTier** ``h_MM = Histogram(R)``: the similarities ``R`` of the retrieved behaviors in ``simtier_tiers``
     equal tiers of [-1, 1] (``simtier_scope: prefix`` histograms the whole searched prefix instead).
  2. **SA-TA** ``α = γ1·α_ID + γ2·R + γ3·α_ID ⊙ R`` with ``α_ID = (E W_k)(e_t W_q)ᵀ/sqrt(D)``,
     ``u_ID = softmax(α)ᵀ(E W_v)`` over the ID embeddings of the K retrieved behaviors.
  ``u_l = [h_MM; u_ID]``, plus the short-term branch (DIN over the recent S = 50, the paper's base) and the target.
* Loss: CTR cross-entropy only (the release's optional aux loss is off in every config; not implemented).

``mode: code`` reproduces the release (``MUSE_DIN``; the published Open-Source-1k 0.6154 GAUC comes from it):

* GSU scores an all-zero vector -1.1 (``sim_mm_top_k``) unless ``gsu_zero_vector_score`` says otherwise;
* SimTier: 22 slots (``eps = 0.1``), ``log1p(count) · w``, padded slots counted; one on the top K ("uni") and one
  on the recent S ("rt");
* SA-TA (``MultiHeadAttV2``): SiLU(Linear) q/k/v, no 1/sqrt(D), ``R/τ1`` (τ1 starts at 0.1), softmax + 1e-7 with no
  mask, 1 head of 2D;
* short-term branch: ``MultiHeadAtt`` (linear q/k, unscaled softmax, keys as values, no mask) instead of DIN;
* tower input ``[u_short; u_long; mean_K(F); mean_S(Sh); e_t; context; SimTier_rt; SimTier_uni]`` and a
  Dice-after-the-logits head (`DiceHead`). The release's tower is [256, 128, 64] LayerNorm-Dice with AdamW
  2e-4 / SparseAdam 2e-3: set ``hidden: [256, 128, 64]``, ``activation: dice_ln``, ``optim.dense: adamw`` (official
  code). Not reproduced: ``trunc_normal(0, 0.001)`` init of the tables, the
  user attribute fields of Taobao-MM, the per-batch GAUC.

``dare: true``: α_ID (and the DIN short branch's scores) use DARE's attention tables, the values the
representation tables.

``muse_lain`` (``lain.enabled: true``, paper mode only): LAIN's prompts, conditioning and τ(L) in SA-TA and in the
short DIN branch (ctr/models/two_stage.py); the prompts' ``R`` is 0 and SimTier counts behaviors only.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from features.dataset import DatasetInfo
from features.loader import Batch

from ..modules.esu import LinearTargetAttention, SimilarityAwareTargetAttention, SimTier, masked_mean
from ..modules.gsu import CategoryGSU, CosineGSU, InnerProductGSU, Selection, gsu_topk
from .base import register, register_lain_variant
from .two_stage import DiceHead, StageInput, TwoStageModel, TwoStageParams


class MUSEParams(TwoStageParams):
    mode: Literal["paper", "code"] = "paper"
    simtier_tiers: int = Field(20, gt=0, description="paper mode: equal tiers over [-1, 1]")
    simtier_eps: float = Field(0.1, gt=0, description="code mode: tier width (22 slots for 0.1)")
    simtier_scope: Literal["topk", "prefix"] = "topk"  # histogram of the K retrieved (paper) or the whole prefix
    short_simtier: bool = False  # paper mode: also a SimTier over the recent S (code mode always has it)
    sata_dim: int | None = None  # None = 2 * embedding_dim (MUSE: 2D)
    sata_heads: int = 1
    gsu_zero_vector_score: float | None = None  # None: 0 (paper), -1.1 in code mode (the release)
    # the GSU: "mm_cosine" (MUSE: cosine of the frozen multimodal table); MUSE's own baselines put a SIM GSU before
    # this ESU: "category" (SIM hard), "id_cosine" (MUSE's SIM soft: cosine of the live ID embeddings),
    # "inner_product" (SIM soft's learned W_a/W_b search, without its auxiliary loss). The ESU's similarities R
    # stay the multimodal cosine in every case.
    gsu: Literal["mm_cosine", "category", "id_cosine", "inner_product"] = "mm_cosine"

    @model_validator(mode="after")
    def _lain_needs_paper_mode(self) -> MUSEParams:
        if self.lain.enabled and self.mode == "code":
            raise ValueError(
                "lain.enabled needs mode 'paper' (the release's code mode has no masks and its own short attention)"
            )
        return self


@register
class MUSE(TwoStageModel):
    name = "muse"
    Params = MUSEParams

    def __init__(self, params: MUSEParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        d = 2 * self.dim
        code = params.mode == "code"
        zero_score = params.gsu_zero_vector_score
        if zero_score is None and code:
            zero_score = -1.1
        mm = torch.from_numpy(info.mm_table())
        self.gsu = CosineGSU(mm, zero_vector_score=zero_score, backend=params.backend)  # also the ESU's R
        self.embeds_prefix = params.gsu in ("id_cosine", "inner_product")  # these score live embeddings
        self.prefix_grad = False  # the ESU reads the selected only; SimTier reads the frozen multimodal table
        self.category_gsu = CategoryGSU(params.backend, unmatched=info.placeholder_categories())
        self.ip_gsu = (
            InnerProductGSU(self.att_width, self.att_width, backend=params.backend)
            if params.gsu == "inner_product"
            else None
        )
        self.simtier = SimTier(params.mode, params.simtier_tiers, params.simtier_eps)
        self.short_simtier = (
            SimTier(params.mode, params.simtier_tiers, params.simtier_eps) if code or params.short_simtier else None
        )
        sata_dim = params.sata_dim or d
        self.sata = SimilarityAwareTargetAttention(
            self.att_width, self.att_width, d, dim=sata_dim, heads=params.sata_heads, mode=params.mode
        )
        self.cross_long = params.target_cross and sata_dim == d and not code
        if code:
            self.short_linear = LinearTargetAttention(d, d, d)
            in_dim = d + sata_dim + 3 * d + self.dim * self.n_context + 2 * self.simtier.out_dim
            self.build_tower(in_dim=in_dim, head=DiceHead)
        else:
            self.long_dim = (
                sata_dim
                + (d if self.cross_long else 0)
                + self.simtier.out_dim
                + (self.short_simtier.out_dim if self.short_simtier is not None else 0)
            )
            self.build_tower()

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        p: MUSEParams = self.p  # type: ignore[assignment]
        if p.gsu == "category":
            return self.category_gsu(offsets, ids["cate"].values(), ids["long_cate"].values(), p.k), {}
        if p.gsu in ("id_cosine", "inner_product"):
            assert emb is not None
            target, behaviors = self.pair(emb, "", att=True), self.pair(emb, "long_", att=True)
            if self.ip_gsu is not None:
                return self.ip_gsu(offsets, target, behaviors, p.k), {}
            positions, scores = gsu_topk(
                offsets, p.k, mode="cosine", target=target.detach().float(),
                behavior_vectors=behaviors.detach().float(), backend=p.backend,
            )  # fmt: skip
            return Selection(positions, scores), {}
        return self.gsu(offsets, ids["item"].values(), ids["long_item"].values(), p.k), {}

    def similarity_parts(self, inp: StageInput, mask_padding: bool) -> list[torch.Tensor]:
        """SimTier over the K retrieved (or the prefix), then over the recent S when configured."""
        p: MUSEParams = self.p  # type: ignore[assignment]
        if p.simtier_scope == "prefix":
            sim = self.gsu.jagged_cosine(inp.target_ids, inp.batch.sparse["long_item"].values(), inp.long_offsets)
            parts = [self.simtier.forward_jagged(sim, inp.long_offsets)]
        else:
            r = self.gsu.cosine(inp.target_ids, inp.long_ids)
            mask = inp.long_mask if mask_padding else torch.ones_like(inp.long_mask)
            parts = [self.simtier(r, mask)]
        if self.short_simtier is not None:
            r_short = self.gsu.cosine(inp.target_ids, inp.short_ids)
            mask = inp.short_mask if mask_padding else torch.ones_like(inp.short_mask)
            parts.append(self.short_simtier(r_short, mask))
        return parts

    def long_interest(self, inp: StageInput) -> list[torch.Tensor]:
        """Paper mode: ``[u_ID; (u_ID ⊙ e_t); SimTier_K; (SimTier_S)]``."""
        r = self.gsu.cosine(inp.target_ids, inp.long_ids) * inp.long_mask
        br = self.lain_branch(inp.lc, inp.target_att, inp.long_att, inp.long_mask, inp.long)
        if br.prompts:  # LAIN's prompt slots have no multimodal similarity: R = 0 there
            r = torch.cat([r.new_zeros(r.shape[0], br.prompts), r], dim=1)
        u, _ = self.sata(br.query, br.keys, r, br.mask, values=br.values, temperature=br.temperature)
        parts = [u, u * inp.target] if self.cross_long else [u]
        return parts + self.similarity_parts(inp, mask_padding=True)

    def tower_input(self, inp: StageInput, long: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.p.mode != "code":  # type: ignore[attr-defined]
            return super().tower_input(inp, long)
        # The release's MUSE_DIN: no masks (padded slots are zero vectors that take part), keys reused as values.
        every_k = torch.ones_like(inp.long_mask)
        r = self.gsu.cosine(inp.target_ids, inp.long_ids)
        u_long, _ = self.sata(inp.target_att, inp.long_att, r, every_k, values=inp.long)
        u_short = self.short_linear(inp.target, inp.short)
        long_mean = masked_mean(inp.long, every_k)
        short_mean = masked_mean(inp.short, torch.ones_like(inp.short_mask))
        tiers = self.similarity_parts(inp, mask_padding=False)
        parts = [u_short, u_long, long_mean, short_mean, inp.target, *self.context_vector(inp.emb)]
        return torch.cat([*parts, tiers[1], tiers[0]], dim=-1)


MUSELain = register_lain_variant(MUSE, "muse_lain")


__all__ = ["MUSE", "MUSELain", "MUSEParams"]
