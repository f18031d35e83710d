"""Measurement on the GPU: median CUDA-event time with the L2 flushed, peak memory of one call, the copy and
bf16-matmul ceilings of this run, and one case measured: Triton, eager, torch.compile, and FBGEMM's kernel for
target_attention (each first call, which compiles, timed on its own as ``first_call_s``), with parity checks."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .common import Case, Config, Shape


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


def error_text(exc: BaseException) -> str:
    """A failure in one line (out of memory said as such; a multi-line message by its first and last lines)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # Triton's CompilationError starts with "at <line>:<col>:" and ends with the cause: keep both ends.
    text = " ... ".join([lines[0], lines[-1]]) if len(lines) > 1 else "".join(lines)
    return f"{type(exc).__name__}: {text}"[:300]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cleanup() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def first_call(fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """The first call of an implementation (Triton's or Inductor's compilation happens here), its wall time and
    its output (kept for the parity checks); a failure is recorded, never replaced by a number."""
    record: dict[str, Any] = {"median_ms": None, "peak_extra_bytes": None, "first_call_s": None, "error": None}
    out = None
    try:
        t0 = time.perf_counter()
        out = fn()
        _sync()
        record["first_call_s"] = time.perf_counter() - t0
    except Exception as exc:  # OOM, compile failures: record and go on
        record["error"] = error_text(exc)
        if not isinstance(exc, torch.cuda.OutOfMemoryError):
            traceback.print_exc()
        out = None
        _cleanup()
    return record, out


def timed(timer: Timer, fn: Callable[[], Any], record: dict[str, Any]) -> dict[str, Any]:
    """Median time and peak memory of an implementation whose first call succeeded (``record``, updated)."""
    if record["error"] is None:
        try:
            record["median_ms"] = timer(fn)
            record["peak_extra_bytes"] = peak_extra_bytes(fn)
        except Exception as exc:
            record["error"] = error_text(exc)
            record["median_ms"] = record["peak_extra_bytes"] = None
            if not isinstance(exc, torch.cuda.OutOfMemoryError):
                traceback.print_exc()
    _cleanup()
    return record


def run_impl(timer: Timer, fn: Callable[[], Any]) -> dict[str, Any]:
    """Time one implementation: its first call, then the timed runs and peak memory."""
    record, out = first_call(fn)
    del out
    return timed(timer, fn, record)


def _parity(compare: Callable[[Any, Any], dict[str, float]], got: Any, want: Any, errors: dict[str, Any]) -> dict:
    """``compare(got, want)``, or why it could not be run (the first failed side)."""
    for name, record in errors.items():
        if record["error"] is not None:
            return {"error": f"{name}: {record['error']}"}
    try:
        return compare(got, want)
    except Exception as exc:
        return {"error": error_text(exc)}


def run_case(
    case: Case, timer: Timer, ceilings: dict[str, Any], compiled: dict[Any, Callable[..., Any]]
) -> dict[str, Any]:
    """One case's result row: first calls and parity (Triton and FBGEMM against the eager reference, FBGEMM
    against Triton too, which still checks it where the reference ran out of memory), then Triton, eager,
    torch.compile and FBGEMM timed (``compiled`` caches the compiled references across cases)."""
    shape = case.shape
    result: dict[str, Any] = {
        "op": case.op,
        "variant": case.variant,
        "B": case.shapes["B"],
        "dist": shape.dist if shape else None,
        "L": case.length,
        "Q": shape.queries if shape else None,
        "D": shape.dim if shape else None,
        "ceilings": {"copy_GBps": ceilings["copy"]["GBps"], "matmul_bf16_TFLOPs": ceilings["matmul_bf16"]["TFLOPs"]},
        "shapes": case.shapes,
        "bytes": case.bytes,
        "flops": case.flops,
        "bytes_formula": case.bytes_formula,
        "flops_formula": case.flops_formula,
    }
    eager, want = first_call(case.reference)
    triton, got = first_call(case.kernel)
    result["parity"] = _parity(case.compare, got, want, {"reference": eager, "triton": triton})
    impls = {"triton": triton, "eager": eager}
    has_peer = case.peer is not None or case.peer_absent is not None
    if case.peer is not None and case.peer_compare is not None:
        peer, peer_out = first_call(case.peer)
        result["parity_fbgemm"] = {
            "vs_reference": _parity(case.peer_compare, peer_out, want, {"reference": eager, "fbgemm": peer}),
            "vs_triton": _parity(case.peer_compare, peer_out, got, {"triton": triton, "fbgemm": peer}),
        }
        del peer_out
    elif has_peer:
        peer = {"median_ms": None, "peak_extra_bytes": None, "first_call_s": None}
        peer["error"] = f"absent: {case.peer_absent}"
    del want, got
    _cleanup()
    timed(timer, case.kernel, triton)
    timed(timer, case.reference, eager)
    if case.reference_fn not in compiled:
        compiled[case.reference_fn] = torch.compile(case.reference_fn, dynamic=False)
    impls["compile"] = run_impl(timer, case.with_reference(compiled[case.reference_fn]))
    if case.peer is not None:
        impls["fbgemm"] = timed(timer, case.peer, peer)
    elif has_peer:
        impls["fbgemm"] = peer
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
    for base in ("eager", "compile", "fbgemm"):
        if base in impls:
            other = impls[base]["median_ms"]
            result[f"speedup_vs_{base}"] = other / ms if ms and other else None
    return result


def null_result(shape: Shape, variant: str, n_total: int, reason: str) -> dict[str, Any]:
    """The row of a case that was not measured (its inputs would exceed the memory cap, its inputs failed to
    build): every implementation null with the reason."""
    impls = ("triton", "eager", "compile", *(("fbgemm",) if shape.op == "target_attention" else ()))
    empty = {"median_ms": None, "peak_extra_bytes": None, "first_call_s": None, "error": reason, "GBps": None}
    empty |= {"TFLOPs": None, "bandwidth_fraction": None, "flops_fraction": None}
    return {
        "op": shape.op,
        "variant": variant,
        "B": shape.batch,
        "dist": shape.dist,
        "L": shape.length,
        "Q": shape.queries,
        "D": shape.dim,
        "shapes": {"B": shape.batch, "L_max": shape.length, "N_total": n_total, "lengths": shape.dist},
        "bytes": None,
        "flops": None,
        "parity": {"error": reason},
        "impls": {name: dict(empty) for name in impls},
        **{f"speedup_vs_{name}": None for name in impls[1:]},
    }
