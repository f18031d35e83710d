"""Pieces shared by the Triton kernels: dtype choices, matmul-or-broadcast, and sortable score/position keys (the
work items and the reductions of their partials are in `kernels.triton.schedule`).

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
