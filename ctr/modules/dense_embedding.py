"""`DenseEmbedding`: the models' own small tables (time-gap buckets, behavior types, semantic-ID codes, item biases),
``nn.Embedding`` with a faster gradient on the CPU.

These tables are trained by the dense optimizer, not TorchRec's fused sparse one, and they are looked up at every
behavior position: TWIN's two cross-feature tables at 1,024 x 50 positions, SIM's time-gap embedding at each
selected behavior. A look-up and its backward through ``F.embedding`` (whose CPU backward is
``embedding_dense_backward``) took 3.1 to 4.8 ms for 51,200 look-ups of an 8- to 32-wide table, or of a 50,000 x 1
item-bias table, on the 2-core machine; here (``index_select``, then the gradient rows summed by index in one pass,
`native.index_add_rows`) 0.7 to 1.2 ms. In TWIN's step at L = 50 the two cross-feature tables' backward was 7.8
of 88 ms. Same parameters, same state dict, same values: each row's gradient is the sum of the gradients of the
positions that looked it up, the ``padding_idx`` row's is zero (``tests/test_dense_embedding.py`` holds both against
``nn.Embedding``). On CUDA (or wherever the native operators do not apply), without gradient, or with ``max_norm``,
``scale_grad_by_freq`` or ``sparse``, it is ``nn.Embedding``'s own path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import native


class DenseEmbedding(nn.Embedding):
    """``nn.Embedding`` whose CPU training look-up is `native.gather_rows` (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's own argument name)
        w = self.weight
        if (
            not (w.requires_grad and torch.is_grad_enabled()) or not native.applies(w)
            or self.max_norm is not None or self.scale_grad_by_freq or self.sparse
        ):  # fmt: skip
            return F.embedding(
                input, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
            )
        out = native.gather_rows(w, input.reshape(-1), zero_row=self.padding_idx)
        return out.view(*input.shape, w.shape[1])
