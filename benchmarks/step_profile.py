"""Where a training step's time goes, per model: the loader alone, then the step split into its phases by the
PyTorch profiler, in one process per model (the trainer's own `Training` object: same model, sharding, fused
sparse optimizer and loader as `ctr train`).

    python benchmarks/step_profile.py --data DATA_DIR [--models din,dien,sim_soft] [--batch-size 1024]
        [--set model.max_len=50 ...] [--steps 20] [--results FILE]

Per model, after `--warmup` steps on prefetched batches (so the loader is not in the step time):

* ``loader``: samples/s of the loader alone (its worker process decoding and padding batches, nothing else).
* ``step``: ms per step and samples/s of the steps alone (prefetched batches), without the profiler.
* the phases of the profiled steps, in ms per step (profiler CPU time of each span, on the main thread):
  ``lookup`` (the sharded EmbeddingCollection's forward: input split, the fbgemm lookup, the output's jagged
  tensors), ``forward`` (the rest of the model and the loss), ``sparse update`` (the fused sparse optimizer
  inside backward: on the CPU `ctr.train.cpu_tables`' update, with `optim.sparse_cpu_kernel=fbgemm` or elsewhere
  FBGEMM's backward + Adagrad over the looked-up rows), ``backward`` (the rest of backward: the dense gradients),
  ``dense optimizer`` (gradient clipping and the dense optimizer's step), and the top operators by self time.

The phases are CPU time of spans, so they sum to the step's time within the profiler's overhead (it is reported as
``profiled_ms`` beside the unprofiled ``step_ms``). Run on a quiet machine: the figures of one run are comparable
with each other, not with another day's (these machines differ by up to 35%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# run as `python benchmarks/step_profile.py`, this folder is first on the path, and its kernels.py (the kernel
# benchmark) would shadow the `kernels` package the models import: the repository root comes first instead
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, ROOT)]

SPARSE_BACKWARD = "fbgemm::split_embedding_nobag_backward"  # FBGEMM's fused sparse optimizer's kernel (prefix)
PHASES = ("lookup", "forward", "sparse update", "backward", "dense optimizer")


def _span_total(prof: Any, name: str) -> float:
    """CPU total (us) of every event called `name`."""
    return sum(e.cpu_time_total for e in prof.events() if e.name == name)


def profile_model(
    model: str, data: Path, sets: list[str], steps: int, warmup: int, work: Path, profile_steps: bool = True
) -> dict[str, Any]:
    """Loader throughput, step time and the step's phases for one model (runs on rank 0 of a 1-process group).
    ``profile_steps=False``: the step time alone (no loader-alone pass, no profiler; `cost_curve.py`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ctr.config import resolve_train_config
    from ctr.train.cpu_tables import UPDATE_SPAN
    from ctr.train.distributed import launch
    from ctr.train.worker import Training

    cfg, params = resolve_train_config(model, None, sets)
    run = work / model
    run.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"model": model, "overrides": sets}

    def on_rank(ctx: Any) -> None:
        tr = Training(ctx, data, run, {"config": cfg.model_dump()}, cfg, params)
        tr.dmp.train()
        tr.train_loader.set_epoch(0)
        it = iter(tr.train_loader)
        batches = [next(it) for _ in range(warmup + steps)]
        if profile_steps:
            t0, n = time.perf_counter(), 0
            for i, b in enumerate(it):  # the loader alone, over the batches after the prefetched ones
                n += b.size
                if i + 1 >= 3 * steps:
                    break
            out["loader_samples_per_s"] = n / (time.perf_counter() - t0)
        del it
        for b in batches[:warmup]:
            tr.step(b)
        timed = batches[warmup:]
        t0 = time.perf_counter()
        for b in timed:
            tr.step(b)
        dt = time.perf_counter() - t0
        samples = sum(b.size for b in timed)
        out["step_ms"] = dt / len(timed) * 1e3
        out["samples_per_s"] = samples / dt
        out["batch_samples"] = samples / len(timed)
        views = [k for k in timed[0].dense if k.endswith("_lengths")]  # behaviors read per sample, per view
        out["behaviors_per_sample"] = {k.removesuffix("_lengths"): sum(float(b.dense[k].sum()) for b in timed) / samples
                                       for k in views}  # fmt: skip
        if not profile_steps:
            return

        collections = [m for m in tr.dmp.modules() if type(m).__name__ == "ShardedEmbeddingCollection"]
        spans: list[Any] = []
        for m in collections:
            m.register_forward_pre_hook(lambda *_: spans.append(record_function("phase:lookup").__enter__()))
            m.register_forward_hook(lambda *_: spans.pop().__exit__(None, None, None))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in timed:
                batch = b.to(ctx.device)
                with record_function("phase:forward+lookup"):
                    res = tr.dmp(batch)
                    total = sum(tr.model.loss(res, batch).values())
                tr.dense_opt.zero_grad(set_to_none=True)
                with record_function("phase:backward+sparse"):
                    total.backward()
                with record_function("phase:dense optimizer"):
                    if tr.cfg.optim.clip_norm:
                        torch.nn.utils.clip_grad_norm_(tr.dense_params, tr.cfg.optim.clip_norm)
                    tr.dense_opt.step()
        k = len(timed) * 1e3  # us -> ms per step
        lookup = _span_total(prof, "phase:lookup") / k
        fwd = _span_total(prof, "phase:forward+lookup") / k
        bwd = _span_total(prof, "phase:backward+sparse") / k
        sparse = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith(SPARSE_BACKWARD))
        sparse = (sparse + _span_total(prof, UPDATE_SPAN)) / k
        opt = _span_total(prof, "phase:dense optimizer") / k
        out["phases_ms"] = {
            "lookup": lookup,
            "forward": fwd - lookup,
            "sparse update": sparse,
            "backward": bwd - sparse,
            "dense optimizer": opt,
        }
        out["profiled_ms"] = fwd + bwd + opt
        ops = sorted(
            (e for e in prof.key_averages() if not e.key.startswith("phase:")),
            key=lambda e: e.self_cpu_time_total,
            reverse=True,
        )
        out["top_ops_ms"] = {e.key: e.self_cpu_time_total / k for e in ops[:8]}

    launch(on_rank, 1, run)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "loader samples/s", "step samples/s", "step ms", *(f"{p} ms" for p in PHASES), "top operator"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} |")
            continue
        top = next(iter(r["top_ops_ms"].items()))
        cells = [r["model"], f"{r['loader_samples_per_s']:,.0f}", f"{r['samples_per_s']:,.0f}", f"{r['step_ms']:.1f}"]
        cells += [f"{r['phases_ms'][p]:.1f}" for p in PHASES]
        cells.append(f"{top[0]} {top[1]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a dataset directory built by `ctr build`")
    parser.add_argument("--models", default="din,dien,sim_soft")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--set", action="append", default=[], help="a config override for every model (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed (and profiled) steps per model")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifelong-ctr-step-profile"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "step-profile.json")
    args = parser.parse_args()
    if not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data}: no manifest.json (build it with `ctr build`)")
    import torch

    from benchmarks._common import machine_info

    sets = [f"data.batch_size={args.batch_size}", "data.num_workers=1", *args.set]
    rows = []
    for model in args.models.split(","):
        print(f"[profile] {model}", flush=True)
        # a model may not take every override (seq_len is DIN/DIEN's, max_len the two-stage models'): keep the ones
        # its config has
        own = [s for s in sets if _applies(model, s)]
        try:
            rows.append(profile_model(model, args.data.resolve(), own, args.steps, args.warmup, args.work))
        except Exception as e:  # one model's failure is reported in its row, the others still run
            rows.append({"model": model, "error": f"{type(e).__name__}: {e}"})
    result = {
        "machine": machine_info(),
        "dataset": str(args.data.resolve()),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": {"batch_size": args.batch_size, "overrides": args.set, "steps": args.steps, "warmup": args.warmup},
        "phases": "ms per step, profiler CPU time of each span (see the module docstring)",
        "results": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(table(rows))
    ok = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    if ok:
        print(f"median step samples/s over models: {statistics.median(ok):,.0f}")
    print(f"wrote {args.results}")
    return 0 if all("error" not in r for r in rows) else 1


def _applies(model: str, override: str) -> bool:
    """Whether `model`'s resolved config has the key an override sets (``model.seq_len=50`` on DIN, not on SIM)."""
    from ctr.models import get_model_class

    key = override.split("=", 1)[0]
    if not key.startswith("model."):
        return True
    fields = get_model_class(model).Params.model_fields
    return key.removeprefix("model.").split(".")[0] in fields


if __name__ == "__main__":
    raise SystemExit(main())
