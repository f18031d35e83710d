"""Where a training step's time goes, per model: the loader alone, then the step split into its phases by the
PyTorch profiler, in one process per model (the trainer's own `Training` object: same model, sharding, fused
sparse optimizer and loader as `ctr train`).

    python benchmarks/step_profile.py --data DATA_DIR [--models din,dien,sim_soft] [--batch-size 1024]
        [--set model.max_len=50 ...] [--steps 20] [--threads 1,2] [--results FILE]

Per model, after `--warmup` steps on prefetched batches (so the loader is not in the step time):

* ``loader``: samples/s of the loader alone (reading, decoding and padding batches, nothing else; in the training
  process or its worker, as `data.num_workers` decides: in the process on 2 cores), over ``3 x steps`` batches.
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

``--threads 1,2 [--rounds R]``: each model once per intra-op thread count, the counts alternating R times (a row
each), and from the lowest and highest counts' median runs its ``thread_split``: the step (and each phase) as
``T(t) = serial + parallel / t`` (Amdahl's law through the two medians), i.e. how much of the step the added threads
do not shorten: the chain of small operators and Python that runs on one core while the others wait.
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
    model: str,
    data: Path,
    sets: list[str],
    steps: int,
    warmup: int,
    work: Path,
    profile_steps: bool = True,
    threads: int | None = None,
    top: int = 8,
) -> dict[str, Any]:
    """Loader throughput, step time and the step's phases for one model (runs on rank 0 of a 1-process group).
    ``profile_steps=False``: the step time alone (no loader-alone pass, no profiler; `cost_curve.py`). ``threads``:
    the step's intra-op threads (default: the trainer's, the cores per rank). ``top``: how many operators (by self
    time) the row keeps."""
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
        if threads is not None:
            torch.set_num_threads(threads)
        out["threads"] = torch.get_num_threads()
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
                    tr.dense_step()
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
        out["top_ops_ms"] = {e.key: e.self_cpu_time_total / k for e in ops[:top]}

    before = torch.get_num_threads()
    try:
        launch(on_rank, 1, run)
    finally:  # the process's own count again: a later call without `threads` must not inherit this one's
        torch.set_num_threads(before)
    return out


def thread_split(lo: list[dict[str, Any]], hi: list[dict[str, Any]]) -> dict[str, Any]:
    """Amdahl's law through one model's runs at ``t_lo < t_hi`` threads (the median of each count's runs):
    ``T(t) = serial + parallel / t`` for the step (unprofiled) and each phase (profiled); ``parallel`` is the
    one-thread time of the part that threads divide. Solving through two points doubles their noise into the serial
    share (serial = 2 T(2) − T(1) at 1 and 2 threads), hence several alternating rounds. A part that got slower with
    threads has a negative parallel share (said as it is)."""
    t_lo, t_hi = lo[0]["threads"], hi[0]["threads"]

    def split(a: float, b: float) -> dict[str, float]:
        par = (a - b) / (1.0 / t_lo - 1.0 / t_hi)
        return {"serial_ms": round(a - par / t_lo, 3), "parallel_ms_one_thread": round(par, 3)}

    def med(runs: list[dict[str, Any]], get: Any) -> float:
        return statistics.median(get(r) for r in runs)

    out: dict[str, Any] = {
        "threads": [t_lo, t_hi],
        "runs": [len(lo), len(hi)],
        "step": split(med(lo, lambda r: r["step_ms"]), med(hi, lambda r: r["step_ms"])),
    }
    if all("phases_ms" in r for r in lo + hi):
        out["phases"] = {
            p: split(med(lo, lambda r, p=p: r["phases_ms"][p]), med(hi, lambda r, p=p: r["phases_ms"][p]))
            for p in PHASES
        }
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "model", "threads", "loader samples/s", "step samples/s", "step ms", *(f"{p} ms" for p in PHASES),
        "top operator",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} |")
            continue
        top = next(iter(r["top_ops_ms"].items()))
        cells = [r["model"], str(r["threads"]), f"{r['loader_samples_per_s']:,.0f}", f"{r['samples_per_s']:,.0f}"]
        cells.append(f"{r['step_ms']:.1f}")
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
    parser.add_argument(
        "--threads", default=None,
        help="intra-op thread counts, comma-separated: each model runs once per count, and with two or more its "
        "thread_split (serial and parallel shares of the step) is reported (default: the trainer's, cores per rank)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="with --threads: run the thread counts this many times, alternating (a row each; the split from each "
        "count's median)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=8, help="operators kept per row, by self time")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lifelong-ctr-step-profile"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "step-profile.json")
    args = parser.parse_args()
    if not (args.data / "manifest.json").exists():
        parser.error(f"--data {args.data}: no manifest.json (build it with `ctr build`)")
    import torch

    from benchmarks._common import machine_info

    # the loader where `ctr train` puts it (`data.num_workers: null`: in the training process on <= 2 cores per rank);
    # `--set data.num_workers=N` places it otherwise
    sets = [f"data.batch_size={args.batch_size}", *args.set]
    counts: list[int | None] = [None]
    if args.threads:
        try:
            counts = sorted({int(t) for t in args.threads.split(",")})
        except ValueError:
            parser.error(f"--threads {args.threads!r}: comma-separated thread counts, e.g. 1,2")
        if counts[0] < 1:
            parser.error(f"--threads {args.threads!r}: every count must be at least 1")
    rows, splits = [], {}
    for model in args.models.split(","):
        # a model may not take every override (seq_len is DIN/DIEN's, max_len the two-stage models'): keep the ones
        # its config has
        own = [s for s in sets if _applies(model, s)]
        mine = []
        for _ in range(max(1, args.rounds) if args.threads else 1):
            for t in counts:
                print(f"[profile] {model}" + (f" on {t} threads" if t else ""), flush=True)
                try:
                    row = profile_model(
                        model, args.data.resolve(), own, args.steps, args.warmup, args.work, True, t, args.top
                    )
                except Exception as e:  # one model's failure is reported in its row, the others still run
                    row = {"model": model, "threads": t, "error": f"{type(e).__name__}: {e}"}
                mine.append(row)
        rows += mine
        by_count = {t: [r for r in mine if r.get("threads") == t and "error" not in r] for t in counts}
        if len(counts) >= 2 and by_count[counts[0]] and by_count[counts[-1]]:
            splits[model] = thread_split(by_count[counts[0]], by_count[counts[-1]])
    result = {
        "machine": machine_info(),
        "dataset": str(args.data.resolve()),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": {"batch_size": args.batch_size, "overrides": args.set, "steps": args.steps, "warmup": args.warmup},
        "phases": "ms per step, profiler CPU time of each span (see the module docstring)",
        "results": rows,
    }
    result["settings"]["threads"] = args.threads
    if splits:
        result["thread_split"] = splits
        result["thread_split_definition"] = (
            "Amdahl's law through the lowest and highest thread counts: T(t) = serial_ms + parallel_ms_one_thread / t"
        )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(table(rows))
    for model, sp in splits.items():
        st = sp["step"]
        print(
            f"{model}: of the step at {sp['threads'][0]} thread(s), {st['serial_ms']:.1f} ms serial and "
            f"{st['parallel_ms_one_thread']:.1f} ms divided by the threads (T(t) = serial + parallel / t)"
        )
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
