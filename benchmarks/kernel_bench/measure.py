"""Measurement on the GPU: median CUDA-event time with the L2 flushed, peak memory of one call, the copy and
bf16-matmul ceilings of this run, one case measured (Triton, eager, torch.compile), and the goals."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .common import GOAL_BANDWIDTH_FRACTION, GOAL_LENGTH, Case, Config


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
    """This run's ceilings: device-to-device copy bandwidth and bf16 matmul throughput."""
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


def run_case(
    case: Case, timer: Timer, ceilings: dict[str, Any], compiled: dict[Any, Callable[..., Any]]
) -> dict[str, Any]:
    """One case's result row: parity, then Triton, eager and torch.compile timed (``compiled`` caches the
    compiled references across cases)."""
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
