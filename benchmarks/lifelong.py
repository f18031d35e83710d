"""The lifelong preset end to end: generate -> build -> sid -> train the two-stage models with `max_len` 100,000 (the
whales' whole histories) -> evaluate -> report, with the default evaluation settings, measured step by step.

Each step is one `ctr` process; its whole process tree's PSS (Ray workers, training ranks, DataLoader workers) is
sampled every 0.5 s. Batches are capped by the trainer's behavior budget (`data.max_batch_behaviors`,
`data.eval_max_batch_behaviors`, 1M padded behaviors by default) as well as by their sample count, so the peak
depends on the budget, not on which users a batch happens to hold.

    python benchmarks/lifelong.py [--out DIR] [--models sim_hard sim_soft muse r2led] [--steps 200]

Writes benchmarks/results/lifelong.json and prints the README's Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import ROOT, machine_info, run_measured  # noqa: E402

MAX_LEN = 100_000


def _ctr() -> str:
    return str(Path(sys.executable).with_name("ctr"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/lifelong-ctr-lifelong-bench")
    parser.add_argument("--models", nargs="+", default=["sim_hard", "sim_soft", "muse", "r2led"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "lifelong.json"))
    args = parser.parse_args()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the benchmark's own scratch directory
    out.mkdir(parents=True)
    raw, data, runs = out / "raw", out / "data", out / "runs"
    ctr = [_ctr(), "-q"]
    steps: list[dict] = []

    def step(name: str, cmd: list[str]) -> dict:
        measured = run_measured(cmd, out / f"{name}.log")
        row = {"step": name, **measured}
        print(json.dumps(row), flush=True)
        steps.append(row)
        return row

    step("generate", [*ctr, "generate", "--preset", "lifelong", "--seed", str(args.seed), "--out", str(raw)])
    step("build", [*ctr, "build", "--raw", str(raw), "--out", str(data)])
    step("sid", [*ctr, "sid", "--data", str(data), "--seed", str(args.seed)])
    for model in args.models:
        run = runs / model
        sets = [
            f"model.max_len={MAX_LEN}",
            f"train.max_steps={args.steps}",
            f"data.batch_size={args.batch_size}",
            f"train.log_every={max(1, args.steps // 10)}",
            f"train.seed={args.seed}",
        ]
        cmd = [*ctr, "train", "--data", str(data), "--model", model, "--out", str(run)]
        for s in sets:
            cmd += ["--set", s]
        step(f"train {model}", cmd)
        step(f"evaluate {model}", [*ctr, "evaluate", "--run", str(run)])
    step("report", [*ctr, "report", *[str(runs / m) for m in args.models], "--out", str(out / "report")])

    manifest = json.loads((data / "manifest.json").read_text())
    metrics = {m: json.loads((runs / m / "metrics.json").read_text()) for m in args.models}
    result = {
        "machine": machine_info(),
        "world": {
            "behaviors": manifest["tables"]["behaviors"]["rows_out"],
            "samples": {s: manifest["split"][s]["rows"] for s in ("train", "valid", "test")},
            "sequence_length": manifest["sequence_length"],
        },
        "settings": {"max_len": MAX_LEN, "steps": args.steps, "batch_size": args.batch_size},
        "steps": steps,
        "test": {m: {"auc": v["auc"], "gauc": v["gauc"]} for m, v in metrics.items()},
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print("| step | wall time | peak memory (process tree PSS) |")
    print("|---|---:|---:|")
    for r in steps:
        print(f"| {r['step']} | {r['seconds']:,.0f} s | {r['peak_pss_bytes'] / 2**30:.2f} GiB |")
    print("\n| model | test AUC | test GAUC |")
    print("|---|---:|---:|")
    for m, v in result["test"].items():
        print(f"| {m} | {v['auc']:.4f} | {v['gauc']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
