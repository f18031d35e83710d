"""DIN attention (the activation unit of Deep Interest Network, Zhou et al. 2018), PyTorch reference.

For sample b with target ``q`` and behaviors ``k_i`` (jagged rows of ``keys``)::

    x_i  = [q; k_i; q - k_i; q * k_i]                                   [4D]
    h_i  = act(... act(x_i @ W_1 + b_1) ... @ W_n + b_n)                 hidden layers (e.g. 80 -> 40)
    s_i  = h_i @ W_out + b_out                                           scalar score
    a_i  = s_i (the paper: raw weights)  or  softmax_i(s_i * softmax_scale) over the sample (the official code)
    out_b = sum_i a_i * v_i                                              v = keys unless values are given

Activations: ``sigmoid``, ``relu``, ``prelu`` (``alpha`` per unit or shared), ``dice``
(``p * x + (1 - p) * alpha * x`` with ``p = sigmoid((x - mean) / sqrt(var + eps))``): with ``dice_training`` the
mean and (biased) variance are the batch statistics over every valid behavior of the batch, and running buffers, if
given, are updated in place like BatchNorm; otherwise the given running statistics are used.
A behavior whose ``mask`` entry is False is absent (it is dropped before the MLP, so it never reaches Dice's batch
statistics, takes no weight and gets zero gradients); a sample without behaviors gets zeros.
This reference builds the ``[total_L, 4D]`` input literally; it is the definition the fused kernel is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._jagged import compact, segment_ids


def activate(
    x: torch.Tensor,
    activation: str,
    alpha: torch.Tensor | None = None,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    dice_training: bool = False,
    dice_momentum: float = 0.1,
    dice_eps: float = 1e-8,
) -> torch.Tensor:
    """One hidden activation of the DIN attention MLP on ``[rows, units]``."""
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "relu":
        return torch.relu(x)
    if activation == "prelu":
        assert alpha is not None
        return torch.where(x > 0, x, alpha * x)
    if activation == "dice":
        assert alpha is not None
        if dice_training and x.shape[0] == 0:
            return x  # no behavior in the batch: no statistics to take (and none to update)
        if dice_training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            if running is not None:  # BatchNorm's update: the running variance takes the unbiased estimate
                with torch.no_grad():
                    unbiased = x.var(0, unbiased=True) if x.shape[0] > 1 else var
                    running[0].mul_(1 - dice_momentum).add_(dice_momentum * mean.to(running[0].dtype))
                    running[1].mul_(1 - dice_momentum).add_(dice_momentum * unbiased.to(running[1].dtype))
        elif running is None:
            raise ValueError("dice in inference needs running statistics (mean, var)")
        else:
            mean, var = running[0].to(x.dtype), running[1].to(x.dtype)
        p = torch.sigmoid((x - mean) / torch.sqrt(var + dice_eps))
        return p * x + (1 - p) * alpha * x
    raise ValueError(f"unknown activation {activation!r}")


def din_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    offsets: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
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
) -> torch.Tensor:
    """query ``[B, D]``, keys ``[N, D]``, values ``[N, Dv]``, mask bool ``[N]``; ``weights[i]`` is ``[in, out]``
    (the first ``[4D, H1]``, the last ``[H_n, 1]``); returns ``[B, Dv]`` in the query's dtype."""
    batch = offsets.numel() - 1
    out_dtype = query.dtype
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    values = keys if values is None else values
    if mask is not None:
        kept, offsets = compact(offsets, mask)
        keys, values = keys[kept], values[kept]
    query, keys, values = query.to(compute), keys.to(compute), values.to(compute)
    sample = segment_ids(offsets, keys.shape[0])

    q = query[sample]
    x = torch.cat([q, keys, q - keys, q * keys], dim=-1)  # [N, 4D]
    for i, (w, b) in enumerate(zip(weights[:-1], biases[:-1], strict=True)):
        x = x @ w.to(compute) + b.to(compute)
        alpha = alphas[i].to(compute) if alphas is not None else None
        running = dice_running[i] if dice_running is not None else None
        x = activate(x, activation, alpha, running, dice_training, dice_momentum, dice_eps)
    scores = (x @ weights[-1].to(compute) + biases[-1].to(compute)).squeeze(-1)  # [N]

    if softmax:
        logits = scores * softmax_scale
        seg_max = torch.full((batch,), float("-inf"), dtype=compute, device=scores.device)
        seg_max = seg_max.scatter_reduce(0, sample, logits.detach(), "amax")
        e = torch.exp(logits - seg_max[sample])
        denom = torch.zeros(batch, dtype=compute, device=scores.device).index_add(0, sample, e)
        scores = e / denom[sample]
    out = torch.zeros(batch, values.shape[-1], dtype=compute, device=values.device)
    return out.index_add(0, sample, scores[:, None] * values).to(out_dtype)
