"""Training benchmark: samples/s and peak memory per model, at L=50 and L=1000, with 1 and 2 processes, one run.

Each configuration is one `ctr train` process (its whole process tree's PSS sampled every 0.5 s: DataLoader
workers and the second rank included) on the same dataset, for `--steps` steps at batch size `--batch-size` per
rank. Samples/s is the trainer's own figure (samples of every rank over wall time between log records), the median
over the logged windows after the first (which carries start-up). Validation is capped to one batch.

    python benchmarks/train.py --data DATA_DIR [--models sum_pool din dien] [--lengths 50 1000] [--nprocs 1 2]
        [--steps 60] [--batch-size 256] [--workers N]

Batches are assembled where `ctr train` puts them by default (`data.num_workers: null`: in the training process on
machines with at most 2 cores per rank, a worker process on bigger ones); ``--workers N`` sets it for every run.

With no --data it generates and builds the demo world into --out first. Writes benchmarks/results/train.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import ROOT, machine_info, run_measured  # noqa: E402


def _ctr() -> str:
    return str(Path(sys.executable).with_name("ctr"))


def bench_one(
    data: Path, out: Path, model: str, length: int, nproc: int, steps: int, batch: int, workers: int | None
) -> dict:
    run = out / f"{model}-L{length}-n{nproc}"
    shutil.rmtree(run, ignore_errors=True)
    log_every = max(1, steps // 6)
    cmd = [
        _ctr(),
        "-q",
        "train",
        "--data",
        str(data),
        "--model",
        model,
        "--out",
        str(run),
        "--nproc",
        str(nproc),
        "--set",
        f"model.seq_len={length}",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        f"data.batch_size={batch}",
        "--set",
        f"train.log_every={log_every}",
        "--set",
        "train.eval_every=1000000000",
        "--set",
        "train.eval_max_batches=1",
    ]
    if workers is not None:  # default: the trainer's own rule (in the training process on <= 2 cores per rank)
        cmd += ["--set", f"data.num_workers={workers}"]
    measured = run_measured(cmd, out / f"{run.name}.log")
    recs = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in recs if r["kind"] == "train"][1:]
    return {
        "model": model,
        "seq_len": length,
        "nproc": nproc,
        "steps": steps,
        "batch_size_per_rank": batch,
        "samples_per_s": round(statistics.median(sps), 1) if sps else None,
        "windows": len(sps),
        "wall_seconds": measured["seconds"],
        "peak_pss_bytes": measured["peak_pss_bytes"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a built dataset directory (default: build the demo world into --out)")
    parser.add_argument("--out", default="/tmp/lifelong-ctr-train-bench")
    parser.add_argument("--models", nargs="+", default=["sum_pool", "din", "dien"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 1000])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workers", type=int, default=None, help="data.num_workers for every run (default: the trainer's own rule)"
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        import subprocess

        subprocess.run([_ctr(), "-q", "generate", "--preset", "demo", "--out", str(out / "raw")], check=True)
        subprocess.run(
            [_ctr(), "-q", "build", "--raw", str(out / "raw"), "--out", str(data), "--overwrite"], check=True
        )
    rows = []
    for model in args.models:
        for length in args.lengths:
            for nproc in args.nprocs:
                r = bench_one(data, out, model, length, nproc, args.steps, args.batch_size, args.workers)
                print(json.dumps(r), flush=True)
                rows.append(r)
    result = {
        "machine": machine_info(),
        "dataset": str(data),
        "workers": args.workers,
        "results": rows,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print("| model | L | processes | samples/s | peak memory |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        sps = f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] else "-"
        print(f"| {r['model']} | {r['seq_len']} | {r['nproc']} | {sps} | {r['peak_pss_bytes'] / 2**30:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
