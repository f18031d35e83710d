"""Fused GSU -> ESU: top-K retrieval over a lifelong jagged prefix, then target attention over the K selected
behaviors, without writing the ``[B, K, D]`` gather of their keys and values.

The two-stage models (SIM, MUSE, TWIN) search the whole prefix for the K behaviors most relevant to the target and
attend over those K only. Composed from the two ops, that is ``gsu_topk`` (positions ``[B, K]``), a gather of the
selected rows into ``[B, K, H, D]`` keys and values (written to memory, read back once), and ``target_attention``
over them. Here the attention kernel reads each selected row in place through the selection's row indices (one
int64 per slot), and its backward writes the gradients of exactly those rows into the prefix's ``[total_L, H, D]``
gradients (zero elsewhere). The selection itself (positions and GSU scores) is returned too: the models need it
for their side features (time gaps, SimTier's similarity histogram, ...).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from ._backend import resolve_backend
from ._jagged import check_offsets
from .gsu_topk import TRITON_MAX_K, gsu_topk
from .reference.target_attention import target_attention_reference
from .target_attention import check_attention_inputs, check_attention_values, last_dim_contiguous, triton_unsupported

_OP = "search_attend"


class SearchAttendResult(NamedTuple):
    out: torch.Tensor  # [B, Q, H, Dv] (or [B, Q, Dv]) in the query's dtype
    positions: torch.Tensor  # [B, K] int64 position of each selected behavior in its sample, -1 = empty slot
    scores: torch.Tensor  # [B, K] float32 GSU score (0 in empty slots)


def selected_rows(offsets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B * K]`` int64 row of each selected behavior in the jagged prefix, -1 for an empty slot."""
    rows = offsets[:-1, None] + positions.clamp_min(0)
    return torch.where(positions >= 0, rows, -1).reshape(-1)


class _SearchAttendTriton(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slot_offsets: torch.Tensor,
        rows: torch.Tensor,
        bias: torch.Tensor | None,
        temperature: torch.Tensor | None,
        scale: float,
        k: int,
    ) -> torch.Tensor:
        from .triton.target_attention import target_attention_fwd_triton

        out, lse, plan = target_attention_fwd_triton(
            query, keys, values, slot_offsets, bias, temperature, None, scale, k, index=rows
        )
        ctx.save_for_backward(query, keys, values, slot_offsets, rows, bias, temperature, out, lse)
        ctx.scale, ctx.k, ctx.plan = scale, k, plan
        return out.to(query.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        from .triton.target_attention import target_attention_bwd_triton

        query, keys, values, slot_offsets, rows, bias, temperature, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias, dtau = target_attention_bwd_triton(
            grad_out, query, keys, values, slot_offsets, bias, temperature, None, ctx.scale, ctx.k, out, lse,
            ctx.plan, index=rows,
        )  # fmt: skip
        need = ctx.needs_input_grad
        return (
            dq if need[0] else None,
            dk if need[1] else None,
            dv if need[2] else None,
            None,
            None,
            dbias if need[5] else None,
            dtau if need[6] else None,
            None,
            None,
        )


def search_attend(
    offsets: torch.Tensor,
    k: int,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    mode: str = "dot",
    target: torch.Tensor | None = None,
    behavior_ids: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    behavior_vectors: torch.Tensor | None = None,
    gsu_scale: torch.Tensor | float | None = None,
    zero_vector_score: float | None = None,
    target_category: torch.Tensor | None = None,
    behavior_category: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    scale: float | None = None,
    max_len: int | None = None,
    backend: str | None = None,
) -> SearchAttendResult:
    """Select each sample's top-K behaviors (``gsu_topk``), then attend over them (``target_attention``).

    Equal to ``gsu_topk`` followed by ``target_attention`` over the gathered selection with the empty slots masked
    (the reference computes exactly that); the Triton path never materializes the gather.

    Args:
        offsets: int64 ``[B + 1]`` of the jagged prefix (oldest first).
        k: behaviors to select (K <= 256 on Triton; beyond it, or for attention shapes the kernel does not cover,
            the reference runs).
        query: ``[B, Q, H, Dk]`` attention queries (or ``[B, Q, Dk]`` with 2-D keys/values).
        keys: ``[total_L, H, Dk]`` attention keys of every behavior of the prefix (or ``[total_L, Dk]``).
        values: ``[total_L, H, Dv]`` (default: the keys).
        mode, target, behavior_ids, table, behavior_vectors, zero_vector_score, target_category,
            behavior_category: the search, as in ``gsu_topk`` (``gsu_scale`` is its ``scale``).
        bias: optional ``[total_L]`` additive attention logit bias per behavior (time gap, ...).
        temperature: optional ``[B]`` positive per-sample temperature of the attention.
        scale: multiplies ``<q, k>``; default ``1 / sqrt(Dk)``.
        max_len: the longest sample, if known (skips the host syncs; the caller vouches for the inputs).
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (default: ``$KERNELS_BACKEND``, else auto).

    Returns:
        ``(out, positions, scores)``: the attention output ``[B, Q, H, Dv]`` (``[B, Q, Dv]`` for 3-D inputs) in the
        query's dtype, differentiable in query, keys, values, bias and temperature (the search is not); the
        selection ``[B, K]`` as ``gsu_topk`` returns it. A sample without candidates gets zeros.
    """
    batch = check_offsets(_OP, offsets)
    values = keys if values is None else values
    query, keys, values, single_head = check_attention_inputs(_OP, query, keys, values, batch, bias, temperature)
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"{_OP}: bias must be one value per behavior, [total_L], got {tuple(bias.shape)}")
    if max_len is None:
        check_attention_values(_OP, bias, temperature)
    positions, scores = gsu_topk(
        offsets, k, mode=mode, target=target, behavior_ids=behavior_ids, table=table,
        behavior_vectors=behavior_vectors, scale=gsu_scale, zero_vector_score=zero_vector_score,
        target_category=target_category, behavior_category=behavior_category, max_len=max_len, backend=backend,
    )  # fmt: skip
    _, n_query, _, dk = query.shape
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    rows = selected_rows(offsets, positions)
    slot_offsets = torch.arange(batch + 1, device=offsets.device, dtype=torch.int64) * k
    unsupported = triton_unsupported(max(dk, values.shape[-1]), n_query)
    if unsupported is None and k > TRITON_MAX_K:
        unsupported = f"k={k} > {TRITON_MAX_K}"
    impl = resolve_backend(_OP, (query, keys, values, offsets, bias, temperature), backend, unsupported)
    if impl == "triton":
        out = _SearchAttendTriton.apply(
            last_dim_contiguous(query), last_dim_contiguous(keys), last_dim_contiguous(values), slot_offsets, rows,
            bias, temperature.contiguous() if temperature is not None else None, scale, k,
        )  # fmt: skip
    else:
        safe = rows.clamp_min(0)
        out = target_attention_reference(
            query, keys[safe], values[safe], slot_offsets, bias[safe] if bias is not None else None, temperature,
            scale, mask=rows >= 0,
        )  # fmt: skip
    return SearchAttendResult(out.squeeze(2) if single_head else out, positions, scores)
