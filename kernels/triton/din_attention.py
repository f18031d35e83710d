"""Triton DIN attention: the activation-unit MLP, the weighting and the pooling fused, forward and backward.

The first layer never sees ``[q; k; q - k; q * k]``: with ``W_1 = [W_q; W_k; W_d; W_p]`` (four ``[D, H1]`` blocks)

    x @ W_1 + b_1 = k @ (W_k - W_d + diag(q) W_p) + (q @ (W_q + W_d) + b_1) = k @ M_b + c_b

so the caller forms, per sample, ``M_b [D, H1]`` and ``c_b [H1]`` in PyTorch (autograd carries their gradients
back to ``q``, ``W_1`` and ``b_1``), and the kernel computes one ``[BLOCK_L, D] x [D, H1]`` product per tile.

Forward, grid ``(B, S)``: program ``(b, s)`` takes tiles ``s, s + S, ...`` of sample b: hidden layers (1 or 2, each
a ``tl.dot``), the score, then either raw weights (DIN paper) or an online softmax, and the weighted sum of the
values; ``combine_splits`` merges the S partials (log-sum-exp merge for softmax, a sum otherwise).
``M_b`` and ``W_2`` are loaded once per program (they are the same for every tile of the sample).
Backward, grid ``(B, S)``: recomputes each tile, writes ``dK``/``dV`` rows, and per-program partial gradients of
``M_b``, ``c_b``, the later layers and the activation slopes, summed on the host (no atomics).

An optional bool behavior mask (read as its uint8 bytes) drops behaviors: no weight, zero gradients.

Activations: sigmoid, relu, prelu, and dice with given statistics (inference); Dice with batch statistics needs a
batch-wide reduction between layers and runs on the reference. Limits: 1 or 2 hidden layers, D, Dv <= 256,
hidden widths <= 256.

This module holds the host side (``DinParams``, the launches, the reductions of the partials); the kernels are in
`kernels.triton._din_kernels`, their shared device functions in `kernels.triton._din_tile`.
"""

from __future__ import annotations

import torch

from ._common import acc_dtype, allow_tf32, combine_splits, dot_dtype, ensure_launchable
from ._din_kernels import _din_bwd_kernel, _din_fwd_kernel
from .config import get_config, next_pow2, num_splits

ACTIVATIONS = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
MAX_WIDTH = 256


class DinParams:
    """The fused kernel's view of the attention MLP (see the module docstring)."""

    def __init__(
        self,
        m: torch.Tensor,  # [B, D, H1]
        c: torch.Tensor,  # [B, H1]
        w2: torch.Tensor | None,  # [H1, H2]
        b2: torch.Tensor | None,  # [H2]
        wout: torch.Tensor,  # [H_last]
        bout: torch.Tensor,  # [1]
        alpha1: torch.Tensor | None,  # [H1]
        alpha2: torch.Tensor | None,  # [H2]
        mean1: torch.Tensor | None,
        istd1: torch.Tensor | None,
        mean2: torch.Tensor | None,
        istd2: torch.Tensor | None,
    ) -> None:
        self.m, self.c, self.w2, self.b2, self.wout, self.bout = m, c, w2, b2, wout, bout
        self.alpha1, self.alpha2 = alpha1, alpha2
        self.mean1, self.istd1, self.mean2, self.istd2 = mean1, istd1, mean2, istd2

    def pointers(self, dummy: torch.Tensor) -> list[torch.Tensor]:
        items = [self.m, self.c, self.w2, self.b2, self.wout, self.bout, self.alpha1, self.alpha2]
        items += [self.mean1, self.istd1, self.mean2, self.istd2]
        return [t if t is not None else dummy for t in items]


def _launch(keys: torch.Tensor, values: torch.Tensor, params: DinParams, max_len: int) -> dict:
    cfg = get_config()
    batch, dim, h1 = params.m.shape
    h2 = params.w2.shape[1] if params.w2 is not None else 1
    block_l = cfg.block_l or 32
    return {
        "splits": min(num_splits(max_len, block_l, batch, keys.device), 128),
        "meta": {
            "NUM_HIDDEN": 2 if params.w2 is not None else 1,
            "DOT": dot_dtype(keys.dtype),
            "ACC": acc_dtype(keys.dtype),
            "TF32": allow_tf32(),
            "BLOCK_L": max(block_l, 16),
            "BLOCK_D": max(next_pow2(dim), 16),
            "BLOCK_DV": next_pow2(values.shape[1]),
            "BLOCK_H1": max(next_pow2(h1), 16),
            "BLOCK_H2": max(next_pow2(h2), 16),
            "num_warps": cfg.num_warps or 4,
        },
        "sizes": (dim, values.shape[1], h1, h2),
    }


def din_attention_fwd_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    params: DinParams,
    activation: str,
    softmax: bool,
    softmax_scale: float,
    max_len: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [B, Dv] in the keys' dtype, lse [B] or None)``."""
    batch = offsets.numel() - 1
    device = keys.device
    acc_torch = torch.float64 if keys.dtype == torch.float64 else torch.float32
    dv = values.shape[1]
    if batch == 0:
        lse = torch.empty(0, dtype=acc_torch, device=device) if softmax else None
        return torch.zeros(0, dv, dtype=keys.dtype, device=device), lse
    ensure_launchable(_din_fwd_kernel, device)
    lp = _launch(keys, values, params, max_len)
    splits = lp["splits"]
    dim, dv, h1, h2 = lp["sizes"]
    part_acc = torch.empty(batch, splits, 1, dv, dtype=acc_torch, device=device)
    part_m = torch.empty(batch, splits, 1, dtype=acc_torch, device=device) if softmax else None
    part_l = torch.empty(batch, splits, 1, dtype=acc_torch, device=device) if softmax else None
    dummy = offsets
    _din_fwd_kernel[(batch, splits)](
        keys,
        values,
        offsets,
        *params.pointers(dummy),
        mask.view(torch.uint8) if mask is not None else dummy,
        part_acc,
        part_m if part_m is not None else dummy,
        part_l if part_l is not None else dummy,
        dim,
        dv,
        h1,
        h2,
        splits,
        keys.stride(0),
        values.stride(0),
        ACT=ACTIVATIONS[activation],
        SOFTMAX=softmax,
        softmax_scale=float(softmax_scale),
        HAS_MASK=mask is not None,
        **lp["meta"],
    )
    out, lse = combine_splits(part_acc, part_m, part_l, keys.dtype)
    return out.view(batch, dv), (lse.view(batch) if lse is not None else None)


def din_attention_bwd_triton(
    grad_out: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    params: DinParams,
    activation: str,
    softmax: bool,
    softmax_scale: float,
    max_len: int,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gradients of keys, values and every DinParams field (None where the field is None)."""
    batch = offsets.numel() - 1
    device = keys.device
    acc_torch = torch.float64 if keys.dtype == torch.float64 else torch.float32
    total = keys.shape[0]
    lp = _launch(keys, values, params, max_len)
    splits = lp["splits"]
    dim, dv, h1, h2 = lp["sizes"]
    two = params.w2 is not None
    h_last = h2 if two else h1
    dkeys = torch.empty(total, dim, dtype=keys.dtype, device=device)
    dvalues = torch.empty(total, dv, dtype=values.dtype, device=device)

    def part(*shape: int) -> torch.Tensor:
        return torch.zeros(batch, splits, *shape, dtype=acc_torch, device=device)

    dm, dc, dbout = part(dim, h1), part(h1), part()
    dw2, db2 = (part(h1, h2), part(h2)) if two else (None, None)
    dwout = part(h_last)
    act = ACTIVATIONS[activation]
    dalpha1 = part(h1) if act >= 2 else None
    dalpha2 = part(h2) if act >= 2 and two else None
    grad_out = grad_out.to(acc_torch).contiguous()
    delta = (grad_out * out.to(acc_torch)).sum(-1).contiguous() if softmax else None
    dummy = offsets
    if batch > 0:
        ensure_launchable(_din_bwd_kernel, device)
        _din_bwd_kernel[(batch, splits)](
            keys,
            values,
            offsets,
            *params.pointers(dummy),
            mask.view(torch.uint8) if mask is not None else dummy,
            grad_out,
            lse if lse is not None else dummy,
            delta if delta is not None else dummy,
            dkeys,
            dvalues,
            dm,
            dc,
            dw2 if dw2 is not None else dummy,
            db2 if db2 is not None else dummy,
            dwout,
            dbout,
            dalpha1 if dalpha1 is not None else dummy,
            dalpha2 if dalpha2 is not None else dummy,
            dim,
            dv,
            h1,
            h2,
            splits,
            keys.stride(0),
            values.stride(0),
            ACT=act,
            SOFTMAX=softmax,
            softmax_scale=float(softmax_scale),
            HAS_MASK=mask is not None,
            **lp["meta"],
        )

    def total_over(t: torch.Tensor | None, like: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor | None:
        if t is None or like is None:
            return None
        return t.sum(dims).to(like.dtype)

    return {
        "keys": dkeys,
        "values": dvalues,
        "m": total_over(dm, params.m, (1,)),
        "c": total_over(dc, params.c, (1,)),
        "w2": total_over(dw2, params.w2, (0, 1)),
        "b2": total_over(db2, params.b2, (0, 1)),
        "wout": total_over(dwout, params.wout, (0, 1)),
        "bout": total_over(dbout, params.bout, (0, 1)).reshape(1) if batch > 0 else torch.zeros_like(params.bout),
        "alpha1": total_over(dalpha1, params.alpha1, (0, 1)),
        "alpha2": total_over(dalpha2, params.alpha2, (0, 1)),
    }
