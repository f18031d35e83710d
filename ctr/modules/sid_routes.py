"""R2LED's blocks: semantic-ID tables, the multi-route mixed retrieval (GSU) and the bi-level fusion refinement (ESU).

See ``ctr/models/r2led.py`` for the model, the paper-vs-choice split and the defaults. Shapes: B samples, jagged
prefixes (values ``[total_L, ...]`` + int64 ``offsets [B + 1]``, oldest first), L_s SID levels, K slots, R routes.

Semantic IDs (`prefix_codes`)
    ``pipelines/sid.py`` (``ctr sid --data DATA_DIR``) writes ``sid_0 .. sid_{L-1}`` (codes ``0..K``, ``K`` reserved
    for "no usable embedding") to ``items.parquet``. `features.dataset.DatasetInfo.sid_codes` reads them into a
    ``[vocab_sizes["item"], L_s]`` table indexed by ``item_idx``; the padding / out-of-vocabulary rows 0 and 1 (and
    any item without a row) get the reserved code. `prefix_codes` numbers every prefix ``(c_0 .. c_{l-1})`` by mixed
    radix ``Σ_j c_j (K+1)^{l-1-j}`` (unique per prefix, < 2^63 for any realistic K and L), and -1 when a reserved
    code occurs in it.

Retrieval (every route through ``kernels.gsu_topk``, forward only, best first, equal scores by recency)
    * `PrefixGSU`: the behaviors whose SID prefix of length l equals the target's (``kernels.gsu_topk`` category
      mode with the prefix numbers as "categories", after a vectorized prefilter like SIM's category index);
      ``rank: recency`` keeps the K most recent (SIM hard with category := SID prefix), ``rank: collab`` ranks the
      matched candidates by a vector score (cosine / dot of the live ID embeddings). A reserved prefix never matches
      (the target's -1 becomes -2).
    * `vector_topk`: top-K of the cosine / dot product of jagged behavior vectors with the target (collaborative
      view: the ID embeddings; semantic view: the SID embeddings).

Refinement
    * `SIDFusion` (the SID-level gate): per item, a softmax gate over the SID levels ``β = softmax(W_β[e_id; E_0[c_0];
      ..; E_{L-1}[c_{L-1}]])``, ``e_sid = Σ_l β_l E_l[c_l]``, then an element-wise ID/SID gate
      ``g = σ(W_g[e_id; e_sid] + b)``, ``e = g ⊙ e_id + (1 − g) ⊙ e_sid``. ``E_l`` are plain ``nn.Embedding(K + 1,
      2d)`` tables (dense: at most 257 rows each); the reserved row is the zero padding row (not trained), so an
      item without semantics is represented by its ID alone.
    * `RouteFusion` (the route level): the target attends over the route outputs ``u_r`` (a learned route embedding
      added to the keys), ``u = Σ_r softmax_r((W_q e_t)·(W_k (u_r + p_r))/sqrt(D)) W_v u_r`` over the non-empty
      routes; ``mode: gate`` is a target-only gate ``softmax_r(W e_t)``, ``mode: concat`` keeps every ``u_r``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .. import native
from .attention import masked_softmax
from .dense_embedding import DenseEmbedding
from .gsu import Selection, gsu_topk, lengths_to_offsets


def prefix_codes(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``codes [N, L]`` -> ``[N, L]`` int64: column l numbers the prefix ``(c_0 .. c_l)`` by mixed radix (base
    ``num_codes``), -1 where a reserved code (``num_codes - 1``) occurs in the prefix."""
    n, levels = codes.shape
    if num_codes**levels >= 2**62:
        raise ValueError(f"{levels} levels x {num_codes} codes do not fit an int64 prefix number")
    out = torch.empty(n, levels, dtype=torch.int64)
    acc = torch.zeros(n, dtype=torch.int64)
    bad = torch.zeros(n, dtype=torch.bool)
    for j in range(levels):
        c = codes[:, j].long()
        acc = acc * num_codes + c
        bad = bad | (c == num_codes - 1)
        out[:, j] = torch.where(bad, -1, acc)
    return out


def _remap(
    candidates: torch.Tensor, sub_offsets: torch.Tensor, local: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Positions within the candidate sub-prefix -> positions within the whole prefix (-1 stays)."""
    if candidates.numel() == 0:
        return local
    rows = candidates[(sub_offsets[:-1].unsqueeze(1) + local.clamp(min=0)).clamp(max=candidates.numel() - 1)]
    return torch.where(local >= 0, rows - offsets[:-1].unsqueeze(1), -1)


def vector_topk(
    offsets: torch.Tensor,
    target: torch.Tensor,
    behaviors: torch.Tensor,
    k: int,
    score: Literal["cosine", "dot"] = "cosine",
    backend: str | None = None,
) -> Selection:
    """Top-K of ``score(target_b, behavior_i)`` over each sample's jagged behaviors (no gradient)."""
    positions, scores = gsu_topk(
        offsets, k, mode=score, target=target.detach().float(), behavior_vectors=behaviors.detach().float(),
        backend=backend,
    )  # fmt: skip
    return Selection(positions, scores)


def rows_by_route(
    values: list[torch.Tensor], dest: torch.Tensor, width: int, route_ends: list[int]
) -> tuple[list[torch.Tensor], list[int]]:
    """The rows of the real slots of a ``[B, width]`` selection, given in row-major order (``dest [N]``: their flat
    positions; route r holds the columns ``[route_ends[r - 1], route_ends[r])``), regrouped route by route with each
    route's rows sample by sample as before: each of ``values`` (``[N, ...]``) gathered once in that order (its
    backward the native row sum), and the rows per route, to split them with."""
    ends = torch.tensor(route_ends[:-1], dtype=torch.int64, device=dest.device)
    route = torch.bucketize(dest % width, ends, right=True)  # each row's route
    order = torch.argsort(route, stable=True)
    counts = torch.bincount(route, minlength=len(route_ends)).tolist()
    return [native.gather_rows(v, order) for v in values], counts


class PrefixGSU(nn.Module):
    """One SID-granularity route: behaviors whose SID prefix equals the target's (see the module docstring)."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self,
        offsets: torch.Tensor,
        target_prefix: torch.Tensor,
        behavior_prefix: torch.Tensor,
        k: int,
        target_vec: torch.Tensor | None = None,
        behavior_vecs: torch.Tensor | None = None,
        score: Literal["cosine", "dot"] = "cosine",
    ) -> Selection:
        """target_prefix ``[B]``, behavior_prefix ``[total_L]`` (-1 = reserved, never matched); with ``target_vec
        [B, D]`` and ``behavior_vecs [total_L, D]`` the matched candidates are ranked by ``score``, else by recency."""
        b = offsets.numel() - 1
        n = behavior_prefix.shape[0]
        target_prefix = torch.where(target_prefix < 0, -2, target_prefix.long())
        sample = torch.repeat_interleave(
            torch.arange(b, device=offsets.device), offsets[1:] - offsets[:-1], output_size=n
        )
        candidates = torch.nonzero(behavior_prefix.long() == target_prefix[sample]).squeeze(1)
        sub_offsets = lengths_to_offsets(torch.bincount(sample[candidates], minlength=b))
        if target_vec is None:
            local, scores = gsu_topk(
                sub_offsets, k, mode="category", target_category=target_prefix,
                behavior_category=behavior_prefix[candidates].long(), backend=self.backend,
            )  # fmt: skip
        else:
            assert behavior_vecs is not None
            sel = vector_topk(sub_offsets, target_vec, behavior_vecs[candidates], k, score, self.backend)
            local, scores = sel.positions, sel.scores
        return Selection(_remap(candidates, sub_offsets, local, offsets), scores)


class SIDFusion(nn.Module):
    """The SID-level gate: item representation from its ID embedding and its SID code embeddings.

    Args:
        dim: width of the ID representation ``e_id`` (``[item; cate]`` = 2d) and of every SID code embedding.
        levels: SID levels L_s. num_codes: K + 1 rows per level (the last is the reserved, zero padding row).
        level_gate: True: softmax gate over the levels; False: ``e_sid = Σ_l E_l[c_l]`` (uniform).
        mode: ``gate`` (element-wise ID/SID gate), ``add`` (``e_id + e_sid``) or ``id`` (no SID: an ablation).
        init_std: normal init of the code tables (the ID tables start near ±1/sqrt(rows); small keeps both comparable).
    """

    def __init__(
        self,
        dim: int,
        levels: int,
        num_codes: int,
        *,
        level_gate: bool = True,
        mode: Literal["gate", "add", "id"] = "gate",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.dim, self.levels, self.num_codes, self.mode = dim, levels, num_codes, mode
        self.tables = nn.ModuleList(DenseEmbedding(num_codes, dim, padding_idx=num_codes - 1) for _ in range(levels))
        for t in self.tables:
            nn.init.normal_(t.weight, std=init_std)
            with torch.no_grad():
                t.weight[num_codes - 1].zero_()
        self.level_gate = nn.Linear((1 + levels) * dim, levels) if level_gate and levels > 1 else None
        self.gate = nn.Linear(2 * dim, dim) if mode == "gate" else None

    def level_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``[..., L_s]`` -> ``[..., L_s, dim]``."""
        return torch.stack([t(codes[..., j]) for j, t in enumerate(self.tables)], dim=-2)

    def sid_embedding(self, codes: torch.Tensor) -> torch.Tensor:
        """The ungated ``Σ_l E_l[c_l]`` ``[..., dim]`` (the semantic retrieval view)."""
        out = self.tables[0](codes[..., 0])
        for j in range(1, self.levels):
            out = out + self.tables[j](codes[..., j])
        return out

    def level_weights(self, e_id: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``β [..., L_s]`` (uniform ones without the level gate)."""
        if self.level_gate is None:
            return levels.new_ones(levels.shape[:-1])
        x = torch.cat([e_id, levels.flatten(-2)], dim=-1)
        return torch.softmax(self.level_gate(x), dim=-1)

    def forward(self, e_id: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """e_id ``[..., dim]``, codes ``[..., L_s]`` -> fused ``[..., dim]``."""
        if self.mode == "id":
            return e_id
        levels = self.level_embeddings(codes)
        beta = self.level_weights(e_id, levels)
        e_sid = (beta.unsqueeze(-1) * levels).sum(-2)
        if self.gate is None:
            return e_id + e_sid
        g = torch.sigmoid(self.gate(torch.cat([e_id, e_sid], dim=-1)))
        return g * e_id + (1.0 - g) * e_sid

    def forward_unique(self, e_id: torch.Tensor, codes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`forward` on rows ``e_id [N, dim]``, ``codes [N, L_s]`` computed once per distinct ``keys [N]``: rows with
        equal keys must carry equal ``e_id`` and ``codes`` (the same item: R2LED keys by (item, category)).

        A batch holds each item many times (targets, retrieved and recent behaviors of many users), and the fusion is
        a function of the item alone; computing it per row cost R2LED about as much as the rest of its step. Each
        distinct key is fused from its first row, whose ``e_id`` then receives the gradient of every row with that
        key (the others' none): their embedding-table row gets the same summed gradient either way.
        """
        uniq, inverse = torch.unique(keys, return_inverse=True)
        n = keys.numel()
        first = torch.full((uniq.numel(),), n, dtype=torch.long, device=keys.device)
        first.scatter_reduce_(0, inverse, torch.arange(n, device=keys.device), "amin")
        return native.gather_rows(self(native.gather_rows(e_id, first), codes.index_select(0, first)), inverse)


class RouteFusion(nn.Module):
    """The route-level fusion: target-aware cross-attention (or gate) over the R route outputs.

    Args:
        query_dim: width of the target. dim: width of every route output ``u_r`` (and of the result).
        routes: R. mode: ``attention`` | ``gate`` | ``concat`` (see the module docstring).
    """

    def __init__(self, query_dim: int, dim: int, routes: int, mode: Literal["attention", "gate", "concat"]) -> None:
        super().__init__()
        self.mode, self.routes, self.dim = mode, routes, dim
        self.out_dim = routes * dim if mode == "concat" else dim
        if mode == "attention":
            self.w_q = nn.Linear(query_dim, dim, bias=False)
            self.w_k = nn.Linear(dim, dim, bias=False)
            self.w_v = nn.Linear(dim, dim, bias=False)
            self.route_embedding = nn.Parameter(torch.randn(routes, dim) * 0.1)
        elif mode == "gate":
            self.gate = nn.Linear(query_dim, routes)

    def forward(
        self, target: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """target ``[B, Dq]``, outputs ``[B, R, dim]``, mask ``[B, R]`` (route non-empty) -> (``[B, out_dim]``,
        route weights ``[B, R]`` or None for concat). A sample whose routes are all empty gets zeros."""
        if self.mode == "concat":
            return outputs.flatten(1), None
        if self.mode == "gate":
            w = masked_softmax(self.gate(target), mask)
            return (w.unsqueeze(-1) * outputs).sum(1), w
        q = self.w_q(target)
        k = self.w_k(outputs + self.route_embedding)
        s = (k * q.unsqueeze(1)).sum(-1) / math.sqrt(self.dim)
        w = masked_softmax(s, mask)
        return (w.unsqueeze(-1) * self.w_v(outputs)).sum(1), w


__all__ = [
    "rows_by_route",
    "PrefixGSU",
    "RouteFusion",
    "SIDFusion",
    "prefix_codes",
    "vector_topk",
]
