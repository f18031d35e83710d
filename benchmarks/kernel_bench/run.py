"""The command line of `benchmarks/kernels.py` and the run: the ceilings, every case of the grid measured (by
priority, within ``--max-seconds``), the results JSON written after each case, the Markdown tables at the end."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import ROOT
from . import din_attention as din_module
from . import gsu_topk as gsu_module
from . import target_attention as ta_module
from .common import DISTS, OPS, Case, Config, Shape, result_key, shape_lengths
from .fbgemm_peer import Peer, load_peer, stage
from .goals import evaluate_goals
from .grid import PASSES, make_grid
from .kernel_stats import KernelStats
from .measure import Timer, error_text, measure_ceilings, null_result, run_case
from .report import fmt, gpu_slug, kept_rows, markdown_table, merge_previous

BUILDERS = {
    "gsu_topk": gsu_module.gsu_cases,
    "target_attention": ta_module.target_attention_cases,
    "din_attention": din_module.din_attention_cases,
}
OP_MODULES = {"gsu_topk": gsu_module, "target_attention": ta_module, "din_attention": din_module}
FBGEMM_SLL_DIR = ROOT / "benchmarks" / ".peers" / "fbgemm_sll"


def build_cases(cfg: Config, shape: Shape, device: torch.device, peer: Peer | None = None) -> list[Case]:
    """The cases of a shape, inputs made on ``device``; target_attention's carry FBGEMM's calls when ``peer``
    loaded (else the reason it is absent)."""
    if shape.op == "target_attention":
        module: types.ModuleType | None = peer.module if peer is not None else None
        absent = "" if peer is None else (peer.error or "")
        return ta_module.target_attention_cases(cfg, shape, device, module, absent or "not requested")
    return BUILDERS[shape.op](cfg, shape, device)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of `benchmarks/kernels.py`."""
    parser = argparse.ArgumentParser(
        description="Benchmark the fused Triton kernels (gsu_topk, target_attention, din_attention) against their "
        "PyTorch references, eager and torch.compile, and target_attention against FBGEMM's "
        "jagged_dense_flash_attention, with the copy/matmul ceilings measured in the same run. Needs a CUDA GPU "
        "(exits with status 2 otherwise), except --stage-fbgemm.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: B=8, L=1K, D=64, Q=1, 1 warm-up, 3 runs")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: all)")
    axes = parser.add_argument_group(
        "grid", "any of these replaces the default grid (see kernel_bench/grid.py) by the cross product of the axes: "
        "the values given, every value of the others"
    )  # fmt: skip
    axes.add_argument("--batch-sizes", nargs="+", type=int, help="B (all: 1 16 64 256)")
    axes.add_argument("--dists", nargs="+", choices=DISTS, help="length distributions (all: uniform powerlaw)")
    axes.add_argument("--lengths", nargs="+", type=int, help="longest lengths L (all: 1000 10000 100000)")
    axes.add_argument("--queries", nargs="+", type=int, help="target_attention's Q (all: 1 16)")
    axes.add_argument("--dims", nargs="+", type=int, help="embedding widths D (all: 64 128)")
    axes.add_argument("--passes", nargs="+", choices=PASSES, help="forward, backward (= forward + backward)")
    parser.add_argument("--k", type=int, default=256, help="gsu_topk's K (default 256)")
    parser.add_argument("--iters", type=int, help="timed runs per measurement (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output JSON (default: benchmarks/results/kernels-<gpu>.json)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the results already in the output file for the cases this run does not measure (to split a "
        "run into several shorter ones); each row keeps its own run's ceilings",
    )
    parser.add_argument(
        "--resume", action="store_true", help="--merge, and skip the cases the output file already holds"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="time budget of the whole run: no case is started that would end past it (judged by the last "
        'case\'s duration); what was measured is written, with "complete": false',
    )
    parser.add_argument(
        "--memory-cap-gb",
        type=float,
        help="skip (record as null) a shape whose inputs would need more GPU memory (default: half the GPU's)",
    )
    parser.add_argument(
        "--fbgemm-sll-dir",
        type=Path,
        default=FBGEMM_SLL_DIR,
        help="staged copy of FBGEMM's SLL Triton attention, used when fbgemm_gpu does not import "
        "(default: benchmarks/.peers/fbgemm_sll)",
    )
    parser.add_argument(
        "--stage-fbgemm",
        action="store_true",
        help="copy FBGEMM's jagged_dense_flash_attention sources from the installed fbgemm_gpu into "
        "--fbgemm-sll-dir (with a VERSION file) and exit; needs no GPU",
    )
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    """The run's `Config` from the command line (``--quick`` first, explicit options over it)."""
    cfg = Config(k=args.k, seed=args.seed)
    if args.quick:
        cfg = dataclasses.replace(cfg, warmup=1, iters=3, copy_bytes=256 << 20, matmul_n=4096)
    if args.iters is not None:
        cfg = dataclasses.replace(cfg, iters=args.iters)
    if args.memory_cap_gb is not None:
        cfg = dataclasses.replace(cfg, memory_cap_bytes=int(args.memory_cap_gb * 2**30))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or stage the FBGEMM peer); the exit status (2 without CUDA: nothing is written)."""
    start = time.monotonic()
    args = parse_args(argv)
    if args.stage_fbgemm:
        try:
            version = stage(args.fbgemm_sll_dir)
        except (OSError, FileNotFoundError) as exc:
            print(f"benchmarks/kernels.py --stage-fbgemm: {exc}", file=sys.stderr)
            return 1
        print(f"staged FBGEMM's jagged_dense_flash_attention ({version}) in {args.fbgemm_sll_dir}")
        return 0
    if not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py: no CUDA device is available; the benchmark measures GPU kernels and produces "
            "no numbers without one (nothing was written).",
            file=sys.stderr,
        )
        return 2
    return run_benchmark(args, make_config(args), make_grid(args), torch.device("cuda"), start)


def _allow_recompiles() -> None:
    """torch.compile specializes on every shape (dynamic=False): allow enough cache entries for every case of a
    shape, so that no case silently falls back to eager (the caches are reset between shapes)."""
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 256))
            break


def _case_key(shape: Shape, variant: str) -> tuple:
    row = {"op": shape.op, "variant": variant, "B": shape.batch, "dist": shape.dist, "L": shape.length}
    return result_key({**row, "D": shape.dim, "Q": shape.queries})


@dataclasses.dataclass
class Budget:
    """``--max-seconds``: no case is started that would end past the budget, judged by the last case's time."""

    max_seconds: float | None
    start: float
    last_case_s: float = 0.0

    def exceeded(self, now: float | None = None) -> str | None:
        """Why the run must stop now, or None."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        if self.max_seconds is None or elapsed + self.last_case_s <= self.max_seconds:
            return None
        return (
            f"--max-seconds {self.max_seconds:g} reached after {elapsed:.0f} s (the last case took "
            f"{self.last_case_s:.0f} s)"
        )


def _progress(result: dict[str, Any], seconds: float) -> str:
    t = result["impls"]["triton"]
    frac = t.get("bandwidth_fraction")
    line = (
        f"{result['op']} [{result['variant']}] B={result['B']} {result['dist']} L={result['L']} Q={result['Q']} "
        f"D={result['D']}: triton {fmt(t['median_ms'], '.3f')} ms, {fmt(t.get('GBps'), '.0f')} GB/s "
        f"({fmt(None if frac is None else 100 * frac, '.0f')}% copy), "
        f"x{fmt(result.get('speedup_vs_compile'), '.1f')} compile"
    )
    if "fbgemm" in result["impls"]:
        line += f", x{fmt(result.get('speedup_vs_fbgemm'), '.1f')} fbgemm"
    return line + f" ({seconds:.0f} s)" + (f"; triton: {t['error']}" if t.get("error") else "")


def run_benchmark(
    args: argparse.Namespace, cfg: Config, grid: list[Shape], device: torch.device, start: float | None = None
) -> int:
    """Measure the ceilings and the grid's cases, writing the results JSON after each one; print the tables."""
    start = time.monotonic() if start is None else start
    gpu = torch.cuda.get_device_name(device)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"kernels-{gpu_slug(gpu)}.json"
    if cfg.memory_cap_bytes is None:
        total = torch.cuda.get_device_properties(device).total_memory
        cfg = dataclasses.replace(cfg, memory_cap_bytes=total // 2)
    _allow_recompiles()
    previous: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if args.merge or args.resume:
        try:
            previous, runs = merge_previous(out_path, gpu)
        except ValueError as exc:
            print(f"benchmarks/kernels.py: {exc}", file=sys.stderr)
            return 2
    done = {result_key(r) for r in previous} if args.resume else set()

    import triton

    peer = load_peer(args.fbgemm_sll_dir) if any(s.op == "target_attention" for s in grid) else None
    stats = KernelStats((peer.module,) if peer is not None and peer.module is not None else ())
    timer = Timer(cfg, device)
    ceilings = measure_ceilings(cfg, timer, device)
    copy_gbps, mm_tflops = ceilings["copy"]["GBps"], ceilings["matmul_bf16"]["TFLOPs"]
    print(f"{gpu}: copy {copy_gbps:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s; {len(grid)} shapes", flush=True)
    if peer is not None:
        print(f"FBGEMM peer: {peer.source or 'absent'} ({peer.version or peer.error})", flush=True)
    config = dataclasses.asdict(cfg) | {
        "quick": bool(args.quick),
        "max_seconds": args.max_seconds,
        "torch_compile": "torch.compile(reference, dynamic=False), caches reset between shapes",
        "grid": [[s.op, s.batch, s.dist, s.length, s.dim, s.queries, list(s.passes)] for s in grid],
    }
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runs.append({"date": date, "config": config, "ceilings": ceilings})
    results: list[dict[str, Any]] = []
    measured: set[tuple] = set()
    stopped: str | None = None

    def write(complete: bool) -> dict[str, Any]:
        """The report so far; written after every case, so that a run cut short keeps what it measured."""
        every = kept_rows(previous, measured) + results
        report = {
            "gpu": gpu,
            "date": date,
            "complete": complete,
            **({"stopped": stopped} if stopped else {}),
            "versions": {
                "torch": torch.__version__,
                "triton": triton.__version__,
                "cuda": torch.version.cuda,
                "python": platform.python_version(),
            },
            "config": config,
            "ceilings": ceilings,
            "peers": {"fbgemm": peer.record()} if peer is not None else {},
            "runs": runs,
            "results": every,
            "goals": evaluate_goals(every),
            "kernel_stats": stats.all(),
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        return report

    def add(result: dict[str, Any], key: tuple) -> None:
        results.append(result)
        measured.add(key)
        write(complete=False)

    budget = Budget(args.max_seconds, start)

    def over_budget(index: int) -> str | None:
        why = budget.exceeded()
        return why and f"{why}; {len(grid) - index} of {len(grid)} shapes not (fully) measured"

    for index, shape in enumerate(grid):
        names = OP_MODULES[shape.op].variants(shape)
        todo = [v for v in names if _case_key(shape, v) not in done]
        if not todo:
            continue
        if stopped := over_budget(index):
            break
        n = int(shape_lengths(shape, cfg.seed).sum())
        need = OP_MODULES[shape.op].input_bytes(shape, n)
        reason = None
        if need > cfg.memory_cap_bytes:
            reason = f"skipped: inputs need {need / 2**30:.1f} GiB > memory cap {cfg.memory_cap_bytes / 2**30:.1f} GiB"
        else:
            torch._dynamo.reset()  # a fresh torch.compile cache per shape (it recompiles for every shape anyway)
            try:
                cases = [c for c in build_cases(cfg, shape, device, peer) if c.variant in todo]
            except Exception as exc:  # out of memory making the inputs, ...
                reason = f"inputs: {error_text(exc)}"
        if reason is not None:
            print(f"{shape}: {reason}", flush=True)
            for variant in todo:
                add(null_result(shape, variant, n, reason), _case_key(shape, variant))
            torch.cuda.empty_cache()
            continue
        compiled: dict[Any, Callable[..., Any]] = {}
        for case in cases:
            if stopped := over_budget(index):
                break
            t0 = time.monotonic()
            result = run_case(case, timer, ceilings, compiled)
            result["kernels_compiled"] = stats.new()
            add(result, _case_key(shape, case.variant))
            budget.last_case_s = time.monotonic() - t0
            print(_progress(result, budget.last_case_s), flush=True)
        del cases, compiled
        torch.cuda.empty_cache()
        if stopped:
            break
    if stopped:
        print(stopped, flush=True)

    report = write(complete=stopped is None)
    print()
    print(markdown_table(report))
    print(f"\nwrote {out_path}")
    return 0
