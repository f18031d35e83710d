"""The command line of `benchmarks/kernels.py` and the run: the ceilings, every (op, L) case measured, the results
JSON written after each case, the Markdown table at the end."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import ROOT
from .common import OPS, Case, Config
from .din_attention import din_attention_cases
from .gsu_topk import gsu_cases
from .measure import Timer, evaluate_goals, measure_ceilings, run_case
from .report import fmt, gpu_slug, markdown_table, merge_previous
from .target_attention import target_attention_cases

BUILDERS = {"gsu_topk": gsu_cases, "target_attention": target_attention_cases, "din_attention": din_attention_cases}


def build_cases(cfg: Config, op: str, length: int, device: torch.device) -> list[Case]:
    """The cases of ``op`` at longest length ``length``, inputs made on ``device``."""
    return BUILDERS[op](cfg, length, device)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of `benchmarks/kernels.py`."""
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
    """The run's `Config` from the command line (``--quick`` first, explicit options over it)."""
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
    """Run the benchmark; the exit status (2 without CUDA: nothing is written)."""
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
    """Measure the ceilings and every case, writing the results JSON after each one; print the table."""
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
                    f"{op} [{case.variant}] L={length}: triton {fmt(t['median_ms'], '.3f')} ms, "
                    f"{fmt(t['GBps'], '.0f')} GB/s, x{fmt(result['speedup_vs_eager'], '.1f')} eager, "
                    f"x{fmt(result['speedup_vs_compile'], '.1f')} compile",
                    flush=True,
                )
            del cases
            torch.cuda.empty_cache()

    report = write(complete=True)
    print()
    print(markdown_table(report))
    print(f"\nwrote {out_path}")
    return 0
