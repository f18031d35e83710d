"""``target_attention`` cases: Q target queries (1 or 16), one head, a float32 per-behavior bias shared by the
queries and a per-sample temperature; forward, and forward + backward. FBGEMM's ``jagged_dense_flash_attention``
runs on the same inputs when it loaded (`fbgemm_peer` documents the mapping)."""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import torch

from kernels import target_attention
from kernels.reference import target_attention_reference

from .common import (
    BF16,
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
    """Device memory of a shape's inputs, with the gradients when it has a backward and the float32 staging of
    the random keys/values, for the memory cap (the implementations' own temporaries are not counted: an
    implementation that runs out of memory is recorded as such)."""
    d, b, q = shape.dim, shape.batch, shape.queries
    per_row = 2 * d * BF16 + F32  # keys + values + bias
    total = n * per_row + n * d * F32 + b * shape.length * 24  # + staging + the peer's padded bias (and its index)
    if "backward" in shape.passes:
        total += n * per_row + b * shape.length * q * F32  # our gradients + the peer's dense dBias
    return total


def peer_calls(
    fbgemm: types.ModuleType,
    length: int,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor,
    temperature: torch.Tensor,
    scale: float,
    grad_out: torch.Tensor,
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """FBGEMM's forward and forward + backward (gradients for keys, values and its own query and bias) on our
    inputs, mapped as `fbgemm_peer` says; the mapping is done here, once, before any timing."""
    batch = query.shape[0]
    with torch.no_grad():
        q_scaled = (query.float() * (scale / temperature)[:, None, None]).to(query.dtype)  # [B, Q, D]
        lengths = offsets.diff()
        rows = torch.arange(length, device=keys.device)
        index = offsets[:-1, None] + rows[None, :]  # [B, L]
        inside = rows[None, :] < lengths[:, None]
        padded = torch.where(inside, bias[index.clamp(max=max(bias.numel() - 1, 0))], 0.0)
        bias_pad = (padded / temperature[:, None]).float()  # [B, L]
    q_leaf = q_scaled.detach().requires_grad_()
    bias_leaf = bias_pad.detach().requires_grad_()
    apply = fbgemm.JaggedDenseFlashAttention.apply

    def forward() -> torch.Tensor:
        # its K: [B, D, T]; its attention bias: [B, L, T] with a zero stride over the T targets
        attn_bias = bias_leaf[:, :, None].expand(batch, length, q_leaf.shape[1])
        return apply(keys, q_leaf.transpose(1, 2), values, attn_bias, offsets, length, True)

    return no_grad(forward), grad_runner(forward, (keys, values, q_leaf, bias_leaf), grad_out)


def peer_compare(got: Any, want: Any) -> dict[str, float]:
    """The peer against the reference: the output, and for forward + backward dKeys and dValues too (its other
    gradients are with respect to its own inputs: the pre-scaled query and the padded bias)."""
    if isinstance(got, tuple):
        return max_abs_diff((got[0], got[1], got[2]), (want[0], want[2], want[3]))
    return max_abs_diff(got, want)


def target_attention_cases(
    cfg: Config, shape: Shape, device: torch.device, fbgemm: types.ModuleType | None = None, peer_absent: str = ""
) -> list[Case]:
    """The shape's cases (forward; forward + backward), with FBGEMM's calls when ``fbgemm`` is given."""
    rnd = Inputs(case_seed(cfg.seed, shape), device)
    batch, dim, length, n_query, n_head = shape.batch, shape.dim, shape.length, shape.queries, 1
    lengths = shape_lengths(shape, cfg.seed)
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
        "lengths": shape.dist,
    }
    peer_fwd = peer_bwd = None
    if fbgemm is not None:
        if dim & (dim - 1):
            peer_absent = f"FBGEMM's kernel needs D a power of two (D = {dim})"
        else:
            args = (query, keys, values, offsets, bias.detach(), temperature.detach(), scale, grad_out)
            peer_fwd, peer_bwd = peer_calls(fbgemm, length, *args)

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
    for backward in ("backward" in p for p in shape.passes):
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
                variant=VARIANTS["backward" if backward else "forward"],
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
                shape=shape,
                peer=peer_bwd if backward else peer_fwd,
                peer_compare=peer_compare,
                peer_absent=None if peer_fwd is not None else (peer_absent or "FBGEMM's kernel did not load"),
            )
        )
    return cases
