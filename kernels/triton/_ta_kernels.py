"""The target attention kernels: the forward over length-balanced work items (online softmax, item partials merged
by ``combine_items``) and the recompute backward (``dK``/``dV``/``dBias`` rows, per-item partial ``dQ`` and
``dTemperature``).

Launched by `kernels.triton.target_attention`, whose docstring describes the algorithm.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LN2, LOG2E, mm
from .schedule import item_span


@triton.jit
def _ta_fwd_kernel(
    q_ptr,  # [B, Q, H, DK]
    k_ptr,  # [N, H, DK]
    v_ptr,  # [N, H, DV]
    bias_ptr,  # [N] or [N, Q]
    tau_ptr,  # [B]
    mask_ptr,  # [N] uint8 (a bool mask's bytes)
    offsets_ptr,
    index_ptr,  # INDEXED: [B * K] int64 row of each selected slot, -1 = empty (offsets are then b * K)
    side_ids_ptr,  # HAS_SIDE: [N] row of the side table for every behavior
    side_ptr,  # HAS_SIDE: [n_side, D2] extra key and value columns of the behaviors, shared by the heads
    items_ptr,  # [n_items, 2] int32: (sample, chunk); sample -1 = empty slot
    part_acc_ptr,  # [n_items, Q * H, DV]
    part_side_ptr,  # HAS_SIDE: [n_items, Q * H, D2]
    part_m_ptr,  # [n_items, Q * H]
    part_l_ptr,  # [n_items, Q * H]
    Q,
    H,
    DK,
    DV,
    D2,
    n_items,
    n_programs,
    chunk,
    stride_qb,
    stride_qq,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_bn,
    stride_bq,
    scale,  # fp32 runtime scalar: a new value does not recompile
    HAS_BIAS: tl.constexpr,
    BIAS_PER_QUERY: tl.constexpr,
    HAS_TAU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INDEXED: tl.constexpr,
    HAS_SIDE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qmask = offs_q < Q
    dkmask = offs_dk < DK
    dvmask = offs_dv < DV
    offs_d2 = tl.arange(0, BLOCK_D2)
    d2mask = offs_d2 < D2
    for item in range(pid, n_items, n_programs):
        b, start, lo, hi = item_span(items_ptr, offsets_ptr, item, chunk)
        if b >= 0:
            q = tl.load(
                q_ptr + b * stride_qb + offs_q[:, None] * stride_qq + h * stride_qh + offs_dk[None, :],
                mask=qmask[:, None] & dkmask[None, :],
                other=0.0,
            )
            if HAS_SIDE:  # the query's last D2 columns meet the side table's
                q2 = tl.load(
                    q_ptr + b * stride_qb + offs_q[:, None] * stride_qq + h * stride_qh + DK + offs_d2[None, :],
                    mask=qmask[:, None] & d2mask[None, :],
                    other=0.0,
                )
            # base-2 logits: exp2(x * log2(e)) = exp(x). Typed constants: a bare Python float is rounded to fp32.
            coef = tl.zeros([], ACC) + scale * LOG2E
            bias_coef = tl.full([], LOG2E, ACC)
            if HAS_TAU:
                inv_tau = 1.0 / tl.load(tau_ptr + b).to(ACC)
                coef = coef * inv_tau
                bias_coef = bias_coef * inv_tau
            m = tl.full([BLOCK_Q], float("-inf"), ACC)
            l_sum = tl.zeros([BLOCK_Q], ACC)
            acc = tl.zeros([BLOCK_Q, BLOCK_DV], ACC)
            acc2 = tl.zeros([BLOCK_Q, BLOCK_D2], ACC)
            for t0 in tl.range(lo, hi, BLOCK_L, num_stages=STAGES):
                pos = t0 + offs_l
                row = start + pos
                valid = pos < hi
                if INDEXED:  # a slot of a selection: its behavior's row, or -1 for an empty slot
                    row = tl.load(index_ptr + row, mask=valid, other=-1)
                    valid = valid & (row >= 0)
                if HAS_MASK:
                    valid = valid & (tl.load(mask_ptr + row, mask=valid, other=0) != 0)
                kt = tl.load(
                    k_ptr + row[:, None] * stride_kn + h * stride_kh + offs_dk[None, :],
                    mask=valid[:, None] & dkmask[None, :],
                    other=0.0,
                )
                s = mm(q, tl.trans(kt), USE_DOT, DOT, ACC, TF32) * coef  # [BLOCK_Q, BLOCK_L]
                if HAS_SIDE:
                    sid = tl.load(side_ids_ptr + row, mask=valid, other=0).to(tl.int64)
                    st = tl.load(
                        side_ptr + sid[:, None] * D2 + offs_d2[None, :],
                        mask=valid[:, None] & d2mask[None, :],
                        other=0.0,
                    )
                    s += mm(q2, tl.trans(st), USE_DOT, DOT, ACC, TF32) * coef
                if HAS_BIAS:
                    if BIAS_PER_QUERY:
                        bt = tl.load(
                            bias_ptr + row[None, :] * stride_bn + offs_q[:, None] * stride_bq,
                            mask=valid[None, :] & qmask[:, None],
                            other=0.0,
                        )
                        s += bt.to(ACC) * bias_coef
                    else:
                        bt = tl.load(bias_ptr + row * stride_bn, mask=valid, other=0.0)
                        s += bt.to(ACC)[None, :] * bias_coef
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))  # -inf only while every key so far was masked out
                m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # keeps exp2 away from -inf - -inf
                alpha = tl.exp2(m - m_use)
                p = tl.exp2(s - m_use[:, None])
                l_sum = l_sum * alpha + tl.sum(p, axis=1)
                vt = tl.load(
                    v_ptr + row[:, None] * stride_vn + h * stride_vh + offs_dv[None, :],
                    mask=valid[:, None] & dvmask[None, :],
                    other=0.0,
                )
                acc = acc * alpha[:, None] + mm(p, vt, USE_DOT, DOT, ACC, TF32)
                if HAS_SIDE:
                    acc2 = acc2 * alpha[:, None] + mm(p, st, USE_DOT, DOT, ACC, TF32)
                m = m_new
            x = item * (Q * H) + offs_q * H + h
            tl.store(part_acc_ptr + x[:, None] * DV + offs_dv[None, :], acc, mask=qmask[:, None] & dvmask[None, :])
            if HAS_SIDE:
                tl.store(
                    part_side_ptr + x[:, None] * D2 + offs_d2[None, :], acc2, mask=qmask[:, None] & d2mask[None, :]
                )
            tl.store(part_m_ptr + x, m, mask=qmask)
            tl.store(part_l_ptr + x, l_sum, mask=qmask)


@triton.jit
def _ta_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    tau_ptr,
    mask_ptr,
    offsets_ptr,
    index_ptr,
    side_ids_ptr,
    side_ptr,
    items_ptr,  # [n_items, 2] int32: (sample, chunk); sample -1 = empty slot
    do_ptr,  # [B, Q, H, DV] contiguous
    do2_ptr,  # HAS_SIDE: [B, Q, H, D2] contiguous, the side columns' output gradient
    lse_ptr,  # [B, Q, H] natural log
    delta_ptr,  # [B, Q, H]: sum(dO * O)
    dq_part_ptr,  # [n_items, Q, H, DK + D2]
    dk_ptr,  # [N, H, DK] contiguous
    dv_ptr,  # [N, H, DV] contiguous
    dside_ptr,  # HAS_SIDE: [rows, H, D2] per (logical) row: the gradient of its side-table row
    dbias_ptr,  # [H, N] or [H, N, Q] contiguous
    dtau_part_ptr,  # [n_items]
    Q,
    H,
    DK,
    DV,
    D2,
    N,
    n_items,
    n_programs,
    chunk,
    stride_qb,
    stride_qq,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_bn,
    stride_bq,
    scale,  # fp32 runtime scalar: a new value does not recompile
    HAS_BIAS: tl.constexpr,
    BIAS_PER_QUERY: tl.constexpr,
    HAS_TAU: tl.constexpr,
    HAS_MASK: tl.constexpr,
    INDEXED: tl.constexpr,
    HAS_SIDE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_l = tl.arange(0, BLOCK_L)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qmask = offs_q < Q
    dkmask = offs_dk < DK
    dvmask = offs_dv < DV
    offs_d2 = tl.arange(0, BLOCK_D2)
    d2mask = offs_d2 < D2
    for item in range(pid, n_items, n_programs):
        b, start, lo, hi = item_span(items_ptr, offsets_ptr, item, chunk)
        if b >= 0:
            coef = tl.zeros([], ACC) + scale * LOG2E
            bias_coef = tl.full([], LOG2E, ACC)
            inv_tau = tl.full([], 1.0, ACC)
            if HAS_TAU:
                inv_tau = 1.0 / tl.load(tau_ptr + b).to(ACC)
                coef = coef * inv_tau
                bias_coef = bias_coef * inv_tau
            dtau_acc = tl.zeros([BLOCK_Q], ACC)
            for h in range(0, H):
                q = tl.load(
                    q_ptr + b * stride_qb + offs_q[:, None] * stride_qq + h * stride_qh + offs_dk[None, :],
                    mask=qmask[:, None] & dkmask[None, :],
                    other=0.0,
                )
                xq = (b * Q + offs_q) * H + h
                if HAS_SIDE:
                    q2 = tl.load(
                        q_ptr + b * stride_qb + offs_q[:, None] * stride_qq + h * stride_qh + DK + offs_d2[None, :],
                        mask=qmask[:, None] & d2mask[None, :],
                        other=0.0,
                    )
                    do2 = tl.load(
                        do2_ptr + xq[:, None] * D2 + offs_d2[None, :], mask=qmask[:, None] & d2mask[None, :], other=0.0
                    )
                do = tl.load(
                    do_ptr + xq[:, None] * DV + offs_dv[None, :], mask=qmask[:, None] & dvmask[None, :], other=0.0
                )
                lse2 = tl.load(lse_ptr + xq, mask=qmask, other=0.0).to(ACC) * tl.full([], LOG2E, ACC)
                delta = tl.load(delta_ptr + xq, mask=qmask, other=0.0).to(ACC)
                dq_acc = tl.zeros([BLOCK_Q, BLOCK_DK], ACC)
                dq2_acc = tl.zeros([BLOCK_Q, BLOCK_D2], ACC)
                for t0 in tl.range(lo, hi, BLOCK_L, num_stages=STAGES):
                    pos = t0 + offs_l
                    row = start + pos
                    slot = row  # the logical row (a selection's slot when INDEXED)
                    inside = pos < hi  # rows this item writes (masked-out rows get zero gradients)
                    if INDEXED:  # a slot of a selection: its behavior's row, or -1 for an empty slot
                        row = tl.load(index_ptr + row, mask=inside, other=-1)
                        inside = inside & (row >= 0)
                    valid = inside
                    if HAS_MASK:
                        valid = valid & (tl.load(mask_ptr + row, mask=inside, other=0) != 0)
                    kt = tl.load(
                        k_ptr + row[:, None] * stride_kn + h * stride_kh + offs_dk[None, :],
                        mask=valid[:, None] & dkmask[None, :],
                        other=0.0,
                    )
                    vt = tl.load(
                        v_ptr + row[:, None] * stride_vn + h * stride_vh + offs_dv[None, :],
                        mask=valid[:, None] & dvmask[None, :],
                        other=0.0,
                    )
                    s = mm(q, tl.trans(kt), USE_DOT, DOT, ACC, TF32) * coef
                    if HAS_SIDE:
                        sid = tl.load(side_ids_ptr + row, mask=valid, other=0).to(tl.int64)
                        st = tl.load(
                            side_ptr + sid[:, None] * D2 + offs_d2[None, :],
                            mask=valid[:, None] & d2mask[None, :],
                            other=0.0,
                        )
                        s += mm(q2, tl.trans(st), USE_DOT, DOT, ACC, TF32) * coef
                    if HAS_BIAS:
                        if BIAS_PER_QUERY:
                            bt = tl.load(
                                bias_ptr + row[None, :] * stride_bn + offs_q[:, None] * stride_bq,
                                mask=valid[None, :] & qmask[:, None],
                                other=0.0,
                            )
                            s += bt.to(ACC) * bias_coef
                        else:
                            bt = tl.load(bias_ptr + row * stride_bn, mask=valid, other=0.0)
                            s += bt.to(ACC)[None, :] * bias_coef
                    live = qmask[:, None] & valid[None, :]
                    p = tl.where(live, tl.exp2(s - lse2[:, None]), 0.0)
                    dp = mm(do, tl.trans(vt), USE_DOT, DOT, ACC, TF32)
                    if HAS_SIDE:
                        dp += mm(do2, tl.trans(st), USE_DOT, DOT, ACC, TF32)
                    ds = p * (dp - delta[:, None])  # dLoss / d(logit)
                    dz = ds * inv_tau  # dLoss / d(scale * q.k + bias)
                    dv_t = mm(tl.trans(p), do, USE_DOT, DOT, ACC, TF32)
                    tl.store(
                        dv_ptr + (row[:, None] * H + h) * DV + offs_dv[None, :],
                        dv_t,
                        mask=inside[:, None] & dvmask[None, :],
                    )
                    dk_t = mm(tl.trans(dz), q, USE_DOT, DOT, ACC, TF32) * (tl.zeros([], ACC) + scale)
                    tl.store(
                        dk_ptr + (row[:, None] * H + h) * DK + offs_dk[None, :],
                        dk_t,
                        mask=inside[:, None] & dkmask[None, :],
                    )
                    dq_acc += mm(dz, kt, USE_DOT, DOT, ACC, TF32)
                    if HAS_SIDE:
                        dst = mm(tl.trans(p), do2, USE_DOT, DOT, ACC, TF32)
                        dst += mm(tl.trans(dz), q2, USE_DOT, DOT, ACC, TF32) * (tl.zeros([], ACC) + scale)
                        tl.store(
                            dside_ptr + (slot[:, None] * H + h) * D2 + offs_d2[None, :],
                            dst,
                            mask=inside[:, None] & d2mask[None, :],
                        )
                        dq2_acc += mm(dz, st, USE_DOT, DOT, ACC, TF32)
                    if HAS_BIAS:
                        if BIAS_PER_QUERY:
                            tl.store(
                                dbias_ptr + (h * N + row[None, :]) * Q + offs_q[:, None],
                                dz,
                                mask=inside[None, :] & qmask[:, None],
                            )
                        else:
                            tl.store(dbias_ptr + h * N + row, tl.sum(dz, axis=0), mask=inside)
                    if HAS_TAU:
                        dtau_acc += tl.sum(ds * s, axis=1)  # s is the base-2 logit
                dq_offs = ((item * Q + offs_q[:, None]) * H + h) * (DK + D2)
                dq_val = dq_acc * (tl.zeros([], ACC) + scale)
                tl.store(dq_part_ptr + dq_offs + offs_dk[None, :], dq_val, mask=qmask[:, None] & dkmask[None, :])
                if HAS_SIDE:
                    dq2_val = dq2_acc * (tl.zeros([], ACC) + scale)
                    tl.store(
                        dq_part_ptr + dq_offs + DK + offs_d2[None, :], dq2_val, mask=qmask[:, None] & d2mask[None, :]
                    )
            if HAS_TAU:
                # d logit / d tau = -logit / tau; the natural logit is the base-2 one times ln(2).
                tl.store(dtau_part_ptr + item, -tl.sum(dtau_acc, axis=0) * tl.full([], LN2, ACC) * inv_tau)
