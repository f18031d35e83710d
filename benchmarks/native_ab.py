"""The native CPU operators of two checkouts side by side (before and after a change to `ctr/native`), alternating.

    git worktree add /tmp/before HEAD~1
    python benchmarks/native_ab.py --before /tmp/before [--after .] [--rounds 4] [--threads 1] [--results FILE]

Each round runs the before checkout's operators, then the after checkout's, each in a process of its own (each
builds and loads its own sources), ms per call (forward and backward where both exist) at the shapes
the demo's models call them with:

* ``token_attention Cq=4`` / ``Cq=1``: DiffuMIN's denoiser attention, 2,048 rows (512 samples x 4 channel copies) of
  4 tokens, width 32 in 2 heads; every token's query (the first block) or one (the last block);
* ``dot_pool fwd`` / ``bwd``: SIM-soft's auxiliary pooling over 512 samples' prefixes (lengths uniform in [0, 910),
  about 233K behaviors), width 32, keys and values one tensor;
* ``din_unit fwd+bwd``: DIN's activation unit ([80, 40], Dice; `DinAttention.scores`, then backward) over 1,024
  samples of L = 50 (real lengths uniform in [20, 50], about 35.6K behaviors), width 64: the short branch of the
  two-stage models and DIN at the side-by-side runs' shapes.

``--threads`` sets the intra-op threads of both sides (1 unless given; the trainer uses 2 on a 2-core machine).

The machine must be quiet; only the same run's before/after ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from ctr import native
assert native.available(), native.unavailable_reason()
torch.manual_seed(0)

def timed(fn, n=30):
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3

out = {}
for cq in (4, 1):
    q = torch.randn(2048, cq, 32, requires_grad=True)
    kv = torch.randn(2048, 4, 64, requires_grad=True)
    g = torch.randn(2048, cq, 32)
    out[f"token_attention Cq={cq}"] = timed(lambda: native.token_attention(q, kv, 2, 0.25).backward(g))
lengths = torch.randint(0, 910, (512,))
offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
keys, qq, gg = torch.randn(int(offsets[-1]), 32), torch.randn(512, 32), torch.randn(512, 32)
ops = torch.ops.ctr_native
out["dot_pool fwd"] = timed(lambda: ops.dot_pool_forward(keys, keys, qq, offsets))
out["dot_pool bwd"] = timed(lambda: ops.dot_pool_backward(gg, keys, keys, qq, offsets, True))
from ctr.modules.attention import DinAttention
att = DinAttention(64, (80, 40), "dice").train()
mask = torch.arange(50)[None, :] < torch.randint(20, 51, (1024,))[:, None]
qd, kd = torch.randn(1024, 64, requires_grad=True), torch.randn(1024, 50, 64, requires_grad=True)
out["din_unit fwd+bwd"] = timed(lambda: att.scores(qd, kd, mask).sum().backward(), n=10)
print(json.dumps(out))
"""


def measure(checkout: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, "-c", MEASURE, str(checkout), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the checkout before the change")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "native-ab.json")
    args = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in ("before", "after"):
            rounds[side].append(measure(getattr(args, side).resolve(), args.threads))
            print(f"round {r + 1} {side}: " + ", ".join(f"{k} {v:.2f}" for k, v in rounds[side][-1].items()))
    ops = list(rounds["before"][0])
    summary = {
        op: {
            "before_ms": [round(x[op], 3) for x in rounds["before"]],
            "after_ms": [round(x[op], 3) for x in rounds["after"]],
            "speedup_of_medians": round(
                statistics.median(x[op] for x in rounds["before"]) / statistics.median(x[op] for x in rounds["after"]),
                3,
            ),
        }
        for op in ops
    }
    print("\n| operator | before (ms) | after (ms) | before / after (medians) |\n|---|---|---|---:|")
    for op, s in summary.items():
        before = ", ".join(f"{v:.2f}" for v in s["before_ms"])
        after = ", ".join(f"{v:.2f}" for v in s["after_ms"])
        print(f"| {op} | {before} | {after} | {s['speedup_of_medians']:.2f}x |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(
        json.dumps(
            {"before": str(args.before), "after": str(args.after), "threads": args.threads, "ops": summary}, indent=2
        )
        + "\n"
    )
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
