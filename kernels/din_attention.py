"""DIN attention: the activation-unit MLP over [q; k; q - k; q * k], the weighting and the sum pooling, fused."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from ._backend import resolve_backend
from ._jagged import check_mask, check_offsets, check_rows, jagged_max_len
from .reference.din_attention import din_attention_reference

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_MAX_WIDTH = 256  # D, Dv and every hidden width
TRITON_MAX_HIDDEN_LAYERS = 2
_OP = "din_attention"

# The autograd Function's tensor inputs after keys, values, offsets: the fused kernel's parameters, in order.
_PARAM_NAMES = ("m", "c", "w2", "b2", "wout", "bout", "alpha1", "alpha2", "mean1", "istd1", "mean2", "istd2")


class _DinAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        keys: torch.Tensor,
        values: torch.Tensor,
        offsets: torch.Tensor,
        mask: torch.Tensor | None,
        activation: str,
        softmax: bool,
        softmax_scale: float,
        max_len: int,
        *param_tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        from .triton.din_attention import DinParams, din_attention_fwd_triton

        params = DinParams(*param_tensors)
        out, lse, plan = din_attention_fwd_triton(
            keys, values, offsets, params, activation, softmax, softmax_scale, max_len, mask
        )
        ctx.plan = plan  # the backward cuts the work the same way
        ctx.save_for_backward(keys, values, offsets, mask, out, lse, *param_tensors)
        ctx.config = (activation, softmax, softmax_scale, max_len)
        return out.to(keys.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor):  # type: ignore[override]
        from .triton.din_attention import DinParams, din_attention_bwd_triton

        keys, values, offsets, mask, out, lse, *param_tensors = ctx.saved_tensors
        activation, softmax, softmax_scale, max_len = ctx.config
        params = DinParams(*param_tensors)
        grads = din_attention_bwd_triton(
            grad_out, keys, values, offsets, params, activation, softmax, softmax_scale, max_len, out, lse, mask,
            ctx.plan,
        )  # fmt: skip
        need = ctx.needs_input_grad
        n_fixed = 8  # keys, values, offsets, mask, activation, softmax, softmax_scale, max_len
        param_grads = [grads.get(name) if need[n_fixed + i] else None for i, name in enumerate(_PARAM_NAMES)]
        return (
            grads["keys"] if need[0] else None,
            grads["values"] if need[1] else None,
            *([None] * (n_fixed - 2)),
            *param_grads,
        )


def din_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    *,
    values: torch.Tensor | None = None,
    activation: str = "sigmoid",
    alphas: Sequence[torch.Tensor] | None = None,
    dice_running: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    dice_training: bool = False,
    dice_momentum: float = 0.1,
    dice_eps: float = 1e-8,
    softmax: bool = False,
    softmax_scale: float = 1.0,
    mask: torch.Tensor | None = None,
    max_len: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DIN's local activation unit over each sample's jagged behaviors, pooled: ``sum_i a_i * v_i``.

    ``a_i = MLP([q; k_i; q - k_i; q * k_i])`` (raw, as in the DIN paper) or its softmax over the sample
    (``softmax=True``, scores multiplied by ``softmax_scale`` first; the official code uses 1/sqrt(D)). A sample
    without behaviors (or with all of them masked out) gets zeros. Differentiable in query, keys, values, weights,
    biases and alphas (first order; the Triton backward is a fused kernel). The Triton kernel never builds the
    ``[total_L, 4D]`` input: ``x @ W_1 = k @ (W_k - W_d + diag(q) W_p) + q @ (W_q + W_d)``, a per-key and a
    per-query product.

    Args:
        query: ``[B, D]`` target embedding.
        keys: ``[total_L, D]`` behavior embeddings, jagged by ``offsets`` (int64 ``[B + 1]``).
        weights: ``[W_1 [4D, H1], W_2 [H1, H2], ..., W_out [H_n, 1]]`` (x @ W layout, e.g. 80 -> 40 -> 1);
            the rows of ``W_1`` multiply ``q``, ``k``, ``q - k``, ``q * k`` in that order.
        biases: ``[b_1 [H1], ..., b_out [1]]``.
        values: ``[total_L, Dv]`` pooled instead of the keys.
        activation: hidden activation, ``"sigmoid"`` (official DIN), ``"relu"``, ``"prelu"`` or ``"dice"``.
        alphas: per hidden layer, the PReLU/Dice slope (``[H_i]`` or one shared value).
        dice_running: per hidden layer ``(running_mean, running_var)`` of Dice's BatchNorm.
        dice_training: Dice with batch statistics over every behavior of the batch (the running buffers, if given,
            are updated in place with ``dice_momentum``); runs on the reference. False: the running statistics.
        dice_eps: Dice's variance epsilon.
        softmax: False (the paper): the raw scores are the weights; True (the official code): their softmax over
            the sample's (unmasked) behaviors.
        softmax_scale: multiplies the scores before the softmax (ignored without it).
        mask: optional bool ``[total_L]``; False drops the behavior (no weight, zero gradients, not in Dice's
            batch statistics). A jagged batch needs no padding mask: a sample's behaviors are exactly its rows.
        max_len: the longest sample, if the caller knows it (skips a host sync and the offsets check).
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (default: ``$KERNELS_BACKEND``, else auto).

    Returns:
        ``[B, Dv]`` in the query's dtype. query, keys and values share one float dtype (16-bit inputs compute in
        float32 on the reference and with float32 accumulation on Triton).
    """
    batch = check_offsets(_OP, offsets)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_rows(_OP, "query", query, batch, 2)
    dim = query.shape[1]
    total = keys.shape[0]
    check_rows(_OP, "keys", keys, total, 2)
    if keys.shape[1] != dim:
        raise ValueError(f"{_OP}: keys must be [N, {dim}], got {tuple(keys.shape)}")
    if values is not None:
        check_rows(_OP, "values", values, total, 2)
    if mask is not None:
        check_mask(_OP, mask, total)
    dtypes = {query.dtype, keys.dtype} | ({values.dtype} if values is not None else set())
    if query.dtype not in FLOAT_DTYPES or len(dtypes) != 1:
        raise ValueError(f"{_OP}: query, keys and values must share one dtype of {FLOAT_DTYPES}")
    if len(weights) < 2 or len(biases) != len(weights):
        raise ValueError(f"{_OP}: need at least one hidden layer and the output layer, with one bias per weight")
    n_hidden = len(weights) - 1
    widths = [w.shape[1] for w in weights[:-1]]
    expected_in = [4 * dim] + widths[:-1]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        want_in = expected_in[i] if i < n_hidden else widths[-1]
        if w.dim() != 2 or w.shape[0] != want_in or b.shape != (w.shape[1],):
            raise ValueError(f"{_OP}: layer {i}: weight must be [{want_in}, out] with bias [out], got "
                             f"{tuple(w.shape)} and {tuple(b.shape)}")  # fmt: skip
    if weights[-1].shape[1] != 1:
        raise ValueError(f"{_OP}: the output layer must have one unit, got {weights[-1].shape[1]}")
    if activation in ("prelu", "dice"):
        if alphas is None or len(alphas) != n_hidden:
            raise ValueError(f"{_OP}: {activation} needs one alpha per hidden layer ({n_hidden})")
        for a, width in zip(alphas, widths, strict=True):
            if a.numel() not in (1, width):
                raise ValueError(f"{_OP}: alpha must have 1 or {width} values, got {tuple(a.shape)}")
    if activation == "dice" and not dice_training:
        if dice_running is None or len(dice_running) != n_hidden:
            raise ValueError(
                f"{_OP}: dice without dice_training needs dice_running (mean, var) per hidden layer ({n_hidden})"
            )
    longest = jagged_max_len(_OP, offsets, total, max_len)

    unsupported = None
    if activation == "dice" and dice_training:
        unsupported = "dice with batch statistics"
    elif n_hidden > TRITON_MAX_HIDDEN_LAYERS:
        unsupported = f"{n_hidden} hidden layers > {TRITON_MAX_HIDDEN_LAYERS}"
    elif max([dim, values.shape[1] if values is not None else dim, *widths]) > TRITON_MAX_WIDTH:
        unsupported = f"a width above {TRITON_MAX_WIDTH}"
    tensors = (query, keys, values, offsets, mask, *weights, *biases)
    impl = resolve_backend(_OP, tensors, backend, unsupported)
    if impl == "reference":
        return din_attention_reference(
            query, keys, offsets, weights, biases, values, activation, alphas, dice_running, dice_training,
            dice_momentum, dice_eps, softmax, softmax_scale, mask,
        )  # fmt: skip

    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.to(compute)
    w1 = weights[0].to(compute)
    w_q, w_k, w_d, w_p = w1.split(dim, dim=0)
    # x @ W_1 + b_1 = k @ (W_k - W_d + diag(q) W_p) + (q @ (W_q + W_d) + b_1): per-sample [D, H1] and [H1].
    m = ((w_k - w_d)[None, :, :] + q[:, :, None] * w_p[None, :, :]).contiguous()
    c = (q @ (w_q + w_d) + biases[0].to(compute)).contiguous()
    w2 = weights[1].to(compute).contiguous() if n_hidden == 2 else None
    b2 = biases[1].to(compute).contiguous() if n_hidden == 2 else None
    wout = weights[-1].to(compute).reshape(-1).contiguous()
    bout = biases[-1].to(compute).reshape(1).contiguous()
    alpha = [None, None]
    stats: list[torch.Tensor | None] = [None, None, None, None]
    for i in range(n_hidden):
        if alphas is not None:
            alpha[i] = alphas[i].to(compute).reshape(-1).expand(widths[i]).contiguous()
        if activation == "dice" and dice_running is not None:
            mean, var = dice_running[i]
            stats[2 * i] = mean.detach().to(compute).contiguous()
            stats[2 * i + 1] = torch.rsqrt(var.detach().to(compute) + dice_eps).contiguous()
    out = _DinAttentionTriton.apply(
        keys if keys.stride(1) == 1 else keys.contiguous(),
        (values if values.stride(1) == 1 else values.contiguous()) if values is not None else keys,
        offsets,
        mask.contiguous() if mask is not None else None,
        activation,
        softmax,
        float(softmax_scale),
        longest,
        m, c, w2, b2, wout, bout, alpha[0], alpha[1], *stats,
    )  # fmt: skip
    return out.to(query.dtype)
