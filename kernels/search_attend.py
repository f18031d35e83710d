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
        side_ids: torch.Tensor | None,
        side_table: torch.Tensor | None,
        scale: float,
        k: int,
    ) -> torch.Tensor:
        from .triton.target_attention import Side, target_attention_fwd_triton

        side = Side(side_ids, side_table) if side_ids is not None and side_table is not None else None
        out, lse, plan = target_attention_fwd_triton(
            query, keys, values, slot_offsets, bias, temperature, None, scale, k, index=rows, side=side
        )
        ctx.save_for_backward(
            query, keys, values, slot_offsets, rows, bias, temperature, side_ids, side_table, out, lse
        )
        ctx.scale, ctx.k, ctx.plan = scale, k, plan
        return out.to(query.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        from .triton.target_attention import Side, target_attention_bwd_triton

        query, keys, values, slot_offsets, rows, bias, temperature, side_ids, side_table, out, lse = ctx.saved_tensors
        side = Side(side_ids, side_table) if side_ids is not None and side_table is not None else None
        dq, dk, dv, dbias, dtau, dside = target_attention_bwd_triton(
            grad_out, query, keys, values, slot_offsets, bias, temperature, None, ctx.scale, ctx.k, out, lse,
            ctx.plan, index=rows, side=side,
        )  # fmt: skip
        need = ctx.needs_input_grad
        dtable = None
        if need[8] and side is not None and dside is not None:
            dtable = side_table_grad(rows, side.ids, dside, side.table)
        return (
            dq if need[0] else None,
            dk if need[1] else None,
            dv if need[2] else None,
            None,
            None,
            dbias if need[5] else None,
            dtau if need[6] else None,
            None,
            dtable,
            None,
            None,
        )


def side_table_grad(
    rows: torch.Tensor, side_ids: torch.Tensor, per_slot: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """The side table's gradient from the per-slot ones: ``dT[r] = sum of the slots whose behavior reads row r``,
    as a one-hot product (deterministic, unlike an atomic scatter-add on a GPU); empty slots add nothing."""
    valid = rows >= 0
    ids = torch.where(valid, side_ids[rows.clamp_min(0)], 0)
    one_hot = torch.nn.functional.one_hot(ids, table.shape[0]).to(per_slot.dtype) * valid.unsqueeze(1)
    return (one_hot.t() @ per_slot).to(table.dtype)


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
    side_ids: torch.Tensor | None = None,
    side_table: torch.Tensor | None = None,
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
        query: ``[B, Q, H, Dk (+ D2)]`` attention queries (or ``[B, Q, Dk (+ D2)]`` with 2-D keys/values).
        keys: ``[total_L, H, Dk]`` attention keys of every behavior of the prefix (or ``[total_L, Dk]``).
        values: ``[total_L, H, Dv]`` (default: the keys).
        mode, target, behavior_ids, table, behavior_vectors, zero_vector_score, target_category,
            behavior_category: the search, as in ``gsu_topk`` (``gsu_scale`` is its ``scale``).
        side_ids, side_table: optional extra key and value columns from a small table, shared by the heads:
            behavior ``i`` attends with keys ``[keys[i]; side_table[side_ids[i]]]`` and values ``[values[i];
            side_table[side_ids[i]]]`` (``side_ids`` ``[total_L]`` int, ``side_table`` ``[n, D2]``, e.g. SIM's
            time-gap embedding by the behavior's bucket), met by the query's last D2 columns; differentiable in
            the table. Read in place by the kernel, like the keys.
        bias: optional ``[total_L]`` additive attention logit bias per behavior (time gap, ...).
        temperature: optional ``[B]`` positive per-sample temperature of the attention.
        scale: multiplies ``<q, k>``; default ``1 / sqrt(Dk + D2)`` (the query's width).
        max_len: the longest sample, if known (skips the host syncs; the caller vouches for the inputs).
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (default: ``$KERNELS_BACKEND``, else auto).

    Returns:
        ``(out, positions, scores)``: the attention output ``[B, Q, H, Dv (+ D2)]`` (``[B, Q, Dv (+ D2)]`` for 3-D
        inputs) in the query's dtype, differentiable in query, keys, values, side table, bias and temperature (the
        search is not); the
        selection ``[B, K]`` as ``gsu_topk`` returns it. A sample without candidates gets zeros.
    """
    batch = check_offsets(_OP, offsets)
    values = keys if values is None else values
    if (side_ids is None) != (side_table is None):
        raise ValueError(f"{_OP}: side_ids and side_table go together")
    d2 = 0
    if side_table is not None and side_ids is not None:
        if side_table.dim() != 2 or side_table.dtype != query.dtype:
            raise ValueError(f"{_OP}: side_table must be [n, D2] of the query's dtype, got {side_table.dtype} "
                             f"{tuple(side_table.shape)}")  # fmt: skip
        if side_ids.dim() != 1 or side_ids.shape[0] != keys.shape[0] or side_ids.dtype.is_floating_point:
            raise ValueError(f"{_OP}: side_ids must be [{keys.shape[0]}] integers, got {tuple(side_ids.shape)}")
        d2 = side_table.shape[1]
        if query.shape[-1] != keys.shape[-1] + d2:
            raise ValueError(f"{_OP}: with a side table the query is Dk + D2 = {keys.shape[-1] + d2} wide, got "
                             f"{query.shape[-1]}")  # fmt: skip
    key_query = query[..., : query.shape[-1] - d2]
    _, keys, values, single_head = check_attention_inputs(_OP, key_query, keys, values, batch, bias, temperature)
    query = query.unsqueeze(2) if single_head else query
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"{_OP}: bias must be one value per behavior, [total_L], got {tuple(bias.shape)}")
    if max_len is None:
        check_attention_values(_OP, bias, temperature)
    positions, scores = gsu_topk(
        offsets, k, mode=mode, target=target, behavior_ids=behavior_ids, table=table,
        behavior_vectors=behavior_vectors, scale=gsu_scale, zero_vector_score=zero_vector_score,
        target_category=target_category, behavior_category=behavior_category, max_len=max_len, backend=backend,
    )  # fmt: skip
    n_query = query.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    rows = selected_rows(offsets, positions)
    slot_offsets = torch.arange(batch + 1, device=offsets.device, dtype=torch.int64) * k
    unsupported = triton_unsupported(max(keys.shape[-1], values.shape[-1], d2), n_query)
    if unsupported is None and k > TRITON_MAX_K:
        unsupported = f"k={k} > {TRITON_MAX_K}"
    tensors = (query, keys, values, offsets, bias, temperature, side_ids, side_table)
    impl = resolve_backend(_OP, tensors, backend, unsupported)
    if impl == "triton":
        out = _SearchAttendTriton.apply(
            last_dim_contiguous(query), last_dim_contiguous(keys), last_dim_contiguous(values), slot_offsets, rows,
            bias, temperature.contiguous() if temperature is not None else None,
            side_ids.long().contiguous() if side_ids is not None else None,
            side_table.contiguous() if side_table is not None else None, scale, k,
        )  # fmt: skip
    else:
        safe = rows.clamp_min(0)
        sel_keys, sel_values = keys[safe], values[safe]
        if side_table is not None and side_ids is not None:
            extra = side_table[side_ids[safe].long()].unsqueeze(1).expand(-1, sel_keys.shape[1], -1)
            sel_keys, sel_values = torch.cat([sel_keys, extra], -1), torch.cat([sel_values, extra], -1)
        out = target_attention_reference(
            query, sel_keys, sel_values, slot_offsets, bias[safe] if bias is not None else None, temperature,
            scale, mask=rows >= 0,
        )  # fmt: skip
    return SearchAttendResult(out.squeeze(2) if single_head else out, positions, scores)
