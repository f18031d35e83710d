"""``din_attention`` cases: DIN's activation unit [4D -> 80 -> 40 -> 1], sigmoid, softmax with scale 1/sqrt(D),
pooling the keys; forward, and forward + backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kernels import din_attention
from kernels.reference import din_attention_reference

from .common import (
    BF16,
    DIN_HIDDEN,
    F32,
    I64,
    PASS_VARIANTS,
    Case,
    Config,
    Inputs,
    Shape,
    case_seed,
    grad_runner,
    max_abs_diff,
    no_grad,
    offsets_of,
    pass_variants,
    shape_lengths,
)

VARIANTS = PASS_VARIANTS
variants = pass_variants


def input_bytes(shape: Shape, n: int) -> int:
    """Device memory of a shape's inputs (keys, their float32 staging, dKeys with a backward), for the memory
    cap."""
    total = n * shape.dim * (BF16 + F32)
    if "backward" in shape.passes:
        total += n * shape.dim * BF16
    return total


def din_attention_cases(cfg: Config, shape: Shape, device: torch.device) -> list[Case]:
    """The shape's cases (forward; forward + backward)."""
    rnd = Inputs(case_seed(cfg.seed, shape), device)
    batch, dim, length = shape.batch, shape.dim, shape.length
    h1, h2 = DIN_HIDDEN
    lengths = shape_lengths(shape, cfg.seed)
    n = int(lengths.sum())
    offsets = offsets_of(lengths).to(device)
    scale = 1.0 / math.sqrt(dim)
    query = rnd.randn(batch, dim, dtype=torch.bfloat16).requires_grad_()
    keys = rnd.randn(n, dim, dtype=torch.bfloat16).requires_grad_()
    sizes = [4 * dim, h1, h2, 1]
    weights = [(rnd.randn(a, b) / math.sqrt(a)).requires_grad_() for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [(0.1 * rnd.randn(b)).requires_grad_() for b in sizes[1:]]
    grad_out = rnd.randn(batch, dim, dtype=torch.bfloat16)
    shapes = {
        "B": batch,
        "L_max": length,
        "N_total": n,
        "D": dim,
        "mlp": sizes,
        "activation": "sigmoid",
        "softmax": True,
        "dtype": "bfloat16 (MLP weights float32)",
        "lengths": shape.dist,
    }

    def kernel_forward() -> torch.Tensor:
        return din_attention(
            query, keys, offsets, weights, biases, activation="sigmoid", softmax=True, softmax_scale=scale,
            max_len=length, backend="triton",
        )  # fmt: skip

    def reference_forward(fn: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        return lambda: fn(
            query, keys, offsets, weights, biases, None, "sigmoid", None, None, False, 0.1, 1e-8, True, scale
        )

    # per behavior: first layer in the fused form k @ M_b (2·D·H1), second layer (2·H1·H2), output (2·H2),
    # pooling (2·Dv); per sample: forming M_b = W_k - W_d + diag(q) W_p and c_b (about 4·D·H1)
    per_behavior_mm = 2 * dim * h1 + 2 * h1 * h2
    fwd_flops = n * (per_behavior_mm + 2 * h2 + 2 * dim) + batch * 4 * dim * h1
    weight_bytes = (4 * dim * h1 + h1 + h1 * h2 + h2 + h2 + 1) * F32
    # keys (pooled as the values too: counted once) + query + output + M_b, c_b written and read + weights + offsets
    fwd_bytes = n * dim * BF16 + 2 * batch * dim * BF16 + 2 * batch * (dim * h1 + h1) * F32 + weight_bytes
    fwd_bytes += (batch + 1) * I64
    cases = []
    for backward in ("backward" in p for p in shape.passes):
        if backward:
            grads = (query, keys, *weights, *biases)

            def kernel(grads=grads) -> Any:
                return grad_runner(kernel_forward, grads, grad_out)()

            def with_reference(fn: Callable[..., Any], grads=grads) -> Callable[[], Any]:
                return grad_runner(reference_forward(fn), grads, grad_out)

            # keys read again and dKeys written; per-sample dM_b partials are O(B·S·D·H1) and not counted
            nbytes = fwd_bytes + 2 * n * dim * BF16
            # recompute the forward, then dW2 and dh1 (2·2·H1·H2), dM and dK (2·2·D·H1), output and pooling
            flops = 2 * fwd_flops + n * (2 * per_behavior_mm + 2 * h2 + 4 * dim)
            bytes_formula = "fwd + 4*N*D: keys read again, dKeys written"
            flops_formula = "2*fwd + N*(2*(2*D*H1 + 2*H1*H2) + 2*H2 + 4*D)"
        else:
            kernel = kernel_forward
            with_reference = reference_forward
            nbytes, flops = fwd_bytes, fwd_flops
            bytes_formula = "2*N*D + 4*B*D + 8*B*(D*H1 + H1) + 4*|weights| + 8*(B+1)"
            flops_formula = "N*(2*D*H1 + 2*H1*H2 + 2*H2 + 2*D) + 4*B*D*H1"
        run = kernel if backward else no_grad(kernel)
        wrap = with_reference if backward else (lambda fn, w=with_reference: no_grad(w(fn)))
        cases.append(
            Case(
                op="din_attention",
                variant=VARIANTS["backward" if backward else "forward"],
                length=length,
                shapes=shapes,
                bytes=nbytes,
                flops=flops,
                bytes_formula=bytes_formula,
                flops_formula=flops_formula,
                kernel=run,
                reference=wrap(din_attention_reference),
                with_reference=wrap,
                reference_fn=din_attention_reference,
                compare=max_abs_diff,
                shape=shape,
            )
        )
    return cases
