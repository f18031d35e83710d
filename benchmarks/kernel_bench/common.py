"""What every op's cases share: the benchmark's configuration and constants, a `Case`, seeded jagged inputs made on
the target device, and the helpers that wrap a call (no grad, forward + backward) and compare two outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

OPS = ("gsu_topk", "target_attention", "din_attention")
LENGTHS = (1_000, 10_000, 100_000)
GOAL_BANDWIDTH_FRACTION = 0.70  # gsu_topk and target_attention forward, at L = GOAL_LENGTH
GOAL_LENGTH = 100_000
NUM_ITEMS = 1 << 22  # rows of the GSU embedding tables (4M items)
NUM_CATEGORIES = 1000
DIN_HIDDEN = (80, 40)
BF16 = 2  # bytes per element
F32 = 4
I32 = 4
I64 = 8


@dataclasses.dataclass
class Config:
    """What a run measures and how (``--quick`` shrinks it: see `run.make_config`)."""

    batch: int = 256
    dim: int = 64
    k: int = 256
    lengths: tuple[int, ...] = LENGTHS
    ops: tuple[str, ...] = OPS
    warmup: int = 3
    iters: int = 10
    seed: int = 0
    copy_bytes: int = 1 << 30  # the copy ceiling's buffer (each of source and destination)
    matmul_n: int = 8192  # the matmul ceiling's n (an n x n x n bf16 product)
    flush_bytes: int = 256 << 20  # written before every timed run to evict the L2 cache


@dataclasses.dataclass
class Case:
    """One benchmark case. ``kernel`` and ``reference`` are zero-argument callables running the Triton dispatch
    function and the PyTorch reference on the same inputs (forward, or forward + backward); ``with_reference(fn)``
    builds the same callable around another implementation of the reference (its ``torch.compile``)."""

    op: str
    variant: str
    length: int
    shapes: dict[str, Any]
    bytes: int
    flops: int
    bytes_formula: str
    flops_formula: str
    kernel: Callable[[], Any]
    reference: Callable[[], Any]
    with_reference: Callable[[Callable[..., Any]], Callable[[], Any]]
    reference_fn: Callable[..., Any]
    compare: Callable[[Any, Any], dict[str, float]]


# ---------------------------------------------------------------------------------------------------------- inputs


def jagged_lengths(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """B lengths uniform in [L/2, L], the first exactly L (so the longest sample is L)."""
    lengths = torch.randint(max(length // 2, 0), length + 1, (batch,), generator=gen)
    if batch:
        lengths[0] = length
    return lengths


class Inputs:
    """Seeded random inputs made on the target device (a 100K batch holds tens of millions of rows)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.host = torch.Generator().manual_seed(seed)
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def lengths(self, batch: int, length: int) -> torch.Tensor:
        return jagged_lengths(batch, length, self.host)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device).to(dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen, device=self.device)

    def randint(self, low: int, high: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen, device=self.device, dtype=dtype)


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """int64 offsets [B + 1] of the lengths (on the host)."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return offsets


def grad_runner(
    forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Forward then backward; the gradients are returned (not accumulated into .grad)."""

    def run() -> tuple[torch.Tensor, ...]:
        out = forward()
        return (out, *torch.autograd.grad(out, list(inputs), grad_out.reshape(out.shape)))

    return run


def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run under ``torch.no_grad()``."""

    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def max_abs_diff(got: Any, want: Any) -> dict[str, float]:
    """The largest absolute difference over the outputs (a tensor or a tuple of tensors)."""
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for g, w in zip(got_t, want_t, strict=True):
        if g.numel():
            worst = max(worst, float((g.detach().float() - w.detach().float()).abs().max()))
    return {"max_abs_diff": worst}
