"""`DenseEmbedding`: the models' own small tables (time-gap buckets, behavior types, semantic-ID codes, item biases),
``nn.Embedding`` with a faster gradient on the CPU.

These tables are trained by the dense optimizer, not TorchRec's fused sparse one, and they are looked up at every
behavior position: TWIN's two cross-feature tables at 1,024 x 50 positions, SIM's time-gap embedding at each
selected behavior. PyTorch's CPU backward of ``F.embedding`` (``embedding_dense_backward``) took 3.2 to 3.6 ms for
51,200 look-ups of an 8- to 32-wide table on the 2-core machine, where an ``index_add_`` of the same gradient rows
takes 0.7 to 1.1 ms (0.3 against 3.1 ms for a 50,000 x 1 item-bias table); in TWIN's step at L = 50 the two tables'
backward was 7.8 of 88 ms. Same parameters, same state dict, same values: each row's gradient is the sum of the
gradients of the positions that looked it up, the ``padding_idx`` row's is zero (``tests/test_dense_embedding.py``
holds both against ``nn.Embedding``). On CUDA, without gradient, or with ``max_norm``, ``scale_grad_by_freq`` or
``sparse``, it is ``nn.Embedding``'s own path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _IndexAddLookup(torch.autograd.Function):
    """``weight[idx]`` forward (``index_select``), ``zeros.index_add_(0, idx, grad)`` backward, padding row zeroed."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, idx: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows, ctx.padding_idx = weight.shape[0], padding_idx
        return weight.index_select(0, idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (idx,) = ctx.saved_tensors
        g = grad.new_zeros(ctx.rows, grad.shape[1]).index_add_(0, idx, grad)
        if ctx.padding_idx is not None:
            g[ctx.padding_idx] = 0
        return g, None, None


class DenseEmbedding(nn.Embedding):
    """``nn.Embedding`` whose CPU training look-up has an ``index_add_`` backward (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's own argument name)
        w = self.weight
        if (
            w.device.type != "cpu" or not (w.requires_grad and torch.is_grad_enabled())
            or self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        ):  # fmt: skip
            return F.embedding(
                input, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
            )
        out = _IndexAddLookup.apply(w, input.reshape(-1), self.padding_idx)
        return out.view(*input.shape, w.shape[1])
