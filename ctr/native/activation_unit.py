"""DIN's activation unit with Dice in cache-sized blocks (`din_unit.cpp`), for `DinAttention.scores`.

The eager unit (`DinAttention._rows` on gathered rows) runs a chain of whole-batch operators whose passes through
memory, not their arithmetic, set its time on a 2-core machine; the native form reads each block of rows once per
layer and keeps what it derives from it in cache (see `din_unit.cpp`), and runs the first layer sample by sample on
the keys alone (``x = qpart + M_bᵀ k`` with ``M_b = W_k' + diag(q_b) W_p``: half the multiply-adds, forward and
backward; `unit_first_layer.h`). Same function, same parameters, the same
running statistics as the eager module (`tests/test_din_unit.py`). Called as `ctr.native.din_unit`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import applies


class _DinUnit(torch.autograd.Function):
    """The scores [N], computed by `din_unit_forward` before the call (``pack``: its outputs), with their backward:
    gradients for the keys (all M rows, zero where unread), the queries, the first layer's per-sample share
    ``qpart``, every weight, bias and Dice's α. With ``pack``'s pooled sums (`din_unit(pool=True)`): (pooled [B, D],
    scores), the pooling's gradient taken in the same backward (no second [M, D] gradient of the keys to add)."""

    @staticmethod
    def forward(ctx, pack, flat, rows, layers, keys, query, qpart, w1, w_out, b_out, *rest):  # type: ignore[no-untyped-def]
        ws, alphas = rest[: layers - 1], rest[2 * layers - 2 :]
        scores, pre, mean, invstd, sig, pooled = pack
        saved = (scores,) if pooled is not None else ()
        ctx.save_for_backward(keys, flat, query, rows, w1, w_out, *ws, *alphas, *pre, *mean, *invstd, *sig, *saved)
        ctx.layers, ctx.b_shape, ctx.pooled = layers, b_out.shape, pooled is not None
        return scores if pooled is None else (pooled, scores)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[no-untyped-def]
        layers = ctx.layers
        keys, flat, query, rows, w1, w_out, *rest = ctx.saved_tensors
        ws, alphas = rest[: layers - 1], rest[layers - 1 : 2 * layers - 1]
        pre, mean, invstd, sig = (
            rest[2 * layers - 1 + i * layers : 2 * layers - 1 + (i + 1) * layers] for i in range(4)
        )
        gpooled, scores = None, None
        if ctx.pooled:
            gpooled, grad = grads
            scores = rest[-1]
            grad = scores.new_zeros(scores.shape) if grad is None else grad
            gpooled = None if gpooled is None else gpooled.contiguous()
        else:
            (grad,) = grads
        g = torch.ops.ctr_native.din_unit_backward(
            grad.contiguous(), keys, flat, query, rows, w1, list(ws), list(alphas), w_out, list(pre), list(mean),
            list(invstd), list(sig), gpooled, scores,
        )  # fmt: skip
        gkeys, gquery, gqpart, gw1 = g[:4]
        gws, gbs = g[4 : 3 + layers], g[3 + layers : 2 + 2 * layers]
        galphas, gw_out, gb_out = g[2 + 2 * layers : 2 + 3 * layers], g[-2], g[-1]
        return (
            None, None, None, None, gkeys, gquery, gqpart, gw1, gw_out, gb_out.view(ctx.b_shape),
            *gws, *gbs, *galphas,
        )  # fmt: skip


def fits(dices: Sequence[nn.Module]) -> bool:
    """Whether every hidden activation is batch-statistics Dice (`ctr.modules.activations.Dice`, ``mode="batch"``)
    whose norm the native op reproduces (no affine parameters, running statistics tracked with a fixed momentum),
    as `ctr.native.dice` requires. Read by attribute: `ctr.native` does not import the modules built on it."""
    for act in dices:
        if getattr(act, "mode", None) != "batch" or not isinstance(getattr(act, "alpha", None), torch.Tensor):
            return False
        norm = act.norm
        if (
            not isinstance(norm, nn.BatchNorm1d) or norm.affine or not norm.track_running_stats
            or norm.momentum is None or norm.running_mean is None or norm.running_var is None
        ):  # fmt: skip
            return False
    return True


def din_unit(
    keys: torch.Tensor,
    flat: torch.Tensor,
    query: torch.Tensor,
    rows: torch.Tensor,
    qpart: torch.Tensor,
    w_kp: torch.Tensor,
    linears: Sequence[nn.Linear],
    dices: Sequence[nn.Module],
    out: nn.Linear,
    pool: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """The unit's scores [N] natively, or None where the caller must run its eager form; with ``pool``, (DIN's
    weighted sum of the keys by the scores [B, D], as `weighted_pool` gives it, the scores).

    ``keys [M, D]`` (a padded block's rows), ``flat [N]`` the real rows' positions in it (increasing), ``rows [N]``
    their samples (nondecreasing), ``query [B, D]``, ``qpart [B, H_1]`` the first layer's per-sample share with its
    bias, ``w_kp [H_1, 2D]`` its weight on ``[k; q ⊙ k]``; ``linears`` the hidden layers after the first, ``dices``
    every hidden layer's Dice, ``out`` the 1-unit output layer. Training: the batch's statistics, the running ones
    updated as `nn.BatchNorm1d` does; evaluation: the running statistics, forward only (None when a gradient is
    needed). Native only on float32 CPU tensors outside `torch.compile`, with more than one row in training.
    """
    if not fits(dices) or out.bias is None or any(lin.bias is None for lin in linears):
        return None
    params = [p for lin in linears for p in (lin.weight, lin.bias)] + [d.alpha for d in dices]  # type: ignore[misc]
    if not applies(keys, query, qpart, w_kp, out.weight, *params):
        return None
    n = flat.numel()
    norms = [d.norm for d in dices]  # type: ignore[misc]
    layers = len(dices)
    eps = float(norms[0].eps)
    if any(float(nm.eps) != eps for nm in norms):
        return None
    flat = flat.to(torch.int64).contiguous()
    rows = rows.to(torch.int64).contiguous()
    keys, query, qpart, w_kp = keys.contiguous(), query.contiguous(), qpart.contiguous(), w_kp.contiguous()
    w_out = out.weight.reshape(-1)
    ws = [lin.weight for lin in linears]
    bs = [lin.bias for lin in linears]
    alphas = [d.alpha for d in dices]  # type: ignore[misc]
    training = norms[0].training
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (keys, query, qpart, w_kp, out.weight, *params))
    if training and n < 2:
        return None  # one row has no variance: the module's own rule (BatchNorm1dAnySize)
    if not training and grad:
        return None  # the running statistics with a gradient: the eager form
    with torch.no_grad():
        stats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        if not training:
            stats = (
                [nm.running_mean.float().contiguous() for nm in norms],  # type: ignore[union-attr]
                [(nm.running_var.float() + nm.eps).rsqrt().contiguous() for nm in norms],  # type: ignore[union-attr]
            )
        res = torch.ops.ctr_native.din_unit_forward(
            keys, flat, query, rows, qpart, w_kp, [w.detach() for w in ws], [b.detach() for b in bs],
            [a.detach() for a in alphas], w_out.detach().contiguous(), float(out.bias), *stats, eps, grad, pool,
        )  # fmt: skip
        scores, pre = res[0], res[1 : 1 + layers]
        mean, invstd = res[1 + layers : 1 + 2 * layers], res[1 + 2 * layers : 1 + 3 * layers]
        var = res[1 + 3 * layers : 1 + 4 * layers]
        sig = res[1 + 4 * layers : 1 + 4 * layers + (layers if grad else 0)]  # sig: each Dice's σ (with grad)
        pooled = res[-1] if pool else None
        if training:
            _update_running(norms, mean, var, n)
    if not grad:
        return scores if pooled is None else (pooled, scores)
    pack = (scores, pre, mean, invstd, sig, pooled)
    return _DinUnit.apply(pack, flat, rows, layers, keys, query, qpart, w_kp, w_out, out.bias, *ws, *bs, *alphas)


def _update_running(
    norms: Sequence[nn.Module], means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor], n: int
) -> None:
    """Each norm's running mean and (unbiased) variance moved toward the batch's, as `nn.BatchNorm1d` does."""
    for norm, mean, var64 in zip(norms, means, variances, strict=True):
        m = float(norm.momentum)  # type: ignore[arg-type]
        norm.running_mean.mul_(1.0 - m).add_(mean.to(norm.running_mean.dtype), alpha=m)  # type: ignore[operator]
        unbiased = (var64 * (n / (n - 1))).to(norm.running_var.dtype)  # type: ignore[operator]
        norm.running_var.mul_(1.0 - m).add_(unbiased, alpha=m)  # type: ignore[operator]
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)  # type: ignore[operator]


class _WeightedPool(torch.autograd.Function):
    """``out[b] = Σ_{i: rows_i = b} w_i values[flat_i]`` (`weighted_pool.cpp`) with its backward."""

    @staticmethod
    def forward(ctx, w, values, flat, rows, b):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(w, values, flat, rows)
        return torch.ops.ctr_native.weighted_pool_forward(w, values, flat, rows, b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        w, values, flat, rows = ctx.saved_tensors
        need_w, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gw, gv = torch.ops.ctr_native.weighted_pool_backward(grad.contiguous(), w, values, flat, rows, need_v, need_w)
        return (gw if need_w else None), (gv if need_v else None), None, None, None


class _SimHashPool(torch.autograd.Function):
    """SDIM's ``u_b = Σ_i share_i v_i`` with the shares computed from the hashed rows in the same pass
    (`simhash.cpp`); only the values have a gradient."""

    @staticmethod
    def forward(ctx, values, keys, target, offsets, rotation):  # type: ignore[no-untyped-def]
        pooled, share = torch.ops.ctr_native.simhash_pool_forward(keys, target, offsets, rotation, values)
        ctx.save_for_backward(share, offsets)
        return pooled

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        share, offsets = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        gv = torch.ops.ctr_native.simhash_pool_backward(grad.contiguous(), share, offsets)
        return gv, None, None, None, None


def simhash_pool(
    target: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor, rotation: torch.Tensor, values: torch.Tensor
) -> torch.Tensor | None:
    """``[B, Dv]``: per sample, the sum of its rows of ``values [N, Dv]`` weighted by the share of the SimHash functions
    (``rotation [m, D, bits]``) under which the row's key (``keys [N, D]``, jagged by ``offsets [B + 1]``) has its
    target's (``target [B, D]``) code, natively; the keys and targets without gradient. None where the caller must
    run its eager form."""
    if values.dim() != 2 or not applies(values, keys, target, rotation):
        return None
    same = keys is values
    values = values.contiguous()
    keys = values.detach() if same else keys.detach().contiguous()  # the same rows: each read once
    target, offsets = target.detach().contiguous(), offsets.long().contiguous()
    return _SimHashPool.apply(values, keys, target, offsets, rotation.contiguous())


def weighted_pool(
    w: torch.Tensor, values: torch.Tensor, flat: torch.Tensor, rows: torch.Tensor, b: int
) -> torch.Tensor | None:
    """``[B, Dv]``: for each sample b, ``Σ_i w_i values[flat_i]`` over its rows (``rows_i = b``; ``w [N]``, ``values
    [M, Dv]``, ``flat [N]`` increasing, ``rows [N]`` nondecreasing), natively; None where the caller must run its eager
    form (not float32 on the CPU, not built, switched off, inside `torch.compile`)."""
    if w.dim() != 1 or values.dim() != 2 or not applies(w, values):
        return None
    flat, rows = flat.to(torch.int64).contiguous(), rows.to(torch.int64).contiguous()
    return _WeightedPool.apply(w.contiguous(), values.contiguous(), flat, rows, int(b))
