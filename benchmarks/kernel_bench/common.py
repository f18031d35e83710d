"""What every op's cases share: the benchmark's configuration and constants, a `Shape` and a `Case`, the length
distributions, seeded jagged inputs made on the target device, and the helpers that wrap a call (no grad,
forward + backward) and compare two outputs.

Length distributions (L = the longest length; every batch's first sample has exactly L behaviors, so that the
longest sample is L whatever the draw):

- ``uniform``: the other lengths uniform in [L/2, L] (``torch.randint(L // 2, L + 1)``);
- ``powerlaw``: a Pareto law with shape ``POWERLAW_ALPHA`` = 1.2 and scale ``x_m = max(1, POWERLAW_SCALE * L)``
  (``POWERLAW_SCALE`` = 0.01), floored and clipped to [1, L]::

      len_b = min(L, max(1, floor(x_m * (1 - u_b) ** (-1 / alpha))))      u_b ~ U[0, 1) (torch.rand, float64)

  Most samples are short (the median is ``2 ** (1 / alpha) * x_m``, about 1.8% of L; about 0.4% of them reach L):
  the long-tailed users of a lifelong log. At B = 256 and L = 100K the batch holds about 1.1M behaviors against
  19M for ``uniform``.

Both are drawn from a host `torch.Generator` seeded per shape (`case_seed`), so every run builds the same batch.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

OPS = ("gsu_topk", "target_attention", "din_attention")
DISTS = ("uniform", "powerlaw")
POWERLAW_ALPHA = 1.2
POWERLAW_SCALE = 0.01
NUM_ITEMS = 1 << 22  # rows of the GSU embedding tables (4M items)
NUM_CATEGORIES = 1000
DIN_HIDDEN = (80, 40)
BF16 = 2  # bytes per element
F32 = 4
I32 = 4
I64 = 8


@dataclasses.dataclass
class Config:
    """How a run measures (the shapes it measures are its grid: `grid`; ``--quick`` shrinks both, see
    `run.make_config`)."""

    k: int = 256
    warmup: int = 3
    iters: int = 10
    seed: int = 0
    copy_bytes: int = 1 << 30  # the copy ceiling's buffer (each of source and destination)
    matmul_n: int = 8192  # the matmul ceiling's n (an n x n x n bf16 product)
    flush_bytes: int = 256 << 20  # written before every timed run to evict the L2 cache
    memory_cap_bytes: int | None = None  # a shape whose inputs would need more is skipped (None: no cap)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One point of the grid: the inputs of an op. ``queries`` is target_attention's Q (1 for the other ops);
    ``passes`` says which cases to build: ``"forward"``, and ``"backward"`` for forward + backward (gsu_topk has
    no backward)."""

    op: str
    batch: int
    dist: str
    length: int
    dim: int
    queries: int = 1
    passes: tuple[str, ...] = ("forward",)

    def key(self) -> tuple[str, int, str, int, int, int]:
        """What identifies the shape's results (the passes are variants of the rows)."""
        return (self.op, self.batch, self.dist, self.length, self.dim, self.queries)


def result_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """A result row's identity (rows of results files from before the grid have no B/dist/Q/D: None)."""
    return (row["op"], row["variant"], row.get("B"), row.get("dist"), row["L"], row.get("D"), row.get("Q"))


def case_seed(seed: int, shape: Shape) -> int:
    """The seed of a shape's inputs: the run's seed plus a stable hash of the shape (the same batch every run)."""
    return seed + zlib.crc32(repr(shape.key()).encode()) % (1 << 30)


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
    shape: Shape | None = None
    peer: Callable[[], Any] | None = None  # FBGEMM's kernel on the same inputs (target_attention), when loaded
    peer_compare: Callable[[Any, Any], dict[str, float]] | None = None  # peer output vs the reference output
    peer_absent: str | None = None  # why there is no peer call (the peer did not load, the shape is not expressible)


# ---------------------------------------------------------------------------------------------------------- inputs


def jagged_lengths(batch: int, length: int, gen: torch.Generator, dist: str = "uniform") -> torch.Tensor:
    """B int64 lengths drawn from ``dist`` (the module docstring defines both), the first exactly L."""
    if dist == "uniform":
        lengths = torch.randint(max(length // 2, 0), length + 1, (batch,), generator=gen)
    elif dist == "powerlaw":
        u = torch.rand(batch, generator=gen, dtype=torch.float64)
        x_m = max(1.0, POWERLAW_SCALE * length)
        lengths = (x_m * (1.0 - u).pow(-1.0 / POWERLAW_ALPHA)).floor().clamp(min=1).clamp(max=length).long()
    else:
        raise ValueError(f"unknown length distribution {dist!r}; expected one of {DISTS}")
    if batch:
        lengths[0] = length
    return lengths


def shape_lengths(shape: Shape, seed: int) -> torch.Tensor:
    """The lengths of a shape's batch (on the host), the same for a given seed: what its case builds and what
    the memory cap is checked against before anything is allocated."""
    gen = torch.Generator().manual_seed(case_seed(seed, shape))
    return jagged_lengths(shape.batch, shape.length, gen, shape.dist)


class Inputs:
    """Seeded random inputs made on the target device (a 100K batch holds tens of millions of rows)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

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


# The variants of an op with a forward and an optional backward pass (target_attention, din_attention).
PASS_VARIANTS = {"forward": "forward", "backward": "forward + backward"}


def pass_variants(shape: Shape) -> list[str]:
    """The variant names of a shape's cases, in order (one per pass it runs)."""
    return [PASS_VARIANTS[p] for p in shape.passes]
