"""Triton DIN attention: the activation-unit MLP, the weighting and the pooling fused, forward and backward.

The first layer never sees ``[q; k; q - k; q * k]``: with ``W_1 = [W_q; W_k; W_d; W_p]`` (four ``[D, H1]`` blocks)

    x @ W_1 + b_1 = k @ (W_k - W_d + diag(q) W_p) + (q @ (W_q + W_d) + b_1) = k @ M_b + c_b

so the caller forms, per sample, ``M_b [D, H1]`` and ``c_b [H1]`` in PyTorch (autograd carries their gradients
back to ``q``, ``W_1`` and ``b_1``), and the kernel computes one ``[BLOCK_L, D] x [D, H1]`` product per tile.

Forward, grid ``(programs,)`` over length-balanced work items (`kernels.triton.schedule`): for each item (at most
``chunk`` rows of one sample) a program walks its tiles: hidden layers (1 or 2, each a ``tl.dot``), the score, then
either raw weights (DIN paper) or an online softmax, and the weighted sum of the values; ``combine_items`` merges a
sample's item partials (log-sum-exp merge for softmax, a sum otherwise). ``M_b`` and ``W_2`` are loaded once per item.
Backward, same grid: recomputes each tile, writes ``dK``/``dV`` rows, and per-item partial gradients of ``M_b``,
``c_b`` (summed per sample by ``sum_items``), the later layers and the activation slopes (summed over items on the
host; no atomics). Tiles, warps and stages are autotuned (`_tune`).

An optional bool behavior mask (read as its uint8 bytes) drops behaviors: no weight, zero gradients.

Activations: sigmoid, relu, prelu, and dice with given statistics (inference); Dice with batch statistics needs a
batch-wide reduction between layers and runs on the reference. Limits: 1 or 2 hidden layers, D, Dv <= 256,
hidden widths <= 256.

This module holds the host side (``DinParams``, the launches, the reductions of the partials); the kernels are in
`kernels.triton._din_kernels`, their shared device functions in `kernels.triton._din_tile`.
"""

from __future__ import annotations

import torch
import triton

from ._common import acc_dtype, allow_tf32, dot_dtype, ensure_launchable
from ._din_kernels import _din_bwd_kernel, _din_fwd_kernel
from ._tune import Tuned, configs
from .config import next_pow2
from .schedule import WorkPlan, combine_items, plan_work, sum_items

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


def _launch(keys: torch.Tensor, values: torch.Tensor, params: DinParams) -> dict:
    batch, dim, h1 = params.m.shape
    h2 = params.w2.shape[1] if params.w2 is not None else 1
    return {
        "meta": {
            "NUM_HIDDEN": 2 if params.w2 is not None else 1,
            "DOT": dot_dtype(keys.dtype),
            "ACC": acc_dtype(keys.dtype),
            "TF32": allow_tf32(),
            "BLOCK_D": max(next_pow2(dim), 16),
            "BLOCK_DV": next_pow2(values.shape[1]),
            "BLOCK_H1": max(next_pow2(h1), 16),
            "BLOCK_H2": max(next_pow2(h2), 16),
        },
        "sizes": (dim, values.shape[1], h1, h2),
    }


_KEY = ["NUM_HIDDEN", "ACT", "SOFTMAX", "HAS_MASK", "BLOCK_D", "BLOCK_DV", "BLOCK_H1", "BLOCK_H2"]


def _fits(config: triton.Config, meta: dict, backward: bool) -> bool:
    """The ``[BLOCK_L, H1]`` hidden activations (twice that and more in the backward) within the warps' registers."""
    widest = max(meta["BLOCK_H1"], meta["BLOCK_D"], meta["BLOCK_DV"])
    return config.kwargs["BLOCK_L"] * widest <= (4096 if backward else 8192) * config.num_warps // 4


_FWD = Tuned(
    _din_fwd_kernel,
    configs([16, 32, 64, 128], [4, 8], [2, 3]),
    _KEY,
    lambda c, meta: _fits(c, meta, backward=False),
    lambda meta: (32, 4, 2),
)
_BWD = Tuned(
    _din_bwd_kernel,
    configs([16, 32, 64], [4, 8], [1, 2]),
    _KEY,
    lambda c, meta: _fits(c, meta, backward=True),
    lambda meta: (32, 4, 1),
)


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
) -> tuple[torch.Tensor, torch.Tensor | None, WorkPlan | None]:
    """``(out [B, Dv], lse [B] or None, the work plan for the backward)``; out in the accumulation dtype (the
    backward's ``sum(dO * O)`` needs it before rounding to 16 bits)."""
    batch = offsets.numel() - 1
    device = keys.device
    acc_torch = torch.float64 if keys.dtype == torch.float64 else torch.float32
    dv = values.shape[1]
    if batch == 0 or keys.shape[0] == 0:
        lse = torch.full((batch,), float("-inf"), dtype=acc_torch, device=device) if softmax else None
        return torch.zeros(batch, dv, dtype=acc_torch, device=device), lse, None
    ensure_launchable(_din_fwd_kernel, device)
    lp = _launch(keys, values, params)
    plan = plan_work(offsets, keys.shape[0], max_len)
    dim, dv, h1, h2 = lp["sizes"]
    part_acc = torch.empty(plan.bound, 1, dv, dtype=acc_torch, device=device)
    part_m = torch.empty(plan.bound, 1, dtype=acc_torch, device=device) if softmax else None
    part_l = torch.empty(plan.bound, 1, dtype=acc_torch, device=device) if softmax else None
    dummy = offsets
    _FWD[(plan.programs,)](
        keys,
        values,
        offsets,
        *params.pointers(dummy),
        mask.view(torch.uint8) if mask is not None else dummy,
        plan.items,
        part_acc,
        part_m if part_m is not None else dummy,
        part_l if part_l is not None else dummy,
        dim,
        dv,
        h1,
        h2,
        plan.bound,
        plan.programs,
        plan.chunk,
        keys.stride(0),
        values.stride(0),
        ACT=ACTIVATIONS[activation],
        SOFTMAX=softmax,
        softmax_scale=float(softmax_scale),
        HAS_MASK=mask is not None,
        **lp["meta"],
    )
    out, lse = combine_items(plan, part_acc, part_m, part_l, acc_torch)
    return out.view(batch, dv), (lse.view(batch) if lse is not None else None), plan


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
    plan: WorkPlan | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gradients of keys, values and every DinParams field (None where the field is None)."""
    batch = offsets.numel() - 1
    device = keys.device
    acc_torch = torch.float64 if keys.dtype == torch.float64 else torch.float32
    total = keys.shape[0]
    lp = _launch(keys, values, params)
    launch = batch > 0 and total > 0
    if launch and plan is None:
        plan = plan_work(offsets, total, max_len)
    bound = plan.bound if launch and plan is not None else 0
    dim, dv, h1, h2 = lp["sizes"]
    two = params.w2 is not None
    h_last = h2 if two else h1
    new = torch.empty if launch else torch.zeros  # every row belongs to one work item, which writes it
    dkeys = new(total, dim, dtype=keys.dtype, device=device)
    dvalues = new(total, dv, dtype=values.dtype, device=device)

    def part(*shape: int) -> torch.Tensor:
        # zeros: the slots past the last item are summed too (over all items, for the shared parameters)
        return torch.zeros(bound, *shape, dtype=acc_torch, device=device)

    dm, dc, dbout = part(dim, h1), part(h1), part()
    dw2, db2 = (part(h1, h2), part(h2)) if two else (None, None)
    dwout = part(h_last)
    act = ACTIVATIONS[activation]
    dalpha1 = part(h1) if act >= 2 else None
    dalpha2 = part(h2) if act >= 2 and two else None
    grad_out = grad_out.to(acc_torch).contiguous()
    delta = (grad_out * out.to(acc_torch)).sum(-1).contiguous() if softmax else None
    dummy = offsets
    if launch:
        assert plan is not None
        ensure_launchable(_din_bwd_kernel, device)
        _BWD[(plan.programs,)](
            keys,
            values,
            offsets,
            *params.pointers(dummy),
            mask.view(torch.uint8) if mask is not None else dummy,
            plan.items,
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
            plan.bound,
            plan.programs,
            plan.chunk,
            keys.stride(0),
            values.stride(0),
            ACT=act,
            SOFTMAX=softmax,
            softmax_scale=float(softmax_scale),
            HAS_MASK=mask is not None,
            **lp["meta"],
        )

    def total_over(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or like is None:
            return None
        return t.sum(0).to(like.dtype)

    def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if not launch or plan is None:
            return torch.zeros_like(like)
        return sum_items(plan, t, like.dtype)

    return {
        "keys": dkeys,
        "values": dvalues,
        "m": per_sample(dm, params.m),
        "c": per_sample(dc, params.c),
        "w2": total_over(dw2, params.w2),
        "b2": total_over(db2, params.b2),
        "wout": total_over(dwout, params.wout),
        "bout": total_over(dbout, params.bout).reshape(1),  # type: ignore[union-attr]
        "alpha1": total_over(dalpha1, params.alpha1),
        "alpha2": total_over(dalpha2, params.alpha2),
    }
