"""A model's training step with one native CPU operator used and declined, alternating in one process.

    python benchmarks/native_toggle.py --data DATA_DIR --op gather_dot [--models muse,r2led] [--rounds 4]
        [--steps 4] [--batch-size 512] [--threads 1] [--set KEY=VALUE ...] [--against REV[:PATH]] [--results FILE]

(a ``--set model.KEY=VALUE`` goes to the models whose config has KEY: ``model.seq_len`` to DIN, ``model.max_len`` to
the two-stage models)

Each `ctr.native` operator returns None to decline, and its caller then runs its PyTorch form: this benchmark
replaces ``ctr.native.<op>`` with a function that declines ("off") or with the operator itself ("on") and times the
same prefetched batches through the trainer's own `Training` step (the model, sharding, fused sparse optimizer and
loader of `ctr train`), ``--threads`` threads (1 unless given; the trainer uses 2 on a 2-core machine), off then on,
``--rounds`` times: both forms share the process, the batches
and the hour, so the ratio is not the machine's drift between two runs. One process per model.

``--against REV`` compares two versions of the operator's C++ instead: "off" runs the source at git revision REV
(``ctr/native/<op>.cpp`` and the headers beside it, or ``--against REV:PATH``), built as a second extension under
another operator namespace, "on" the working tree's; every ``torch.ops.ctr_native`` operator that file defines is
swapped while "off" runs. The Python around the operator is the working tree's on both sides, so the two versions
must share their operators' signatures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), str(HERE)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]


def measure(args: argparse.Namespace) -> dict:
    """One model: the step's ms per round with the operator declined and used (runs in its own process); its
    scratch (the runs' folders, the revision's build) is removed at the end."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="native-toggle-"))
    try:
        return _measure(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(args: argparse.Namespace, scratch: Path) -> dict:
    import torch

    from ctr import native
    from ctr.config import resolve_train_config
    from ctr.train.distributed import launch
    from ctr.train.worker import Training

    real = getattr(native, args.op)
    from step_profile import _applies

    swapped = base_operators(args.against, args.op, scratch / "base") if args.against else {}

    own = [s for s in args.set if _applies(args.models, s)]  # each model takes the overrides its config has
    sets = [f"data.batch_size={args.batch_size}", "data.num_workers=0", *own]
    cfg, params = resolve_train_config(args.models, None, sets)
    out: dict = {"off": [], "on": [], "calls_on": 0}

    def counted(*a, **kw):  # type: ignore[no-untyped-def]
        out["calls_on"] += 1
        return real(*a, **kw)

    def on_rank(ctx) -> None:  # type: ignore[no-untyped-def]
        torch.set_num_threads(args.threads)
        (scratch / "run").mkdir(exist_ok=True)
        tr = Training(ctx, Path(args.data), scratch / "run", {"config": cfg.model_dump()}, cfg, params)
        tr.dmp.train()
        tr.train_loader.set_epoch(0)
        it = iter(tr.train_loader)
        batches = [next(it) for _ in range(args.steps + 2)]
        for b in batches[:2]:  # warm-up
            tr.step(b)
        for _ in range(args.rounds):
            for side in ("off", "on"):
                if swapped:  # REV's operators ("off") or the working tree's
                    for op_name, (ours, theirs) in swapped.items():
                        setattr(torch.ops.ctr_native, op_name, ours if side == "on" else theirs)
                    setattr(native, args.op, counted)
                else:
                    setattr(native, args.op, counted if side == "on" else (lambda *a, **kw: None))
                t0 = time.perf_counter()
                for b in batches[2:]:
                    tr.step(b)
                out[side].append(round((time.perf_counter() - t0) / args.steps * 1e3, 2))
        setattr(native, args.op, real)

    launch(on_rank, 1, scratch / "launch")
    return out


def base_operators(against: str, op: str, work: Path) -> dict:
    """Build the operator's C++ at a git revision as the ``ctr_native_base`` namespace, in ``work``: {name: (working
    tree's operator, the revision's)} for every operator its source defines."""
    import re

    import torch
    from torch.utils.cpp_extension import load

    from ctr import native

    rev, _, path = against.partition(":")
    path = path or f"ctr/native/{op}.cpp"

    def show(p: str) -> str:
        done = subprocess.run(["git", "show", f"{rev}:{p}"], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout

    work.mkdir(parents=True, exist_ok=True)
    folder = str(Path(path).parent)
    listed = subprocess.run(["git", "ls-tree", "--name-only", rev, folder + "/"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()  # fmt: skip
    for header in (h for h in listed if h.endswith(".h")):
        (work / Path(header).name).write_text(show(header))
    text = re.sub(r"TORCH_LIBRARY(_FRAGMENT|_IMPL)?\(ctr_native\b", r"TORCH_LIBRARY\1(ctr_native_base", show(path))
    source = work / Path(path).name
    source.write_text(text)
    assert native.available(), native.unavailable_reason()
    name, flags = native._build_flags()
    digest = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    load(f"{name}_base_{digest}", [str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         build_directory=str(work), is_python_module=False)  # fmt: skip
    names = re.findall(r'm\.def\(\s*"(\w+)\(', text)
    if not names:
        raise SystemExit(f"{rev}:{path} defines no operator")
    return {n: (getattr(torch.ops.ctr_native, n), getattr(torch.ops.ctr_native_base, n)) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--op", required=True, help="a ctr.native function that returns None to decline")
    parser.add_argument("--models", default="muse,r2led")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--against", help="REV[:PATH]: the operator's C++ at a git revision as 'off' (see above)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "native-toggle.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the per-model process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    rows = []
    for model in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", "--data", args.data, "--op", args.op, "--models", model]
        cmd += ["--rounds", str(args.rounds), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        cmd += ["--threads", str(args.threads)] + (["--against", args.against] if args.against else [])
        cmd += [f"--set={s}" for s in args.set]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not line:
            sys.exit(f"{model}: failed\n{done.stderr[-3000:]}")
        r = json.loads(line[0][len("RESULT ") :])
        r["model"] = model
        r["speedup_of_medians"] = round(statistics.median(r["off"]) / statistics.median(r["on"]), 3)
        rows.append(r)
        print(f"{model:14s} off {r['off']}  on {r['on']}  {r['speedup_of_medians']:.2f}x  ({r['calls_on']} calls)")
    result = {
        "op": args.op,
        "off": f"the C++ at {args.against}" if args.against else "declined (the eager form)",
        "data": args.data,
        "settings": {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "rounds": args.rounds,
            "sets": args.set,
            "threads": args.threads,
        },  # fmt: skip
        "unit": f"ms per training step (prefetched batches, {args.threads} thread(s)), each round off then on",
        "results": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
