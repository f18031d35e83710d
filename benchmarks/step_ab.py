"""The training step of two checkouts side by side (before and after a change anywhere in the step), alternating.

    git worktree add /tmp/before HEAD~1
    python benchmarks/step_ab.py --before /tmp/before --data DATA_DIR [--after .] [--models din,sim_soft]
        [--rounds 4] [--steps 10] [--batch-size 1024] [--threads 2] [--set KEY=VALUE ...] [--results FILE]

For a change in Python (a model's forward, a module, the trainer), where `native_toggle.py`'s swap of one operator
inside a process does not apply. Each round runs every model in the before checkout, then in the after checkout, one
process each (each imports and builds its own sources), and takes ms per step over ``--steps`` prefetched batches
after ``--warmup`` (the trainer's own `Training` step through `step_profile.profile_model`: model, sharding, fused
sparse optimizer, loader); rounds alternate so that the machine's drift over the run falls on both sides. The
ratio reported is of the medians over rounds. ``--threads``: intra-op threads of both sides (the trainer uses 2 on a
2-core machine). ``--set``: config overrides, each given to the models whose config has its key.

``--before-env`` / ``--after-env KEY=VALUE`` (repeatable): environment of one side's processes, e.g. an A/B of the
native operators' instruction set in one checkout (``--before-env LIFELONG_CTR_NATIVE_ISA=avx2``; `--before`
defaults to this checkout).

The machine must be quiet; only the same run's before/after ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, sys, tempfile
from pathlib import Path
checkout, model, data, steps, warmup, threads = sys.argv[1:7]
sets = sys.argv[7:]
sys.path[:0] = [checkout, checkout + "/benchmarks"]
import torch
torch.set_num_threads(int(threads))
import step_profile
own = [s for s in sets if step_profile._applies(model, s)]
work = Path(tempfile.mkdtemp(prefix="step-ab-"))
out = step_profile.profile_model(model, Path(data), own, int(steps), int(warmup), work, profile_steps=False)
print("RESULT " + json.dumps({"step_ms": out["step_ms"], "samples_per_s": out["samples_per_s"]}))
"""


def measure(checkout: Path, model: str, args: argparse.Namespace, extra_env: list[str] | None = None) -> float:
    """ms per step of `model` in `checkout` (a process of its own; ``extra_env``: KEY=VALUE pairs for it)."""
    sets = [f"data.batch_size={args.batch_size}", "data.num_workers=1", *args.set]
    cmd = [sys.executable, "-c", MEASURE, str(checkout.resolve()), model, args.data, str(args.steps),
           str(args.warmup), str(args.threads), *sets]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for pair in extra_env or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"an environment setting is KEY=VALUE, got {pair!r}")
        env[key] = value
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        sys.exit(f"{model} in {checkout}: failed\n{done.stderr[-3000:]}")
    return float(json.loads(line[0][len("RESULT ") :])["step_ms"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=ROOT, help="the checkout before the change (default: this one)")
    parser.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--after-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--data", required=True, help="a dataset directory built by `ctr build`")
    parser.add_argument("--models", default="din,sim_soft")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "step-ab.json")
    args = parser.parse_args()

    models = args.models.split(",")
    times: dict[str, dict[str, list[float]]] = {m: {"before": [], "after": []} for m in models}
    for r in range(args.rounds):
        for m in models:
            for side in ("before", "after"):
                env = getattr(args, f"{side}_env")
                times[m][side].append(round(measure(getattr(args, side), m, args, env), 2))
            print(f"round {r + 1}/{args.rounds} {m:10s} before {times[m]['before'][-1]:7.2f} ms  "
                  f"after {times[m]['after'][-1]:7.2f} ms", flush=True)  # fmt: skip
    rows = []
    for m in models:
        before, after = statistics.median(times[m]["before"]), statistics.median(times[m]["after"])
        rows.append({"model": m, **times[m], "speedup_of_medians": round(before / after, 3)})
        print(f"{m:10s} before {before:7.2f} ms  after {after:7.2f} ms  {before / after:.2f}x")
    git = ["git", "rev-parse", "--short", "HEAD"]
    revs = {s: subprocess.run(git, cwd=getattr(args, s), capture_output=True, text=True).stdout.strip()
            for s in ("before", "after")}  # fmt: skip
    result = {
        "before": revs["before"],
        "after": revs["after"],
        "before_env": args.before_env,
        "after_env": args.after_env,
        "data": args.data,
        "settings": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "threads": args.threads,
            "sets": args.set,
        },  # fmt: skip
        "unit": f"ms per training step (prefetched batches, {args.threads} thread(s)); each round before then after",
        "results": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
