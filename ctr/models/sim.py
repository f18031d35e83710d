"""SIM: Search-based user Interest Model (Pi et al., "Search-based User Interest Modeling with Lifelong Sequential
Behavior Data for Click-Through Rate Prediction", CIKM 2020, arXiv 2006.05639). Two models:

* ``sim_hard``: the GSU keeps the K most recent behaviors of the target's category (`CategoryGSU`; the paper's
  hard search, served by the "User Behavior Tree" user -> category -> behaviors).
* ``sim_soft``: the GSU keeps the top K of ``r_i = (W_b e_i) · (W_a e_t)`` (`InnerProductGSU`; the paper serves it
  with MIPS, we take the exact top-K). The search embeddings are trained by the paper's auxiliary CTR task on the
  whole searched sequence: ``U_r = Σ_i r_i e_i``, ``p_aux = σ(MLP([U_r; e_t]))``, ``L = β·L_ESU + α·BCE(p_aux, y)``
  (α = β = 1 in the paper and in FuxiCTR). The auxiliary loss is returned in training only.

ESU (both, §4.2): every selected behavior is ``z_j = [e_j; e(Δt_j)]`` with ``Δt_j`` the bucketized time gap to the
target (log2 seconds, `ctr.modules.esu.TimeGapEmbedding`; ``time_buckets: 0`` drops it), then multi-head target
attention ``head_h = softmax_j((W_q^h e_t)·(W_k^h z_j)/sqrt(d_h)) W_v^h z_j`` (FuxiCTR ``MultiHeadTargetAttention``:
2 heads of 32, ``W_o`` back to 2d), and the tower gets ``[e_t; U_short; U_long; context]`` (two-stage base).

LAIN (``sim_hard_lain``, ``sim_soft_lain``): the prompts open the K selected behaviors (zero time embedding) and the
short sequence; the ESU's query/keys are conditioned on the length and its logits divided by τ(L) (applied to the
query, so the fused attention kernel still serves it); see ctr/models/two_stage.py.

Where reference code differs (see models.md §3):

* FuxiCTR ``LongCTR/SIM``: soft search only; shared embeddings with ``W_a``/``W_b`` (as here); the aux pooling is the
  unnormalized ``Σ qk_i E_i`` (``aux_pooling: sum``, the default); **no time embeddings** (``time_buckets: 0``);
  DNN [64, 32] ReLU, emb 4 in the template.
* SIM-TF (tttwwy/sim): first-stage dot attention thresholded at the k-th score, DIN-style ESU plus a mean pool;
  short = last 10 of 100, top 50.
* MUSE's SIM baselines: the SIM GSU followed by MUSE's ESU (SA-TA + SimTier); MUSE's SIM-soft is the cosine of the
  live ID embeddings, no ``W_a``/``W_b``, no aux loss. Not reproduced here (use ``muse`` for that ESU).
* The paper does not state whether the soft-search embeddings are shared with the ESU; we share them (FuxiCTR);
  with ``dare: true`` the search uses DARE's attention tables (a separate embedding space) and the pooled values
  the representation tables.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

import kernels
from features.dataset import DatasetInfo
from features.loader import Batch

from ..modules.esu import MultiHeadTargetAttention, TemporalTargetAttention, TimeGapEmbedding, time_gap_bucket
from ..modules.gsu import CategoryGSU, InnerProductGSU, Selection
from ..modules.mlp import MLP
from .base import ModelOutput, register, register_lain_variant
from .two_stage import StageInput, TwoStageModel, TwoStageParams


class SIMParams(TwoStageParams):
    time_buckets: int = Field(32, ge=0, description="log2-seconds time-gap buckets in the ESU; 0 = no time embedding")
    time_dim: int | None = None  # None = embedding_dim
    esu_heads: int = 2  # FuxiCTR SIM: 2 heads, attention_dim 64
    esu_head_dim: int = 32
    # the ESU: "mhta" (SIM's time-aware multi-head target attention) or "tin" (TIN's temporal encoding + scaled
    # dot-product attention over the K, `TemporalTargetAttention`; time_buckets rows, at least 2)
    esu: Literal["mhta", "tin"] = "mhta"
    # SIM hard: a target whose category is a placeholder (out of vocabulary, the importers' "no category" 0) selects
    # nothing, as R2LED's reserved SID prefixes; true matches them like any category (unrelated items grouped)
    match_placeholder_category: bool = False


class SIMSoftParams(SIMParams):
    gsu_dim: int = 64  # width of W_a e_t and W_b e_i (FuxiCTR attention_dim)
    aux_alpha: float = Field(1.0, ge=0, description="weight of the soft-search auxiliary CTR loss; 0 = off")
    aux_pooling: Literal["sum", "mean"] = "sum"  # paper / FuxiCTR: Σ r_i e_i; mean divides by the length
    aux_hidden: list[int] = [200, 80]
    aux_activation: str = "relu"


class SIMBase(TwoStageModel):
    """SIM's ESU (time-aware multi-head target attention) over whatever the subclass's GSU selected."""

    def __init__(self, params: SIMParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        d = 2 * self.dim
        t = params.time_dim or self.dim
        self.time = TimeGapEmbedding(params.time_buckets, t) if params.time_buckets else None
        self.time_att = TimeGapEmbedding(params.time_buckets, t) if params.time_buckets and params.dare else None
        a = self.att_width  # the query and keys (DARE: the attention tables' width), the values are d wide
        z = d + (t if self.time is not None else 0)
        za = a + (t if self.time is not None else 0)
        if params.esu == "tin":
            if params.lain.enabled or params.time_buckets < 2:
                raise ValueError("esu: tin needs time_buckets >= 2 and no LAIN")
            if a != d:
                raise ValueError("esu: tin adds one time encoding to keys and values: it needs dare_att_dim unset")
            self.time = self.time_att = None
            z = za = d
            self.esu = TemporalTargetAttention(d, params.time_buckets)
        else:
            self.esu = MultiHeadTargetAttention(
                a, za, z, heads=params.esu_heads, head_dim=params.esu_head_dim, out_dim=d, backend=params.backend
            )
        self.long_dim = 2 * d if params.target_cross else d
        self.lain_long_key_dim = za
        # the subclass builds its GSU, then calls build_tower() (LAIN, when on, is built last)

    def long_interest(self, inp: StageInput) -> list[torch.Tensor]:
        if inp.esu_out is not None:  # computed with the search (SIMSoft.search_attend)
            u = inp.esu_out
            return [u, u * inp.target] if self.p.target_cross else [u]
        u = self._long_rows(inp)
        if u is not None:
            return [u, u * inp.target] if self.p.target_cross else [u]
        mask = inp.long_mask
        keys, values = inp.long_att, inp.long
        if isinstance(self.esu, TemporalTargetAttention):  # TIN's ESU: the time buckets index its encoding
            index = time_gap_bucket(inp.long_gap, self.esu.table.num_embeddings)
            u = self.esu(inp.target_att, keys, mask, index, values=values)
            return [u, u * inp.target] if self.p.target_cross else [u]
        if self.time is not None:
            t = self.time(inp.long_gap, mask)
            t_att = self.time_att(inp.long_gap, mask) if self.time_att is not None else t
            same = keys is values and t_att is t  # without DARE: one [e; e(Δt)] tensor is both (built once)
            keys = torch.cat([keys, t_att], -1)
            values = keys if same else torch.cat([values, t], -1)
        br = self.lain_branch(inp.lc, inp.target_att, keys, mask, values)
        u = self.esu(br.query, br.keys, br.mask, values=br.values, temperature=br.temperature)
        return [u, u * inp.target] if self.p.target_cross else [u]

    def _long_rows(self, inp: StageInput) -> torch.Tensor | None:
        """The ESU over every behavior as the rows they were looked up in (`fits_k`: ETA and SIM soft at ``max_len <=
        k``; no DARE, no LAIN, the multi-head ESU), or None: the same function without the ``[B, K, ...]`` slots of the
        behaviors, their time gaps and ``[e; e(Δt)]``."""
        a = inp.long_rows.jagged()
        if a is None or inp.lc is not None or not isinstance(self.esu, MultiHeadTargetAttention):
            return None
        t = None
        if self.time is not None:
            gap = inp.long_rows.prefix_gap
            t = self.time(gap, torch.ones(gap.shape, dtype=torch.bool, device=gap.device))
        return self.esu.forward_rows(inp.target_att, a, inp.long_offsets, t)


@register
class SIMHard(SIMBase):
    name = "sim_hard"
    Params = SIMParams

    def __init__(self, params: SIMParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        unmatched = () if params.match_placeholder_category else info.placeholder_categories()
        self.gsu = CategoryGSU(params.backend, unmatched=unmatched)
        self.build_tower()

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        return self.gsu(offsets, ids["cate"].values(), ids["long_cate"].values(), self.p.k), {}


@register
class SIMSoft(SIMBase):
    name = "sim_soft"
    Params = SIMSoftParams
    embeds_prefix = True
    keeps_all_within_k = True  # a top-k of the inner product over every behavior of the prefix

    def __init__(self, params: SIMSoftParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        d = 2 * self.dim
        self.gsu = InnerProductGSU(self.att_width, self.att_width, params.gsu_dim, params.backend)
        self.aux_mlp = (
            MLP(2 * d, params.aux_hidden, activation=params.aux_activation, out_dim=1) if params.aux_alpha > 0 else None
        )
        self.build_tower()

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        assert emb is not None
        target_att = self.pair(emb, "", att=True)
        behaviors_att = self.pair(emb, "long_", att=True)
        selection = self.gsu(offsets, target_att, behaviors_att, self.p.k)
        return selection, self.aux_extras(batch, emb, offsets, target_att, behaviors_att)

    def whole_extras(
        self, batch: Batch, offsets: torch.Tensor, emb: dict[str, Any], behaviors: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The auxiliary head where `fits_k` skips the search (its top k would keep every behavior): it reads the
        whole prefix either way."""
        behaviors_att = self.pair(emb, "long_", att=True) if self.p.dare else behaviors
        return self.aux_extras(batch, emb, offsets, self.pair(emb, "", att=True), behaviors_att)

    def search_attend(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any]
    ) -> tuple[Selection, dict[str, torch.Tensor], torch.Tensor] | None:
        """The soft search and the ESU fused (`kernels.search_attend`) where the op's Triton kernel serves the call
        and the ESU is SIM's multi-head attention over ``z_j = [e_j; e(Δt_j)]`` (the time-gap embedding read by the
        kernel from its table by each behavior's bucket; none with ``time_buckets: 0``), without DARE or LAIN. The
        selection and the output equal the unfused path (`tests/test_fused_search.py`); the ``[B, K, 2d]`` gather
        of the selected embeddings is never written."""
        p: SIMSoftParams = self.p  # type: ignore[assignment]
        esu = self.esu
        if p.dare or self.lain is not None or not isinstance(esu, MultiHeadTargetAttention):
            return None
        behaviors = self.pair(emb, "long_")
        if kernels.resolve_backend("search_attend", (behaviors,), p.backend) != "triton":
            return None
        target = self.pair(emb, "")
        with torch.no_grad():
            gsu_query = self.gsu.query(target).float()
        side = {}
        if self.time is not None:
            gap = batch.dense["long_ts_gap"]  # [total_L], every behavior of the searched prefix
            side = {"side_ids": time_gap_bucket(gap, self.time.n_buckets), "side_table": self.time.embedding.weight}
        u, res = esu.search_attend(
            target, offsets, p.k, behaviors, mode="dot", target=gsu_query, behavior_vectors=behaviors.detach().float(),
            max_len=p.max_len, **side,
        )  # fmt: skip
        selection = Selection(res.positions, res.scores)
        return selection, self.aux_extras(batch, emb, offsets, target, behaviors), u

    def aux_extras(
        self,
        batch: Batch,
        emb: dict[str, Any],
        offsets: torch.Tensor,
        target_att: torch.Tensor,
        behaviors_att: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The auxiliary CTR head's logit over the whole searched prefix (training only; {} otherwise)."""
        p: SIMSoftParams = self.p  # type: ignore[assignment]
        extras = {}
        if self.training and self.aux_mlp is not None:
            # Σ_i r_i e_i over the whole prefix, r_i the soft search's relevance, with gradient (DARE: the
            # representation tables' e_i weighted by the attention tables' relevance)
            values = self.pair(emb, "long_") if p.dare else None
            pooled = self.gsu.pooled(target_att, behaviors_att, offsets, values)
            lengths = offsets[1:] - offsets[:-1]
            if p.aux_pooling == "mean":
                pooled = pooled / lengths.clamp(min=1).unsqueeze(-1).to(pooled.dtype)
            target = self.pair(emb, "") if p.dare else target_att
            extras["aux_logit"] = self.aux_mlp(torch.cat([pooled, target], dim=-1)).squeeze(-1)
        return extras

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """BCE + ``aux_alpha`` x the BCE of the soft search's own CTR head (training only; paper Sec. 4.1)."""
        terms = super().loss(out, batch)
        if "aux_logit" in out.extras:
            aux = F.binary_cross_entropy_with_logits(out.extras["aux_logit"], batch.dense["label"])
            terms["aux"] = self.p.aux_alpha * aux  # type: ignore[attr-defined]
        return terms


SIMHardLain = register_lain_variant(SIMHard, "sim_hard_lain")


SIMSoftLain = register_lain_variant(SIMSoft, "sim_soft_lain")


__all__ = ["SIMHard", "SIMHardLain", "SIMParams", "SIMSoft", "SIMSoftLain", "SIMSoftParams"]
