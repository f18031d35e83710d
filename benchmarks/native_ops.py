"""The native CPU operators (`ctr.native`) against the eager PyTorch forms they replace, side by side in one run.

    python benchmarks/native_ops.py [--data DATA_DIR --models din,sim_soft,dien --set model.max_len=50 ...]
        [--rounds 4] [--results benchmarks/results/native-ops.json]

* ``dice``: Dice alone, forward and backward (batch statistics), on [N, 80] and [N, 40] blocks, the two hidden
  layers of DIN's activation unit, N = the real behaviors of a batch of 1,024 at L = 50 on the demo world;
* ``din_unit``: DIN's activation unit and pooling (`DinAttention`, [80, 40] Dice, D = 32), forward and backward, on
  1,024 samples of 50 slots with lengths drawn from 20 to 50;
* ``gru_scan_torch`` / ``gru_scan_paper``: DIEN's two recurrences (`ctr.modules.gru_scan`: the interest extractor's
  GRU and the AUGRU), forward and backward, over the same 1,024 x 50 slots with a state of 32;
* with ``--data``: each model's training step on prefetched batches (`step_profile.profile_model` without the
  profiler: the trainer's own model, sharding and optimizers, on one rank in this process), `native.set_enabled`
  switching the form.

Every measurement alternates the two forms ``--rounds`` times (eager first); the medians and every round are kept.
The machine must be quiet: these CPUs move by 10% to 30% between runs, so only same-run ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT), str(HERE)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]


def _timed(fn: Callable[[], None], steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1e3


def _ab(fn_for: Callable[[bool], Callable[[], None]], rounds: int, steps: int) -> dict[str, Any]:
    """ms per call of each form, alternating eager / native `rounds` times."""
    from ctr import native

    runs: dict[str, list[float]] = {"eager": [], "native": []}
    for _ in range(rounds):
        for form in ("eager", "native"):
            native.set_enabled(form == "native")
            runs[form].append(_timed(fn_for(form == "native"), steps))
    native.set_enabled(True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"ms": runs, "median_ms": med, "speedup": med["eager"] / med["native"]}


def op_benchmarks(rounds: int, steps: int) -> dict[str, Any]:
    import torch

    from ctr.modules.activations import Dice
    from ctr.modules.attention import DinAttention

    torch.manual_seed(0)
    out: dict[str, Any] = {}
    rows = 42_800  # the demo world at L = 50: 41.8 real behaviors per sample x 1,024
    for h in (80, 40):
        d = Dice(h)
        x = (torch.randn(rows, h) * 1.5 + 0.3).requires_grad_()
        g = torch.randn(rows, h)

        def dice_step(_: bool, d: Dice = d, x: torch.Tensor = x, g: torch.Tensor = g) -> Callable[[], None]:
            return lambda: d(x).backward(g)

        out[f"dice_{rows}x{h}"] = _ab(dice_step, rounds, steps)

    b, n, dim = 1024, 50, 32
    unit = DinAttention(dim, (80, 40), "dice")
    q = torch.randn(b, dim, requires_grad=True)
    keys = torch.randn(b, n, dim, requires_grad=True)
    mask = torch.arange(n)[None] < torch.randint(20, n + 1, (b,))[:, None]

    def unit_step(_: bool) -> Callable[[], None]:
        return lambda: unit(q, keys, mask)[0].sum().backward()

    out["din_unit_1024x50_d32"] = _ab(unit_step, rounds, steps)
    out["din_unit_1024x50_d32"]["real_behaviors"] = int(mask.sum())

    from ctr.modules.gru_scan import gru_scan

    hd = 32  # DIEN's state: 2 x embedding_dim 16
    gx = torch.randn(b, n, 3 * hd, requires_grad=True)
    att = torch.rand(b, n, requires_grad=True)
    w = (torch.randn(3 * hd, hd) * 0.3).requires_grad_()
    b_c = torch.zeros(hd, requires_grad=True)
    for form in ("torch", "paper"):

        def scan_step(_: bool, form: str = form) -> Callable[[], None]:
            a = att if form != "torch" else None
            return lambda: gru_scan(gx, a, mask, None, w, b_c, form)[0].sum().backward()

        out[f"gru_scan_{form}_1024x50_h32"] = _ab(scan_step, rounds, steps)
    return out


def step_benchmarks(args: argparse.Namespace) -> dict[str, Any]:
    from step_profile import _applies, profile_model

    from ctr import native

    sets = [f"data.batch_size={args.batch_size}", "data.num_workers=1", *args.set]  # as step_profile.py
    out: dict[str, Any] = {}
    for model in args.models.split(","):
        own = [s for s in sets if _applies(model, s)]  # each model takes the overrides its config has
        runs: dict[str, list[float]] = {"eager": [], "native": []}
        for _ in range(args.rounds):
            for form in ("eager", "native"):
                native.set_enabled(form == "native")  # the step runs in this process (one rank)
                r = profile_model(model, args.data.resolve(), own, args.steps, 5, args.work / form, profile_steps=False)
                runs[form].append(r["step_ms"])
                print(f"{model} {form}: {r['step_ms']:.1f} ms per step ({r['samples_per_s']:,.0f} samples/s)")
        native.set_enabled(True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        out[model] = {"step_ms": runs, "median_step_ms": med, "speedup": med["eager"] / med["native"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a dataset directory: also time the models' training steps")
    parser.add_argument("--models", default="din,sim_soft,dien")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--set", action="append", default=[], help="a config override for every model (repeatable)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifelong-ctr-native-ops"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "native-ops.json")
    args = parser.parse_args()

    import torch

    from ctr import native
    from ctr.malloc import keep_freed_memory

    keep_freed_memory()  # as the trainer's processes run
    torch.set_num_threads(args.threads)
    if not native.available():
        print(f"native operators unavailable: {native.unavailable_reason()}")
        return 1
    name, flags = native._build_flags()
    res: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },  # fmt: skip
        "threads": args.threads,
        "extension": {"name": name, "flags": flags},
        "rounds": args.rounds,
        "ops": op_benchmarks(args.rounds, args.steps),
    }
    for k, v in res["ops"].items():
        print(f"{k}: eager {v['median_ms']['eager']:.2f} ms, native {v['median_ms']['native']:.2f} ms "
              f"({v['speedup']:.2f}x)")  # fmt: skip
    if args.data:
        res["steps"] = {"data": str(args.data), "batch_size": args.batch_size, "overrides": args.set,
                        "models": step_benchmarks(args)}  # fmt: skip
        for k, v in res["steps"]["models"].items():
            m = v["median_step_ms"]
            print(f"{k} step: eager {m['eager']:.1f} ms, native {m['native']:.1f} ms ({v['speedup']:.2f}x)")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
