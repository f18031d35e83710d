"""R2LED: multi-granularity semantic-ID retrieval and refinement for lifelong user modeling (Liu et al., arXiv
2602.06622, Feb 2026). Built on the two-stage frame (``ctr/models/two_stage.py``); blocks in
``ctr/modules/sid_routes.py``.

What the paper specifies (models.md §5.1: abstract level; the code, abananbao/R2LED, could not be read)
    * A two-stage "retrieval-refinement" model over the lifelong sequence, built on **Semantic IDs** (SIDs) for
      their multi-granularity and lightness.
    * **Multi-route Mixed Retrieval**: several parallel recall routes capture interests at several granularities;
      a mixed retrieval retrieves candidates from both a **collaborative** and a **semantic** view.
    * **Bi-level Fusion Refinement**: a **gate for SID-level fusion** (to bridge the semantic and collaborative
      spaces) and a **target-aware cross-attention for route-level fusion**.

Documented choices (models.md §5.2 [INF]; each is a parameter of ``R2LEDParams``)
    * SIDs: RQ-KMeans over ``items.parquet``'s ``mm_emb``, 3 levels x 256 codes (+1 reserved code), from
      ``ctr sid --data DATA_DIR`` (``pipelines/sid.py``). Read at construction into non-persistent buffers
      (``sid_codes``, ``sid_prefix``: item_idx -> codes / prefix numbers; rows 0 and 1 (padding, OOV) and items
      without an embedding get the reserved code, which never matches in a route). A dataset without them is an
      error that says to run ``ctr sid``. ``sid_levels`` keeps the coarsest levels only.
    * Routes (``routes:``, each with its own K; default five, 180 behaviors in all before the budget: ``budget: k``,
      the default, scales them to 50 in all, the K of SIM and MUSE, so that comparisons retrieve equally many):
        - ``sid1`` / ``sid2`` / ``sid3`` (``kind: prefix``, level l, K = 50 / 20 / 10): behaviors whose SID prefix of
          length l equals the target's, the K most recent (SIM hard with category := SID prefix, through
          ``kernels.gsu_topk`` category mode on the prefix numbers). ``rank: collab`` ranks the matched candidates
          by the collaborative score instead (a "mixed" route: semantic filter, collaborative ranking).
        - ``collab`` (``kind: collab``, K = 50): cosine of the live ID embeddings ``[e(item); e(cate)]`` of target and
          behavior (MUSE's SIM-soft baseline: no projection, no auxiliary loss; the selection has no gradient, the
          embeddings learn through the ESU). Needs the whole searched prefix embedded.
        - ``semantic`` (``kind: semantic``, K = 50): cosine of the SID embeddings ``Σ_l E_l[c_l]`` (ungated, learned
          with the model; ``semantic_source: mm`` uses the frozen multimodal vectors instead, as MUSE's GSU).
      Every route keeps the best K, equal scores to the more recent behavior; routes may overlap (each refines its
      own list).
    * SID-level fusion (`SIDFusion`), per item (target, retrieved and short-term behaviors): a softmax gate over
      the SID levels ``β = softmax(W_β[e_id; E_0[c_0]; ..; E_{L-1}[c_{L-1}]])``, ``e_sid = Σ_l β_l E_l[c_l]``, then
      an element-wise ID/SID gate ``g = σ(W_g[e_id; e_sid] + b)``, ``e = g ⊙ e_id + (1 − g) ⊙ e_sid`` (models.md
      §5.2 4(a) plus the level gate). ``E_l`` are plain dense ``nn.Embedding(K + 1, 2d)`` tables inside the model
      (<= 257 rows each: trained by the dense optimizer, not TorchRec tables), reserved row = zero padding row.
      ``level_gate: false`` sums the levels uniformly; ``sid_fusion: add | id`` are ablations.
    * Route-level refinement: per route, SIM's ESU: ``z_j = [e_j; e(Δt_j)]`` (log2-seconds time-gap buckets) and
      multi-head target attention (2 heads x 32, ``W_o`` back to 2d; one module per route unless
      ``share_route_attention``), giving ``u_r``. Then the target attends over the non-empty routes
      (`RouteFusion`: ``softmax_r((W_q e_t)·(W_k(u_r + p_r))/sqrt(2d))``, ``p_r`` a learned route embedding, values
      ``W_v u_r``); ``route_fusion: gate | concat`` are alternatives.
    * Short-term branch: DIN attention ([80, 40] Dice, no softmax) over the last S = 50 fused behaviors (the frame's).
    * Tower ``[e_t; u_short; u_short ⊙ e_t; u_long; u_long ⊙ e_t; context] -> [200, 80] Dice -> 1`` with ``e_t`` the
      fused target; BCE only (no SID-specific auxiliary loss: none is known).
    * Not supported: ``dare: true``.
    * ``r2led_lain`` (LAIN, ctr/models/two_stage.py): the length prompts open every route's list, each route
      attention is conditioned (one ``long`` branch shared by the routes) and tempered, the short branch as in the
      frame; the routes' retrieval and the route-level fusion are not modulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from features.dataset import DatasetInfo
from features.loader import Batch

from ..modules.attention import DinAttention
from ..modules.esu import MultiHeadTargetAttention, TimeGapEmbedding
from ..modules.gsu import CosineGSU, Selection, gsu_topk, lengths_to_offsets
from ..modules.sid_routes import PrefixGSU, RouteFusion, SIDFusion, prefix_codes, rows_by_route, vector_topk
from .base import ModelOutput, register, register_lain_variant
from .two_stage import LengthContext, TwoStageModel, TwoStageParams, to_slots


class RouteParams(BaseModel):
    """One recall route."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["prefix", "collab", "semantic"]
    level: int | None = Field(None, ge=1, description="prefix: the SID prefix length (1 = coarsest)")
    k: int | None = Field(None, ge=1, description="top-K of this route; null = the model's k")
    rank: Literal["recency", "collab"] = "recency"  # prefix only: order of the matched behaviors
    score: Literal["cosine", "dot"] = "cosine"  # collab / semantic, and prefix with rank: collab

    @model_validator(mode="after")
    def _check(self) -> RouteParams:
        if self.kind == "prefix" and self.level is None:
            raise ValueError(f"route {self.name!r}: kind prefix needs level (the SID prefix length, >= 1)")
        if self.kind != "prefix" and (self.level is not None or self.rank != "recency"):
            raise ValueError(f"route {self.name!r}: level and rank apply to kind prefix only")
        return self


def default_routes() -> list[RouteParams]:
    return [
        RouteParams(name="sid1", kind="prefix", level=1, k=50),
        RouteParams(name="sid2", kind="prefix", level=2, k=20),
        RouteParams(name="sid3", kind="prefix", level=3, k=10),
        RouteParams(name="collab", kind="collab", k=50),
        RouteParams(name="semantic", kind="semantic", k=50),
    ]


class R2LEDParams(TwoStageParams):
    sid_levels: int | None = Field(None, ge=1, description="SID levels used (coarsest first); null = all")
    routes: list[RouteParams] = Field(default_factory=default_routes)
    semantic_source: Literal["sid", "mm"] = "sid"  # the semantic route's vectors: SID embeddings or frozen mm_emb
    level_gate: bool = True  # softmax gate over the SID levels (false: uniform sum)
    sid_fusion: Literal["gate", "add", "id"] = "gate"  # ID/SID fusion of every item representation
    sid_init_std: float = Field(0.01, gt=0)
    route_fusion: Literal["attention", "gate", "concat"] = "attention"
    share_route_attention: bool = False
    time_buckets: int = Field(32, ge=0, description="log2-seconds time-gap buckets in the route ESU; 0 = none")
    time_dim: int | None = None  # None = embedding_dim
    esu_heads: int = 2
    esu_head_dim: int = 32
    # ΣK over the routes: each route's K is scaled (largest remainders, at least 1 each) so that the routes retrieve
    # this many behaviors in all; "k" = the model's k (50, SIM's and MUSE's K: an equal-budget comparison);
    # null = every route's own K (180 with the default routes)
    budget: int | Literal["k"] | None = "k"

    def route_ks(self) -> list[int]:
        """The K of every route after the budget."""
        ks = [r.k if r.k is not None else self.k for r in self.routes]
        budget = self.k if self.budget == "k" else self.budget
        if budget is None:
            return ks
        if budget < len(ks):
            raise ValueError(f"budget {budget}: at least one behavior per route ({len(ks)} routes)")
        shares = [budget * k / sum(ks) for k in ks]
        out = [max(1, int(x)) for x in shares]
        by_remainder = sorted(range(len(ks)), key=lambda i: (-(shares[i] - int(shares[i])), i))
        i = 0
        while sum(out) < budget:
            out[by_remainder[i % len(ks)]] += 1
            i += 1
        while sum(out) > budget:  # only when the at-least-one rule pushed past the budget
            j = max(range(len(ks)), key=lambda i: out[i])
            out[j] -= 1
        return out

    @model_validator(mode="after")
    def _check(self) -> R2LEDParams:
        if not self.routes:
            raise ValueError("r2led needs at least one route")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError(f"route names must be unique, got {names}")
        if self.dare:
            raise ValueError("r2led does not support dare: true")
        self.route_ks()  # a budget smaller than the number of routes is an error here, not at build time
        return self


@dataclass
class RouteInput:
    """What the refinement sees. B samples, R routes, ΣK = sum of the routes' K, S short slots, 2d wide. The
    behaviors are kept as the rows they were fused in; `long`, `long_gap` and `short` lay them out in slots."""

    emb: dict[str, Any]
    selections: list[Selection]
    slices: list[tuple[int, int]]  # the columns of each route in the ΣK slots
    target: torch.Tensor  # [B, 2d] fused (ID + SID) target
    long_rows: torch.Tensor  # [N, 2d] fused retrieved behaviors: the real slots of [B, ΣK] in row-major order
    long_dest: torch.Tensor  # [N] int64, their flat positions in [B, ΣK]
    long_gap_rows: torch.Tensor  # [N] seconds before the sample
    long_mask: torch.Tensor  # [B, ΣK]
    short_rows: torch.Tensor  # [M, 2d] fused recent behaviors, sample by sample
    short_lengths: torch.Tensor  # [B]
    short_mask: torch.Tensor  # [B, S] (each sample's real slots first)
    lc: LengthContext | None = None  # LAIN's length state (None without LAIN)

    @property
    def long(self) -> torch.Tensor:
        """``[B, ΣK, 2d]`` (zeros in empty slots)."""
        return to_slots(self.long_rows, self.long_mask, self.long_dest)

    @property
    def long_gap(self) -> torch.Tensor:
        """``[B, ΣK]`` (0 in empty slots)."""
        return to_slots(self.long_gap_rows, self.long_mask, self.long_dest)

    @property
    def short(self) -> torch.Tensor:
        """``[B, S, 2d]`` (zeros in empty slots)."""
        return to_slots(self.short_rows, self.short_mask)


@register
class R2LED(TwoStageModel):
    name = "r2led"
    Params = R2LEDParams

    def __init__(self, params: R2LEDParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        codes, num_codes = info.sid_codes(params.sid_levels)  # first: a dataset without SIDs fails fast
        codes = torch.from_numpy(codes)
        super().__init__(params, info, device)
        levels = codes.shape[1]
        for r in params.routes:
            if r.kind == "prefix" and r.level is not None and r.level > levels:
                raise ValueError(f"route {r.name!r}: level {r.level} > the {levels} SID levels in use")
        self.register_buffer("sid_codes", codes, persistent=False)
        self.register_buffer("sid_prefix", prefix_codes(codes, num_codes), persistent=False)
        # each level's prefix numbers as one contiguous row, read with `index_select` (a column of `sid_prefix` is read
        # through advanced indexing, about twice as slow: 0.073 against 0.034 ms for 43K behaviors)
        self.register_buffer("sid_prefix_by_level", self.sid_prefix.t().contiguous(), persistent=False)
        d = 2 * self.dim
        self.sid = SIDFusion(
            d, levels, num_codes, level_gate=params.level_gate, mode=params.sid_fusion, init_std=params.sid_init_std
        )
        self.prefix_gsu = PrefixGSU(params.backend)
        uses_mm = params.semantic_source == "mm" and any(r.kind == "semantic" for r in params.routes)
        self.mm_gsu = CosineGSU(torch.from_numpy(info.mm_table()), backend=params.backend) if uses_mm else None
        self.route_k = params.route_ks()
        self.embeds_prefix_routes = any(r.kind == "collab" or r.rank == "collab" for r in params.routes)
        t = params.time_dim or self.dim
        self.time = TimeGapEmbedding(params.time_buckets, t) if params.time_buckets else None
        z = d + (t if self.time is not None else 0)
        n_att = 1 if params.share_route_attention else len(params.routes)
        self.route_attention = nn.ModuleList(
            MultiHeadTargetAttention(
                d, z, z, heads=params.esu_heads, head_dim=params.esu_head_dim, out_dim=d, backend=params.backend
            )
            for _ in range(n_att)
        )
        self.route_fusion = RouteFusion(d, d, len(params.routes), params.route_fusion)
        self.cross_long = params.target_cross and self.route_fusion.out_dim == d
        self.long_dim = self.route_fusion.out_dim + (d if self.cross_long else 0)
        self.lain_long_key_dim = z
        self.build_tower()

    @property
    def rp(self) -> R2LEDParams:
        return self.p  # type: ignore[return-value]

    # ---- retrieval -------------------------------------------------------------------------------------------------
    def route_selections(
        self,
        ids: dict[str, Any],
        offsets: torch.Tensor,
        target_id: torch.Tensor | None = None,
        long_id: torch.Tensor | None = None,
    ) -> list[Selection]:
        """Every route's top-K over the `long` view (positions within each sample's prefix). ``target_id [B, 2d]``
        and ``long_id [total_L, 2d]`` (the ID embeddings) are needed by the collaborative scores."""
        items = ids["long_item"].values().long()
        target_items = ids["item"].values().long()
        backend = self.rp.backend
        semantic: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        out = []
        for r, k in zip(self.rp.routes, self.route_k, strict=True):
            if r.kind == "prefix":
                assert r.level is not None
                level = self.sid_prefix_by_level[r.level - 1]
                tp, bp = level.index_select(0, target_items), level.index_select(0, items)
                if r.rank == "collab":
                    sel = self.prefix_gsu(offsets, tp, bp, k, target_id, long_id, r.score)
                else:
                    sel = self.prefix_gsu(offsets, tp, bp, k)
            elif r.kind == "collab":
                assert target_id is not None and long_id is not None
                sel = vector_topk(offsets, target_id, long_id, k, r.score, backend)
            elif self.mm_gsu is not None:
                positions, scores = gsu_topk(
                    offsets, k, mode=r.score, target=self.mm_gsu.vectors(target_items), behavior_ids=items,
                    table=self.mm_gsu.table, backend=backend,
                )  # fmt: skip
                sel = Selection(positions, scores)
            else:
                if semantic is None:
                    semantic = self.semantic_vectors(target_items, items)
                positions, scores = gsu_topk(
                    offsets, k, mode=r.score, target=semantic[0], behavior_ids=semantic[2], table=semantic[1],
                    backend=backend,
                )  # fmt: skip
                sel = Selection(positions, scores)
            out.append(sel)
        return out

    @torch.no_grad()
    def semantic_vectors(
        self, target_items: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The semantic route's view: (targets' ``Σ_l E_l[c_l]`` ``[B, 2d]``, a table of it, each behavior's row
        in the table). The table is every item's when the vocabulary is no longer than the batch's behaviors, else
        the batch's distinct items': a few thousand distinct items among 10^5 behaviors, each summed once instead
        of once per behavior (the same sums either way)."""
        if self.sid_codes.shape[0] <= items.numel():
            table, rows = self.sid.sid_embedding(self.sid_codes), items
        else:
            distinct, rows = torch.unique(items, return_inverse=True)
            table = self.sid.sid_embedding(self.sid_codes.index_select(0, distinct))
        return self.sid.sid_embedding(self.sid_codes.index_select(0, target_items)), table, rows

    def select_routes(self, batch: Batch) -> tuple[list[Selection], torch.Tensor]:
        """The retrieval alone (for inspection and tests): (one selection per route, offsets of the `long` view)."""
        ids = batch.sparse.to_dict()
        offsets = lengths_to_offsets(ids["long_item"].lengths())
        target_id = long_id = None
        if self.embeds_prefix_routes:
            emb = self.embed(ids)
            target_id, long_id = self.pair(emb, ""), self.pair(emb, "long_")
        return self.route_selections(ids, offsets, target_id, long_id), offsets

    def select(self, batch: Batch) -> tuple[Selection, torch.Tensor]:
        """Every route's slots side by side (``[B, ΣK]``; routes may select the same behavior)."""
        sels, offsets = self.select_routes(batch)
        return Selection(torch.cat([s.positions for s in sels], 1), torch.cat([s.scores for s in sels], 1)), offsets

    # ---- forward ---------------------------------------------------------------------------------------------------
    def prepare_routes(self, batch: Batch) -> RouteInput:
        """Retrieval, one embedding lookup, SID-level fusion of the target, the retrieved and the short behaviors."""
        from torchrec.sparse.jagged_tensor import JaggedTensor

        ids = batch.sparse.to_dict()
        long_item = ids["long_item"]
        offsets = lengths_to_offsets(long_item.lengths())
        if self.embeds_prefix_routes:
            # The collaborative scores need the whole prefix embedded, but a top-K has no gradient: look it up
            # without autograd (a forward only: no backward and no fused-optimizer update over ~10^5 rows).
            with torch.no_grad():
                emb_all = self.embed(ids)
                sels = self.route_selections(ids, offsets, self.pair(emb_all, ""), self.pair(emb_all, "long_"))
            del emb_all
        else:
            sels = self.route_selections(ids, offsets)
        joint = Selection(torch.cat([s.positions for s in sels], 1), torch.cat([s.scores for s in sels], 1))
        rows, mask = joint.rows(offsets), joint.mask
        # embed (with gradient) only the retrieved behaviors (row-major over [B, ΣK]: grouped by sample)
        picked = dict(ids)
        n = mask.sum(1).int()
        dest = mask.reshape(-1).nonzero().squeeze(1)  # the real slots' flat positions
        picked_rows = rows.reshape(-1).index_select(0, dest)  # their rows in the `long` view
        for f in ("long_item", "long_cate"):
            picked[f] = JaggedTensor(values=ids[f].values().index_select(0, picked_rows), lengths=n)
        emb = self.embed(picked)
        s = self.rp.short_len
        short_lengths = emb["short_item"].lengths().long()
        short_mask = torch.arange(s, device=mask.device).unsqueeze(0) < short_lengths.unsqueeze(1)
        # the SID-level fusion of the target and of the real retrieved and recent behaviors, once per distinct item
        # (an empty slot's fusion is zero: its ID embedding is zero and its codes are the reserved, zero rows)
        target, long_real, short_real = self.fuse_items([(emb, "", ids), (emb, "long_", picked), (emb, "short_", ids)])
        slices, start = [], 0
        for k in self.route_k:
            slices.append((start, start + k))
            start += k
        return RouteInput(
            emb=emb,
            selections=sels,
            slices=slices,
            target=target,
            long_rows=long_real,
            long_dest=dest,
            long_gap_rows=batch.dense["long_ts_gap"].index_select(0, picked_rows),
            long_mask=mask,
            short_rows=short_real,
            short_lengths=short_lengths,
            short_mask=short_mask,
            lc=self.length_context(batch),
        )

    def fuse_items(self, parts: list[tuple[dict[str, Any], str, dict[str, Any]]]) -> list[torch.Tensor]:
        """`SIDFusion` of each ``(emb, prefix, ids)`` feature pair's jagged rows ``[N_i, 2d]``, every distinct
        (item, category) fused once over all of them (`SIDFusion.forward_unique`); the fused rows per part."""
        n_cate = max(1, int(self.info.vocab_sizes["cate"]))
        items = [ids[f"{prefix}item"].values().long() for _, prefix, ids in parts]
        cates = torch.cat([ids[f"{prefix}cate"].values().long() for _, prefix, ids in parts])
        e_id = torch.cat([self.pair(emb, prefix) for emb, prefix, _ in parts])
        flat = torch.cat(items)
        fused = self.sid.forward_unique(e_id, self.sid_codes.index_select(0, flat), flat * n_cate + cates)
        return list(fused.split([i.numel() for i in items]))

    def route_outputs(self, inp: RouteInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Per route, the target attention over its retrieved behaviors: (``u [B, R, 2d]``, non-empty ``[B, R]``)."""
        found = self.route_rows(inp)
        return found if found is not None else self.route_slots(inp)

    def route_rows(self, inp: RouteInput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`route_slots` on the retrieved behaviors as rows: each route's ESU over its own rows and their time gaps
        (`MultiHeadTargetAttention.forward_rows`, natively), without the ``[B, ΣK, 2d + t]`` slots, their concatenation
        with the time-gap embeddings or each route's slice of them (and the backward of each: a zero-filled
        ``[B, ΣK, 2d + t]`` per route, summed). The same function (`tests/test_r2led.py`); None where it does not run
        (LAIN's prompts and τ, no native op), and the slots run."""
        if inp.lc is not None or inp.long_rows.shape[0] == 0:
            return None
        (rows, gap), counts = rows_by_route(
            [inp.long_rows, inp.long_gap_rows], inp.long_dest, inp.long_mask.shape[1], [hi for _, hi in inp.slices]
        )
        a = rows.split(counts)
        x: list[torch.Tensor | None] = [None] * len(counts)
        if self.time is not None:
            x = list(self.time(gap, torch.ones(gap.shape, dtype=torch.bool, device=gap.device)).split(counts))
        outs, nonempty = [], []
        for r, (lo, hi) in enumerate(inp.slices):
            n = inp.long_mask[:, lo:hi].sum(1)
            att = self.route_attention[0 if self.rp.share_route_attention else r]
            u = att.forward_rows(inp.target, a[r], lengths_to_offsets(n), x[r])
            if u is None:
                return None
            outs.append(u)
            nonempty.append(n > 0)
        return torch.stack(outs, 1), torch.stack(nonempty, 1)

    def route_slots(self, inp: RouteInput) -> tuple[torch.Tensor, torch.Tensor]:
        """`route_outputs` on ``[B, ΣK]`` slots, each route's columns in turn (the readable form; LAIN's)."""
        z = inp.long
        if self.time is not None:
            z = torch.cat([z, self.time(inp.long_gap, inp.long_mask)], dim=-1)
        outs, nonempty = [], []
        for r, (a, b) in enumerate(inp.slices):
            att = self.route_attention[0 if self.rp.share_route_attention else r]
            m = inp.long_mask[:, a:b]
            br = self.lain_branch(inp.lc, inp.target, z[:, a:b], m)  # LAIN: the prompts open every route's list
            outs.append(att(br.query, br.keys, br.mask, values=br.values, temperature=br.temperature))
            nonempty.append(m.any(1))
        return torch.stack(outs, 1), torch.stack(nonempty, 1)

    def short_interest(self, inp: RouteInput) -> torch.Tensor:
        """The short branch ``[B, 2d]``: DIN's unit on the recent behaviors as rows (`DinAttention.forward_rows`, no
        padded copy; the same function) without LAIN, else `attend_short` on their slots."""
        if inp.lc is None and isinstance(self.short_attention, DinAttention):
            n = inp.short_rows.shape[0]
            b = inp.short_lengths.shape[0]
            dev = inp.short_rows.device
            rows = torch.repeat_interleave(torch.arange(b, device=dev), inp.short_lengths, output_size=n)
            flat = torch.arange(n, device=dev)
            return self.short_attention.forward_rows(inp.target, inp.short_rows, flat, rows)[0]
        return self.attend_short(inp.lc, inp.target, inp.short, inp.short_mask)

    def forward(self, batch: Batch) -> ModelOutput:
        assert self.tower is not None
        inp = self.prepare_routes(batch)
        u_routes, nonempty = self.route_outputs(inp)
        u_long, _ = self.route_fusion(inp.target, u_routes, nonempty)
        u_short = self.short_interest(inp)
        parts = [inp.target, u_short]
        if self.p.target_cross:
            parts.append(u_short * inp.target)
        parts.append(u_long)
        if self.cross_long:
            parts.append(u_long * inp.target)
        parts += self.context_vector(inp.emb)
        logit = self.tower(torch.cat(parts, dim=-1)).squeeze(-1)
        return ModelOutput(logit=logit)


R2LEDLain = register_lain_variant(R2LED, "r2led_lain")


__all__ = ["R2LED", "R2LEDLain", "R2LEDParams", "RouteParams"]
