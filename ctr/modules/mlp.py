"""MLP tower with a choice of activation (ReLU, PReLU, sigmoid, Dice), optional batch norm and dropout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .activations import BatchNorm1dAnySize, make_activation


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> [Dropout] per hidden layer, then an optional output Linear."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        *,
        activation: str = "relu",
        batch_norm: bool = False,
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(BatchNorm1dAnySize(h))
            layers.append(make_activation(activation, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
