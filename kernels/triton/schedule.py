"""Length-balanced work for the jagged kernels: work items built on the device, and the reductions of their partials.

Sizing the grid from the longest sample (``B x S`` programs, ``S`` from ``max_len``) leaves most of the GPU idle when
one 100K-long user shares a batch with short ones: the long sample's ``S`` programs do all the work. Instead every
sample is cut into **work items** of at most ``chunk`` rows (``chunk`` is the same for the whole batch, a multiple of
every tile the kernels use), the items are ordered longest sample first, and a fixed grid of ``programs`` persistent
programs (about ``PROGRAMS_PER_SM`` per SM) takes items ``pid, pid + programs, ...``. ``chunk`` is sized from the
total number of rows, so there are about ``ITEMS_PER_PROGRAM`` items per program and the imbalance between programs
is at most one item.

Everything the host needs is known without reading the offsets: the total number of rows (the values' shape), B, and
the longest sample (``max_len``, given by the caller or read once by the dispatcher). The item table itself is built
by device ops on the offsets (sort, cumsum, searchsorted), so a call with ``max_len`` given does not synchronize and
can be captured in a CUDA graph. ``bound`` item slots are allocated (an upper bound of the number of items); the
slots past the real number of items hold sample -1 and are skipped.

Each item writes a partial result; ``combine_items`` (softmax log-sum-exp merge, or a plain sum) and ``sum_items``
reduce a sample's partials, which are contiguous item slots ``first[b] .. first[b] + count[b] - 1``, in a fixed order
(deterministic, no atomics).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import LN2, acc_dtype, ensure_launchable
from .config import get_config, next_pow2

PROGRAMS_PER_SM = 4  # persistent programs per SM: enough warps in flight to hide memory latency
ITEMS_PER_PROGRAM = 8  # items per program: the last item's imbalance is at most 1/8 of a program's work
CHUNK_ALIGN = 256  # the largest tile (BLOCK_L) of any kernel config: chunks never split a tile
MIN_CHUNK = 4 * CHUNK_ALIGN  # at least four tiles per item, so the reduction of the partials stays cheap
INTERPRETER_SMS = 4  # the interpreter runs programs one after another: a few are enough


@dataclasses.dataclass(frozen=True)
class WorkPlan:
    """Work items of one jagged batch (see the module docstring)."""

    items: torch.Tensor  # int32 [bound, 2]: (sample, chunk index within the sample); sample -1 = empty slot
    first: torch.Tensor  # int64 [B]: the sample's first item slot
    count: torch.Tensor  # int64 [B]: its number of items (0 for an empty sample)
    chunk: int  # rows per item
    bound: int  # item slots
    programs: int  # persistent programs (the grid's first dimension)
    max_items: int  # the most items of one sample if max_len is right (ceil(max_len / chunk)); a hint only


def device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def plan_work(offsets: torch.Tensor, total: int, max_len: int) -> WorkPlan:
    """Cut the batch ``offsets`` (``[B + 1]``, ``total`` rows, longest ``max_len``) into work items.

    Chunks are a multiple of `CHUNK_ALIGN` (of the configured ``block_l`` in tests). Test overrides
    (`kernels.triton.config`): ``chunk_l`` (rows per item), ``programs`` (grid size).
    """
    cfg = get_config()
    batch = offsets.numel() - 1
    if batch < 1:
        raise ValueError("plan_work needs at least one sample")
    device = offsets.device
    align = cfg.block_l or CHUNK_ALIGN
    target_programs = PROGRAMS_PER_SM * device_sms(device)
    if cfg.chunk_l is not None:
        if cfg.chunk_l % align:
            raise ValueError(f"chunk_l={cfg.chunk_l} must be a multiple of the tile {align}")
        chunk = cfg.chunk_l
    else:
        wanted = -(-max(total, 1) // (ITEMS_PER_PROGRAM * target_programs))
        chunk = max(MIN_CHUNK if cfg.block_l is None else align, -(-wanted // align) * align)
    max_items = -(-max_len // chunk) if max_len > 0 else 0
    bound = batch + -(-total // chunk)  # >= sum(ceil(len_b / chunk)) for any offsets: every row gets an item
    programs = max(1, min(bound, cfg.programs or target_programs))

    lengths = offsets[1:] - offsets[:-1]
    n = torch.div(lengths + (chunk - 1), chunk, rounding_mode="floor").clamp_min(0)
    order = torch.sort(lengths, descending=True, stable=True).indices
    n_sorted = n[order]
    cum = n_sorted.cumsum(0)
    start_sorted = cum - n_sorted
    first = torch.empty_like(n).scatter_(0, order, start_sorted)
    slot_ids = torch.arange(bound, device=device, dtype=torch.int64)
    slot = torch.searchsorted(cum, slot_ids, right=True).clamp_max(batch - 1)
    valid = slot_ids < cum[-1:]
    sample = torch.where(valid, order[slot], -1)
    chunk_idx = torch.where(valid, slot_ids - start_sorted[slot], 0)
    items = torch.stack([sample, chunk_idx], 1).to(torch.int32)
    return WorkPlan(items, first, n, chunk, bound, programs, max_items)


@triton.jit
def item_span(items_ptr, offsets_ptr, item, chunk):
    """Work item ``item``: ``(b, start, lo, hi)``, its sample (int64; -1 for an empty slot, whose other values are
    then meaningless), the sample's first row and the item's rows ``[lo, hi)`` within the sample."""
    b = tl.load(items_ptr + 2 * item).to(tl.int64)
    safe = tl.maximum(b, 0)  # an empty slot reads sample 0's offsets (in bounds) and is skipped by the caller
    start = tl.load(offsets_ptr + safe)
    lo = tl.load(items_ptr + 2 * item + 1).to(tl.int64) * chunk
    hi = tl.minimum(lo + chunk, tl.load(offsets_ptr + safe + 1) - start)
    return b, start, lo, hi


@triton.jit
def _combine_items_kernel(
    part_acc_ptr,  # [bound, X, DV]: per-item weighted sums, normalized by exp2(m) when NORMALIZE
    part_m_ptr,  # [bound, X]: per-item running max of the base-2 logits
    part_l_ptr,  # [bound, X]: per-item sum of exp2(logit - m)
    first_ptr,
    count_ptr,
    out_ptr,  # [B, X, DV]
    lse_ptr,  # [B, X]: natural-log log-sum-exp (NORMALIZE only)
    X,
    DV,
    NORMALIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per (sample, query/head, BLOCK_DV columns) merges the sample's item partials, BLOCK_S at a time,
    in item order."""
    b = tl.program_id(0)
    x = tl.program_id(1)
    d_block = tl.program_id(2)
    first = tl.load(first_ptr + b)
    count = tl.load(count_ptr + b)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = d_block * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dmask = offs_d < DV
    m_run = tl.full([], float("-inf"), ACC)
    l_run = tl.zeros([], ACC)
    acc = tl.zeros([BLOCK_DV], ACC)
    for s0 in range(0, count, BLOCK_S):
        smask = s0 + offs_s < count
        row = (first + s0 + offs_s).to(tl.int64) * X + x
        part = tl.load(
            part_acc_ptr + row[:, None] * DV + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0
        ).to(ACC)
        if NORMALIZE:
            m = tl.load(part_m_ptr + row, mask=smask, other=float("-inf")).to(ACC)
            l_part = tl.load(part_l_ptr + row, mask=smask, other=0.0).to(ACC)
            m_new = tl.maximum(m_run, tl.max(m, axis=0))
            m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # no item saw a key yet: keep exp2 finite
            w = tl.where(m > float("-inf"), tl.exp2(m - m_use), 0.0)
            alpha = tl.exp2(m_run - m_use)
            l_run = l_run * alpha + tl.sum(w * l_part, axis=0)
            acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
            m_run = m_new
        else:
            acc += tl.sum(part, axis=0)
    if NORMALIZE:
        has = l_run > 0
        safe = tl.where(has, l_run, 1.0)
        out = tl.where(has, acc / safe, 0.0)
        m_fin = tl.where(m_run > float("-inf"), m_run, 0.0)
        lse = tl.where(has, (m_fin + tl.log2(safe)) * tl.full([], LN2, ACC), float("-inf"))
        if d_block == 0:
            tl.store(lse_ptr + b * X + x, lse)
    else:
        out = acc
    tl.store(out_ptr + (b * X + x) * DV + offs_d, out, mask=dmask)


def combine_items(
    plan: WorkPlan,
    part_acc: torch.Tensor,
    part_m: torch.Tensor | None,
    part_l: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reduce ``[bound, X, DV]`` item partials to ``([B, X, DV], lse [B, X] or None)``.

    With ``part_m``/``part_l`` the partials are softmax-normalized (log-sum-exp merge); without, they are summed.
    A sample without items gets zeros (and lse -inf).
    """
    batch = plan.first.numel()
    _, x_dim, dv = part_acc.shape
    device = part_acc.device
    out = torch.empty(batch, x_dim, dv, device=device, dtype=out_dtype)
    normalize = part_m is not None
    lse = torch.empty(batch, x_dim, device=device, dtype=part_acc.dtype) if normalize else None
    if batch == 0 or x_dim == 0:
        return out, lse
    ensure_launchable(_combine_items_kernel, device)
    dummy = part_acc
    block_dv = min(next_pow2(dv), 256)
    _combine_items_kernel[(batch, x_dim, triton.cdiv(dv, block_dv))](
        part_acc,
        part_m if normalize else dummy,
        part_l if normalize else dummy,
        plan.first,
        plan.count,
        out,
        lse if normalize else dummy,
        x_dim,
        dv,
        NORMALIZE=normalize,
        BLOCK_S=max(2, min(16, next_pow2(plan.max_items))),
        BLOCK_DV=block_dv,
        ACC=acc_dtype(part_acc.dtype),
    )
    return out, lse


def sum_items(plan: WorkPlan, part: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-sample sums ``[B, *rest]`` of item partials ``[bound, *rest]`` (deterministic order)."""
    rest = part.shape[1:]
    flat = part.reshape(part.shape[0], 1, -1)
    out, _ = combine_items(plan, flat, None, None, out_dtype)
    return out.reshape(plan.first.numel(), *rest)
