"""Device functions shared by the DIN attention kernels (`_din_kernels`): the activations and their gradients, the
loads of the per-sample MLP (``M_b``, ``c_b`` and the later layers) and one tile's MLP, from keys to scores.

See `kernels.triton.din_attention` for the algorithm (the first layer in the fused ``k @ M_b + c_b`` form).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import mm


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
