"""TWIN: TWo-stage Interest Network (Chang et al., "TWIN: TWo-stage Interest Network for Lifelong User Behavior
Modeling in CTR Prediction at Kuaishou", KDD 2023, arXiv 2302.02352; models-wave2.md C.1, models.md §7.1).

The GSU and the ESU share one relevance, with the same parameters (the Consistency-Preserved GSU)::

    α_ai = (W^h_a k_i)·(W^q_a e_t)/sqrt(d_k) + Σ_j β_aj (w^c_aj · e_j(c_ij))     k_i = [e(item); e(cate)]
    GSU:  the top ``k`` (100) unique behaviors of the union over the H (4) heads' rankings of α over the prefix
    ESU:  head_a = softmax(α_a over the 100) · ([k_i; e(Δt_i); e(btype_i)] W^v_a),  u = Concat(heads) W^o
    logit = MLP([e_t; u_short; u_short ⊙ e_t; u; u ⊙ e_t; context])

Blocks and the two relevance paths: `ctr.modules.twin`. Cross features: the log2 time gap to the sample, and the
behavior type when the dataset has one (``btype``), each an 8-d embedding compressed to one scalar per head.

Paper defaults vs public code:

* ``k: 100``, ``heads: 4`` (paper) — FuxiCTR's LongCTR TWIN: top 50, per-head top-K, its cross bias constant per head
  (a no-op on the ranking) and off by default; DARE's TWIN: no projections, top 20.
* The paper caches ``K_h W^h`` per item offline (refreshed every 15 min) and recomputes it in the ESU;
  ``gsu_path: projected`` computes it once per distinct item of the batch and gathers it (exact, no staleness);
  ``gsu_path: query`` (default) folds ``W^h_aᵀ W^q_a`` into the query and projects no key: the same α, cheaper here.
* ``head_dim: 16`` (H·d_k = 64, FuxiCTR's attention_dim); the paper's d_k is not given.
* Short branch: the two-stage frame's DIN over the last 50 (the paper: a short-term module over the 50 most recent).
* Not reproduced: the 15-minute staleness of the cache, the paper's other towers (profile, context modelings).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from features.dataset import DatasetInfo
from features.errors import DatasetError
from features.loader import Batch, SequenceView

from ..modules.gsu import Selection, gather_slots
from ..modules.twin import RelevancePath, TwinAttention
from .base import register
from .two_stage import StageInput, TwoStageModel, TwoStageParams


class TWINParams(TwoStageParams):
    k: int = 100  # paper: top-100 (FuxiCTR: 50)
    heads: int = Field(4, ge=1, description="H (paper: 4)")
    head_dim: int = Field(16, ge=1, description="d_k per head")
    time_buckets: int = Field(32, ge=0, description="log2-seconds time-gap buckets of the cross bias; 0 = none")
    use_btype: bool = True  # the behavior type as a cross feature, when the dataset has it
    cross_dim: int = Field(8, ge=1, description="embedding width of each cross feature (paper: 8)")
    gsu_path: RelevancePath = "query"  # "projected": the paper's per-item projection cache (same scores)


@register
class TWIN(TwoStageModel):
    name = "twin"
    Params = TWINParams
    embeds_prefix = True  # the GSU scores the live embeddings of the whole prefix
    prefix_grad = False  # the ESU reads the selected only
    keeps_all_within_k = True  # a top-k over every behavior of the prefix

    def __init__(self, params: TWINParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        d = 2 * self.dim
        self.twin = TwinAttention(
            self.att_width, value_dim=d, heads=params.heads, head_dim=params.head_dim, time_buckets=params.time_buckets,
            btype=self.use_btype, cross_dim=params.cross_dim, out_dim=d, backend=params.backend,
        )  # fmt: skip
        self.long_dim = 2 * d if params.target_cross else d
        self.build_tower()

    @property
    def use_btype(self) -> bool:
        """The behavior type is a cross feature: asked for, and the dataset has it."""
        return bool(self.params.use_btype and self.info.has_btype)  # type: ignore[attr-defined]

    def views(self) -> tuple[SequenceView, ...]:
        p: TWINParams = self.params  # type: ignore[assignment]
        return (SequenceView("long", p.max_len, btype=self.use_btype), SequenceView("short", p.short_len))

    def extra_bias(
        self, batch: Batch, rows: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor | float:
        """A per-behavior logit bias beyond the cross features (TWIN-V2: ln n_c); TWIN: none."""
        return 0.0

    def _btype(self, batch: Batch) -> torch.Tensor | None:
        return batch.dense["long_btype"] if self.use_btype else None

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        assert emb is not None
        keys = self.pair_parts(emb, "long_", att=True)  # [e(item); e(cate)] as two blocks: read in place
        gap = batch.dense["long_ts_gap"]
        with torch.no_grad():
            bias = self.twin.cross_bias_of(gap, self._btype(batch), gap > 0)
            bias = bias + self.extra_bias(batch)
        sel = self.twin.search(
            offsets, self.pair(emb, "", att=True), keys, bias, self.p.k,
            path=self.p.gsu_path, item_ids=ids["long_item"].values(),
        )  # fmt: skip
        return sel, {}

    def long_interest(self, inp: StageInput) -> list[torch.Tensor]:
        u = self._long_rows(inp)
        if u is None:
            u = self._long_slots(inp)
        return [u, u * inp.target] if self.p.target_cross else [u]

    def _long_rows(self, inp: StageInput) -> torch.Tensor | None:
        """The ESU over every behavior as the rows they were looked up in (`fits_k`, no DARE), or None: the same
        function as `_long_slots` without laying the behaviors, their time gaps and cross features out as slots."""
        keys = inp.long_rows.jagged()
        if keys is None:
            return None
        gap = inp.long_rows.prefix_gap
        real = torch.ones(gap.shape, dtype=torch.bool, device=gap.device)  # every row is a behavior
        btype = self._btype(inp.batch)
        cross = self.twin.cross_features(gap, btype, real).flatten(-2)  # [N, J c], live (with gradient)
        bias = self.twin.cross_bias_of(gap, btype, real) + self.extra_bias(inp.batch)
        return self.twin.forward_rows(inp.target_att, keys, cross, bias, inp.long_offsets)

    def _long_slots(self, inp: StageInput) -> torch.Tensor:
        mask = inp.long_mask
        btype = self._btype(inp.batch)
        if btype is not None:
            btype = gather_slots(btype, inp.selection.rows(inp.long_offsets), mask)
        cross = self.twin.cross_features(inp.long_gap, btype, mask)  # [B, K, J, c], live (with gradient)
        # the bias from the tables' rows mapped to their H scalars (`cross_bias_of`), not from `cross`: the same sum
        # without the batched [N, c] x [c, H] products of `cross_bias`, a slow shape on the CPU (4 ms a step at L = 50)
        bias = self.twin.cross_bias_of(inp.long_gap, btype, mask)
        bias = bias + self.extra_bias(inp.batch, inp.selection.rows(inp.long_offsets), mask)
        values = torch.cat([inp.long, cross.flatten(-2)], -1)  # the full key: inherent + cross features
        return self.twin(inp.target_att, inp.long_att, values, bias, mask)


class TWINV2Params(TWINParams):
    cluster_size_bias: bool = True  # + ln n_c in the GSU and ESU (cluster-aware attention); false: the ablation


@register
class TWINV2(TWIN):
    """TWIN-V2 (Si et al., CIKM 2024; models-wave2.md C.3): TWIN over the history as virtual items (`ctr cluster`:
    the clusters of the blocks before the sample's snapshot, then its later behaviors one by one), with
    cluster-aware attention ``α'_c = α_c + ln n_c`` in both the GSU and the ESU (a cluster weighs as its behaviors
    would together). Needs ``ctr cluster --data DATA_DIR``; `max_len` counts virtual items."""

    name = "twin_v2"
    Params = TWINV2Params

    def __init__(self, params: TWINV2Params, info: DatasetInfo, device: torch.device | None = None) -> None:
        if not info.manifest.get("clusters"):  # fail at build, not in the first batch
            raise DatasetError(f"{info.data_dir}: twin_v2 needs clusters; run `ctr cluster --data {info.data_dir}`")
        super().__init__(params, info, device)

    def views(self) -> tuple[SequenceView, ...]:
        p: TWINParams = self.params  # type: ignore[assignment]
        long = SequenceView("long", p.max_len, btype=self.use_btype, clusters=True)
        return (long, SequenceView("short", p.short_len))

    def size_bias(self, size: torch.Tensor) -> torch.Tensor:
        """``ln n_c`` per head ``[..., H]`` (zero with ``cluster_size_bias: false``)."""
        on = self.params.cluster_size_bias  # type: ignore[attr-defined]
        b = torch.log(size.clamp(min=1).float()) if on else torch.zeros(size.shape, device=size.device)
        return b.unsqueeze(-1).expand(*size.shape, self.twin.heads)

    def extra_bias(
        self, batch: Batch, rows: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        size = batch.dense["long_size"]
        if rows is not None and mask is not None:
            size = gather_slots(size, rows, mask)
        return self.size_bias(size)


__all__ = ["TWIN", "TWINParams", "TWINV2", "TWINV2Params"]
