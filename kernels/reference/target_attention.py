"""Jagged target attention, PyTorch reference.

For sample b, query q (of Q) and head h, over the sample's behaviors i (jagged rows ``offsets[b]:offsets[b+1]``)::

    z_i   = scale * <query[b, q, h], keys[i, h]> + bias_i          (bias_i: bias[i] or bias[i, q]; 0 if absent)
    s_i   = z_i / tau_b                                            (tau_b: temperature[b]; 1 if absent)
    a_i   = softmax_i(s_i) over the sample's behaviors
    out[b, q, h] = sum_i a_i * values[i, h]                        (zero for a sample without behaviors)

The temperature divides the whole logit, bias included (LAIN's length-modulated attention: tau > 1 flattens).
A behavior whose ``mask`` entry is False is absent: it takes no weight and gets zero gradients (a sample whose
behaviors are all masked gets zeros, like an empty one).
Differentiable in query, keys, values, bias and temperature through autograd.
"""

from __future__ import annotations

import torch

from .._jagged import compact, segment_ids


def target_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """query ``[B, Q, H, Dk]``, keys ``[N, H, Dk]``, values ``[N, H, Dv]``, bias ``[N]`` or ``[N, Q]``,
    temperature ``[B]``, mask bool ``[N]``; returns ``[B, Q, H, Dv]`` in the query's dtype."""
    if mask is not None:
        kept, offsets = compact(offsets, mask)
        keys, values = keys[kept], values[kept]
        bias = bias[kept] if bias is not None else None
    batch, n_query, n_head, _ = query.shape
    total = keys.shape[0]
    sample = segment_ids(offsets, total)  # [N]
    out_dtype = query.dtype
    # 16-bit inputs are computed in float32, float64 in float64 (the Triton kernels accumulate the same way).
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    query, keys, values = query.to(compute), keys.to(compute), values.to(compute)
    bias = bias.to(compute) if bias is not None else None
    temperature = temperature.to(compute) if temperature is not None else None

    logits = torch.einsum("nqhd,nhd->nqh", query[sample], keys) * scale  # [N, Q, H]
    if bias is not None:
        logits = logits + (bias[:, None, None] if bias.dim() == 1 else bias[:, :, None])
    if temperature is not None:
        logits = logits / temperature[sample][:, None, None]

    # Softmax within each sample: subtract the sample's max (no gradient needed: softmax is shift-invariant).
    seg_max = torch.full((batch, n_query, n_head), float("-inf"), dtype=logits.dtype, device=logits.device)
    seg_max = seg_max.scatter_reduce(0, sample[:, None, None].expand_as(logits), logits.detach(), "amax")
    weights = torch.exp(logits - seg_max[sample])  # [N, Q, H]
    denom = torch.zeros_like(seg_max).index_add(0, sample, weights)  # >= 1 for a non-empty sample
    numer = torch.zeros(batch, n_query, n_head, values.shape[-1], dtype=weights.dtype, device=weights.device)
    numer = numer.index_add(0, sample, weights[..., None] * values[:, None, :, :])
    # clamp_min(1) changes nothing for a non-empty sample and gives 0 / 1 = 0 for an empty one.
    return (numer / denom.clamp_min(1.0)[..., None]).to(out_dtype)
