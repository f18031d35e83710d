"""Triton jagged target attention: a length-balanced forward (flash-decoding over work items) and a recompute
backward.

Work (`kernels.triton.schedule`): every sample is cut into items of at most ``chunk`` rows, ordered longest sample
first; ``programs`` persistent programs take items ``pid, pid + programs, ...``.

Forward, grid ``(programs, H)``: for each of its items, program ``(p, h)`` walks the item's ``BLOCK_L``-key tiles,
keeps an online softmax (running max ``m``, sum ``l`` and weighted value sum, base-2 exponentials) for all Q queries
of head h, and writes the item's partial; ``combine_items`` merges a sample's partials with a log-sum-exp reduction
and also returns the log-sum-exp, which the backward reuses. Keys and values are read once per (sample, head), in
coalesced ``[BLOCK_L, D]`` tiles; everything accumulates in fp32 (fp64 for fp64 inputs). The tile loop is a
``tl.range`` with ``STAGES`` software-pipelining stages (loads of the next tiles in flight while one is computed).

Scores use ``tl.dot`` for every Q >= 2, the queries padded to a 16-row tile (16-bit operands on tensor cores); Q = 1
takes a broadcast multiply-reduce (a matrix-vector product: memory-bound, no use for tensor cores).

Backward, grid ``(programs,)``: for each item, the program walks the same tiles for every head, recomputes the
probabilities from the saved log-sum-exp (no ``[B, L]`` probability tensor is stored) and writes the ``dK``, ``dV``
and ``dBias`` rows it owns, plus per-item partial ``dQ`` and ``dTemperature`` that ``sum_items`` adds up per sample
(deterministic, no atomics). The bias gradient is written per head and summed over heads on the host.

Tiles, warps and stages are autotuned per (query, head-dim buckets, mode, dtype) (`kernels.triton._tune`).

An optional bool behavior mask (read as its uint8 bytes) drops behaviors: they take no weight in the forward (a tile
or sample with no live key keeps the running max at -inf and contributes nothing) and get zero gradients.

Two extensions serve `kernels.search_attend`: ``index`` (INDEXED) attends over a selection, slot ``j`` of sample
``b`` reading row ``index[b * K + j]`` of the keys, values, bias and mask in place (-1: an empty slot); ``side``
(HAS_SIDE) extends every behavior's key and value by a row of a small table picked by the behavior's side id (the
query's last ``D2`` columns meet it), whose per-slot gradients the backward writes for the caller to add up.

Limits (else the dispatcher uses the reference): Dk, Dv <= 256, Q <= 64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from ._common import acc_dtype, allow_tf32, dot_dtype, ensure_launchable
from ._ta_kernels import _ta_bwd_kernel, _ta_fwd_kernel
from ._tune import Tuned, configs
from .config import get_config, next_pow2
from .schedule import WorkPlan, combine_items, plan_work, sum_items


def _mask_bytes(mask: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (the same bytes; no copy)."""
    return mask.view(torch.uint8) if mask is not None else dummy


def _meta(query: torch.Tensor, dk: int, values_dim: int, side_dim: int) -> dict:
    """The constexpr launch arguments of a call (tiles, warps and stages come from `_tune`)."""
    cfg = get_config()
    n_query = query.shape[1]
    use_dot = cfg.use_dot if cfg.use_dot is not None else n_query >= 2
    min_dim = 16 if use_dot else 1  # tl.dot tiles are at least 16 wide
    return {
        "USE_DOT": use_dot,
        "DOT": dot_dtype(query.dtype),
        "ACC": acc_dtype(query.dtype),
        "TF32": allow_tf32(),
        "BLOCK_Q": max(next_pow2(n_query), min_dim),
        "BLOCK_DK": max(next_pow2(dk), min_dim),
        "BLOCK_DV": max(next_pow2(values_dim), min_dim),
        "HAS_SIDE": side_dim > 0,
        "BLOCK_D2": max(next_pow2(side_dim), min_dim) if side_dim else 1,
    }


_KEY = ["USE_DOT", "BLOCK_Q", "BLOCK_DK", "BLOCK_DV", "BLOCK_D2", "HAS_BIAS", "BIAS_PER_QUERY", "HAS_TAU", "HAS_MASK"]
_KEY += ["INDEXED", "HAS_SIDE"]


def _fits(config: triton.Config, meta: dict, backward: bool) -> bool:
    """Keep the register tiles within what one program holds without spilling (an H100's 255 registers per
    thread): the broadcast path materializes ``[BLOCK_Q, BLOCK_D, BLOCK_L]`` products, the dot path ``[BLOCK_L, D]``
    key and value tiles plus the ``[BLOCK_Q, BLOCK_L]`` scores; the backward holds about twice as much."""
    block_l = config.kwargs["BLOCK_L"]
    width = max(meta["BLOCK_DK"], meta["BLOCK_DV"]) + (meta["BLOCK_D2"] if meta["HAS_SIDE"] else 0)
    budget = 16384 * config.num_warps // (8 if backward else 4)
    if meta["USE_DOT"]:
        return 32 <= block_l <= 128 and block_l * (width + meta["BLOCK_Q"]) <= 2 * budget
    return block_l >= 32 and meta["BLOCK_Q"] * width * block_l <= budget


def _default(meta: dict, backward: bool) -> tuple[int, int, int]:
    wide = max(meta["BLOCK_DK"], meta["BLOCK_DV"]) > 64
    if meta["USE_DOT"]:
        return (32 if wide and backward else 64), 4, 2 if backward else 3
    return (64 if wide or backward else 128), 4, 2 if backward else 3


_FWD = Tuned(
    _ta_fwd_kernel,
    configs([32, 64, 128, 256], [4, 8], [2, 3, 4]),
    _KEY,
    lambda c, meta: _fits(c, meta, backward=False),
    lambda meta: _default(meta, backward=False),
)
_BWD = Tuned(
    _ta_bwd_kernel,
    configs([32, 64, 128], [4, 8], [1, 2, 3]),
    _KEY,
    lambda c, meta: _fits(c, meta, backward=True),
    lambda meta: _default(meta, backward=True),
)


def _plan(offsets: torch.Tensor, rows: int, max_len: int, plan: WorkPlan | None) -> WorkPlan:
    return plan if plan is not None else plan_work(offsets, rows, max_len)


class Side(NamedTuple):
    """Extra key and value columns of every behavior from a small table: behavior ``i`` attends with keys
    ``[keys[i]; table[ids[i]]]`` and values ``[values[i]; table[ids[i]]]`` (shared by the heads), the query's last
    ``D2`` columns meeting the table's; e.g. SIM's time-gap embedding ``e(Δt_i)`` by the behavior's gap bucket."""

    ids: torch.Tensor  # [N] int64 row of the table for every behavior (physical rows)
    table: torch.Tensor  # [n, D2], the query's dtype


def target_attention_fwd_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    max_len: int,
    plan: WorkPlan | None = None,
    index: torch.Tensor | None = None,
    side: Side | None = None,
) -> tuple[torch.Tensor, torch.Tensor, WorkPlan | None]:
    """``(out [B, Q, H, Dv], lse [B, Q, H], the work plan)`` in the accumulation dtype (the backward's
    ``sum(dO * O)`` needs the output before rounding to 16 bits); lse = -inf for an empty sample.

    ``index`` (``[B * K]`` int64, -1 = empty slot): attend over a selection, ``offsets = arange(B + 1) * K`` and
    slot ``j`` of sample ``b`` reading the keys, values, bias and mask at row ``index[b * K + j]``. Shapes are
    validated by the dispatchers. The plan (None when nothing was launched) is passed back to the backward, which
    cuts the work the same way. ``side``: extra columns (`Side`); ``out`` then has ``Dv + D2`` columns."""
    batch, n_query, n_head, _ = query.shape
    d2 = side.table.shape[1] if side is not None else 0
    dk = keys.shape[-1]
    dv = values.shape[-1]
    device = query.device
    acc_torch = torch.float64 if query.dtype == torch.float64 else torch.float32
    rows = index.numel() if index is not None else keys.shape[0]
    if batch == 0 or n_query == 0 or n_head == 0 or rows == 0:
        return (
            torch.zeros(batch, n_query, n_head, dv + d2, dtype=acc_torch, device=device),
            torch.full((batch, n_query, n_head), float("-inf"), dtype=acc_torch, device=device),
            None,
        )
    ensure_launchable(_ta_fwd_kernel, device)
    plan = _plan(offsets, rows, max_len, plan)
    x_dim = n_query * n_head
    part_acc = torch.empty(plan.bound, x_dim, dv, dtype=acc_torch, device=device)
    part_side = torch.empty(plan.bound, x_dim, d2, dtype=acc_torch, device=device) if side is not None else None
    part_m = torch.empty(plan.bound, x_dim, dtype=acc_torch, device=device)
    part_l = torch.empty(plan.bound, x_dim, dtype=acc_torch, device=device)
    dummy = offsets
    _FWD[(plan.programs, n_head)](
        query,
        keys,
        values,
        bias if bias is not None else dummy,
        temperature if temperature is not None else dummy,
        _mask_bytes(mask, dummy),
        offsets,
        index if index is not None else dummy,
        side.ids if side is not None else dummy,
        side.table if side is not None else dummy,
        plan.items,
        part_acc,
        part_side if part_side is not None else dummy,
        part_m,
        part_l,
        n_query,
        n_head,
        dk,
        dv,
        d2,
        plan.bound,
        plan.programs,
        plan.chunk,
        *query.stride()[:3],
        *keys.stride()[:2],
        *values.stride()[:2],
        bias.stride(0) if bias is not None else 0,
        bias.stride(1) if bias is not None and bias.dim() == 2 else 0,
        scale=float(scale),
        HAS_BIAS=bias is not None,
        BIAS_PER_QUERY=bias is not None and bias.dim() == 2,
        HAS_TAU=temperature is not None,
        HAS_MASK=mask is not None,
        INDEXED=index is not None,
        **_meta(query, dk, dv, d2),
    )
    out, lse = combine_items(plan, part_acc, part_m, part_l, acc_torch)
    assert lse is not None
    if part_side is not None:
        out = torch.cat([out, combine_items(plan, part_side, part_m, part_l, acc_torch)[0]], dim=-1)
    return out.view(batch, n_query, n_head, dv + d2), lse.view(batch, n_query, n_head), plan


def target_attention_bwd_triton(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: torch.Tensor | None,
    mask: torch.Tensor | None,
    scale: float,
    max_len: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    plan: WorkPlan | None = None,
    index: torch.Tensor | None = None,
    side: Side | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dQuery, dKeys, dValues, dBias, dTemperature, dSide)`` in the inputs' dtypes (``index``,
    ``side``: as in the forward; the rows no slot selects get zero gradients). ``dSide`` (None without ``side``) is
    per logical row, ``[rows, D2]`` in the accumulation dtype: the gradient of that row's side-table row (the
    caller adds them up by table row)."""
    batch, n_query, n_head, _ = query.shape
    dk = keys.shape[-1]
    d2 = side.table.shape[1] if side is not None else 0
    total = keys.shape[0]
    dv = values.shape[-1]
    device = query.device
    acc_torch = lse.dtype
    rows = index.numel() if index is not None else total
    launch = batch > 0 and n_query > 0 and n_head > 0 and rows > 0
    # without an index every row belongs to one work item, which writes it; with one, only the selected rows
    new = torch.empty if launch and index is None else torch.zeros
    dkeys = new(total, n_head, dk, dtype=keys.dtype, device=device)
    dvalues = new(total, n_head, dv, dtype=values.dtype, device=device)
    dbias_heads = None
    if bias is not None:
        shape = (n_head, total) if bias.dim() == 1 else (n_head, total, n_query)
        dbias_heads = new(shape, dtype=acc_torch, device=device)
    dside_heads = torch.zeros(rows, n_head, d2, dtype=acc_torch, device=device) if side is not None else None
    if not launch:
        dquery = torch.zeros_like(query)
        dtau = torch.zeros_like(temperature) if temperature is not None else None
    else:
        ensure_launchable(_ta_bwd_kernel, device)
        plan = _plan(offsets, rows, max_len, plan)
        delta = (grad_out.to(acc_torch) * out.to(acc_torch)).sum(-1).contiguous()  # [B, Q, H]
        grad_side = grad_out[..., dv:].contiguous() if side is not None else None
        grad_out = grad_out[..., :dv].contiguous()
        dq_part = torch.empty(plan.bound, n_query, n_head, dk + d2, dtype=acc_torch, device=device)
        dtau_part = torch.empty(plan.bound, 1, dtype=acc_torch, device=device) if temperature is not None else None
        dummy = offsets
        _BWD[(plan.programs,)](
            query,
            keys,
            values,
            bias if bias is not None else dummy,
            temperature if temperature is not None else dummy,
            _mask_bytes(mask, dummy),
            offsets,
            index if index is not None else dummy,
            side.ids if side is not None else dummy,
            side.table if side is not None else dummy,
            plan.items,
            grad_out,
            grad_side if grad_side is not None else dummy,
            lse.contiguous(),
            delta,
            dq_part,
            dkeys,
            dvalues,
            dside_heads if dside_heads is not None else dummy,
            dbias_heads if dbias_heads is not None else dummy,
            dtau_part if dtau_part is not None else dummy,
            n_query,
            n_head,
            dk,
            dv,
            d2,
            total,
            plan.bound,
            plan.programs,
            plan.chunk,
            *query.stride()[:3],
            *keys.stride()[:2],
            *values.stride()[:2],
            bias.stride(0) if bias is not None else 0,
            bias.stride(1) if bias is not None and bias.dim() == 2 else 0,
            scale=float(scale),
            HAS_BIAS=bias is not None,
            BIAS_PER_QUERY=bias is not None and bias.dim() == 2,
            HAS_TAU=temperature is not None,
            HAS_MASK=mask is not None,
            INDEXED=index is not None,
            **_meta(query, dk, dv, d2),
        )
        dquery = sum_items(plan, dq_part, query.dtype)
        dtau = sum_items(plan, dtau_part, temperature.dtype).view(batch) if dtau_part is not None else None
    dbias = dbias_heads.sum(0).to(bias.dtype) if dbias_heads is not None and bias is not None else None
    dside = dside_heads.sum(1) if dside_heads is not None else None
    return dquery, dkeys, dvalues, dbias, dtau, dside
