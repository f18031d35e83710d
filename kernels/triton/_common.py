"""Pieces shared by the Triton kernels: dtype choices, matmul-or-broadcast, sortable score/position keys, and the
split-L combine kernel (flash-decoding's final log-sum-exp reduction).

Interpreter note: Triton 3.6's interpreter turns every scalar into a 1-element array and converts loop bounds with
``int(array)``, which NumPy >= 2.3 refuses for arrays with a dimension. Jagged kernels need loop bounds read from
the offsets, so, only when ``TRITON_INTERPRET=1`` and only on such a NumPy, ``_patch_interpreter`` replaces that
conversion (for the duration of each interpreted launch, through the interpreter's own patch scope). Compiled
kernels are untouched.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton import knobs

logger = logging.getLogger(__name__)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Smaller than every packed key of a finite or infinite float32 score (see pack_keys): marks an empty top-K slot.
SENTINEL_VALUE = -9223372036854775807
SENTINEL = tl.constexpr(SENTINEL_VALUE)


def _patch_interpreter() -> None:
    import numpy as np  # the interpreter's own dependency; imported only when interpreting

    try:
        int(np.array([1]))
        return  # this NumPy still converts 1-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kernels_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._kernels_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched
    logger.debug("patched the Triton interpreter's scalar-to-index conversion for NumPy %s", np.__version__)


def interpreting() -> bool:
    return bool(knobs.runtime.interpret)


if interpreting():
    _patch_interpreter()


def ensure_launchable(kernel: object, device: torch.device) -> None:
    """A kernel built without the interpreter cannot take CPU tensors: say so instead of crashing in the driver."""
    if device.type != "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):
            raise RuntimeError(
                "Triton kernels on CPU tensors run only in the interpreter: set TRITON_INTERPRET=1 before "
                "the kernels.triton modules are imported"
            )


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulation type: float64 for float64 inputs (exact parity tests), float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of tl.dot: bf16/fp16 inputs stay 16-bit on the GPU (tensor cores); the interpreter computes
    16-bit dots wrongly in Triton 3.6, so there they are promoted to float32."""
    if dtype == torch.float64:
        return tl.float64
    if dtype in (torch.bfloat16, torch.float16) and not interpreting():
        return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    return tl.float32


def allow_tf32() -> bool:
    """float32 dots use TF32 exactly when PyTorch's own float32 matmuls may (``torch.backends.cuda.matmul``)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) and not interpreting()


@triton.jit
def mm(a, b, USE_DOT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, TF32: tl.constexpr):
    """``a @ b`` for tiles ``[M, K] x [K, N]``: tl.dot (M, N, K >= 16) or a broadcast multiply and reduce."""
    if USE_DOT:
        if DOT == tl.float32:
            if TF32:
                return tl.dot(a.to(DOT), b.to(DOT), out_dtype=ACC, input_precision="tf32")
            else:
                return tl.dot(a.to(DOT), b.to(DOT), out_dtype=ACC, input_precision="ieee")
        else:
            return tl.dot(a.to(DOT), b.to(DOT), out_dtype=ACC)
    else:
        return tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)


@triton.jit
def pack_keys(score, pos):
    """One int64 per candidate whose order is (float32 score, position): larger key = better, and on equal scores
    the larger position (the more recent behavior) wins. ``pos`` must be in [0, 2**31)."""
    bits = score.to(tl.float32).to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ties with +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone in the float's value
    return (ordered.to(tl.int64) << 32) | pos.to(tl.int64)


@triton.jit
def unpack_keys(key):
    """Inverse of pack_keys: (position int64, score float32); empty slots give (-1, 0.0)."""
    empty = key == SENTINEL
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    score = bits.to(tl.float32, bitcast=True)
    pos = key & 0x7FFFFFFF
    return tl.where(empty, -1, pos), tl.where(empty, 0.0, score)


@triton.jit
def merge_topk(run, cand):
    """Top keys of two equally long lists sorted descending, sorted descending.

    ``max(run[i], cand[K-1-i])`` holds exactly the K largest of the 2K keys and is bitonic, so one bitonic merge
    (log2 K compare-exchange stages) sorts it."""
    return tl.bitonic_merge(tl.maximum(run, tl.flip(cand, 0)), descending=True)


@triton.jit
def combine_splits_kernel(
    part_acc_ptr,  # [B, S, X, DV]: per-split weighted sums (normalized by exp2(m) when NORMALIZE)
    part_m_ptr,  # [B, S, X]: per-split running max of the base-2 logits
    part_l_ptr,  # [B, S, X]: per-split sum of exp2(logit - m)
    out_ptr,  # [B, X, DV]
    lse_ptr,  # [B, X]: natural-log log-sum-exp (NORMALIZE only)
    n_splits,
    X,
    DV,
    NORMALIZE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr,
):
    """Flash-decoding reduction: one program per (sample, query/head) merges the S split partials."""
    b = tl.program_id(0)
    x = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    smask = offs_s < n_splits
    dmask = offs_d < DV
    row = (b * n_splits + offs_s) * X + x
    acc = tl.load(part_acc_ptr + row[:, None] * DV + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
    acc = acc.to(ACC)
    if NORMALIZE:
        m = tl.load(part_m_ptr + row, mask=smask, other=float("-inf")).to(ACC)
        l_part = tl.load(part_l_ptr + row, mask=smask, other=0.0).to(ACC)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # no split saw a key: keep exp2 finite
        w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
        denom = tl.sum(w * l_part, axis=0)
        num = tl.sum(w[:, None] * acc, axis=0)
        has = denom > 0
        safe = tl.where(has, denom, 1.0)
        out = tl.where(has, num / safe, 0.0)
        lse = tl.where(has, (m_max + tl.log2(safe)) * tl.full([], LN2, ACC), float("-inf"))
        tl.store(lse_ptr + b * X + x, lse)
    else:
        out = tl.sum(acc, axis=0)
    tl.store(out_ptr + (b * X + x) * DV + offs_d, out, mask=dmask)


def combine_splits(
    part_acc: torch.Tensor, part_m: torch.Tensor | None, part_l: torch.Tensor | None, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reduce ``[B, S, X, DV]`` split partials to ``([B, X, DV], lse [B, X] or None)``.

    With ``part_m``/``part_l`` the partials are softmax-normalized (log-sum-exp merge); without, they are summed.
    """
    from .config import next_pow2

    batch, n_splits, x_dim, dv = part_acc.shape
    out = torch.empty(batch, x_dim, dv, device=part_acc.device, dtype=out_dtype)
    normalize = part_m is not None
    lse = torch.empty(batch, x_dim, device=part_acc.device, dtype=part_acc.dtype) if normalize else None
    if batch == 0 or x_dim == 0:
        return out, lse
    ensure_launchable(combine_splits_kernel, part_acc.device)
    dummy = part_acc
    combine_splits_kernel[(batch, x_dim)](
        part_acc,
        part_m if normalize else dummy,
        part_l if normalize else dummy,
        out,
        lse if normalize else dummy,
        n_splits,
        x_dim,
        dv,
        NORMALIZE=normalize,
        BLOCK_S=next_pow2(n_splits),
        BLOCK_DV=next_pow2(dv),
        ACC=acc_dtype(part_acc.dtype),
    )
    return out, lse
