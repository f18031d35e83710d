"""Triton jagged target attention: split-L forward (flash-decoding) and a recompute backward.

Forward, grid ``(B, S, H)``: program ``(b, s, h)`` takes the tiles ``s, s + S, ...`` (``BLOCK_L`` keys each) of
sample b, keeps an online softmax (running max ``m``, sum ``l`` and weighted value sum, base-2 exponentials) for all
Q queries of head h, and writes its partial; ``combine_splits`` merges the S partials with a log-sum-exp reduction
and also returns the log-sum-exp, which the backward reuses. Keys and values are read once per (sample, head), in
coalesced ``[BLOCK_L, D]`` tiles; everything accumulates in fp32 (fp64 for fp64 inputs).

Scores use ``tl.dot`` when the queries fill a 16-row tile (``Q >= 16``; 16-bit operands on tensor cores), otherwise
a broadcast multiply-reduce, which is what a memory-bound Q = 1..8 decode wants.

Backward, grid ``(B, S)``: program ``(b, s)`` walks the same tiles for every head, recomputes the probabilities from
the saved log-sum-exp (no ``[B, L]`` probability tensor is stored) and writes ``dK``, ``dV`` and ``dBias`` rows it
owns, plus per-split partial ``dQ`` and ``dTemperature`` that are summed on the host (deterministic, no atomics).
The bias gradient is written per head and summed over heads on the host.

An optional bool behavior mask (read as its uint8 bytes) drops behaviors: they take no weight in the forward (a tile
or sample with no live key keeps the running max at -inf and contributes nothing) and get zero gradients.

Limits (else the dispatcher uses the reference): Dk, Dv <= 256, Q <= 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LN2, LOG2E, acc_dtype, allow_tf32, combine_splits, dot_dtype, ensure_launchable, mm
from .config import get_config, next_pow2, num_splits

MAX_HEAD_DIM = 256
MAX_QUERIES = 64


@triton.jit
def _ta_fwd_kernel(
    q_ptr,  # [B, Q, H, DK]
    k_ptr,  # [N, H, DK]
    v_ptr,  # [N, H, DV]
    bias_ptr,  # [N] or [N, Q]
    tau_ptr,  # [B]
    mask_ptr,  # [N] uint8 (a bool mask's bytes)
    offsets_ptr,
    part_acc_ptr,  # [B, S, Q * H, DV]
    part_m_ptr,  # [B, S, Q * H]
    part_l_ptr,  # [B, S, Q * H]
    Q,
    H,
    DK,
    DV,
    n_splits,
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
    USE_DOT: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(offsets_ptr + b)
    length = tl.load(offsets_ptr + b + 1) - start
    n_iter = tl.cdiv(tl.maximum(tl.cdiv(length, BLOCK_L) - split, 0), n_splits)

    offs_l = tl.arange(0, BLOCK_L)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qmask = offs_q < Q
    dkmask = offs_dk < DK
    dvmask = offs_dv < DV

    q = tl.load(
        q_ptr + b * stride_qb + offs_q[:, None] * stride_qq + h * stride_qh + offs_dk[None, :],
        mask=qmask[:, None] & dkmask[None, :],
        other=0.0,
    )
    # base-2 logits: exp2(x * log2(e)) = exp(x). Typed constants: a bare Python float would be rounded to fp32.
    coef = tl.zeros([], ACC) + scale * LOG2E
    bias_coef = tl.full([], LOG2E, ACC)
    if HAS_TAU:
        inv_tau = 1.0 / tl.load(tau_ptr + b).to(ACC)
        coef = coef * inv_tau
        bias_coef = bias_coef * inv_tau

    m = tl.full([BLOCK_Q], float("-inf"), ACC)
    l_sum = tl.zeros([BLOCK_Q], ACC)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], ACC)
    for it in range(0, n_iter):
        pos = (split + it * n_splits) * BLOCK_L + offs_l
        row = (start + pos).to(tl.int64)
        valid = pos < length
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + row, mask=valid, other=0) != 0)
        kt = tl.load(
            k_ptr + row[:, None] * stride_kn + h * stride_kh + offs_dk[None, :],
            mask=valid[:, None] & dkmask[None, :],
            other=0.0,
        )
        s = mm(q, tl.trans(kt), USE_DOT, DOT, ACC, TF32) * coef  # [BLOCK_Q, BLOCK_L]
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
        m = m_new

    x = (b * n_splits + split) * (Q * H) + offs_q * H + h
    tl.store(part_acc_ptr + x[:, None] * DV + offs_dv[None, :], acc, mask=qmask[:, None] & dvmask[None, :])
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
    do_ptr,  # [B, Q, H, DV] contiguous
    lse_ptr,  # [B, Q, H] natural log
    delta_ptr,  # [B, Q, H]: sum(dO * O)
    dq_part_ptr,  # [B, S, Q, H, DK]
    dk_ptr,  # [N, H, DK] contiguous
    dv_ptr,  # [N, H, DV] contiguous
    dbias_ptr,  # [H, N] or [H, N, Q] contiguous
    dtau_part_ptr,  # [B, S]
    Q,
    H,
    DK,
    DV,
    N,
    n_splits,
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
    USE_DOT: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(offsets_ptr + b)
    length = tl.load(offsets_ptr + b + 1) - start
    n_iter = tl.cdiv(tl.maximum(tl.cdiv(length, BLOCK_L) - split, 0), n_splits)

    offs_l = tl.arange(0, BLOCK_L)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    qmask = offs_q < Q
    dkmask = offs_dk < DK
    dvmask = offs_dv < DV

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
        do = tl.load(do_ptr + xq[:, None] * DV + offs_dv[None, :], mask=qmask[:, None] & dvmask[None, :], other=0.0)
        lse2 = tl.load(lse_ptr + xq, mask=qmask, other=0.0).to(ACC) * tl.full([], LOG2E, ACC)
        delta = tl.load(delta_ptr + xq, mask=qmask, other=0.0).to(ACC)
        dq_acc = tl.zeros([BLOCK_Q, BLOCK_DK], ACC)
        for it in range(0, n_iter):
            pos = (split + it * n_splits) * BLOCK_L + offs_l
            row = (start + pos).to(tl.int64)
            inside = pos < length  # rows this program writes (masked-out rows get zero gradients)
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
        dq_offs = (((b * n_splits + split) * Q + offs_q[:, None]) * H + h) * DK + offs_dk[None, :]
        tl.store(dq_part_ptr + dq_offs, dq_acc * (tl.zeros([], ACC) + scale), mask=qmask[:, None] & dkmask[None, :])
    if HAS_TAU:
        # d logit / d tau = -logit / tau; the natural logit is the base-2 one times ln(2).
        tl.store(dtau_part_ptr + b * n_splits + split, -tl.sum(dtau_acc, axis=0) * tl.full([], LN2, ACC) * inv_tau)


def _mask_bytes(mask: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 (the same bytes; no copy)."""
    return mask.view(torch.uint8) if mask is not None else dummy


def _launch_params(query: torch.Tensor, values_dim: int, max_len: int, programs_per_split: int) -> dict:
    cfg = get_config()
    batch, n_query, _, dk = query.shape
    use_dot = cfg.use_dot if cfg.use_dot is not None else n_query >= 16
    block_q = max(next_pow2(n_query), 16 if use_dot else 1)
    block_l = cfg.block_l or (64 if use_dot or dk > 64 else 128)
    splits = num_splits(max_len, block_l, programs_per_split, query.device)
    min_dim = 16 if use_dot else 1  # tl.dot tiles are at least 16 wide
    return {
        "use_dot": use_dot,
        "block_q": block_q,
        "block_dk": max(next_pow2(dk), min_dim),
        "block_dv": max(next_pow2(values_dim), min_dim),
        "block_l": block_l,
        "splits": min(splits, 128),
        "num_warps": cfg.num_warps or 4,
    }


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Q, H, Dv] in the query's dtype, lse [B, Q, H] in the accumulation dtype)``; lse = -inf for an
    empty sample. Shapes are validated by ``kernels.target_attention``."""
    batch, n_query, n_head, dk = query.shape
    dv = values.shape[-1]
    device = query.device
    acc_torch = torch.float64 if query.dtype == torch.float64 else torch.float32
    if batch == 0 or n_query == 0 or n_head == 0:
        return (
            torch.zeros(batch, n_query, n_head, dv, dtype=query.dtype, device=device),
            torch.full((batch, n_query, n_head), float("-inf"), dtype=acc_torch, device=device),
        )
    ensure_launchable(_ta_fwd_kernel, device)
    lp = _launch_params(query, dv, max_len, batch * n_head)
    splits = lp["splits"]
    x_dim = n_query * n_head
    part_acc = torch.empty(batch, splits, x_dim, dv, dtype=acc_torch, device=device)
    part_m = torch.empty(batch, splits, x_dim, dtype=acc_torch, device=device)
    part_l = torch.empty(batch, splits, x_dim, dtype=acc_torch, device=device)
    dummy = offsets
    _ta_fwd_kernel[(batch, splits, n_head)](
        query,
        keys,
        values,
        bias if bias is not None else dummy,
        temperature if temperature is not None else dummy,
        _mask_bytes(mask, dummy),
        offsets,
        part_acc,
        part_m,
        part_l,
        n_query,
        n_head,
        dk,
        dv,
        splits,
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
        USE_DOT=lp["use_dot"],
        DOT=dot_dtype(query.dtype),
        ACC=acc_dtype(query.dtype),
        TF32=allow_tf32(),
        BLOCK_L=lp["block_l"],
        BLOCK_Q=lp["block_q"],
        BLOCK_DK=lp["block_dk"],
        BLOCK_DV=lp["block_dv"],
        num_warps=lp["num_warps"],
    )
    out, lse = combine_splits(part_acc, part_m, part_l, query.dtype)
    assert lse is not None
    return out.view(batch, n_query, n_head, dv), lse.view(batch, n_query, n_head)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dQuery, dKeys, dValues, dBias, dTemperature)`` in the inputs' dtypes."""
    batch, n_query, n_head, dk = query.shape
    total = keys.shape[0]
    dv = values.shape[-1]
    device = query.device
    acc_torch = lse.dtype
    ensure_launchable(_ta_bwd_kernel, device)
    lp = _launch_params(query, dv, max_len, batch)
    splits = lp["splits"]
    grad_out = grad_out.contiguous()
    delta = (grad_out.to(acc_torch) * out.to(acc_torch)).sum(-1).contiguous()  # [B, Q, H]
    dq_part = torch.empty(batch, splits, n_query, n_head, dk, dtype=acc_torch, device=device)
    dkeys = torch.empty(total, n_head, dk, dtype=keys.dtype, device=device)
    dvalues = torch.empty(total, n_head, dv, dtype=values.dtype, device=device)
    dbias_heads = None
    if bias is not None:
        shape = (n_head, total) if bias.dim() == 1 else (n_head, total, n_query)
        dbias_heads = torch.empty(shape, dtype=acc_torch, device=device)
    dtau_part = torch.empty(batch, splits, dtype=acc_torch, device=device) if temperature is not None else None
    dummy = offsets
    if batch > 0 and n_query > 0 and n_head > 0:
        _ta_bwd_kernel[(batch, splits)](
            query,
            keys,
            values,
            bias if bias is not None else dummy,
            temperature if temperature is not None else dummy,
            _mask_bytes(mask, dummy),
            offsets,
            grad_out,
            lse.contiguous(),
            delta,
            dq_part,
            dkeys,
            dvalues,
            dbias_heads if dbias_heads is not None else dummy,
            dtau_part if dtau_part is not None else dummy,
            n_query,
            n_head,
            dk,
            dv,
            total,
            splits,
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
            USE_DOT=lp["use_dot"],
            DOT=dot_dtype(query.dtype),
            ACC=acc_dtype(query.dtype),
            TF32=allow_tf32(),
            BLOCK_L=lp["block_l"],
            BLOCK_Q=lp["block_q"],
            BLOCK_DK=lp["block_dk"],
            BLOCK_DV=lp["block_dv"],
            num_warps=lp["num_warps"],
        )
    else:
        dq_part.zero_()
        dkeys.zero_()
        dvalues.zero_()
        if dbias_heads is not None:
            dbias_heads.zero_()
        if dtau_part is not None:
            dtau_part.zero_()
    dquery = dq_part.sum(1).to(query.dtype)
    dbias = dbias_heads.sum(0).to(bias.dtype) if dbias_heads is not None and bias is not None else None
    dtau = dtau_part.sum(1).to(temperature.dtype) if dtau_part is not None and temperature is not None else None
    return dquery, dkeys, dvalues, dbias, dtau
