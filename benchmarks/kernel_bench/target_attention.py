"""``target_attention`` cases: one target query, one head, a float32 per-behavior bias and a per-sample temperature;
forward, and forward + backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kernels import target_attention
from kernels.reference import target_attention_reference

from .common import BF16, F32, I64, Case, Config, Inputs, grad_runner, max_abs_diff, no_grad, offsets_of


def target_attention_cases(cfg: Config, length: int, device: torch.device) -> list[Case]:
    """The forward and the forward + backward case at longest length ``length``."""
    rnd = Inputs(cfg.seed + 1 + length, device)
    batch, dim = cfg.batch, cfg.dim
    n_query = n_head = 1
    lengths = rnd.lengths(batch, length)
    n = int(lengths.sum())
    offsets = offsets_of(lengths).to(device)
    scale = 1.0 / math.sqrt(dim)
    query = rnd.randn(batch, n_query, dim, dtype=torch.bfloat16).requires_grad_()
    keys = rnd.randn(n, dim, dtype=torch.bfloat16).requires_grad_()
    values = rnd.randn(n, dim, dtype=torch.bfloat16).requires_grad_()
    bias = (-2.0 * rnd.rand(n)).requires_grad_()  # e.g. a learned time-gap bias
    temperature = (rnd.rand(batch) + 0.5).requires_grad_()
    grad_out = rnd.randn(batch, n_query, dim, dtype=torch.bfloat16)
    shapes = {
        "B": batch,
        "L_max": length,
        "N_total": n,
        "Q": n_query,
        "H": n_head,
        "Dk": dim,
        "Dv": dim,
        "dtype": "bfloat16",
        "bias": [n],
        "temperature": [batch],
    }

    def kernel_forward() -> torch.Tensor:
        return target_attention(
            query, keys, values, offsets, bias=bias, temperature=temperature, max_len=length, backend="triton"
        )

    def reference_forward(fn: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        # The reference takes the [B, Q, H, D] / [N, H, D] form.
        return lambda: fn(query[:, :, None], keys[:, None], values[:, None], offsets, bias, temperature, scale)

    per_row = n_query * n_head * (dim + dim)
    # forward: keys + values (bf16) + bias (f32) + query + temperature + output + offsets
    fwd_bytes = n * (n_head * 2 * dim * BF16 + F32) + batch * (n_query * n_head * 2 * dim * BF16 + F32)
    fwd_bytes += (batch + 1) * I64
    fwd_flops = 2 * n * per_row  # q.k and p.v
    cases = []
    for backward in (False, True):
        if backward:
            grads = (query, keys, values, bias, temperature)

            def kernel(grads=grads) -> Any:
                return grad_runner(kernel_forward, grads, grad_out)()

            def with_reference(fn: Callable[..., Any], grads=grads) -> Callable[[], Any]:
                forward = reference_forward(fn)
                return grad_runner(lambda: forward().squeeze(2), grads, grad_out)

            # backward: keys + values + bias read again, dK + dV + dBias written (the rest is O(B))
            nbytes = fwd_bytes + n * 2 * (n_head * 2 * dim * BF16 + F32)
            # recompute q.k (2·Dk), dP = dO.v (2·Dv), dV = p·dO (2·Dv), dK = dS·q (2·Dk), dQ = dS·k (2·Dk)
            flops = fwd_flops + 2 * n * n_query * n_head * (3 * dim + 2 * dim)
            bytes_formula = "fwd + 2*N*(4*D + 4): K, V, bias read again; dK, dV, dBias written"
            flops_formula = "2*N*Q*H*(Dk+Dv) + 2*N*Q*H*(3*Dk + 2*Dv)"
        else:
            kernel = kernel_forward

            def with_reference(fn: Callable[..., Any]) -> Callable[[], Any]:
                forward = reference_forward(fn)
                return lambda: forward().squeeze(2)

            nbytes, flops = fwd_bytes, fwd_flops
            bytes_formula = "N*H*2*(Dk+Dv) + 4*N + B*(2*Q*H*(Dk+Dv) + 4) + 8*(B+1)"
            flops_formula = "2*N*Q*H*(Dk+Dv)"
        run = kernel if backward else no_grad(kernel)
        wrap = with_reference if backward else (lambda fn, w=with_reference: no_grad(w(fn)))
        cases.append(
            Case(
                op="target_attention",
                variant="forward + backward" if backward else "forward",
                length=length,
                shapes=shapes,
                bytes=nbytes,
                flops=flops,
                bytes_formula=bytes_formula,
                flops_formula=flops_formula,
                kernel=run,
                reference=wrap(target_attention_reference),
                with_reference=wrap,
                reference_fn=target_attention_reference,
                compare=max_abs_diff,
            )
        )
    return cases
