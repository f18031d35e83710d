"""Triton GSU top-K: score every behavior of a jagged prefix against the target and keep the best K.

Design (two passes, split over L):

1. ``_gsu_split_kernel``, grid ``(B, S)``: program ``(b, s)`` walks the tiles ``s, s + S, s + 2S, ...`` of sample
   ``b`` counted from the newest, ``BLOCK_L`` behaviors per tile. Per tile it gathers the behavior vectors (table
   rows by id, or rows of a jagged tensor; int8 rows are dequantized in registers, so no ``[B, L, D]`` tensor ever
   exists), computes the scores in fp32 (fp64 for fp64 inputs), and packs each (score, position) into one int64 key
   whose order is "score, then recency" (``pack_keys``). The program keeps a running top-K of keys in registers.
   A tile is merged only when its best key beats the running K-th key (threshold test), so after the first few
   tiles most tiles cost just the loads: the kernel stays bandwidth-bound. Walking newest-first makes the
   category mode (all matches score 1) stop merging once K recent matches are held.
2. ``_gsu_merge_kernel``, grid ``(B,)``: merges the S partial lists and decodes positions and scores. With S = 1
   the first pass writes the result itself.

Top-K in registers uses bitonic networks on the int64 keys: Triton's ``tl.topk`` for a tile's best ``K_PAD`` keys
(sorted), then ``merge_topk`` (one bitonic merge) with the running list. ``K_PAD`` is K rounded up to a power of two
(at least 2) and the tile is at least ``K_PAD`` wide.
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
from .config import get_config, next_pow2, num_splits

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
def _gsu_split_kernel(
    offsets_ptr,
    target_ptr,  # [B, D] (cosine, dot)
    ids_ptr,  # [total_L] row ids into emb (USE_IDS)
    emb_ptr,  # [N, D] table (USE_IDS) or [total_L, D] jagged behavior vectors
    scale_ptr,  # [N] per-row or [1] global dequantization scale
    tcat_ptr,  # [B] target category (category mode)
    bcat_ptr,  # [total_L] behavior categories (category mode)
    part_ptr,  # [B, S, K_PAD] int64 keys
    pos_ptr,  # [B, K] int64 (S == 1)
    score_ptr,  # [B, K] float32 (S == 1)
    D,
    K,
    stride_target,
    stride_emb,
    n_splits,
    zero_score,
    MODE: tl.constexpr,  # 0 cosine, 1 dot, 2 category
    USE_IDS: tl.constexpr,
    SCALE_MODE: tl.constexpr,  # 0 none, 1 global, 2 per row
    HAS_ZERO_SCORE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr,
    FINAL: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(offsets_ptr + b)
    length = tl.load(offsets_ptr + b + 1) - start
    n_tiles = tl.cdiv(length, BLOCK_L)
    n_iter = tl.cdiv(tl.maximum(n_tiles - split, 0), n_splits)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    run = tl.full([K_PAD], SENTINEL, tl.int64)

    q_inv = tl.full([], 1.0, ACC)
    if MODE == 0:
        qsq = tl.zeros([BLOCK_D], ACC)
        for d0 in range(0, D, BLOCK_D):
            q = tl.load(target_ptr + b * stride_target + d0 + offs_d, mask=d0 + offs_d < D, other=0.0).to(ACC)
            qsq += q * q
        q_inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(qsq, axis=0)), _EPS)
    tcat = 0
    if MODE == 2:
        tcat = tl.load(tcat_ptr + b)

    for it in range(0, n_iter):
        tile = n_tiles - 1 - (split + it * n_splits)  # newest tiles first
        pos = tile * BLOCK_L + offs_l
        valid = pos < length
        row = start + pos
        if MODE == 2:
            cat = tl.load(bcat_ptr + row, mask=valid, other=0)
            score = tl.where(cat == tcat, 1.0, float("-inf")).to(tl.float32)
        else:
            if USE_IDS:
                erow = tl.load(ids_ptr + row, mask=valid, other=0).to(tl.int64)
            else:
                erow = row.to(tl.int64)
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
        key = pack_keys(score, pos)
        key = tl.where(valid & (score > float("-inf")), key, SENTINEL)
        if tl.max(key, axis=0) > tl.min(run, axis=0):
            run = merge_topk(run, tl.topk(key, K_PAD))

    if FINAL:
        _write_topk(run, pos_ptr, score_ptr, b, K, K_PAD)
    else:
        tl.store(part_ptr + (b * n_splits + split) * K_PAD + tl.arange(0, K_PAD), run)


@triton.jit
def _gsu_merge_kernel(part_ptr, pos_ptr, score_ptr, n_splits, K, K_PAD: tl.constexpr):
    b = tl.program_id(0)
    offs_k = tl.arange(0, K_PAD)
    run = tl.load(part_ptr + b * n_splits * K_PAD + offs_k)
    for s in range(1, n_splits):
        cand = tl.load(part_ptr + (b * n_splits + s) * K_PAD + offs_k)
        if tl.max(cand, axis=0) > tl.min(run, axis=0):
            run = merge_topk(run, cand)
    _write_topk(run, pos_ptr, score_ptr, b, K, K_PAD)


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
    """Launch the two passes. Arguments are validated by ``kernels.gsu_topk``; ``scale`` is None, a 1-element
    tensor (global) or ``[N]`` (``scale_per_row``)."""
    batch = offsets.numel() - 1
    device = offsets.device
    positions = torch.full((batch, k), -1, dtype=torch.int64, device=device)
    scores = torch.zeros((batch, k), dtype=torch.float32, device=device)
    if batch == 0 or k == 0 or max_len == 0:
        return positions, scores
    ensure_launchable(_gsu_split_kernel, device)
    cfg = get_config()
    k_pad = max(next_pow2(k), 2)  # tl.topk needs k >= 2
    block_l = max(cfg.block_l or 128, k_pad)
    splits = num_splits(max_len, block_l, batch, device)

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
    part = torch.empty((batch, splits, k_pad), dtype=torch.int64, device=device) if splits > 1 else dummy
    if cfg.num_warps is not None:
        num_warps = cfg.num_warps
    else:
        num_warps = 8 if block_l * block_d >= 16384 else 4
    _gsu_split_kernel[(batch, splits)](
        offsets,
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
        splits,
        float(zero_vector_score) if zero_vector_score is not None else 0.0,
        MODE=mode_id,
        USE_IDS=behavior_ids is not None,
        SCALE_MODE=scale_mode,
        HAS_ZERO_SCORE=zero_vector_score is not None,
        ACC=acc_dtype(dtype),
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        K_PAD=k_pad,
        FINAL=splits == 1,
        num_warps=num_warps,
    )
    if splits > 1:
        _gsu_merge_kernel[(batch,)](part, positions, scores, splits, k, K_PAD=k_pad, num_warps=4)
    return positions, scores
