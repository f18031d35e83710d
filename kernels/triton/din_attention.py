"""Triton DIN attention: the activation-unit MLP, the weighting and the pooling fused, forward and backward.

The first layer never sees ``[q; k; q - k; q * k]``: with ``W_1 = [W_q; W_k; W_d; W_p]`` (four ``[D, H1]`` blocks)

    x @ W_1 + b_1 = k @ (W_k - W_d + diag(q) W_p) + (q @ (W_q + W_d) + b_1) = k @ M_b + c_b

so the caller forms, per sample, ``M_b [D, H1]`` and ``c_b [H1]`` in PyTorch (autograd carries their gradients
back to ``q``, ``W_1`` and ``b_1``), and the kernel computes one ``[BLOCK_L, D] x [D, H1]`` product per tile.

Forward, grid ``(B, S)``: program ``(b, s)`` takes tiles ``s, s + S, ...`` of sample b: hidden layers (1 or 2, each
a ``tl.dot``), the score, then either raw weights (DIN paper) or an online softmax, and the weighted sum of the
values; ``combine_splits`` merges the S partials (log-sum-exp merge for softmax, a sum otherwise).
``M_b`` and ``W_2`` are loaded once per program (they are the same for every tile of the sample).
Backward, grid ``(B, S)``: recomputes each tile, writes ``dK``/``dV`` rows, and per-program partial gradients of
``M_b``, ``c_b``, the later layers and the activation slopes, summed on the host (no atomics).

An optional bool behavior mask (read as its uint8 bytes) drops behaviors: no weight, zero gradients.

Activations: sigmoid, relu, prelu, and dice with given statistics (inference); Dice with batch statistics needs a
batch-wide reduction between layers and runs on the reference. Limits: 1 or 2 hidden layers, D, Dv <= 256,
hidden widths <= 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, acc_dtype, allow_tf32, combine_splits, dot_dtype, ensure_launchable, mm
from .config import get_config, next_pow2, num_splits

ACTIVATIONS = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
MAX_WIDTH = 256


@triton.jit
def _act_fwd(x, alpha, mean, istd, ACT: tl.constexpr):
    if ACT == 0:
        h = tl.sigmoid(x)
    elif ACT == 1:
        h = tl.maximum(x, 0.0)
    elif ACT == 2:
        h = tl.where(x > 0, x, alpha[None, :] * x)
    else:
        p = tl.sigmoid((x - mean[None, :]) * istd[None, :])
        h = x * (alpha[None, :] + p * (1.0 - alpha[None, :]))
    return h


@triton.jit
def _act_bwd(x, h, dh, alpha, mean, istd, ACT: tl.constexpr):
    """(dLoss/dx, dLoss/dalpha per element) given dLoss/dh."""
    if ACT == 0:
        dx = dh * h * (1.0 - h)
        dalpha = tl.zeros_like(dh)
    elif ACT == 1:
        dx = tl.where(x > 0, dh, 0.0)
        dalpha = tl.zeros_like(dh)
    elif ACT == 2:
        dx = tl.where(x > 0, dh, dh * alpha[None, :])
        dalpha = tl.where(x > 0, 0.0, dh * x)
    else:
        a = alpha[None, :]
        p = tl.sigmoid((x - mean[None, :]) * istd[None, :])
        dx = dh * (a + p * (1.0 - a) + x * (1.0 - a) * p * (1.0 - p) * istd[None, :])
        dalpha = dh * x * (1.0 - p)
    return dx, dalpha


@triton.jit
def _din_weights(
    m_ptr,
    w2_ptr,
    b,
    D,
    H1,
    H2,
    NUM_HIDDEN: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
):
    """The sample's first-layer matrix ``M_b [D, H1]`` and the second layer ``W_2 [H1, H2]`` (``M_b`` again when
    there is one hidden layer), loaded once per program (they are the same for every tile) and kept in the dot
    operand type (every use is a ``tl.dot``; 16-bit halves their registers)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_h1 = tl.arange(0, BLOCK_H1)
    offs_h2 = tl.arange(0, BLOCK_H2)
    mb = tl.load(
        m_ptr + (b * D + offs_d[:, None]).to(tl.int64) * H1 + offs_h1[None, :],
        mask=(offs_d < D)[:, None] & (offs_h1 < H1)[None, :],
        other=0.0,
    ).to(DOT)
    if NUM_HIDDEN == 2:
        w2 = tl.load(
            w2_ptr + offs_h1[:, None] * H2 + offs_h2[None, :],
            mask=(offs_h1 < H1)[:, None] & (offs_h2 < H2)[None, :],
            other=0.0,
        ).to(DOT)
    else:
        w2 = mb
    return mb, w2


@triton.jit
def _din_tile(
    k_ptr,
    mb,
    w2,
    row,
    valid,
    c,
    b2,
    wout,
    bout,
    alpha1,
    mean1,
    istd1,
    alpha2,
    mean2,
    istd2,
    D,
    H1,
    H2,
    stride_kn,
    NUM_HIDDEN: tl.constexpr,
    ACT: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
):
    """Scores of one tile: (k tile, pre1, h1, pre2, h2, score)."""
    offs_d = tl.arange(0, BLOCK_D)
    kt = tl.load(
        k_ptr + row[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None] & (offs_d < D)[None, :], other=0.0
    )
    pre1 = mm(kt, mb, True, DOT, ACC, TF32) + c[None, :]
    h1 = _act_fwd(pre1, alpha1, mean1, istd1, ACT)
    if NUM_HIDDEN == 2:
        pre2 = mm(h1, w2, True, DOT, ACC, TF32) + b2[None, :]
        h2 = _act_fwd(pre2, alpha2, mean2, istd2, ACT)
        score = tl.sum(h2 * wout[None, :], axis=1) + bout
    else:
        pre2 = pre1
        h2 = h1
        score = tl.sum(h1 * wout[None, :], axis=1) + bout
    return kt, pre1, h1, pre2, h2, score


@triton.jit
def _din_params(
    c_ptr,
    b2_ptr,
    wout_ptr,
    bout_ptr,
    alpha1_ptr,
    alpha2_ptr,
    mean1_ptr,
    istd1_ptr,
    mean2_ptr,
    istd2_ptr,
    b,
    H1,
    H2,
    NUM_HIDDEN: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
):
    offs_h1 = tl.arange(0, BLOCK_H1)
    offs_h2 = tl.arange(0, BLOCK_H2)
    h1mask = offs_h1 < H1
    h2mask = offs_h2 < H2
    c = tl.load(c_ptr + b * H1 + offs_h1, mask=h1mask, other=0.0).to(ACC)
    b2 = tl.zeros([BLOCK_H2], ACC)
    alpha1 = tl.zeros([BLOCK_H1], ACC)
    alpha2 = tl.zeros([BLOCK_H2], ACC)
    mean1 = tl.zeros([BLOCK_H1], ACC)
    istd1 = tl.zeros([BLOCK_H1], ACC)
    mean2 = tl.zeros([BLOCK_H2], ACC)
    istd2 = tl.zeros([BLOCK_H2], ACC)
    if ACT >= 2:
        alpha1 = tl.load(alpha1_ptr + offs_h1, mask=h1mask, other=0.0).to(ACC)
    if ACT == 3:
        mean1 = tl.load(mean1_ptr + offs_h1, mask=h1mask, other=0.0).to(ACC)
        istd1 = tl.load(istd1_ptr + offs_h1, mask=h1mask, other=0.0).to(ACC)
    if NUM_HIDDEN == 2:
        b2 = tl.load(b2_ptr + offs_h2, mask=h2mask, other=0.0).to(ACC)
        wout = tl.load(wout_ptr + offs_h2, mask=h2mask, other=0.0).to(ACC)
        if ACT >= 2:
            alpha2 = tl.load(alpha2_ptr + offs_h2, mask=h2mask, other=0.0).to(ACC)
        if ACT == 3:
            mean2 = tl.load(mean2_ptr + offs_h2, mask=h2mask, other=0.0).to(ACC)
            istd2 = tl.load(istd2_ptr + offs_h2, mask=h2mask, other=0.0).to(ACC)
    else:
        wout = tl.load(wout_ptr + offs_h1, mask=h1mask, other=0.0).to(ACC)
    bout = tl.load(bout_ptr).to(ACC)
    return c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2


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
    part_acc_ptr,  # [B, S, 1, DV]
    part_m_ptr,  # [B, S, 1]
    part_l_ptr,  # [B, S, 1]
    D,
    DV,
    H1,
    H2,
    n_splits,
    stride_kn,
    stride_vn,
    NUM_HIDDEN: tl.constexpr,
    ACT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SOFTMAX_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(offsets_ptr + b)
    length = tl.load(offsets_ptr + b + 1) - start
    n_iter = tl.cdiv(tl.maximum(tl.cdiv(length, BLOCK_L) - split, 0), n_splits)
    offs_l = tl.arange(0, BLOCK_L)
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2 = _din_params(
        c_ptr, b2_ptr, wout_ptr, bout_ptr, alpha1_ptr, alpha2_ptr, mean1_ptr, istd1_ptr, mean2_ptr, istd2_ptr,
        b, H1, H2, NUM_HIDDEN, ACT, ACC, BLOCK_H1, BLOCK_H2,
    )  # fmt: skip
    mb, w2 = _din_weights(m_ptr, w2_ptr, b, D, H1, H2, NUM_HIDDEN, DOT, BLOCK_D, BLOCK_H1, BLOCK_H2)
    coef = tl.full([], SOFTMAX_SCALE * LOG2E, ACC)

    m = tl.full([], float("-inf"), ACC)
    l_sum = tl.zeros([], ACC)
    acc = tl.zeros([BLOCK_DV], ACC)
    for it in range(0, n_iter):
        pos = (split + it * n_splits) * BLOCK_L + offs_l
        row = (start + pos).to(tl.int64)
        valid = pos < length
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + row, mask=valid, other=0) != 0)
        _kt, _pre1, _h1, _pre2, _h2, score = _din_tile(
            k_ptr, mb, w2, row, valid, c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2,
            D, H1, H2, stride_kn, NUM_HIDDEN, ACT, DOT, ACC, TF32, BLOCK_D, BLOCK_H1, BLOCK_H2,
        )  # fmt: skip
        vt = tl.load(
            v_ptr + row[:, None] * stride_vn + offs_dv[None, :], mask=valid[:, None] & dvmask[None, :], other=0.0
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

    x = b * n_splits + split
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
    dout_ptr,  # [B, DV]
    lse_ptr,  # [B] (softmax)
    delta_ptr,  # [B] (softmax): sum(dout * out)
    dk_ptr,  # [N, D]
    dv_ptr,  # [N, DV]
    dm_part_ptr,  # [B, S, D, H1]
    dc_part_ptr,  # [B, S, H1]
    dw2_part_ptr,  # [B, S, H1, H2]
    db2_part_ptr,  # [B, S, H2]
    dwout_part_ptr,  # [B, S, H_last]
    dbout_part_ptr,  # [B, S]
    dalpha1_part_ptr,  # [B, S, H1]
    dalpha2_part_ptr,  # [B, S, H2]
    D,
    DV,
    H1,
    H2,
    n_splits,
    stride_kn,
    stride_vn,
    NUM_HIDDEN: tl.constexpr,
    ACT: tl.constexpr,
    SOFTMAX: tl.constexpr,
    SOFTMAX_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(offsets_ptr + b)
    length = tl.load(offsets_ptr + b + 1) - start
    n_iter = tl.cdiv(tl.maximum(tl.cdiv(length, BLOCK_L) - split, 0), n_splits)
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
    coef = tl.full([], SOFTMAX_SCALE * LOG2E, ACC)
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
    for it in range(0, n_iter):
        pos = (split + it * n_splits) * BLOCK_L + offs_l
        row = (start + pos).to(tl.int64)
        inside = pos < length  # rows this program writes (masked-out rows get zero gradients)
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + row, mask=inside, other=0) != 0)
        kt, pre1, h1, pre2, h2, score = _din_tile(
            k_ptr, mb, w2, row, valid, c, b2, wout, bout, alpha1, mean1, istd1, alpha2, mean2, istd2,
            D, H1, H2, stride_kn, NUM_HIDDEN, ACT, DOT, ACC, TF32, BLOCK_D, BLOCK_H1, BLOCK_H2,
        )  # fmt: skip
        vt = tl.load(
            v_ptr + row[:, None] * stride_vn + offs_dv[None, :], mask=valid[:, None] & dvmask[None, :], other=0.0
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
            ds = tl.full([], SOFTMAX_SCALE, ACC) * w * (dw - delta)
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

    x = b * n_splits + split
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


class DinParams:
    """The fused kernel's view of the attention MLP (see the module docstring)."""

    def __init__(
        self,
        m: torch.Tensor,  # [B, D, H1]
        c: torch.Tensor,  # [B, H1]
        w2: torch.Tensor | None,  # [H1, H2]
        b2: torch.Tensor | None,  # [H2]
        wout: torch.Tensor,  # [H_last]
        bout: torch.Tensor,  # [1]
        alpha1: torch.Tensor | None,  # [H1]
        alpha2: torch.Tensor | None,  # [H2]
        mean1: torch.Tensor | None,
        istd1: torch.Tensor | None,
        mean2: torch.Tensor | None,
        istd2: torch.Tensor | None,
    ) -> None:
        self.m, self.c, self.w2, self.b2, self.wout, self.bout = m, c, w2, b2, wout, bout
        self.alpha1, self.alpha2 = alpha1, alpha2
        self.mean1, self.istd1, self.mean2, self.istd2 = mean1, istd1, mean2, istd2

    def pointers(self, dummy: torch.Tensor) -> list[torch.Tensor]:
        items = [self.m, self.c, self.w2, self.b2, self.wout, self.bout, self.alpha1, self.alpha2]
        items += [self.mean1, self.istd1, self.mean2, self.istd2]
        return [t if t is not None else dummy for t in items]


def _launch(keys: torch.Tensor, values: torch.Tensor, params: DinParams, max_len: int) -> dict:
    cfg = get_config()
    batch, dim, h1 = params.m.shape
    h2 = params.w2.shape[1] if params.w2 is not None else 1
    block_l = cfg.block_l or 32
    return {
        "splits": min(num_splits(max_len, block_l, batch, keys.device), 128),
        "meta": {
            "NUM_HIDDEN": 2 if params.w2 is not None else 1,
            "DOT": dot_dtype(keys.dtype),
            "ACC": acc_dtype(keys.dtype),
            "TF32": allow_tf32(),
            "BLOCK_L": max(block_l, 16),
            "BLOCK_D": max(next_pow2(dim), 16),
            "BLOCK_DV": next_pow2(values.shape[1]),
            "BLOCK_H1": max(next_pow2(h1), 16),
            "BLOCK_H2": max(next_pow2(h2), 16),
            "num_warps": cfg.num_warps or 4,
        },
        "sizes": (dim, values.shape[1], h1, h2),
    }


def din_attention_fwd_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    params: DinParams,
    activation: str,
    softmax: bool,
    softmax_scale: float,
    max_len: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, Dv] in the keys' dtype, lse [B] or None)``."""
    batch = offsets.numel() - 1
    device = keys.device
    acc_torch = torch.float64 if keys.dtype == torch.float64 else torch.float32
    dv = values.shape[1]
    if batch == 0:
        lse = torch.empty(0, dtype=acc_torch, device=device) if softmax else None
        return torch.zeros(0, dv, dtype=keys.dtype, device=device), lse
    ensure_launchable(_din_fwd_kernel, device)
    lp = _launch(keys, values, params, max_len)
    splits = lp["splits"]
    dim, dv, h1, h2 = lp["sizes"]
    part_acc = torch.empty(batch, splits, 1, dv, dtype=acc_torch, device=device)
    part_m = torch.empty(batch, splits, 1, dtype=acc_torch, device=device) if softmax else None
    part_l = torch.empty(batch, splits, 1, dtype=acc_torch, device=device) if softmax else None
    dummy = offsets
    _din_fwd_kernel[(batch, splits)](
        keys,
        values,
        offsets,
        *params.pointers(dummy),
        mask.view(torch.uint8) if mask is not None else dummy,
        part_acc,
        part_m if part_m is not None else dummy,
        part_l if part_l is not None else dummy,
        dim,
        dv,
        h1,
        h2,
        splits,
        keys.stride(0),
        values.stride(0),
        ACT=ACTIVATIONS[activation],
        SOFTMAX=softmax,
        SOFTMAX_SCALE=float(softmax_scale),
        HAS_MASK=mask is not None,
        **lp["meta"],
    )
    out, lse = combine_splits(part_acc, part_m, part_l, keys.dtype)
    return out.view(batch, dv), (lse.view(batch) if lse is not None else None)


def din_attention_bwd_triton(
    grad_out: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    params: DinParams,
    activation: str,
    softmax: bool,
    softmax_scale: float,
    max_len: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gradients of keys, values and every DinParams field (None where the field is None)."""
    batch = offsets.numel() - 1
    device = keys.device
    acc_torch = torch.float64 if keys.dtype == torch.float64 else torch.float32
    total = keys.shape[0]
    lp = _launch(keys, values, params, max_len)
    splits = lp["splits"]
    dim, dv, h1, h2 = lp["sizes"]
    two = params.w2 is not None
    h_last = h2 if two else h1
    dkeys = torch.empty(total, dim, dtype=keys.dtype, device=device)
    dvalues = torch.empty(total, dv, dtype=values.dtype, device=device)

    def part(*shape: int) -> torch.Tensor:
        return torch.zeros(batch, splits, *shape, dtype=acc_torch, device=device)

    dm, dc, dbout = part(dim, h1), part(h1), part()
    dw2, db2 = (part(h1, h2), part(h2)) if two else (None, None)
    dwout = part(h_last)
    act = ACTIVATIONS[activation]
    dalpha1 = part(h1) if act >= 2 else None
    dalpha2 = part(h2) if act >= 2 and two else None
    grad_out = grad_out.to(acc_torch).contiguous()
    delta = (grad_out * out.to(acc_torch)).sum(-1).contiguous() if softmax else None
    dummy = offsets
    if batch > 0:
        ensure_launchable(_din_bwd_kernel, device)
        _din_bwd_kernel[(batch, splits)](
            keys,
            values,
            offsets,
            *params.pointers(dummy),
            mask.view(torch.uint8) if mask is not None else dummy,
            grad_out,
            lse if lse is not None else dummy,
            delta if delta is not None else dummy,
            dkeys,
            dvalues,
            dm,
            dc,
            dw2 if dw2 is not None else dummy,
            db2 if db2 is not None else dummy,
            dwout,
            dbout,
            dalpha1 if dalpha1 is not None else dummy,
            dalpha2 if dalpha2 is not None else dummy,
            dim,
            dv,
            h1,
            h2,
            splits,
            keys.stride(0),
            values.stride(0),
            ACT=act,
            SOFTMAX=softmax,
            SOFTMAX_SCALE=float(softmax_scale),
            HAS_MASK=mask is not None,
            **lp["meta"],
        )

    def total_over(t: torch.Tensor | None, like: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor | None:
        if t is None or like is None:
            return None
        return t.sum(dims).to(like.dtype)

    return {
        "keys": dkeys,
        "values": dvalues,
        "m": total_over(dm, params.m, (1,)),
        "c": total_over(dc, params.c, (1,)),
        "w2": total_over(dw2, params.w2, (0, 1)),
        "b2": total_over(db2, params.b2, (0, 1)),
        "wout": total_over(dwout, params.wout, (0, 1)),
        "bout": total_over(dbout, params.bout, (0, 1)).reshape(1) if batch > 0 else torch.zeros_like(params.bout),
        "alpha1": total_over(dalpha1, params.alpha1, (0, 1)),
        "alpha2": total_over(dalpha2, params.alpha2, (0, 1)),
    }
