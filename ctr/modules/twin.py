"""TWIN's relevance, shared by its GSU and its ESU (Chang et al., KDD 2023; models-wave2.md C.1).

Per head ``a`` (H heads of width d_k), for the target's inherent features ``q = e_t`` and a behavior ``i`` with
inherent features ``k_i = [e(item); e(cate)]`` and cross features ``c_ij`` (its time gap to the sample, its type)::

    α_ai = (W^h_a k_i) · (W^q_a q) / sqrt(d_k)  +  Σ_j β_aj · (w^c_aj · e_j(c_ij))          (paper Eq. 5-6)

The cross part compresses each cross feature ``j`` (an 8-d embedding of its bucket) to one scalar per head, so it is
a per-behavior bias: it can move one behavior's score (FuxiCTR's version adds a constant per head, which cannot).

Two ways to the same scores (`RelevancePath`):

* ``query``: ``α_ai = k_i · Q̃_a + bias_ai`` with ``Q̃_a = W^h_aᵀ W^q_a q / sqrt(d_k)`` in the key space: no key is
  projected at all, the cheapest path for a GSU over 10^4-10^5 behaviors when the embeddings move every step.
* ``projected``: the paper's serving path: ``P = K_h W^h`` computed **once per distinct item** (the cache of the
  paper's "inherent feature projector"), gathered per behavior, ``α_ai = P_i,a · (W^q_a q) / sqrt(d_k) + bias``.

The GSU keeps the top K **unique** behaviors of the union over the heads: the heads' rankings are walked round
robin (rank 0 of every head, then rank 1, ...) until K distinct behaviors are collected (paper §3.3; FuxiCTR keeps a
separate top-K per head). Each head's ranking breaks ties by recency (`kernels.gsu_topk`).

The ESU attends over the K with the same α (so the GSU's choice and the ESU's weights agree: consistency preserved)
and takes its values from the full key ``[e(item); e(cate); e(Δt); e(btype)]`` (paper: "values use the full K")::

    head_a = softmax_i(α_ai) · ([k_i; e(c_i)] W^v_a),   u = [head_1; ...; head_H] W^o

computed as one `esu.slot_attention` call (`kernels.target_attention` on CUDA): the heads are its Q queries over the
shared keys ``k_i`` (query path), the cross term its per-query ``bias`` input, and ``W^v_a`` applied after pooling
(it is linear).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .. import native
from .dense_embedding import DenseEmbedding
from .esu import slot_attention, time_gap_bucket
from .gsu import Selection, gsu_topk, per_sample_products

RelevancePath = Literal["query", "projected"]
BTYPE_OFFSET = 128  # int8 behavior types -> rows 0..255 of the type embedding


class TwinAttention(nn.Module):
    """The relevance α (both paths), the cross-feature bias, the union-over-heads GSU and the ESU of TWIN.

    Args:
        key_dim: width of the inherent features ``k_i`` and of the target ``q`` (2d: item and category).
        value_dim: width of the inherent part of the values (default ``key_dim``; DARE: the representation tables').
        heads, head_dim: H and d_k.
        time_buckets: log2 time-gap buckets of the cross feature (0: no time-gap bias).
        btype: a behavior-type cross feature (the dataset has ``btype``).
        cross_dim: width of each cross feature's embedding before it is compressed to a scalar (paper: 8).
        out_dim: width of ``u`` after ``W^o``.
    """

    def __init__(
        self,
        key_dim: int,
        *,
        value_dim: int | None = None,
        heads: int = 4,
        head_dim: int = 16,
        time_buckets: int = 32,
        btype: bool = False,
        cross_dim: int = 8,
        out_dim: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        self.w_q = nn.Linear(key_dim, heads * head_dim, bias=False)
        self.w_h = nn.Linear(key_dim, heads * head_dim, bias=False)
        self.time = DenseEmbedding(time_buckets, cross_dim, padding_idx=0) if time_buckets else None
        self.btype = DenseEmbedding(256, cross_dim) if btype else None
        # the cross features start neutral (zero bias, zero value part): drawn N(0, 1) they outweighed the
        # inherent score, whose embeddings TorchRec starts at ±sqrt(1 / rows), and the first GSU ranked by time gap
        for table in (self.time, self.btype):
            if table is not None:
                nn.init.zeros_(table.weight)
        n_cross = (self.time is not None) + (self.btype is not None)
        # w^c_aj: one cross_dim -> 1 map per (feature, head); β_aj: one weight per (feature, head)
        self.w_c = nn.Parameter(torch.randn(n_cross, cross_dim, heads) / math.sqrt(cross_dim)) if n_cross else None
        self.beta = nn.Parameter(torch.ones(n_cross, heads)) if n_cross else None
        full = (value_dim or key_dim) + cross_dim * n_cross
        self.w_v = nn.Parameter(torch.randn(heads, full, head_dim) / math.sqrt(full))
        self.w_o = nn.Linear(heads * head_dim, out_dim or value_dim or key_dim, bias=False)
        self.out_dim = out_dim or value_dim or key_dim

    # ---- the relevance --------------------------------------------------------------------------------------------
    def query_keys(self, target: torch.Tensor) -> torch.Tensor:
        """``Q̃ [B, H, key_dim]``: ``W^h_aᵀ W^q_a q / sqrt(d_k)``, so that ``α_ai = k_i · Q̃_a + bias``."""
        q = self.w_q(target).view(-1, self.heads, self.head_dim)
        w_h = self.w_h.weight.view(self.heads, self.head_dim, -1)  # [H, d_k, key_dim]
        return torch.einsum("bhd,hdk->bhk", q, w_h) / math.sqrt(self.head_dim)

    def item_projection(self, keys: torch.Tensor) -> torch.Tensor:
        """``P = k W^h`` per head ``[N, H, d_k]``: the inherent projection, a function of the item alone (cacheable)."""
        return self.w_h(keys).view(-1, self.heads, self.head_dim)

    def cross_features(self, gap: torch.Tensor, btype: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """The cross features' embeddings ``[..., n_cross, cross_dim]`` (zeros where not mask)."""
        parts = []
        if self.time is not None:
            parts.append(self.time(torch.where(mask, time_gap_bucket(gap, self.time.num_embeddings), 0)))
        if self.btype is not None:
            assert btype is not None, "the model was built with a btype cross feature: the batch needs <view>_btype"
            parts.append(self.btype((btype.long() + BTYPE_OFFSET).clamp(0, 255)) * mask.unsqueeze(-1))
        if not parts:
            return gap.new_zeros(*gap.shape, 0, 1, dtype=torch.float32)
        return torch.stack(parts, -2)

    def cross_bias(self, cross: torch.Tensor) -> torch.Tensor:
        """``Σ_j β_aj (w^c_aj · e_j)`` per head, ``[..., H]``, from `cross_features`."""
        if self.w_c is None or self.beta is None:
            return cross.new_zeros(*cross.shape[:-2], self.heads)
        return torch.einsum("...jc,jch,jh->...h", cross, self.w_c, self.beta)

    def cross_bias_of(self, gap: torch.Tensor, btype: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """``cross_bias(cross_features(gap, btype, mask))`` without building the ``[..., J, c]`` features: the bias is
        linear in each feature's embedding, so each table is mapped to its H scalars per row first (``E_j (w^c_j ⊙
        β_j)``, a few dozen rows) and each behavior reads its row. The GSU's form over the whole prefix, where the
        features' stack and the batched products ``[N, c] x [c, H]`` (an inner size of 8 and 4 outputs: a slow shape
        for the CPU's matrix kernels) took about 15 ms per step at 300K behaviors; equal to the reference to float
        rounding (`tests/test_twin.py`)."""
        if self.w_c is None or self.beta is None:
            return torch.zeros(*gap.shape, self.heads, device=gap.device)
        per = self.w_c * self.beta.unsqueeze(1)  # [J, c, H]
        flat_mask = mask.reshape(-1)
        out = torch.zeros(flat_mask.numel(), self.heads, device=gap.device, dtype=per.dtype)
        j = 0
        if self.time is not None:
            rows = torch.where(flat_mask, time_gap_bucket(gap.reshape(-1), self.time.num_embeddings), 0)
            out = out + native.gather_rows(self.time.weight @ per[j], rows)  # row 0 (an empty slot) is zero
            j += 1
        if self.btype is not None:
            assert btype is not None, "the model was built with a btype cross feature: the batch needs <view>_btype"
            rows = (btype.reshape(-1).long() + BTYPE_OFFSET).clamp(0, 255)
            out = out + native.gather_rows(self.btype.weight @ per[j], rows) * flat_mask.unsqueeze(-1).to(per.dtype)
        return out.view(*gap.shape, self.heads)

    def relevance(
        self,
        target: torch.Tensor,
        keys: torch.Tensor,
        sample: torch.Tensor,
        bias: torch.Tensor,
        path: RelevancePath = "query",
        projected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """α ``[N, H]`` of behaviors ``keys [N, key_dim]`` of samples ``sample [N]`` (reference; the GSU and the
        ESU compute the same quantity). ``projected``: `item_projection` rows of the behaviors (projected path)."""
        if path == "query":
            return torch.einsum("nk,nhk->nh", keys, native.gather_rows(self.query_keys(target), sample)) + bias
        p = self.item_projection(keys) if projected is None else projected
        q = native.gather_rows(self.w_q(target).view(-1, self.heads, self.head_dim), sample)
        return (p * q).sum(-1) / math.sqrt(self.head_dim) + bias

    # ---- GSU --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def search(
        self,
        offsets: torch.Tensor,
        target: torch.Tensor,
        keys: torch.Tensor | Sequence[torch.Tensor],
        bias: torch.Tensor,
        k: int,
        *,
        path: RelevancePath = "query",
        item_ids: torch.Tensor | None = None,
        max_len: int | None = None,
    ) -> Selection:
        """Top ``k`` unique behaviors of the union over the heads (round robin over their rankings), ``[B, k']``
        with ``k' = min(k, the batch's longest prefix)`` (or ``max_len``, when given: no host sync).

        ``keys [N, key_dim]`` (or its column blocks, ``[N, D_p]`` each, e.g. the item and category halves as looked
        up) and ``bias [N, H]`` of the jagged prefix; ``item_ids [N]`` for the projected path (the projection is
        computed once per distinct item, then gathered)."""
        parts = [keys] if isinstance(keys, torch.Tensor) else list(keys)
        parts = [part.detach().float() for part in parts]
        # no sample has more than its prefix to keep: k past the batch's longest prefix (TWIN's 100 over a window of
        # 50) would only add empty slots, which every later [B, K, ...] tensor of the ESU then carries
        if max_len is not None:
            k = max(1, min(k, max_len))
        elif offsets.numel() > 1:
            k = max(1, min(k, int((offsets[1:] - offsets[:-1]).max())))
        target, bias = target.detach().float(), bias.detach().float()
        if path == "query" and native.applies(*parts, bias):
            # on the CPU every head at once: α [N, H] in one pass over the keys' blocks (read in place), each head's
            # top k natively
            q_keys = self.query_keys(target)
            alpha = native.segment_dots(parts, q_keys, offsets)
            if alpha is None:
                alpha = per_sample_products(torch.cat(parts, -1), q_keys, offsets)
            positions, scores = native.jagged_topk(alpha + bias, offsets, k)  # type: ignore[misc]
            return union_round_robin(positions, scores, k)
        keys = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        if path == "query":
            q, vectors = self.query_keys(target), keys
        else:
            assert item_ids is not None, "the projected path needs the behaviors' item ids"
            unique, inverse = torch.unique(item_ids, return_inverse=True)
            first = torch.zeros(len(unique), dtype=torch.long, device=keys.device).scatter_(
                0, inverse, torch.arange(len(keys), device=keys.device)
            )
            # [N, H, d_k], one projection per distinct item
            vectors = native.gather_rows(self.item_projection(native.gather_rows(keys, first)), inverse)
            q = self.w_q(target).view(-1, self.heads, self.head_dim) / math.sqrt(self.head_dim)
        ones = torch.ones(len(target), 1, device=target.device)
        per_head, per_score = [], []
        for a in range(self.heads):  # α_ai = [v_i; bias_ai] · [q_a; 1], ranked with ties to the most recent
            v = vectors if vectors.dim() == 2 else vectors[:, a]
            pos, score = gsu_topk(
                offsets, k, mode="dot", target=torch.cat([q[:, a], ones], -1),
                behavior_vectors=torch.cat([v, bias[:, a : a + 1]], -1), max_len=max_len, backend=self.backend,
            )  # fmt: skip
            per_head.append(pos)
            per_score.append(score)
        return union_round_robin(torch.stack(per_head, 1), torch.stack(per_score, 1), k)

    # ---- ESU --------------------------------------------------------------------------------------------------------
    def forward(
        self, target: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``u [B, out_dim]``: target ``[B, key_dim]``; the K selected keys ``[B, K, key_dim]``, full values
        ``[B, K, key_dim + cross]``, bias ``[B, K, H]`` and mask ``[B, K]``."""
        b, k, _ = keys.shape
        # the heads are the op's Q queries over one shared key head: [B, H, full], per head a Σ softmax(α_a) [k; e(c)]
        pooled = slot_attention(
            self.query_keys(target).unsqueeze(2), keys.unsqueeze(2), values.unsqueeze(2), mask, bias=bias, scale=1.0,
            backend=self.backend,
        ).squeeze(2)  # fmt: skip
        heads = torch.einsum("bhf,hfd->bhd", pooled, self.w_v)  # W^v_a after pooling (linear)
        return self.w_o(heads.reshape(b, -1))

    def forward_rows(
        self, target: torch.Tensor, keys: torch.Tensor, cross: torch.Tensor, bias: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor | None:
        """`forward` over every behavior of each sample as the jagged rows they were looked up in (`fits_k`): keys
        ``[N, key_dim]``, the cross features' embeddings ``[N, cross]`` (the values are ``[keys; cross]``), bias
        ``[N, H]``, ``offsets [B + 1]``; natively (`ctr.native.attention_rows`), None where it does not run (the
        caller lays the rows out as slots for `forward`)."""
        pooled = native.attention_rows(self.query_keys(target), keys, offsets, cross, bias)  # [B, H, full]
        if pooled is None:
            return None
        heads = torch.einsum("bhf,hfd->bhd", pooled, self.w_v)
        return self.w_o(heads.reshape(pooled.shape[0], -1))


def union_round_robin(positions: torch.Tensor, scores: torch.Tensor, k: int) -> Selection:
    """The first ``k`` distinct positions of ``positions [B, H, K]`` (each head best first, -1 = empty) read rank by
    rank across the heads: rank 0 of heads 1..H, then rank 1, ...; each kept slot carries the score of the head
    that contributed it. Empty slots are -1 (fewer than k distinct behaviors)."""
    b, h, kk = positions.shape
    order = positions.transpose(1, 2).reshape(b, h * kk)  # rank-major: (rank, head)
    score = scores.transpose(1, 2).reshape(b, h * kk)
    m = order.shape[1]
    # first occurrence of each position in its row: a stable sort by position keeps the earliest (rank, head) first
    key = torch.where(order >= 0, order, torch.iinfo(torch.int64).max)
    sorted_key, idx = torch.sort(key, dim=1, stable=True)
    first_sorted = torch.ones_like(sorted_key, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    first = torch.zeros_like(first_sorted).scatter_(1, idx, first_sorted) & (order >= 0)
    slot = torch.cumsum(first.long(), 1) - 1  # where each kept position goes
    keep = first & (slot < k)
    out_pos = torch.full((b, k), -1, dtype=torch.int64, device=positions.device)
    out_score = torch.zeros(b, k, dtype=scores.dtype, device=positions.device)
    rows = torch.arange(b, device=positions.device).unsqueeze(1).expand(b, m)
    out_pos[rows[keep], slot[keep]] = order[keep]
    out_score[rows[keep], slot[keep]] = score[keep]
    return Selection(positions=out_pos, scores=out_score)
