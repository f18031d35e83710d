"""Sums and gathers of rows by index with their gradients (`index_add.cpp`): `index_add_rows` (one pass in index
order, not PyTorch's sort of the index), `gather_rows` (an ``index_select`` whose backward is that sum) and
`sum_rows` (the sum, differentiable); and DIEN's auxiliary dot products of each state with the next behaviors,
`next_dots` (`next_dots.cpp`). Called as ``ctr.native.<name>``; each runs PyTorch's form where the native one
does not apply (`ctr.native.applies`)."""

from __future__ import annotations

import torch

from . import applies


def index_add_rows(src: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """``zeros(rows, D).index_add_(0, index, src)`` for ``src [N, D]`` and ``index [N]``: natively where it applies
    (float32 on the CPU; `index_add.cpp`: one pass in index order, not PyTorch's sort of the index), else PyTorch's.
    Not differentiable itself: the backward of `gather_rows` and the sparse update call it."""
    if src.dim() == 2 and index.dim() == 1 and index.device.type == "cpu" and applies(src):
        return torch.ops.ctr_native.index_add_rows(src.contiguous(), index.to(torch.int64).contiguous(), int(rows))
    return src.new_zeros(rows, *src.shape[1:]).index_add_(0, index, src)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is `index_add_rows` (x [R, ...] summed as [R, prod(...)]), the
    gradient of row ``zero_row`` (None: none) set to zero."""

    @staticmethod
    def forward(ctx, x, index, zero_row):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(index)
        ctx.shape, ctx.zero_row = x.shape, zero_row
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (index,) = ctx.saved_tensors
        summed = index_add_rows(grad.reshape(grad.shape[0], -1), index, ctx.shape[0])
        if ctx.zero_row is not None:
            summed[ctx.zero_row] = 0
        return summed.view(ctx.shape), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, *, zero_row: int | None = None) -> torch.Tensor:
    """``x.index_select(0, index)``; where a gradient flows back to a float32 CPU ``x``, its backward is the native
    `index_add_rows` instead of PyTorch's ``index_add_`` (which sorts the index first; see `index_add.cpp`).
    ``zero_row``: a row whose gradient is zero on that path (``nn.Embedding``'s ``padding_idx``; callers that need
    it elsewhere check `applies` first, as `ctr.modules.dense_embedding` does)."""
    if (
        x.dim() >= 1 and index.dim() == 1 and x.requires_grad and torch.is_grad_enabled()
        and index.device.type == "cpu" and applies(x)
    ):  # fmt: skip
        return _GatherRows.apply(x, index, zero_row)
    return x.index_select(0, index)


class _SumRows(torch.autograd.Function):
    """`index_add_rows` with its gradient: each source row's is its destination's."""

    @staticmethod
    def forward(ctx, src, index, rows):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(index)
        return index_add_rows(src, index, rows)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def sum_rows(src: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """``zeros(rows, D).index_add(0, index, src)`` for ``src [N, D]``, differentiable in ``src``: natively where it
    applies (`index_add_rows`), else PyTorch's ``index_add``."""
    if src.dim() == 2 and index.dim() == 1 and index.device.type == "cpu" and applies(src):
        return _SumRows.apply(src, index, int(rows))
    return src.new_zeros(rows, *src.shape[1:]).index_add(0, index, src)


class _NextDots(torch.autograd.Function):
    """`next_dots` natively (`next_dots.cpp`): forward one pass over the three blocks, backward one more."""

    @staticmethod
    def forward(ctx, h, clicked, sampled):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(h, clicked, sampled)
        pos, neg = torch.ops.ctr_native.next_dots_forward(h, clicked, sampled)
        return pos, neg

    @staticmethod
    def backward(ctx, gpos, gneg):  # type: ignore[no-untyped-def]
        h, clicked, sampled = ctx.saved_tensors
        # (an output the loss does not read arrives as zeros: autograd materializes them)
        dh, dc, ds = torch.ops.ctr_native.next_dots_backward(gpos.contiguous(), gneg.contiguous(), h, clicked, sampled)
        return dh, dc, ds


def next_dots(
    h: torch.Tensor, clicked: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(<h[:, t], clicked[:, t + 1]>, <h[:, t], sampled[:, t + 1]>)`` over t < L − 1, each ``[B, L − 1]``, for
    ``[B, L, H]`` blocks of one shape, natively (`next_dots.cpp`); None where the caller must run its PyTorch form."""
    if h.dim() != 3 or clicked.shape != h.shape or sampled.shape != h.shape or not applies(h, clicked, sampled):
        return None
    return _NextDots.apply(h.contiguous(), clicked.contiguous(), sampled.contiguous())
