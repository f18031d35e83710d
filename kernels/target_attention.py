"""Jagged softmax target attention: one or a few target queries per sample over its behaviors (ESU, LAIN, MUSE)."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._backend import resolve_backend
from ._jagged import check_mask, check_offsets, check_rows, jagged_max_len
from .reference.target_attention import target_attention_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_MAX_HEAD_DIM = 256
TRITON_MAX_QUERIES = 64
_OP = "target_attention"


class _TargetAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        offsets: torch.Tensor,
        bias: torch.Tensor | None,
        temperature: torch.Tensor | None,
        mask: torch.Tensor | None,
        scale: float,
        max_len: int,
    ) -> torch.Tensor:
        from .triton.target_attention import target_attention_fwd_triton

        out, lse, plan = target_attention_fwd_triton(
            query, keys, values, offsets, bias, temperature, mask, scale, max_len
        )
        ctx.save_for_backward(query, keys, values, offsets, bias, temperature, mask, out, lse)
        ctx.scale = scale
        ctx.max_len = max_len
        ctx.plan = plan  # the backward cuts the work the same way (its item table is built once)
        return out.to(query.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        from .triton.target_attention import target_attention_bwd_triton

        query, keys, values, offsets, bias, temperature, mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias, dtau, _ = target_attention_bwd_triton(
            grad_out, query, keys, values, offsets, bias, temperature, mask, ctx.scale, ctx.max_len, out, lse, ctx.plan
        )
        need = ctx.needs_input_grad
        return (
            dq if need[0] else None,
            dk if need[1] else None,
            dv if need[2] else None,
            None,
            dbias if need[4] else None,
            dtau if need[5] else None,
            None,
            None,
            None,
        )


def target_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    max_len: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention of each sample's target queries over its jagged behaviors.

    ``logit_i = (scale * <q, k_i> + bias_i) / temperature_b``, softmax over the sample's behaviors, output
    ``sum_i softmax_i * v_i``; a sample without behaviors (or with all of them masked out) gets zeros.
    Differentiable in query, keys, values, bias and temperature (first order: the backward is a fused kernel).

    Args:
        query: ``[B, Q, H, Dk]`` (Q target queries, H heads), or ``[B, Q, Dk]`` for one head.
        keys: ``[total_L, H, Dk]`` (or ``[total_L, Dk]``), jagged by ``offsets``.
        values: ``[total_L, H, Dv]`` (or ``[total_L, Dv]``). query, keys and values share one float dtype
            (float32, float16, bfloat16, float64; 16-bit inputs accumulate in float32).
        offsets: int64 ``[B + 1]``.
        bias: optional additive logit bias per behavior, ``[total_L]`` (shared by the queries) or
            ``[total_L, Q]``; shared by the heads (time gap, GSU similarity, ...). Must be finite.
        temperature: optional ``[B]`` positive per-sample temperature (LAIN); divides the whole logit.
        mask: optional bool ``[total_L]``; False drops the behavior (no weight, zero gradients), e.g. the empty
            slots of a fixed-K GSU result laid out as ``offsets = arange(B + 1) * K``.
        scale: multiplies ``<q, k>``; default ``1 / sqrt(Dk)`` (MUSE's SA-TA uses 1.0).
        max_len: the longest sample, if the caller knows it (skips a host sync and the checks of the offsets, of
            the bias' finiteness and of the temperature's sign).
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (default: ``$KERNELS_BACKEND``, else auto).

    Returns:
        ``[B, Q, H, Dv]`` (or ``[B, Q, Dv]`` for 3-D inputs) in the query's dtype.
    """
    batch = check_offsets(_OP, offsets)
    query, keys, values, single_head = check_attention_inputs(_OP, query, keys, values, batch, bias, temperature)
    total = keys.shape[0]
    if mask is not None:
        check_mask(_OP, mask, total)
    _, n_query, _, dk = query.shape
    dv = values.shape[-1]
    scale = 1.0 / math.sqrt(dk) if scale is None else float(scale)
    longest = jagged_max_len(_OP, offsets, total, max_len)
    if max_len is None:  # checked with the offsets; a caller passing max_len vouches for them too
        check_attention_values(_OP, bias, temperature)

    unsupported = triton_unsupported(max(dk, dv), n_query)
    impl = resolve_backend(_OP, (query, keys, values, offsets, bias, temperature, mask), backend, unsupported)
    if impl == "triton":
        out = _TargetAttentionTriton.apply(
            last_dim_contiguous(query),
            last_dim_contiguous(keys),
            last_dim_contiguous(values),
            offsets,
            bias,
            temperature.contiguous() if temperature is not None else None,
            mask.contiguous() if mask is not None else None,
            scale,
            longest,
        )
    else:
        out = target_attention_reference(query, keys, values, offsets, bias, temperature, scale, mask)
    return out.squeeze(2) if single_head else out


def check_attention_inputs(
    op: str,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: int,
    bias: torch.Tensor | None,
    temperature: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Shapes and dtypes of an attention call; returns the 4-D query and 3-D keys/values, and whether the call was
    single-head (3-D query)."""
    single_head = query.dim() == 3
    if single_head:
        if keys.dim() != 2 or values.dim() != 2:
            raise ValueError(f"{op}: a 3-D query [B, Q, D] needs 2-D keys and values [total_L, D]")
        query, keys, values = query.unsqueeze(2), keys.unsqueeze(1), values.unsqueeze(1)
    elif query.dim() != 4 or keys.dim() != 3 or values.dim() != 3:
        raise ValueError(
            f"{op}: expected query [B, Q, H, Dk] with keys [N, H, Dk] and values [N, H, Dv] (or 3-D/2-D/2-D), "
            f"got {tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}"
        )
    check_rows(op, "query", query, batch, 4)
    _, n_query, n_head, dk = query.shape
    total = keys.shape[0]
    if keys.shape[1:] != (n_head, dk) or values.shape[0] != total or values.shape[1] != n_head:
        raise ValueError(
            f"{op}: keys must be [N, {n_head}, {dk}] and values [N, {n_head}, Dv] with the same N, "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if query.dtype not in FLOAT_DTYPES or keys.dtype != query.dtype or values.dtype != query.dtype:
        raise ValueError(
            f"{op}: query, keys and values must share one dtype of {FLOAT_DTYPES}, "
            f"got {query.dtype}, {keys.dtype}, {values.dtype}"
        )
    if bias is not None:
        if not bias.dtype.is_floating_point:
            raise ValueError(f"{op}: bias must be floating point, got {bias.dtype}")
        if not ((bias.dim() == 1 and bias.shape[0] == total) or (bias.dim() == 2 and bias.shape == (total, n_query))):
            raise ValueError(f"{op}: bias must be [{total}] or [{total}, {n_query}], got {tuple(bias.shape)}")
    if temperature is not None:
        if not temperature.dtype.is_floating_point:
            raise ValueError(f"{op}: temperature must be floating point, got {temperature.dtype}")
        check_rows(op, "temperature", temperature, batch, 1)
    return query, keys, values, single_head


def triton_unsupported(head_dim: int, n_query: int) -> str | None:
    """Why the Triton attention kernel cannot serve a call, or None."""
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM}"
    if n_query > TRITON_MAX_QUERIES:
        return f"{n_query} queries > {TRITON_MAX_QUERIES}"
    return None


def check_attention_values(op: str, bias: torch.Tensor | None, temperature: torch.Tensor | None) -> None:
    """A finite bias and a positive temperature (one host sync for both)."""
    checks = []
    if bias is not None:
        checks.append(torch.isfinite(bias.detach()).all())
    if temperature is not None:
        checks.append((temperature.detach() > 0).all())
    if not checks:
        return
    ok = torch.stack(checks).tolist()
    if bias is not None and not ok[0]:
        raise ValueError(f"{op}: bias must be finite (use mask to drop behaviors)")
    if temperature is not None and not ok[-1]:
        raise ValueError(f"{op}: temperature must be positive")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
