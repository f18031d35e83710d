"""Triton GSU top-K: score every behavior of a jagged prefix against the target and keep the best K.

Design (length-balanced work items, `kernels.triton.schedule`; three launches):

1. ``_gsu_items_kernel``, grid ``(programs,)``: each persistent program takes work items (at most ``chunk`` rows of
   one sample) and walks an item's ``BLOCK_L`` tiles newest first. Per tile it gathers the behavior vectors (table
   rows by id, or rows of a jagged tensor; int8 rows are dequantized in registers, so no ``[B, L, D]`` tensor ever
   exists), computes the scores in fp32 (fp64 for fp64 inputs), and packs each (score, position) into one int64 key
   whose order is "score, then recency" (``pack_keys``). The program keeps the item's running top-K of keys in
   registers (``K_PAD`` = K rounded up to a power of two) and the running K-th key as a threshold.
   **Streaming selection**: a tile's keys are compared with the threshold first; only the ones that can still enter
   the top K are sorted. With few of them (at most ``SMALL``, the usual case once the list is warm: among n scores
   seen, a new one enters with probability K / n) a ``SMALL``-wide ``tl.topk`` picks them; otherwise one as wide as
   the tile (or ``K_PAD`` if smaller). Either way one bitonic merge inserts them into the running list. The tile size
   is thus independent of K. A sample with one item writes its result directly; otherwise the item's list goes to
   the partials ``[bound, K_PAD]``.
2. ``_gsu_tree_kernel``, one launch per level ``s = 1, 2, 4, ...`` (up to the most items of a sample by
   ``max_len``): item ``c`` of a sample with ``c % 2s == 0`` merges item ``c + s`` into its list; every merge of a
   level runs in parallel.
3. ``_gsu_final_kernel``, grid ``(B,)``: merges what the tree left (only if ``max_len`` understated the longest
   sample) and decodes positions and scores.

Tiles, warps and pipeline stages are autotuned per (mode, ids, scale mode, D bucket, K_PAD, dtype) (`_tune`).
Limit: K <= ``MAX_K`` (256); beyond it the dispatcher uses the reference. Positions must be < 2**31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    SENTINEL,
    acc_dtype,
    ensure_launchable,
    merge_topk,
    pack_keys,
    unpack_keys,
)
from ._tune import Tuned, configs
from .config import next_pow2
from .schedule import item_span, plan_work

MAX_K = 256
_MODES = {"cosine": 0, "dot": 1, "category": 2}
_EPS = tl.constexpr(1e-12)  # F.normalize's eps: a vector's norm is max(||x||, eps)


@triton.jit
def _write_topk(run, pos_ptr, score_ptr, b, K, K_PAD: tl.constexpr):
    pos, score = unpack_keys(run)
    offs_k = tl.arange(0, K_PAD)
    kmask = offs_k < K
    tl.store(pos_ptr + b * K + offs_k, pos, mask=kmask)
    tl.store(score_ptr + b * K + offs_k, score, mask=kmask)


@triton.jit
def _pad_to(cand, SMALL: tl.constexpr, K_PAD: tl.constexpr):
    """A sorted ``[SMALL]`` list as a ``[K_PAD]`` list (its keys first, then empty slots)."""
    if SMALL == K_PAD:
        return cand
    else:
        rows = tl.arange(0, K_PAD // SMALL)
        return tl.reshape(tl.where((rows == 0)[:, None], cand[None, :], SENTINEL), [K_PAD])


@triton.jit
def _gsu_items_kernel(
    offsets_ptr,
    items_ptr,  # [n_items, 2] int32: (sample, chunk); sample -1 = empty slot
    count_ptr,  # [B]: items per sample
    target_ptr,  # [B, D] (cosine, dot)
    ids_ptr,  # [total_L] row ids into emb (USE_IDS)
    emb_ptr,  # [N, D] table (USE_IDS) or [total_L, D] jagged behavior vectors
    scale_ptr,  # [N] per-row or [1] global dequantization scale
    tcat_ptr,  # [B] target category (category mode)
    bcat_ptr,  # [total_L] behavior categories (category mode)
    part_ptr,  # [n_items, K_PAD] int64 keys
    pos_ptr,  # [B, K] int64
    score_ptr,  # [B, K] float32
    D,
    K,
    stride_target,
    stride_emb,
    n_items,
    n_programs,
    chunk,
    zero_score,
    MODE: tl.constexpr,  # 0 cosine, 1 dot, 2 category
    USE_IDS: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0 none, 1 global, 2 per row
    HAS_ZERO_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, K_PAD)
    WIDE: tl.constexpr = BLOCK_L if BLOCK_L < K_PAD else K_PAD
    SMALL: tl.constexpr = WIDE if WIDE < 16 else 16
    for item in range(pid, n_items, n_programs):
        b, start, lo, hi = item_span(items_ptr, offsets_ptr, item, chunk)
        if b >= 0:
            n_tiles = tl.cdiv(hi - lo, BLOCK_L)
            q_inv = tl.full([], 1.0, ACC)
            if MODE == 0:
                qsq = tl.zeros([BLOCK_D], ACC)
                for d0 in range(0, D, BLOCK_D):
                    q = tl.load(target_ptr + b * stride_target + d0 + offs_d, mask=d0 + offs_d < D, other=0.0)
                    qsq += q.to(ACC) * q.to(ACC)
                q_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(qsq, axis=0)), _EPS)
            tcat = 0
            if MODE == 2:
                tcat = tl.load(tcat_ptr + b)
            run = tl.full([K_PAD], SENTINEL, tl.int64)
            kth = tl.full([], SENTINEL, tl.int64)  # the running K-th best key: a key must beat it to enter
            for t in tl.range(0, n_tiles, num_stages=STAGES):
                pos = lo + (n_tiles - 1 - t) * BLOCK_L + offs_l  # newest tiles first
                valid = pos < hi
                row = start + pos
                if MODE == 2:
                    cat = tl.load(bcat_ptr + row, mask=valid, other=0)
                    score = tl.where(cat == tcat, 1.0, float("-inf")).to(tl.float32)
                else:
                    if USE_IDS:
                        erow = tl.load(ids_ptr + row, mask=valid, other=0).to(tl.int64)
                    else:
                        erow = row
                    if SCALE_MODE == 2:
                        rscale = tl.load(scale_ptr + erow, mask=valid, other=0.0).to(ACC)
                    elif SCALE_MODE == 1:
                        rscale = tl.zeros([BLOCK_L], ACC) + tl.load(scale_ptr).to(ACC)
                    dot = tl.zeros([BLOCK_L], ACC)
                    esq = tl.zeros([BLOCK_L], ACC)
                    for d0 in range(0, D, BLOCK_D):
                        dmask = d0 + offs_d < D
                        q = tl.load(target_ptr + b * stride_target + d0 + offs_d, mask=dmask, other=0.0).to(ACC)
                        e = tl.load(
                            emb_ptr + erow[:, None] * stride_emb + (d0 + offs_d)[None, :],
                            mask=valid[:, None] & dmask[None, :],
                            other=0.0,
                        ).to(ACC)
                        if SCALE_MODE != 0:
                            e = e * rscale[:, None]
                        dot += tl.sum(e * q[None, :], axis=1)
                        if MODE == 0:
                            esq += tl.sum(e * e, axis=1)
                    if MODE == 0:
                        score = dot * q_inv * (1.0 / tl.maximum(tl.sqrt(esq), _EPS))
                        if HAS_ZERO_SCORE:
                            score = tl.where(esq == 0, zero_score, score)
                    else:
                        score = dot
                    score = score.to(tl.float32)
                key = pack_keys(score, pos)  # pos: the position within the sample
                enter = valid & (score > float("-inf")) & (key > kth)
                n_enter = tl.sum(enter.to(tl.int32), axis=0)
                if n_enter > 0:
                    key = tl.where(enter, key, SENTINEL)
                    if n_enter <= SMALL:
                        cand = _pad_to(tl.topk(key, SMALL), SMALL, K_PAD)
                    else:
                        cand = _pad_to(tl.topk(key, WIDE), WIDE, K_PAD)
                    run = merge_topk(run, cand)
                    kth = tl.max(tl.where(offs_k == K - 1, run, SENTINEL), axis=0)
            if tl.load(count_ptr + b) == 1:
                _write_topk(run, pos_ptr, score_ptr, b, K, K_PAD)
            else:
                tl.store(part_ptr + item * K_PAD + offs_k, run)


@triton.jit
def _gsu_tree_kernel(part_ptr, items_ptr, count_ptr, stride, K_PAD: tl.constexpr):
    """One level of the tree merge: item c (c % 2·stride == 0) of a sample takes item c + stride into its list."""
    item = tl.program_id(0)
    b = tl.load(items_ptr + 2 * item)
    c = tl.load(items_ptr + 2 * item + 1)
    if b >= 0:
        if (c % (2 * stride) == 0) & (c + stride < tl.load(count_ptr + b)):
            offs_k = tl.arange(0, K_PAD)
            run = tl.load(part_ptr + item.to(tl.int64) * K_PAD + offs_k)
            cand = tl.load(part_ptr + (item + stride).to(tl.int64) * K_PAD + offs_k)
            if tl.max(cand, axis=0) > tl.min(run, axis=0):
                tl.store(part_ptr + item.to(tl.int64) * K_PAD + offs_k, merge_topk(run, cand))


@triton.jit
def _gsu_final_kernel(part_ptr, first_ptr, count_ptr, pos_ptr, score_ptr, K, merged, K_PAD: tl.constexpr):
    """Per sample with several items: the tree's root list, plus any items past the tree's ``merged`` span."""
    b = tl.program_id(0)
    count = tl.load(count_ptr + b)
    if count > 1:
        first = tl.load(first_ptr + b)
        offs_k = tl.arange(0, K_PAD)
        run = tl.load(part_ptr + first * K_PAD + offs_k)
        for s in range(merged, count, merged):
            cand = tl.load(part_ptr + (first + s) * K_PAD + offs_k)
            if tl.max(cand, axis=0) > tl.min(run, axis=0):
                run = merge_topk(run, cand)
        _write_topk(run, pos_ptr, score_ptr, b, K, K_PAD)


def _fits(config: triton.Config, meta: dict) -> bool:
    """A ``[BLOCK_L, BLOCK_D]`` vector tile per program, within what its warps hold in registers."""
    return config.kwargs["BLOCK_L"] * meta["BLOCK_D"] <= 4096 * config.num_warps


def _default(meta: dict) -> tuple[int, int, int]:
    return 128, (8 if 128 * meta["BLOCK_D"] >= 16384 else 4), 3


_ITEMS = Tuned(
    _gsu_items_kernel,
    configs([64, 128, 256], [4, 8], [2, 3, 4]),
    ["MODE", "USE_IDS", "SCALE_MODE", "HAS_ZERO_SCORE", "BLOCK_D", "K_PAD"],
    _fits,
    _default,
)


def gsu_topk_triton(
    offsets: torch.Tensor,
    k: int,
    mode: str,
    max_len: int,
    target: torch.Tensor | None,
    behavior_ids: torch.Tensor | None,
    vectors: torch.Tensor | None,
    scale: torch.Tensor | None,
    scale_per_row: bool,
    zero_vector_score: float | None,
    target_category: torch.Tensor | None,
    behavior_category: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the passes. Arguments are validated by ``kernels.gsu_topk``; ``scale`` is None, a 1-element tensor
    (global) or ``[N]`` (``scale_per_row``)."""
    batch = offsets.numel() - 1
    device = offsets.device
    positions = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    scores = torch.zeros((batch, k), dtype=torch.float32, device=device)
    if mode == "category":
        assert behavior_category is not None
        total = behavior_category.shape[0]
    else:
        total = behavior_ids.shape[0] if behavior_ids is not None else vectors.shape[0]  # type: ignore[union-attr]
    if batch == 0 or k == 0 or total == 0:
        return positions, scores
    ensure_launchable(_gsu_items_kernel, device)
    plan = plan_work(offsets, total, max_len)
    k_pad = max(next_pow2(k), 2)  # tl.topk needs k >= 2

    mode_id = _MODES[mode]
    dim = 1
    dtype = torch.float32
    if mode_id != 2:
        assert target is not None and vectors is not None
        dim = vectors.shape[1]
        dtype = torch.float64 if torch.float64 in (vectors.dtype, target.dtype) else torch.float32
    scale_mode = 0 if scale is None else (2 if scale_per_row else 1)
    block_d = min(next_pow2(dim), 128 if dtype != torch.float64 else 64)
    dummy = offsets
    part = torch.empty((plan.bound, k_pad), dtype=torch.int64, device=device)
    _ITEMS[(plan.programs,)](
        offsets,
        plan.items,
        plan.count,
        target if target is not None else dummy,
        behavior_ids if behavior_ids is not None else dummy,
        vectors if vectors is not None else dummy,
        scale if scale is not None else dummy,
        target_category if target_category is not None else dummy,
        behavior_category if behavior_category is not None else dummy,
        part,
        positions,
        scores,
        dim,
        k,
        target.stride(0) if target is not None else 0,
        vectors.stride(0) if vectors is not None else 0,
        plan.bound,
        plan.programs,
        plan.chunk,
        float(zero_vector_score) if zero_vector_score is not None else 0.0,
        MODE=mode_id,
        USE_IDS=behavior_ids is not None,
        SCALE_MODE=scale_mode,
        HAS_ZERO_SCORE=zero_vector_score is not None,
        ACC=acc_dtype(dtype),
        BLOCK_D=block_d,
        K_PAD=k_pad,
    )
    stride = 1
    while stride < plan.max_items:
        _gsu_tree_kernel[(plan.bound,)](part, plan.items, plan.count, stride, K_PAD=k_pad, num_warps=4)
        stride *= 2
    _gsu_final_kernel[(batch,)](part, plan.first, plan.count, positions, scores, k, stride, K_PAD=k_pad, num_warps=4)
    return positions, scores
