"""Exact Search Units (ESU): attention over the K behaviors a GSU selected, and MUSE's similarity features.

All modules take fixed-K slots: the target ``[B, Dq]``, behaviors ``[B, K, D]`` (best first, as the GSU returned
them) and a bool ``mask [B, K]`` (True = a selected behavior).

* `time_gap_bucket` / `TimeGapEmbedding` (SIM, Pi et al., CIKM 2020, §4.2): each retrieved behavior is
  ``z_j = [e_j; e(Δt_j)]`` with ``Δt_j`` the time gap to the target, bucketized. The paper does not give the
  buckets; we use ``1 + floor(log2(Δt seconds))`` (0 = empty slot), so ``n_buckets = 32`` spans 1 s to 34 years.
* `MultiHeadTargetAttention` (SIM ESU; FuxiCTR ``MultiHeadTargetAttention``, ``use_qkvo=True``): per head
  ``softmax((W_q e_t)·(W_k z_j)/sqrt(d_h))`` over the real slots, values ``W_v z_j``, heads concatenated and mapped by
  ``W_o``. Where ``kernels.target_attention`` runs as a Triton kernel, the projected keys and values go to it as a
  jagged batch (`slot_attention`); elsewhere (the CPU) ``W_k`` is folded into the query and ``W_v`` applied after the
  pooling, so no slot is projected (`MultiHeadTargetAttention.absorbed`, the same values up to float rounding), and
  the masked softmax pooling runs natively (`ctr.native.target_attention`; eagerly without the build).
* `SimTier` (MUSE, Wu et al., arXiv 2512.07216, §4.3): the target-behavior similarities ``R`` bucketed into tiers.
  Paper mode: ``N`` equal tiers over ``[-1, 1]``, raw counts of the real behaviors. Code mode (alimama-tech/MUSE
  ``SimTier``): ``tier = ceil(cos / eps) + 1/eps`` over ``2/eps + 2`` slots (22 for eps = 0.1), output
  ``log1p(count_b) · w_b`` with ``w ~ U(0, 1)`` learnable, padded slots counted (cos 0, the middle tier).
* `SimilarityAwareTargetAttention` (MUSE's SA-TA, §4.3): ``α_ID = (E W_k)(e_t W_q)ᵀ / sqrt(D)``, ``α = γ1·α_ID +
  γ2·R + γ3·α_ID ⊙ R`` (γ learnable, start 1), ``u = softmax(α)ᵀ (E W_v)``, masked. Code mode (``MultiHeadAttV2``):
  ``Q, K, V = SiLU(Linear(·))``, no ``1/sqrt(D)``, ``R`` divided by a learnable ``τ1`` (start 0.1), per-head γ and
  τ, softmax + 1e-7 without a mask (padded slots take part).
* `LinearTargetAttention` (MUSE code's short-term ``MultiHeadAtt``): ``q = W e_t + b``, ``k = W s_j + b``,
  ``softmax(k·q)`` without scaling or mask, the keys reused as values.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

import kernels

from .. import native
from .attention import masked_softmax, pool
from .dense_embedding import DenseEmbedding


def time_gap_bucket(gap: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Seconds ``> 0`` -> bucket ``1 + floor(log2(gap))`` clipped to ``[1, n_buckets - 1]``; 0 stays for empty."""
    g = gap.clamp(min=1).to(torch.float64)
    b = 1 + torch.floor(torch.log2(g)).long()
    return b.clamp(1, n_buckets - 1)


def slot_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float,
    backend: str | None = None,
) -> torch.Tensor:
    """``kernels.target_attention`` over fixed-K slots: query ``[B, Q, H, Dk]``, keys ``[B, K, H, Dk]``, values
    ``[B, K, H, Dv]``, mask ``[B, K]``, bias ``[B, K]`` or ``[B, K, Q]`` (shared by the heads) -> ``[B, Q, H, Dv]``.

    Where the op resolves to its Triton kernel, the slots are handed to it as a jagged batch (``offsets =
    arange(B + 1) * K``, the empty slots masked). Elsewhere (the CPU) the same formula is computed on the slots as
    they are: with one key head (TWIN) natively (`ctr.native.target_attention`, the Q queries its heads), else with
    broadcast products and a masked softmax over K: the kernel's reference works on jagged rows with gathers and
    scatters whose backward accumulates serially on the CPU, about 3x the time here. They agree to float rounding
    (`tests/test_two_stage.py`, `tests/test_native_esu.py`); an all-masked sample gets zeros in all.
    """
    b, k = mask.shape
    if kernels.resolve_backend("target_attention", (query, keys, values), backend) == "triton":
        offsets = torch.arange(b + 1, device=keys.device, dtype=torch.int64) * k
        flat_bias = None if bias is None else bias.reshape(b * k, *bias.shape[2:])
        return kernels.target_attention(
            query, keys.reshape(b * k, *keys.shape[2:]), values.reshape(b * k, *values.shape[2:]), offsets,
            bias=flat_bias, mask=mask.reshape(-1), scale=scale, max_len=k, backend=backend,
        )  # fmt: skip
    if keys.shape[2] == 1 and values.shape[2] == 1:  # one key head (TWIN: its heads are the Q queries): natively
        nq = query.shape[1]
        q_bias = None if bias is None else (bias.unsqueeze(-1) if bias.dim() == 2 else bias).expand(b, k, nq)
        # squeeze, not [:, :, 0]: a select's backward fills a zero [B, K, 1, D] block and copies into it (3 ms a step)
        out = native.target_attention(query.squeeze(2) * scale, keys.squeeze(2), mask, values.squeeze(2), q_bias)
        if out is not None:
            return out.unsqueeze(2)
    if query.shape[1] == 1:  # one query (SIM's ESU): broadcast products, cheaper than a batch of [1, K] matmuls
        logits = (query.unsqueeze(1) * keys.unsqueeze(2)).sum(-1) * scale  # [B, K, 1, H]
        if bias is not None:
            logits = logits + (bias[:, :, None, None] if bias.dim() == 2 else bias.unsqueeze(-1))
        m = mask[:, :, None, None]
        weights = torch.softmax(logits.masked_fill(~m, torch.finfo(logits.dtype).min), dim=1) * m.to(logits.dtype)
        return (weights.unsqueeze(-1) * values.unsqueeze(2)).sum(1)
    # Q queries (TWIN's heads): batched matmuls; a broadcast product would build [B, K, Q, H, D] (7x the time)
    logits = torch.matmul(query.transpose(1, 2), keys.permute(0, 2, 3, 1)) * scale  # [B, H, Q, K]
    if bias is not None:
        logits = logits + (bias[:, None, None, :] if bias.dim() == 2 else bias.transpose(1, 2).unsqueeze(1))
    weights = masked_softmax(logits, mask[:, None, None, :])
    return torch.matmul(weights, values.transpose(1, 2)).transpose(1, 2)  # [B, Q, H, Dv]


class TimeGapEmbedding(nn.Module):
    """``e(Δt)``: a dense embedding of the log2 time-gap bucket; row 0 (empty slot) is zero and not trained."""

    def __init__(self, n_buckets: int, dim: int) -> None:
        super().__init__()
        if n_buckets < 2:
            raise ValueError(f"TimeGapEmbedding needs n_buckets >= 2, got {n_buckets}")
        self.n_buckets = n_buckets
        self.embedding = DenseEmbedding(n_buckets, dim, padding_idx=0)

    def forward(self, gap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """gap ``[B, K]`` seconds, mask ``[B, K]`` -> ``[B, K, dim]`` (zeros where not mask)."""
        bucket = torch.where(mask, time_gap_bucket(gap, self.n_buckets), 0)
        return self.embedding(bucket)


class TemporalTargetAttention(nn.Module):
    """TIN's target-aware temporal encoding and scaled dot-product target attention (Zhou et al., WWW 2024)::

        w_i = softmax_i((q + T[0]) · (k_i + T[idx_i]) / sqrt(D)),   u = Σ_i w_i (v_i + T[idx_i])

    ``T`` is a table of ``buckets`` rows (row 0: the target's own slot, "now"), started at zero so that the encoding
    does not drown embeddings that start small; ``idx_i`` >= 1 is the behavior's time bucket (or position).
    """

    def __init__(self, dim: int, buckets: int) -> None:
        super().__init__()
        self.table = DenseEmbedding(buckets, dim)
        nn.init.zeros_(self.table.weight)

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        index: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[B, D]``, keys / values ``[B, L, D]``, mask and index ``[B, L]`` -> ``[B, D]``."""
        enc = self.table(torch.where(mask, index, 0))
        k = keys + enc
        v = (keys if values is None else values) + enc
        scores = torch.einsum("bd,bld->bl", query + self.table.weight[0], k) / math.sqrt(k.shape[-1])
        return torch.einsum("bl,bld->bd", masked_softmax(scores, mask), v * mask.unsqueeze(-1))


class MultiHeadTargetAttention(nn.Module):
    """Scaled dot-product target attention with ``W_q, W_k, W_v`` (no bias) and an output map ``W_o``.

    Args:
        query_dim: width of the target.
        key_dim: width of the attention keys ``z`` (``[e; e(Δt)]``).
        value_dim: width of the values (defaults to ``key_dim``; DARE gives separate key and value inputs).
        heads: H. head_dim: d_h. out_dim: width after ``W_o`` (None: no ``W_o``, output ``H·d_h``).
        backend: passed to ``kernels.target_attention`` (None = ``$KERNELS_BACKEND`` / auto).
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        value_dim: int | None = None,
        *,
        heads: int = 2,
        head_dim: int = 32,
        out_dim: int | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        inner = heads * head_dim
        self.w_q = nn.Linear(query_dim, inner, bias=False)
        self.w_k = nn.Linear(key_dim, inner, bias=False)
        self.w_v = nn.Linear(value_dim or key_dim, inner, bias=False)
        self.w_o = nn.Linear(inner, out_dim, bias=False) if out_dim is not None else None
        self.out_dim = out_dim or inner

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None = None,
        temperature: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[B, Dq]``, keys ``[B, K, Dk]``, mask ``[B, K]`` (values ``[B, K, Dv]``) -> ``[B, out_dim]``.

        ``temperature [B]`` (LAIN's τ(L)) divides each sample's logits: applied to ``W_q e_t`` (the logits are linear
        in the query), so the fused kernel's fixed scale still holds."""
        b, k, _ = keys.shape
        h, d = self.heads, self.head_dim
        values = keys if values is None else values
        q = self.w_q(query)
        if temperature is not None:
            q = q / temperature.to(q.dtype).unsqueeze(-1)
        scale = 1.0 / math.sqrt(d)
        if kernels.resolve_backend("target_attention", (query, keys, values), self.backend) == "triton":
            kk = self.w_k(keys).reshape(b, k, h, d)
            vv = self.w_v(values).reshape(b, k, h, d)
            out = slot_attention(q.reshape(b, 1, h, d), kk, vv, mask, scale=scale, backend=self.backend)
            out = out.reshape(b, h * d)
        else:
            out = self.absorbed(q.reshape(b, h, d), keys, values, mask, scale)
        return self.w_o(out) if self.w_o is not None else out

    def forward_rows(
        self, query: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """`forward` over every behavior of each sample as jagged rows, keys = values = ``[a; x]`` (``a [N, Da]``,
        ``x [N, Dx]`` or None: SIM's ``[e; e(Δt)]`` without building it), ``offsets [B + 1]``; `absorbed`'s
        projections around `ctr.native.attention_rows`. None where that does not run (the caller uses slots)."""
        b = query.shape[0]
        h, d = self.heads, self.head_dim
        w_k = self.w_k.weight.reshape(h, d, -1)  # [H, d, Dk]
        scale = 1.0 / math.sqrt(d)
        q_keys = torch.bmm(self.w_q(query).reshape(b, h, d).transpose(0, 1), w_k).transpose(0, 1) * scale
        pooled = native.attention_rows(q_keys, a, offsets, x, scored=True)  # [B, H, Dv]
        if pooled is None:
            return None
        w_v = self.w_v.weight.reshape(h, d, -1)  # [H, d, Dv]
        out = torch.bmm(pooled.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(b, h * d)
        return self.w_o(out) if self.w_o is not None else out

    def search_attend(
        self,
        query: torch.Tensor,
        offsets: torch.Tensor,
        k: int,
        keys: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        max_len: int | None = None,
        **search: Any,
    ) -> tuple[torch.Tensor, kernels.SearchAttendResult]:
        """The GSU's top-K and this attention over the selected behaviors in one fused op (`kernels.search_attend`),
        with the projections absorbed as in `absorbed`: the H per-head queries ``W_k^hᵀ W_q^h e_t`` attend over the
        raw jagged ``keys`` ``[total_L, Dk]`` of the whole prefix (one shared head, the H queries as Q = H), the
        pooled values ``[B, H, Dv]`` are projected by ``W_v^h`` and ``W_o`` after. ``search``: the GSU's arguments
        (``mode``, ``target``, ``behavior_vectors``, ...). Returns ``([B, out_dim], the op's result)``."""
        b = query.shape[0]
        h, d = self.heads, self.head_dim
        values = keys if values is None else values
        w_k = self.w_k.weight.reshape(h, d, -1)  # [H, d, Dk]
        w_v = self.w_v.weight.reshape(h, d, -1)  # [H, d, Dv]
        q_keys = torch.bmm(self.w_q(query).reshape(b, h, d).transpose(0, 1), w_k).transpose(0, 1)  # [B, H, Dk]
        res = kernels.search_attend(
            offsets, k, q_keys.unsqueeze(2), keys.unsqueeze(1), values.unsqueeze(1), scale=1.0 / math.sqrt(d),
            max_len=max_len, backend=self.backend, **search,
        )  # fmt: skip
        pooled = res.out[:, :, 0]  # [B, H, Dv]
        out = torch.bmm(pooled.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(b, h * d)
        return (self.w_o(out) if self.w_o is not None else out), res

    def absorbed(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The same attention with ``W_k`` and ``W_v`` moved off the K slots (the CPU path).

        ``(W_q^h e_t)·(W_k^h z_j) = z_j·(W_k^hᵀ W_q^h e_t)`` and ``Σ_j a_hj W_v^h z_j = W_v^h Σ_j a_hj z_j``: the query
        is mapped into the key space once per sample and the values are pooled before their projection, so nothing is
        projected per slot (a third of the time of projecting the K keys and values, backward included, at SIM's
        1,024 x 50 slots). Equal to the projected form up to float rounding (`tests/test_two_stage.py`).
        q ``[B, H, d]`` (``W_q e_t``, LAIN's τ applied), keys ``[B, K, Dk]``, values ``[B, K, Dv]`` -> ``[B, H·d]``.
        """
        b, h, d = q.shape
        w_k = self.w_k.weight.reshape(h, d, -1)  # [H, d, Dk]
        w_v = self.w_v.weight.reshape(h, d, -1)  # [H, d, Dv]
        q_keys = torch.bmm(q.transpose(0, 1), w_k).transpose(0, 1) * scale  # [B, H, Dk]
        pooled = native.target_attention(q_keys, keys, mask, values)  # [B, H, Dv]
        if pooled is None:  # the eager form: one sample per batched product
            logits = torch.bmm(keys, q_keys.transpose(1, 2))  # [B, K, H]
            m = mask.unsqueeze(-1)
            weights = torch.softmax(logits.masked_fill(~m, torch.finfo(logits.dtype).min), dim=1) * m.to(logits.dtype)
            pooled = torch.bmm(weights.transpose(1, 2), values)
        return torch.bmm(pooled.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1).reshape(b, h * d)


class SimTier(nn.Module):
    """MUSE's SimTier: a histogram of the target-behavior similarities (see the module docstring).

    Args:
        mode: ``paper`` (``tiers`` equal bins over [-1, 1], raw counts of the real behaviors) or ``code`` (the
            release: ``2/eps + 2`` slots, ``log1p(count) · w``, every slot counted).
        tiers: number of bins in paper mode.
        eps: tier width in code mode (0.1 -> 22 slots).
    """

    def __init__(self, mode: Literal["paper", "code"] = "paper", tiers: int = 20, eps: float = 0.1) -> None:
        super().__init__()
        self.mode = mode
        if mode == "code":
            self.inv_eps = round(1.0 / eps)
            self.slots = 2 * self.inv_eps + 2
            self.weight = nn.Parameter(torch.rand(self.slots))
        else:
            self.slots = tiers
            self.weight = None
        self.out_dim = self.slots

    def tier(self, sim: torch.Tensor) -> torch.Tensor:
        """The slot of each similarity (int64, same shape)."""
        sim = sim.detach().float().clamp(-1.0, 1.0)
        if self.mode == "code":
            tier = torch.ceil(sim * self.inv_eps).long() + self.inv_eps
        else:
            tier = torch.floor((sim + 1.0) * 0.5 * self.slots).long()
        return tier.clamp(0, self.slots - 1)

    def counts(self, sim: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-slot counts ``[B, slots]`` (float32) of the similarities ``sim [B, L]`` where ``mask``."""
        out = torch.zeros(sim.shape[0], self.slots, dtype=torch.float32, device=sim.device)
        return out.scatter_add_(1, self.tier(sim), mask.to(torch.float32))

    def encode(self, counts: torch.Tensor) -> torch.Tensor:
        """Counts -> the output: raw counts (paper) or ``log1p(count) · w`` (code)."""
        return counts if self.weight is None else torch.log1p(counts) * self.weight

    def forward(self, sim: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sim ``[B, L]``, mask ``[B, L]`` -> ``[B, slots]``. In code mode pass an all-True mask for the release's
        "padded slots count" behavior."""
        return self.encode(self.counts(sim, mask))

    def forward_jagged(self, sim: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The histogram of jagged similarities ``sim [total_L]`` (int64 ``offsets [B + 1]``) -> ``[B, slots]``."""
        b = offsets.numel() - 1
        sample = torch.repeat_interleave(
            torch.arange(b, device=sim.device), offsets[1:] - offsets[:-1], output_size=sim.shape[0]
        )
        flat = torch.bincount(sample * self.slots + self.tier(sim), minlength=b * self.slots)
        return self.encode(flat.reshape(b, self.slots).to(torch.float32))


class SimilarityAwareTargetAttention(nn.Module):
    """MUSE's SA-TA: ID target attention fused with the multimodal similarity ``R`` (module docstring).

    Args:
        query_dim / key_dim / value_dim: widths of the target, the attention keys and the values (DARE: the keys
            come from the attention tables, the values from the representation tables).
        dim: the projection width (MUSE: 2D, one head).
        heads: number of heads (MUSE code: ``2D // 2D = 1``).
        mode: ``paper`` or ``code``.
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        value_dim: int | None = None,
        *,
        dim: int = 32,
        heads: int = 1,
        mode: Literal["paper", "code"] = "paper",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"SA-TA dim {dim} must be a multiple of heads {heads}")
        self.mode, self.heads, self.head_dim = mode, heads, dim // heads
        bias = mode == "code"
        self.w_q = nn.Linear(query_dim, dim, bias=bias)
        self.w_k = nn.Linear(key_dim, dim, bias=bias)
        self.w_v = nn.Linear(value_dim or key_dim, dim, bias=bias)
        self.act: nn.Module = nn.SiLU() if mode == "code" else nn.Identity()
        self.gamma = nn.Parameter(torch.ones(3, heads))  # γ1, γ2, γ3 per head
        self.tau = nn.Parameter(torch.full((heads,), 0.1)) if mode == "code" else None
        self.out_dim = dim

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        sim: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None = None,
        temperature: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query ``[B, Dq]``, keys ``[B, K, Dk]``, sim ``R [B, K]``, mask ``[B, K]`` -> (``[B, dim]``, weights
        ``[B, H, K]``). ``temperature [B]`` (LAIN's τ(L)) divides the fused logits α before the softmax."""
        b, k, _ = keys.shape
        h, d = self.heads, self.head_dim
        q = self.act(self.w_q(query)).reshape(b, h, 1, d)
        kk = self.act(self.w_k(keys)).reshape(b, k, h, d).transpose(1, 2)  # [B, H, K, d]
        vv = self.act(self.w_v(keys if values is None else values)).reshape(b, k, h, d).transpose(1, 2)
        alpha_id = (kk * q).sum(-1)  # [B, H, K]
        if self.mode == "paper":
            alpha_id = alpha_id / math.sqrt(d)
            r = sim.unsqueeze(1)
        else:
            assert self.tau is not None
            r = sim.unsqueeze(1) / self.tau.reshape(1, h, 1)
        g = self.gamma.reshape(3, 1, h, 1)
        alpha = g[0] * alpha_id + g[1] * r + g[2] * alpha_id * r
        if temperature is not None:
            alpha = alpha / temperature.to(alpha.dtype).reshape(b, 1, 1)
        if self.mode == "paper":
            weights = masked_softmax(alpha, mask.unsqueeze(1).expand(b, h, k))
        else:
            weights = torch.softmax(alpha, dim=-1) + 1e-7
        out = torch.matmul(weights.unsqueeze(2), vv).squeeze(2)  # [B, H, d]
        return out.reshape(b, h * d), weights


class LinearTargetAttention(nn.Module):
    """MUSE code's short-term attention (``MultiHeadAtt``): linear q and k, unscaled softmax, keys as values."""

    def __init__(self, query_dim: int, key_dim: int, dim: int) -> None:
        super().__init__()
        self.w_q = nn.Linear(query_dim, dim)
        self.w_k = nn.Linear(key_dim, dim)
        self.out_dim = dim

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """query ``[B, Dq]``, keys ``[B, S, Dk]`` -> ``[B, dim]``; with ``mask`` the softmax is restricted to it."""
        q = self.w_q(query)
        kk = self.w_k(keys)
        s = torch.bmm(kk, q.unsqueeze(-1)).squeeze(-1)
        w = masked_softmax(s, mask) if mask is not None else torch.softmax(s, dim=-1) + 1e-7
        return pool(w, kk)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, L, D]`` over the True positions of ``mask [B, L]`` (zeros for an empty row)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


__all__ = [
    "LinearTargetAttention",
    "MultiHeadTargetAttention",
    "SimTier",
    "SimilarityAwareTargetAttention",
    "TimeGapEmbedding",
    "masked_mean",
    "slot_attention",
    "time_gap_bucket",
]
