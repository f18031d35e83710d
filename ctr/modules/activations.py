"""Activations by name, including Dice (DIN paper) in its batch-statistics form and MUSE's LayerNorm form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import native


class BatchNorm1dAnySize(nn.BatchNorm1d):
    """BatchNorm1d that accepts a training batch of one sample: it is normalized with the running statistics, which
    it leaves unchanged (one value has no variance). Batches capped by a behavior budget can hold a single whale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.size(0) == 1 and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class Dice(nn.Module):
    """Dice (DIN, Zhou et al. 2018): f(s) = p(s)·s + (1 − p(s))·α·s, p(s) = σ((s − E[s]) / sqrt(Var[s] + ε)).

    `mode="batch"` (the paper): E and Var are batch statistics in training and moving averages at inference (a
    BatchNorm without affine parameters). `mode="layer"` (MUSE's code): p = σ(LayerNorm(s)) per sample, ε = 1e-12.
    α is learned per unit; the paper does not give its start value, MUSE's code starts it at −0.25, we start at 0.
    Works on [B, H] and [B, L, H] (statistics over every position).
    """

    def __init__(self, units: int, mode: str = "batch", eps: float = 1e-8, alpha_init: float = 0.0) -> None:
        super().__init__()
        if mode not in ("batch", "layer"):
            raise ValueError(f"Dice mode must be 'batch' or 'layer', got {mode!r}")
        self.mode = mode
        self.alpha = nn.Parameter(torch.full((units,), alpha_init))
        if mode == "batch":
            self.norm: nn.Module = BatchNorm1dAnySize(units, eps=eps, affine=False)
        else:
            self.norm = nn.LayerNorm(units, eps=1e-12, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "batch":  # fused passes on the CPU where available (ctr/native: the same function)
            rows = x.reshape(-1, x.size(-1)) if x.dim() == 3 else x
            out = native.dice(rows, self.alpha, self.norm)  # type: ignore[arg-type]
            if out is not None:
                return out.view_as(x)
        if self.mode == "batch" and x.dim() == 3:
            b, n, h = x.shape
            p = torch.sigmoid(self.norm(x.reshape(b * n, h)).reshape(b, n, h))
        else:
            p = torch.sigmoid(self.norm(x))
        # p·x + (1 − p)·α·x as x·(α + p·(1 − α)): two passes over [N, H] instead of five (forward and backward
        # are memory-bound on the CPU, and the activation unit runs this on every behavior)
        return x * torch.addcmul(self.alpha, p, 1 - self.alpha)


def make_activation(name: str, units: int) -> nn.Module:
    """`relu`, `prelu`, `sigmoid`, `tanh`, `silu`, `dice` (batch statistics) or `dice_ln` (MUSE's LayerNorm Dice)."""
    name = name.lower()
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU(units)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "silu":
        return nn.SiLU()
    if name == "dice":
        return Dice(units, mode="batch")
    if name == "dice_ln":
        return Dice(units, mode="layer", alpha_init=-0.25)
    raise ValueError(f"unknown activation {name!r}; choose relu, prelu, sigmoid, tanh, silu, dice, dice_ln")
