"""Kernel benchmark: the fused Triton kernels of `kernels/` against their PyTorch references, eager and
`torch.compile`d, on one CUDA GPU, with the machine's ceilings measured in the same run.

For every op and every L in {1K, 10K, 100K} (L = the longest sample; a batch of B samples whose lengths are drawn
uniformly from [L/2, L], the first one exactly L):

- median time over ``--iters`` runs, timed with CUDA events around one call (L2 flushed before each run, so that
  1K-long batches are not served from the cache);
- achieved GB/s and TFLOP/s: the bytes the op must move and the FLOPs it must do (formulas beside each case below,
  the Triton kernel's own algorithm: e.g. DIN's first layer counts ``2·D·H1`` per behavior, not the reference's
  ``2·4D·H1``) over the measured time; their ratio to the ceilings measured in this run: a device-to-device copy
  (``dst.copy_(src)``, bytes = 2 x the buffer) and a bf16 matmul (FLOPs = 2·n³);
- the speed-up over the PyTorch reference in eager mode and over ``torch.compile(reference, dynamic=False)``
  (default mode; the first call of every implementation, which compiles, is not timed: its wall time is recorded
  as ``first_call_s``);
- peak memory of one call above what was allocated before it (``torch.cuda.max_memory_allocated``);
- a parity check of the kernel against the eager reference on the benchmark's own inputs.

Cases (default B = 256, D = 64, K = 256; embeddings bf16, biases/temperatures/MLP weights float32):

- ``gsu_topk`` cosine over a bf16 table [4M, D] gathered by int32 ids (MUSE), cosine over an int8 table with
  per-row float32 scales, dot product with jagged bf16 behavior vectors (SIM soft), category match (SIM hard,
  1000 categories); top-K = K; forward only.
- ``target_attention``: one target query, one head, Dk = Dv = D, a float32 per-behavior bias (time gap) and a
  per-sample temperature (LAIN); forward, and forward + backward (gradients for query, keys, values, bias,
  temperature).
- ``din_attention``: DIN's activation unit [4D -> 80 -> 40 -> 1], sigmoid, softmax with scale 1/sqrt(D) (the
  official code), pooling the keys; forward, and forward + backward (gradients for query, keys, weights, biases).

A measurement that fails (out of memory, a compile error) is written as null with the error; no figure is ever
written that this run did not measure. Without CUDA the script exits with status 2 and writes nothing.

    python benchmarks/kernels.py [--quick] [--ops gsu_topk target_attention din_attention] [--lengths 1000 ...]
    python benchmarks/kernels.py --ops gsu_topk && python benchmarks/kernels.py --ops target_attention --merge ...

Writes benchmarks/results/kernels-<gpu-name>.json (or --out) after every case ("complete": false until the end)
and prints a Markdown table. ``--merge`` keeps the file's results for the (op, L) pairs not re-measured, so a full
run can be split into shorter ones; every row records the ceilings of the run that measured it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels import din_attention, gsu_topk, target_attention  # noqa: E402
from kernels.reference import (  # noqa: E402
    din_attention_reference,
    gsu_topk_reference,
    target_attention_reference,
)

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
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return offsets


def _grad_runner(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], grad_out: torch.Tensor):
    """Forward then backward; the gradients are returned (not accumulated into .grad)."""

    def run() -> tuple[torch.Tensor, ...]:
        out = forward()
        return (out, *torch.autograd.grad(out, list(inputs), grad_out.reshape(out.shape)))

    return run


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run


def _max_abs_diff(got: Any, want: Any) -> dict[str, float]:
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for g, w in zip(got_t, want_t, strict=True):
        if g.numel():
            worst = max(worst, float((g.detach().float() - w.detach().float()).abs().max()))
    return {"max_abs_diff": worst}


def _gsu_compare(got: Any, want: Any) -> dict[str, float]:
    # Positions can differ where two scores tie to within the float32 rounding of different summation orders.
    same = (got[0] == want[0]).float().mean().item() if got[0].numel() else 1.0
    return {"positions_equal_fraction": same, "max_abs_score_diff": float((got[1] - want[1]).abs().max())}


def gsu_cases(cfg: Config, length: int, device: torch.device) -> list[Case]:
    rnd = Inputs(cfg.seed + length, device)
    batch, dim, k = cfg.batch, cfg.dim, cfg.k
    lengths = rnd.lengths(batch, length)
    n = int(lengths.sum())
    offsets = offsets_of(lengths).to(device)
    target = rnd.randn(batch, dim, dtype=torch.bfloat16)
    num_items = min(NUM_ITEMS, max(n, 1))
    ids = rnd.randint(0, num_items, (n,), torch.int32)
    out_bytes = batch * k * (I64 + F32)  # positions int64 + scores float32
    common = (batch + 1) * I64 + out_bytes
    shapes = {"B": batch, "L_max": length, "N_total": n, "D": dim, "K": k}
    cases = []

    def add(variant, kwargs, ref_args, nbytes, flops, bytes_formula, flops_formula, extra_shapes):
        def kernel() -> Any:
            return gsu_topk(offsets, k, **kwargs, max_len=length, backend="triton")

        def with_reference(fn: Callable[..., Any]) -> Callable[[], Any]:
            return _no_grad(lambda: fn(offsets, k, *ref_args))

        cases.append(
            Case(
                op="gsu_topk",
                variant=variant,
                length=length,
                shapes={**shapes, **extra_shapes},
                bytes=nbytes,
                flops=flops,
                bytes_formula=bytes_formula,
                flops_formula=flops_formula,
                kernel=_no_grad(kernel),
                reference=with_reference(gsu_topk_reference),
                with_reference=with_reference,
                reference_fn=gsu_topk_reference,
                compare=_gsu_compare,
            )
        )

    # MUSE: cosine against rows of a bf16 multimodal table gathered by item id (the gather is fused).
    table = rnd.randn(num_items, dim, dtype=torch.bfloat16)
    add(
        "cosine, bf16 table",
        {"mode": "cosine", "target": target, "behavior_ids": ids, "table": table},
        ("cosine", target, ids, table, None, False, None, None, None),
        # ids + gathered rows + target + offsets + output
        n * (I32 + dim * BF16) + batch * dim * BF16 + common,
        4 * n * dim,  # dot product and squared norm: a multiply and an add each, per element
        "N*(4 + 2*D) + 2*B*D + 8*(B+1) + 12*B*K",
        "4*N*D",
        {"table": [num_items, dim], "table_dtype": "bfloat16", "ids_dtype": "int32"},
    )
    # The same over an int8 table with one float32 dequantization scale per row.
    table8 = rnd.randint(-127, 128, (num_items, dim), torch.int8)
    scale8 = rnd.rand(num_items) * 0.02 + 0.001
    add(
        "cosine, int8 table + row scales",
        {"mode": "cosine", "target": target, "behavior_ids": ids, "table": table8, "scale": scale8},
        ("cosine", target, ids, table8, scale8, True, None, None, None),
        # ids + gathered int8 rows + gathered scales + target + offsets + output
        n * (I32 + dim + F32) + batch * dim * BF16 + common,
        5 * n * dim,  # dequantize (1) + dot (2) + squared norm (2) per element
        "N*(4 + D + 4) + 2*B*D + 8*(B+1) + 12*B*K",
        "5*N*D",
        {"table": [num_items, dim], "table_dtype": "int8", "scale": [num_items], "ids_dtype": "int32"},
    )
    # SIM soft: inner product with learned behavior embeddings, stored jagged.
    vectors = rnd.randn(n, dim, dtype=torch.bfloat16)
    add(
        "dot, bf16 behavior vectors",
        {"mode": "dot", "target": target, "behavior_vectors": vectors},
        ("dot", target, None, vectors, None, False, None, None, None),
        n * dim * BF16 + batch * dim * BF16 + common,
        2 * n * dim,
        "2*N*D + 2*B*D + 8*(B+1) + 12*B*K",
        "2*N*D",
        {"behavior_vectors": [n, dim], "dtype": "bfloat16"},
    )
    # SIM hard: the most recent behaviors of the target's category.
    bcat = rnd.randint(0, NUM_CATEGORIES, (n,), torch.int32)
    tcat = rnd.randint(0, NUM_CATEGORIES, (batch,), torch.int32)
    add(
        f"category ({NUM_CATEGORIES} categories)",
        {"mode": "category", "target_category": tcat, "behavior_category": bcat},
        ("category", None, None, None, None, False, None, tcat, bcat),
        n * I32 + batch * I32 + common,
        0,  # comparisons only
        "4*N + 4*B + 8*(B+1) + 12*B*K",
        "0 (comparisons only)",
        {"categories_dtype": "int32"},
    )
    return cases


def target_attention_cases(cfg: Config, length: int, device: torch.device) -> list[Case]:
    rnd = Inputs(cfg.seed + 1 + length, device)
    batch, dim = cfg.batch, cfg.dim
    n_query = n_head = 1
    lengths = rnd.lengths(batch, length)
    n = int(lengths.sum())
    offsets = offsets_of(lengths).to(device)
    scale = 1.0 / math.sqrt(dim)
    query = rnd.randn(batch, n_query, dim, dtype=torch.bfloat16).requires_grad_()
    keys = rnd.randn(n, dim, dtype=torch.bfloat16).requires_grad_()
    values = rnd.randn(n, dim, dtype=torch.bfloat16).requires_grad_()
    bias = (-2.0 * rnd.rand(n)).requires_grad_()  # e.g. a learned time-gap bias
    temperature = (rnd.rand(batch) + 0.5).requires_grad_()
    grad_out = rnd.randn(batch, n_query, dim, dtype=torch.bfloat16)
    shapes = {
        "B": batch,
        "L_max": length,
        "N_total": n,
        "Q": n_query,
        "H": n_head,
        "Dk": dim,
        "Dv": dim,
        "dtype": "bfloat16",
        "bias": [n],
        "temperature": [batch],
    }

    def kernel_forward() -> torch.Tensor:
        return target_attention(
            query, keys, values, offsets, bias=bias, temperature=temperature, max_len=length, backend="triton"
        )

    def reference_forward(fn: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        # The reference takes the [B, Q, H, D] / [N, H, D] form.
        return lambda: fn(query[:, :, None], keys[:, None], values[:, None], offsets, bias, temperature, scale)

    per_row = n_query * n_head * (dim + dim)
    # forward: keys + values (bf16) + bias (f32) + query + temperature + output + offsets
    fwd_bytes = n * (n_head * 2 * dim * BF16 + F32) + batch * (n_query * n_head * 2 * dim * BF16 + F32)
    fwd_bytes += (batch + 1) * I64
    fwd_flops = 2 * n * per_row  # q.k and p.v
    cases = []
    for backward in (False, True):
        if backward:
            grads = (query, keys, values, bias, temperature)

            def kernel(grads=grads) -> Any:
                return _grad_runner(kernel_forward, grads, grad_out)()

            def with_reference(fn: Callable[..., Any], grads=grads) -> Callable[[], Any]:
                forward = reference_forward(fn)
                return _grad_runner(lambda: forward().squeeze(2), grads, grad_out)

            # backward: keys + values + bias read again, dK + dV + dBias written (the rest is O(B))
            nbytes = fwd_bytes + n * 2 * (n_head * 2 * dim * BF16 + F32)
            # recompute q.k (2·Dk), dP = dO.v (2·Dv), dV = p·dO (2·Dv), dK = dS·q (2·Dk), dQ = dS·k (2·Dk)
            flops = fwd_flops + 2 * n * n_query * n_head * (3 * dim + 2 * dim)
            bytes_formula = "fwd + 2*N*(4*D + 4): K, V, bias read again; dK, dV, dBias written"
            flops_formula = "2*N*Q*H*(Dk+Dv) + 2*N*Q*H*(3*Dk + 2*Dv)"
        else:
            kernel = kernel_forward

            def with_reference(fn: Callable[..., Any]) -> Callable[[], Any]:
                forward = reference_forward(fn)
                return lambda: forward().squeeze(2)

            nbytes, flops = fwd_bytes, fwd_flops
            bytes_formula = "N*H*2*(Dk+Dv) + 4*N + B*(2*Q*H*(Dk+Dv) + 4) + 8*(B+1)"
            flops_formula = "2*N*Q*H*(Dk+Dv)"
        run = kernel if backward else _no_grad(kernel)
        wrap = with_reference if backward else (lambda fn, w=with_reference: _no_grad(w(fn)))
        cases.append(
            Case(
                op="target_attention",
                variant="forward + backward" if backward else "forward",
                length=length,
                shapes=shapes,
                bytes=nbytes,
                flops=flops,
                bytes_formula=bytes_formula,
                flops_formula=flops_formula,
                kernel=run,
                reference=wrap(target_attention_reference),
                with_reference=wrap,
                reference_fn=target_attention_reference,
                compare=_max_abs_diff,
            )
        )
    return cases


def din_attention_cases(cfg: Config, length: int, device: torch.device) -> list[Case]:
    rnd = Inputs(cfg.seed + 2 + length, device)
    batch, dim = cfg.batch, cfg.dim
    h1, h2 = DIN_HIDDEN
    lengths = rnd.lengths(batch, length)
    n = int(lengths.sum())
    offsets = offsets_of(lengths).to(device)
    scale = 1.0 / math.sqrt(dim)
    query = rnd.randn(batch, dim, dtype=torch.bfloat16).requires_grad_()
    keys = rnd.randn(n, dim, dtype=torch.bfloat16).requires_grad_()
    sizes = [4 * dim, h1, h2, 1]
    weights = [(rnd.randn(a, b) / math.sqrt(a)).requires_grad_() for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [(0.1 * rnd.randn(b)).requires_grad_() for b in sizes[1:]]
    grad_out = rnd.randn(batch, dim, dtype=torch.bfloat16)
    shapes = {
        "B": batch,
        "L_max": length,
        "N_total": n,
        "D": dim,
        "mlp": sizes,
        "activation": "sigmoid",
        "softmax": True,
        "dtype": "bfloat16 (MLP weights float32)",
    }

    def kernel_forward() -> torch.Tensor:
        return din_attention(
            query, keys, offsets, weights, biases, activation="sigmoid", softmax=True, softmax_scale=scale,
            max_len=length, backend="triton",
        )  # fmt: skip

    def reference_forward(fn: Callable[..., Any]) -> Callable[[], torch.Tensor]:
        return lambda: fn(
            query, keys, offsets, weights, biases, None, "sigmoid", None, None, False, 0.1, 1e-8, True, scale
        )

    # per behavior: first layer in the fused form k @ M_b (2·D·H1), second layer (2·H1·H2), output (2·H2),
    # pooling (2·Dv); per sample: forming M_b = W_k - W_d + diag(q) W_p and c_b (about 4·D·H1)
    per_behavior_mm = 2 * dim * h1 + 2 * h1 * h2
    fwd_flops = n * (per_behavior_mm + 2 * h2 + 2 * dim) + batch * 4 * dim * h1
    weight_bytes = (4 * dim * h1 + h1 + h1 * h2 + h2 + h2 + 1) * F32
    # keys (pooled as the values too: counted once) + query + output + M_b, c_b written and read + weights + offsets
    fwd_bytes = n * dim * BF16 + 2 * batch * dim * BF16 + 2 * batch * (dim * h1 + h1) * F32 + weight_bytes
    fwd_bytes += (batch + 1) * I64
    cases = []
    for backward in (False, True):
        if backward:
            grads = (query, keys, *weights, *biases)

            def kernel(grads=grads) -> Any:
                return _grad_runner(kernel_forward, grads, grad_out)()

            def with_reference(fn: Callable[..., Any], grads=grads) -> Callable[[], Any]:
                return _grad_runner(reference_forward(fn), grads, grad_out)

            # keys read again and dKeys written; per-sample dM_b partials are O(B·S·D·H1) and not counted
            nbytes = fwd_bytes + 2 * n * dim * BF16
            # recompute the forward, then dW2 and dh1 (2·2·H1·H2), dM and dK (2·2·D·H1), output and pooling
            flops = 2 * fwd_flops + n * (2 * per_behavior_mm + 2 * h2 + 4 * dim)
            bytes_formula = "fwd + 4*N*D: keys read again, dKeys written"
            flops_formula = "2*fwd + N*(2*(2*D*H1 + 2*H1*H2) + 2*H2 + 4*D)"
        else:
            kernel = kernel_forward
            with_reference = reference_forward
            nbytes, flops = fwd_bytes, fwd_flops
            bytes_formula = "2*N*D + 4*B*D + 8*B*(D*H1 + H1) + 4*|weights| + 8*(B+1)"
            flops_formula = "N*(2*D*H1 + 2*H1*H2 + 2*H2 + 2*D) + 4*B*D*H1"
        run = kernel if backward else _no_grad(kernel)
        wrap = with_reference if backward else (lambda fn, w=with_reference: _no_grad(w(fn)))
        cases.append(
            Case(
                op="din_attention",
                variant="forward + backward" if backward else "forward",
                length=length,
                shapes=shapes,
                bytes=nbytes,
                flops=flops,
                bytes_formula=bytes_formula,
                flops_formula=flops_formula,
                kernel=run,
                reference=wrap(din_attention_reference),
                with_reference=wrap,
                reference_fn=din_attention_reference,
                compare=_max_abs_diff,
            )
        )
    return cases


BUILDERS = {"gsu_topk": gsu_cases, "target_attention": target_attention_cases, "din_attention": din_attention_cases}


def build_cases(cfg: Config, op: str, length: int, device: torch.device) -> list[Case]:
    return BUILDERS[op](cfg, length, device)


# ---------------------------------------------------------------------------------------------------- measurement


class Timer:
    """Median milliseconds of ``fn`` over CUDA events, the L2 cache flushed before every run."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.flush = torch.empty(cfg.flush_bytes, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], Any], iters: int | None = None, warmup: int | None = None) -> float:
        for _ in range(self.cfg.warmup if warmup is None else warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.cfg.iters if iters is None else iters):
            self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def _copy_ms(cfg: Config, timer: Timer, device: torch.device) -> float:
    src = torch.empty(cfg.copy_bytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src), iters=max(cfg.iters, 20))


def _matmul_ms(cfg: Config, timer: Timer, device: torch.device) -> float:
    a = torch.randn(cfg.matmul_n, cfg.matmul_n, device=device, dtype=torch.bfloat16)
    b = torch.randn(cfg.matmul_n, cfg.matmul_n, device=device, dtype=torch.bfloat16)
    return timer(lambda: a @ b, iters=max(cfg.iters, 20))


def measure_ceilings(cfg: Config, timer: Timer, device: torch.device) -> dict[str, Any]:
    copy_ms = _copy_ms(cfg, timer, device)
    copy_bytes = 2 * cfg.copy_bytes  # read the source, write the destination
    n = cfg.matmul_n
    mm_ms = _matmul_ms(cfg, timer, device)
    mm_flops = 2 * n**3
    torch.cuda.empty_cache()
    return {
        "copy": {
            "what": "dst.copy_(src), uint8 buffers, device to device",
            "buffer_bytes": cfg.copy_bytes,
            "bytes_moved": copy_bytes,
            "median_ms": copy_ms,
            "GBps": copy_bytes / copy_ms / 1e6,
        },
        "matmul_bf16": {
            "what": f"a @ b, bf16 [{n}, {n}] x [{n}, {n}]",
            "flops": mm_flops,
            "median_ms": mm_ms,
            "TFLOPs": mm_flops / mm_ms / 1e9,
        },
    }


def _error(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def run_impl(timer: Timer, fn: Callable[[], Any]) -> dict[str, Any]:
    """Time one implementation; a failure is recorded, never replaced by a number."""
    record: dict[str, Any] = {"median_ms": None, "peak_extra_bytes": None, "error": None}
    try:
        t0 = time.perf_counter()
        fn()  # first call: Triton/Inductor compilation happens here
        torch.cuda.synchronize()
        record["first_call_s"] = time.perf_counter() - t0
        record["median_ms"] = timer(fn)
        record["peak_extra_bytes"] = peak_extra_bytes(fn)
    except Exception as exc:  # OOM, compile failures: record and go on
        record["error"] = _error(exc)
        record["median_ms"] = record["peak_extra_bytes"] = None
        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            traceback.print_exc()
    finally:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return record


def run_case(case: Case, timer: Timer, ceilings: dict[str, Any], compiled: dict[Any, Callable[..., Any]]):
    result: dict[str, Any] = {
        "op": case.op,
        "variant": case.variant,
        "L": case.length,
        "ceilings": {"copy_GBps": ceilings["copy"]["GBps"], "matmul_bf16_TFLOPs": ceilings["matmul_bf16"]["TFLOPs"]},
        "shapes": case.shapes,
        "bytes": case.bytes,
        "flops": case.flops,
        "bytes_formula": case.bytes_formula,
        "flops_formula": case.flops_formula,
    }
    try:
        result["parity"] = case.compare(case.kernel(), case.reference())
    except Exception as exc:
        result["parity"] = {"error": _error(exc)}
    torch.cuda.empty_cache()

    if case.reference_fn not in compiled:
        compiled[case.reference_fn] = torch.compile(case.reference_fn, dynamic=False)
    impls = {
        "triton": run_impl(timer, case.kernel),
        "eager": run_impl(timer, case.reference),
        "compile": run_impl(timer, case.with_reference(compiled[case.reference_fn])),
    }
    for record in impls.values():
        ms = record["median_ms"]
        record["GBps"] = case.bytes / ms / 1e6 if ms else None
        record["TFLOPs"] = case.flops / ms / 1e9 if ms and case.flops else None
        record["bandwidth_fraction"] = record["GBps"] / ceilings["copy"]["GBps"] if record["GBps"] else None
        record["flops_fraction"] = (
            record["TFLOPs"] / ceilings["matmul_bf16"]["TFLOPs"] if record["TFLOPs"] is not None else None
        )
    result["impls"] = impls
    ms = impls["triton"]["median_ms"]
    for base in ("eager", "compile"):
        other = impls[base]["median_ms"]
        result[f"speedup_vs_{base}"] = other / ms if ms and other else None
    return result


def evaluate_goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals: gsu_topk and target_attention forward reach GOAL_BANDWIDTH_FRACTION of the copy
    bandwidth at L = 100K, and every kernel beats torch.compile of its reference (met = None: not measurable)."""
    goals = []
    for r in results:
        tri = r["impls"]["triton"]
        bandwidth_goal = r["op"] == "gsu_topk" or (r["op"] == "target_attention" and r["variant"] == "forward")
        if r["L"] == GOAL_LENGTH and bandwidth_goal:
            frac = tri["bandwidth_fraction"]
            goals.append(
                {
                    "goal": f">= {GOAL_BANDWIDTH_FRACTION:.0%} of the copy bandwidth",
                    "op": r["op"],
                    "variant": r["variant"],
                    "L": r["L"],
                    "value": frac,
                    "met": None if frac is None else frac >= GOAL_BANDWIDTH_FRACTION,
                }
            )
        speedup = r["speedup_vs_compile"]
        note = None
        if speedup is None:
            note = f"triton: {tri['error']}" if tri["error"] else f"compile: {r['impls']['compile']['error']}"
        goals.append(
            {
                "goal": "faster than torch.compile(reference)",
                "op": r["op"],
                "variant": r["variant"],
                "L": r["L"],
                "value": speedup,
                "met": None if speedup is None else speedup > 1.0,
                **({"note": note} if note else {}),
            }
        )
    return goals


# -------------------------------------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _parity(p: dict[str, Any]) -> str:
    if "error" in p:
        return f"({p['error']})"
    if "positions_equal_fraction" in p:
        return f"pos {100 * p['positions_equal_fraction']:.1f}%"
    return f"{p['max_abs_diff']:.1e}"


def _mib(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**20:.0f}"


def markdown_table(report: dict[str, Any]) -> str:
    c = report["ceilings"]
    lines = [
        f"# Kernels on {report['gpu']}",
        "",
        f"Ceilings (this run): copy {c['copy']['GBps']:.0f} GB/s, bf16 matmul {c['matmul_bf16']['TFLOPs']:.0f} TFLOP/s."
        f" B = {report['config']['batch']}, D = {report['config']['dim']}, K = {report['config']['k']};"
        " lengths uniform in [L/2, L].",
    ]
    if len(report.get("runs", [])) > 1:
        lines.append(
            f"Merged from {len(report['runs'])} runs; each row's % copy and % mm use the ceilings of its own run."
        )
    lines += [
        "",
        "| op | variant | L | N | Triton ms | GB/s | % copy | TFLOP/s | % mm | eager ms | x eager | compile ms "
        "| x compile | peak MiB Triton / eager / compile | parity vs eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        t, e, k = (r["impls"][name] for name in ("triton", "eager", "compile"))
        frac = t["bandwidth_fraction"]
        mmf = t["flops_fraction"]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["op"],
                    r["variant"],
                    f"{r['L']:,}",
                    f"{r['shapes']['N_total']:,}",
                    _fmt(t["median_ms"], ".3f") if not t["error"] else f"({t['error']})",
                    _fmt(t["GBps"], ".0f"),
                    _fmt(None if frac is None else 100 * frac, ".0f"),
                    _fmt(t["TFLOPs"], ".2f"),
                    _fmt(None if mmf is None else 100 * mmf, ".1f"),
                    _fmt(e["median_ms"], ".3f") if not e["error"] else f"({e['error']})",
                    _fmt(r["speedup_vs_eager"], ".1f"),
                    _fmt(k["median_ms"], ".3f") if not k["error"] else f"({k['error']})",
                    _fmt(r["speedup_vs_compile"], ".1f"),
                    f"{_mib(t['peak_extra_bytes'])} / {_mib(e['peak_extra_bytes'])} / {_mib(k['peak_extra_bytes'])}",
                    _parity(r.get("parity", {"error": "not run"})),
                ]
            )
            + " |"
        )
    lines += ["", "| goal | op | variant | L | value | met |", "|---|---|---|---:|---:|---|"]
    for g in report["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.2f}"
        met = {True: "yes", False: "NO", None: "n/a"}[g["met"]] + (f" ({g['note']})" if g.get("note") else "")
        lines.append(f"| {g['goal']} | {g['op']} | {g['variant']} | {g['L']:,} | {value} | {met} |")
    return "\n".join(lines)


def merge_previous(path: Path, gpu: str, replaced: set[tuple[str, int]]) -> tuple[list[dict], list[dict]]:
    """With --merge: the earlier results in ``path`` (same GPU) for the (op, L) pairs this run does not redo, and
    the earlier runs' records."""
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    if old.get("gpu") != gpu:
        raise ValueError(f"{path} holds results of {old.get('gpu')!r}, not of {gpu!r}: not merging")
    kept = [r for r in old.get("results", []) if (r["op"], r["L"]) not in replaced]
    return kept, list(old.get("runs", []))


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the fused Triton kernels (gsu_topk, target_attention, din_attention) against their "
        "PyTorch references, eager and torch.compile, with the copy/matmul ceilings measured in the same run. "
        "Needs a CUDA GPU (exits with status 2 otherwise).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: B=8, L=1K, 1 warm-up, 3 timed runs")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: all)")
    parser.add_argument("--lengths", nargs="+", type=int, help="longest-sample lengths L (default: 1K 10K 100K)")
    parser.add_argument("--batch", type=int, help="samples per batch (default 256)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width D (default 64)")
    parser.add_argument("--k", type=int, default=256, help="gsu_topk's K (default 256)")
    parser.add_argument("--iters", type=int, help="timed runs per measurement (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output JSON (default: benchmarks/results/kernels-<gpu>.json)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the results already in the output file for the (op, L) pairs this run does not measure (to "
        "split a full run into several shorter ones, e.g. one per --ops); each row keeps its own run's ceilings",
    )
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    cfg = Config(dim=args.dim, k=args.k, ops=tuple(args.ops), seed=args.seed)
    if args.quick:
        cfg = dataclasses.replace(
            cfg, batch=8, lengths=(1_000,), warmup=1, iters=3, copy_bytes=256 << 20, matmul_n=4096
        )
    if args.batch is not None:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    if args.lengths:
        cfg = dataclasses.replace(cfg, lengths=tuple(args.lengths))
    if args.iters is not None:
        cfg = dataclasses.replace(cfg, iters=args.iters)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py: no CUDA device is available; the benchmark measures GPU kernels and produces "
            "no numbers without one (nothing was written).",
            file=sys.stderr,
        )
        return 2
    return run_benchmark(args, make_config(args), torch.device("cuda"))


def run_benchmark(args: argparse.Namespace, cfg: Config, device: torch.device) -> int:
    gpu = torch.cuda.get_device_name(device)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"kernels-{gpu_slug(gpu)}.json"
    # torch.compile specializes on every shape (dynamic=False): allow enough entries for every case, so that no
    # case silently falls back to eager.
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 256))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 1024))
            break

    kept: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if args.merge:
        try:
            kept, runs = merge_previous(out_path, gpu, {(op, length) for op in cfg.ops for length in cfg.lengths})
        except ValueError as exc:
            print(f"benchmarks/kernels.py: {exc}", file=sys.stderr)
            return 2

    import triton

    timer = Timer(cfg, device)
    ceilings = measure_ceilings(cfg, timer, device)
    copy_gbps, mm_tflops = ceilings["copy"]["GBps"], ceilings["matmul_bf16"]["TFLOPs"]
    print(f"{gpu}: copy {copy_gbps:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    config = dataclasses.asdict(cfg) | {"quick": bool(args.quick), "length_distribution": "uniform [L/2, L]"}
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runs.append({"date": date, "config": config, "ceilings": ceilings})
    results: list[dict[str, Any]] = []

    def write(complete: bool) -> dict[str, Any]:
        """The report so far; written after every case, so that a run cut short keeps what it measured."""
        every = kept + results
        report = {
            "gpu": gpu,
            "date": date,
            "complete": complete,
            "versions": {
                "torch": torch.__version__,
                "triton": triton.__version__,
                "cuda": torch.version.cuda,
                "python": platform.python_version(),
            },
            "config": config,
            "ceilings": ceilings,
            "runs": runs,
            "results": every,
            "goals": evaluate_goals(every),
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        return report

    compiled: dict[Any, Callable[..., Any]] = {}
    for op in cfg.ops:
        for length in cfg.lengths:
            try:
                cases = build_cases(cfg, op, length, device)
            except torch.cuda.OutOfMemoryError:
                print(f"{op} L={length}: the inputs do not fit in memory; skipped", flush=True)
                torch.cuda.empty_cache()
                continue
            for case in cases:
                result = run_case(case, timer, ceilings, compiled)
                results.append(result)
                write(complete=False)
                t = result["impls"]["triton"]
                print(
                    f"{op} [{case.variant}] L={length}: triton {_fmt(t['median_ms'], '.3f')} ms, "
                    f"{_fmt(t['GBps'], '.0f')} GB/s, x{_fmt(result['speedup_vs_eager'], '.1f')} eager, "
                    f"x{_fmt(result['speedup_vs_compile'], '.1f')} compile",
                    flush=True,
                )
            del cases
            torch.cuda.empty_cache()

    report = write(complete=True)
    print()
    print(markdown_table(report))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
