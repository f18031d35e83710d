"""Target attention over the rows of a jagged block (`attention_rows.cpp`), for the ESUs of TWIN and ETA where their
GSU keeps every behavior (`TwoStageModel.fits_k`, `ctr.models.stage_input.LongRows.jagged`): the same function as
`ctr.native.target_attention` on the slots laid out from those rows, without the layout.

For sample b (rows ``offsets[b] .. offsets[b + 1]``) and head h: ``s_hr = q_bh · [a_r; x_r] (x_r only when
scored) + bias_rh``, ``p_h = softmax_r(s_h)``, ``out_bh = Σ_r p_hr [a_r; x_r]``. `attention_rows_reference` is the
eager form (the fallback, and what tests/test_attention_rows_native.py holds the op to).
"""

from __future__ import annotations

import torch

from . import applies


class _AttentionRows(torch.autograd.Function):
    """The op and its backward (gradients for the query, both column blocks and the bias); the probabilities
    ``[N, H]`` are saved."""

    @staticmethod
    def forward(ctx, q, a, x, offsets, bias, scored):  # type: ignore[no-untyped-def]
        out, probs = torch.ops.ctr_native.attention_rows_forward(q, a, x, offsets, bias, scored)
        ctx.save_for_backward(q, a, x, offsets, probs)
        ctx.scored, ctx.with_bias = scored, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        q, a, x, offsets, probs = ctx.saved_tensors
        gq, ga, gx, gb = torch.ops.ctr_native.attention_rows_backward(
            grad.contiguous(), q, a, x, offsets, probs, ctx.scored, ctx.with_bias
        )
        return gq, ga, gx, None, (gb if ctx.with_bias else None), None


def _blocks(a: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    return a.new_empty(a.shape[0], 0) if x is None else x


def attention_rows(
    q: torch.Tensor,
    a: torch.Tensor,
    offsets: torch.Tensor,
    x: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scored: bool = False,
) -> torch.Tensor | None:
    """``[B, H, Da + Dx]`` natively (see the module docstring): ``q [B, H, Da (+ Dx when scored)]`` already scaled,
    ``a [N, Da]``, ``x [N, Dx]`` or None, ``offsets [B + 1]`` int64, ``bias [N, H]`` or None. None where the caller
    must run `attention_rows_reference` (not float32 on the CPU, not built, switched off, inside `torch.compile`)."""
    xx = _blocks(a, x)
    if q.dim() != 3 or a.dim() != 2 or xx.dim() != 2 or offsets.dim() != 1:
        return None
    if not applies(q, a, xx, *(() if bias is None else (bias,))):
        return None
    return _AttentionRows.apply(
        q.contiguous(), a.contiguous(), xx.contiguous(), offsets.long().contiguous(),
        None if bias is None else bias.contiguous(), bool(scored),
    )  # fmt: skip


def attention_rows_reference(
    q: torch.Tensor,
    a: torch.Tensor,
    offsets: torch.Tensor,
    x: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scored: bool = False,
) -> torch.Tensor:
    """The eager form of `attention_rows`: per-row products with each row's sample's queries and a softmax within
    each sample and head (zeros for a sample without rows)."""
    b, h = q.shape[0], q.shape[1]
    values = a if x is None else torch.cat([a, x], -1)
    keys = values if scored else a
    n = a.shape[0]
    sample = torch.repeat_interleave(torch.arange(b, device=a.device), offsets[1:] - offsets[:-1], output_size=n)
    s = (keys.unsqueeze(1) * q.index_select(0, sample)).sum(-1)  # [N, H]
    if bias is not None:
        s = s + bias
    idx = sample.unsqueeze(1).expand(n, h)
    top = s.new_full((b, h), float("-inf")).scatter_reduce(0, idx, s.detach(), "amax")
    e = torch.exp(s - top.index_select(0, sample))
    p = e / e.new_zeros(b, h).index_add(0, sample, e).index_select(0, sample)
    return values.new_zeros(b, h, values.shape[1]).index_add(0, sample, p.unsqueeze(-1) * values.unsqueeze(1))


__all__ = ["attention_rows", "attention_rows_reference"]
