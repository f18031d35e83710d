"""The GSU reference on CPU: a model's training step with the jagged top-K against the padded one, side by side.

`kernels.reference.gsu_topk` pads the scores to the longest prefix of the batch only when that costs at most
`JAGGED_WHEN` (4) times the real behaviors, else it sorts the jagged scores (the same result). This times the
model's step (forward, backward, Adam; the loader's batches prepared beforehand) on the same batches with each path
forced, alternating twice and keeping each path's faster pass, in one process.

    python benchmarks/gsu_cpu.py --data DATA_DIR [--models r2led sim_soft muse twin] [--threads 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # not benchmarks/: its kernels.py would shadow the kernels package

from benchmarks._common import machine_info  # noqa: E402


def main() -> int:
    import torch

    import kernels.reference.gsu_topk as reference
    from ctr.models import get_model_class
    from features.dataset import DatasetInfo
    from features.loader import LoaderConfig, SplitLoader

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a built dataset (the demo's: out/demo/data)")
    p.add_argument("--models", nargs="+", default=["r2led", "sim_soft", "muse", "twin"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "gsu-cpu.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = DatasetInfo.load(args.data)
    rows = []
    for name in args.models:
        cls = get_model_class(name)
        torch.manual_seed(0)
        model = cls(cls.Params(), info)
        cfg = LoaderConfig(batch_size=args.batch_size, views=model.views(), shuffle=True, max_behaviors=6_000_000)
        loader = SplitLoader(info, "train", cfg, model.features())
        batches = [b for _, b in zip(range(args.steps + 1), loader, strict=False)]
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()

        def step(batch, model=model, opt=opt) -> None:  # noqa: ANN001
            out = model(batch)
            loss = sum(model.loss(out, batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        step(batches[0])  # warm-up
        best: dict[str, float] = {}
        for path, when in [("padded", 10**15), ("jagged", reference.JAGGED_WHEN)] * 2:
            saved, reference.JAGGED_WHEN = reference.JAGGED_WHEN, when
            t0 = time.perf_counter()
            for b in batches[1:]:
                step(b)
            ms = (time.perf_counter() - t0) / args.steps * 1000
            reference.JAGGED_WHEN = saved
            best[path] = min(best.get(path, float("inf")), ms)
        row = {
            "model": name,
            "padded_ms_per_step": round(best["padded"], 1),
            "jagged_ms_per_step": round(best["jagged"], 1),
            "speedup": round(best["padded"] / best["jagged"], 2),
            "behaviors_per_batch": [int(b.dense["long_lengths"].sum()) for b in batches[1:]],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"machine": machine_info(), "data": args.data, "threads": args.threads, "batch_size": args.batch_size,
           "results": rows}  # fmt: skip
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    print("| model | padded top-K ms/step | jagged top-K ms/step | speed-up |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['padded_ms_per_step']} | {r['jagged_ms_per_step']} | {r['speedup']}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
