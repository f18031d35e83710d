"""The DIN attention kernels: the forward over length-balanced work items (online softmax or raw weights, item
partials merged by ``combine_items``) and the recompute backward (``dK``/``dV`` rows and per-item partial parameter
gradients).

Launched by `kernels.triton.din_attention` (``din_attention_fwd_triton`` / ``din_attention_bwd_triton``), whose
docstring describes the algorithm; the shared device functions live in `kernels.triton._din_tile`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LOG2E, mm
from ._din_tile import _act_bwd, _din_params, _din_tile, _din_weights
from .schedule import item_span


@triton.jit
def _din_fwd_kernel(
    k_ptr,  # [N, D]
    v_ptr,  # [N, DV]
    offsets_ptr,
    m_ptr,  # [B, D, H1]
    c_ptr,  # [B, H1]
    w2_ptr,  # [H1, H2]
    b2_ptr,  # [H2]
    wout_ptr,  # [H_last]
    bout_ptr,  # [1]
    alpha1_ptr,
    alpha2_ptr,
    mean1_ptr,
    istd1_ptr,
    mean2_ptr,
    istd2_ptr,
    mask_ptr,  # [N] uint8 (a bool mask's bytes)
    items_ptr,  # [n_items, 2] int32: (sample, chunk); sample -1 = empty slot
    part_acc_ptr,  # [n_items, 1, DV]
    part_m_ptr,  # [n_items, 1]
    part_l_ptr,  # [n_items, 1]
    D,
    DV,
    H1,
    H2,
    n_items,
    n_programs,
    chunk,
    stride_kn,
    stride_vn,
    NUM_HIDDEN: tl.constexpr,
    ACT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    softmax_scale,  # fp32 runtime scalar: a new value does not recompile
    HAS_MASK: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    for item in range(pid, n_items, n_programs):
        b, start, lo, hi = item_span(items_ptr, offsets_ptr, item, chunk)
        if b >= 0:
            offs_l = tl.arange(0, BLOCK_L)
            offs_dv = tl.arange(0, BLOCK_DV)
            dvmask = offs_dv < DV
            c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2 = _din_params(
                c_ptr, b2_ptr, wout_ptr, bout_ptr, alpha1_ptr, alpha2_ptr, mean1_ptr, istd1_ptr, mean2_ptr, istd2_ptr,
                b, H1, H2, NUM_HIDDEN, ACT, ACC, BLOCK_H1, BLOCK_H2,
            )  # fmt: skip
            mb, w2 = _din_weights(m_ptr, w2_ptr, b, D, H1, H2, NUM_HIDDEN, DOT, BLOCK_D, BLOCK_H1, BLOCK_H2)
            coef = tl.zeros([], ACC) + softmax_scale * LOG2E

            m = tl.full([], float("-inf"), ACC)
            l_sum = tl.zeros([], ACC)
            acc = tl.zeros([BLOCK_DV], ACC)
            for t0 in tl.range(lo, hi, BLOCK_L, num_stages=STAGES):
                pos = t0 + offs_l
                row = start + pos
                valid = pos < hi
                if HAS_MASK:
                    valid = valid & (tl.load(mask_ptr + row, mask=valid, other=0) != 0)
                _kt, _pre1, _h1, _pre2, _h2, score = _din_tile(
                    k_ptr, mb, w2, row, valid, c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2,
                    D, H1, H2, stride_kn, NUM_HIDDEN, ACT, DOT, ACC, TF32, BLOCK_D, BLOCK_H1, BLOCK_H2,
                )  # fmt: skip
                vt = tl.load(
                    v_ptr + row[:, None] * stride_vn + offs_dv[None, :],
                    mask=valid[:, None] & dvmask[None, :],
                    other=0.0,
                ).to(ACC)
                if SOFTMAX:
                    s = tl.where(valid, score * coef, float("-inf"))
                    m_new = tl.maximum(m, tl.max(s, axis=0))  # -inf only while every behavior so far was masked out
                    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # keeps exp2 away from -inf - -inf
                    alpha = tl.exp2(m - m_use)
                    p = tl.exp2(s - m_use)
                    l_sum = l_sum * alpha + tl.sum(p, axis=0)
                    acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
                    m = m_new
                else:
                    w = tl.where(valid, score, 0.0)
                    acc += tl.sum(w[:, None] * vt, axis=0)

            x = item
            tl.store(part_acc_ptr + x * DV + offs_dv, acc, mask=dvmask)
            if SOFTMAX:
                tl.store(part_m_ptr + x, m)
                tl.store(part_l_ptr + x, l_sum)


@triton.jit
def _din_bwd_kernel(
    k_ptr,
    v_ptr,
    offsets_ptr,
    m_ptr,
    c_ptr,
    w2_ptr,
    b2_ptr,
    wout_ptr,
    bout_ptr,
    alpha1_ptr,
    alpha2_ptr,
    mean1_ptr,
    istd1_ptr,
    mean2_ptr,
    istd2_ptr,
    mask_ptr,
    items_ptr,
    dout_ptr,  # [B, DV]
    lse_ptr,  # [B] (softmax)
    delta_ptr,  # [B] (softmax): sum(dout * out)
    dk_ptr,  # [N, D]
    dv_ptr,  # [N, DV]
    dm_part_ptr,  # [n_items, D, H1]
    dc_part_ptr,  # [n_items, H1]
    dw2_part_ptr,  # [n_items, H1, H2]
    db2_part_ptr,  # [n_items, H2]
    dwout_part_ptr,  # [n_items, H_last]
    dbout_part_ptr,  # [n_items]
    dalpha1_part_ptr,  # [n_items, H1]
    dalpha2_part_ptr,  # [n_items, H2]
    D,
    DV,
    H1,
    H2,
    n_items,
    n_programs,
    chunk,
    stride_kn,
    stride_vn,
    NUM_HIDDEN: tl.constexpr,
    ACT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    softmax_scale,  # fp32 runtime scalar: a new value does not recompile
    HAS_MASK: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    for item in range(pid, n_items, n_programs):
        b, start, lo, hi = item_span(items_ptr, offsets_ptr, item, chunk)
        if b >= 0:
            offs_l = tl.arange(0, BLOCK_L)
            offs_d = tl.arange(0, BLOCK_D)
            offs_dv = tl.arange(0, BLOCK_DV)
            offs_h1 = tl.arange(0, BLOCK_H1)
            offs_h2 = tl.arange(0, BLOCK_H2)
            dmask = offs_d < D
            dvmask = offs_dv < DV
            h1mask = offs_h1 < H1
            h2mask = offs_h2 < H2
            c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2 = _din_params(
                c_ptr, b2_ptr, wout_ptr, bout_ptr, alpha1_ptr, alpha2_ptr, mean1_ptr, istd1_ptr, mean2_ptr, istd2_ptr,
                b, H1, H2, NUM_HIDDEN, ACT, ACC, BLOCK_H1, BLOCK_H2,
            )  # fmt: skip
            dout = tl.load(dout_ptr + b * DV + offs_dv, mask=dvmask, other=0.0).to(ACC)
            coef = tl.zeros([], ACC) + softmax_scale * LOG2E
            lse2 = tl.zeros([], ACC)
            delta = tl.zeros([], ACC)
            if SOFTMAX:
                lse2 = tl.load(lse_ptr + b).to(ACC) * tl.full([], LOG2E, ACC)
                delta = tl.load(delta_ptr + b).to(ACC)

            dm = tl.zeros([BLOCK_D, BLOCK_H1], ACC)
            dc = tl.zeros([BLOCK_H1], ACC)
            dw2 = tl.zeros([BLOCK_H1, BLOCK_H2], ACC)
            db2 = tl.zeros([BLOCK_H2], ACC)
            dalpha1 = tl.zeros([BLOCK_H1], ACC)
            dalpha2 = tl.zeros([BLOCK_H2], ACC)
            if NUM_HIDDEN == 2:
                dwout = tl.zeros([BLOCK_H2], ACC)
            else:
                dwout = tl.zeros([BLOCK_H1], ACC)
            dbout = tl.zeros([BLOCK_L], ACC)
            mb, w2 = _din_weights(m_ptr, w2_ptr, b, D, H1, H2, NUM_HIDDEN, DOT, BLOCK_D, BLOCK_H1, BLOCK_H2)
            for t0 in tl.range(lo, hi, BLOCK_L, num_stages=STAGES):
                pos = t0 + offs_l
                row = start + pos
                inside = pos < hi  # rows this item writes (masked-out rows get zero gradients)
                valid = inside
                if HAS_MASK:
                    valid = valid & (tl.load(mask_ptr + row, mask=inside, other=0) != 0)
                kt, pre1, h1, pre2, h2, score = _din_tile(
                    k_ptr, mb, w2, row, valid, c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2,
                    D, H1, H2, stride_kn, NUM_HIDDEN, ACT, DOT, ACC, TF32, BLOCK_D, BLOCK_H1, BLOCK_H2,
                )  # fmt: skip
                vt = tl.load(
                    v_ptr + row[:, None] * stride_vn + offs_dv[None, :],
                    mask=valid[:, None] & dvmask[None, :],
                    other=0.0,
                ).to(ACC)
                if SOFTMAX:
                    w = tl.where(valid, tl.exp2(score * coef - lse2), 0.0)
                else:
                    w = tl.where(valid, score, 0.0)
                tl.store(
                    dv_ptr + row[:, None] * DV + offs_dv[None, :],
                    w[:, None] * dout[None, :],
                    mask=inside[:, None] & dvmask[None, :],
                )
                dw = tl.sum(vt * dout[None, :], axis=1)  # dLoss / d(weight)
                if SOFTMAX:
                    ds = (tl.zeros([], ACC) + softmax_scale) * w * (dw - delta)
                else:
                    ds = tl.where(valid, dw, 0.0)
                dbout += ds
                dlast = ds[:, None] * wout[None, :]
                if NUM_HIDDEN == 2:
                    dwout += tl.sum(ds[:, None] * h2, axis=0)
                    dpre2, da2 = _act_bwd(pre2, h2, dlast, alpha2, mean2, istd2, ACT)
                    dalpha2 += tl.sum(da2, axis=0)
                    dw2 += mm(tl.trans(h1), dpre2, True, DOT, ACC, TF32)
                    db2 += tl.sum(dpre2, axis=0)
                    dh1 = mm(dpre2, tl.trans(w2), True, DOT, ACC, TF32)
                else:
                    dwout += tl.sum(ds[:, None] * h1, axis=0)
                    dh1 = dlast
                dpre1, da1 = _act_bwd(pre1, h1, dh1, alpha1, mean1, istd1, ACT)
                dalpha1 += tl.sum(da1, axis=0)
                dm += mm(tl.trans(kt), dpre1, True, DOT, ACC, TF32)
                dc += tl.sum(dpre1, axis=0)
                dk_t = mm(dpre1, tl.trans(mb), True, DOT, ACC, TF32)
                tl.store(dk_ptr + row[:, None] * D + offs_d[None, :], dk_t, mask=inside[:, None] & dmask[None, :])

            x = item
            tl.store(
                dm_part_ptr + (x * D + offs_d[:, None]).to(tl.int64) * H1 + offs_h1[None, :],
                dm,
                mask=dmask[:, None] & h1mask[None, :],
            )
            tl.store(dc_part_ptr + x * H1 + offs_h1, dc, mask=h1mask)
            tl.store(dbout_part_ptr + x, tl.sum(dbout, axis=0))
            if ACT >= 2:
                tl.store(dalpha1_part_ptr + x * H1 + offs_h1, dalpha1, mask=h1mask)
            if NUM_HIDDEN == 2:
                tl.store(
                    dw2_part_ptr + (x * H1 + offs_h1[:, None]) * H2 + offs_h2[None, :],
                    dw2,
                    mask=h1mask[:, None] & h2mask[None, :],
                )
                tl.store(db2_part_ptr + x * H2 + offs_h2, db2, mask=h2mask)
                tl.store(dwout_part_ptr + x * H2 + offs_h2, dwout, mask=h2mask)
                if ACT >= 2:
                    tl.store(dalpha2_part_ptr + x * H2 + offs_h2, dalpha2, mask=h2mask)
            else:
                tl.store(dwout_part_ptr + x * H1 + offs_h1, dwout, mask=h1mask)
