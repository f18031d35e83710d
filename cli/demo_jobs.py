"""`ctr demo`'s model jobs: each model is trained and then scored on the test split in a process of its own, several
at a time, each with its share of the cores.

Why: a training step on the CPU is a chain of many small operators, and torch's intra-op threads barely overlap
them. On 2 cores one process with 2 threads used about 1.1 of them; two processes with 1 thread each trained the
same models about 1.4x faster in total (measured back to back: TWIN 60 steps twice, 69 s one after the other at 2
threads against 49 s side by side at 1 thread; DiffuMIN 30 steps twice, 101 s against 72 s). Each job writes its
whole output (logging, progress bars) to ``OUT/logs/<model>.log``; the demo prints one line per model as it ends.

A job is `run_job` (`train_and_evaluate`, what ``ctr train`` then ``ctr evaluate`` run) in a process forked from a
server that has already imported torch and TorchRec (multiprocessing's ``forkserver`` with `PRELOAD`): each fresh
interpreter used to spend about 3.3 s of its core importing them before its first step, 20 jobs x 3.3 s on two
lanes. The fork is a clean process per job, as before (its own seed, tables, loader; the server imports only, it
never runs an operator), and ``python -m cli.demo_jobs SPEC`` still runs one job by hand. The preload leaves out
pyarrow and polars: they start threads at import (jemalloc's, polars' cleanup), and polars is not fork-safe; the
job imports them itself. Where ``forkserver`` does not exist, ``spawn`` runs the same code (imports paid per job).
One job at a time (``--jobs 1``, the quick demo) runs them in the demo's own process (`run_inline`): a process start
costs more than a quick model's training.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctr.runs import metrics_path

# What the job server imports once, before it forks each job: torch, TorchRec and fbgemm (about 2.5 of the 3.3 s a
# fresh job spent importing), nothing that starts a thread at import (see the module docstring)
PRELOAD = [
    "torch", "torch.distributed.optim", "fbgemm_gpu", "torchrec.distributed.model_parallel",
    "torchrec.distributed.planner", "torchrec.optim.apply_optimizer_in_backward",
]  # fmt: skip
MAX_DEFAULT_JOBS = 4  # beyond a few jobs, memory (each holds its own tables and loader) matters more than cores

# Seconds each model's job took in a full demo on 2 cores (two jobs side by side, 1 thread each; the sixteenth
# fresh-clone run, `docs/performance-log.md`). Used only to start the longest jobs first, so that the last minutes
# are not one long job alone on one core while the other idles (longest-first list scheduling); in alphabetical
# order DiffuMIN (the longest) started third and TWIN ended the demo alone. A model not listed starts first.
DEMO_SECONDS = {
    "diffumin": 184, "r2led_lain": 77, "r2led": 69, "twin": 65, "sim_soft_lain": 56, "twin_v2": 54,
    "sim_soft": 50, "muse_lain": 50, "sdim": 47, "eta": 46, "muse": 43, "dien_lain": 34, "dien": 33,
    "sim_hard_lain": 32, "sim_hard": 25, "din_sid": 22, "din_lain": 20, "din": 17, "tin": 12, "sum_pool": 7,
}  # fmt: skip


def longest_first(jobs: list[ModelJob]) -> list[ModelJob]:
    """The jobs in the order to start them: unknown models, then by `DEMO_SECONDS`, longest first (stable)."""
    return sorted(jobs, key=lambda j: -DEMO_SECONDS.get(j.name, float("inf")))


def default_jobs(n_models: int, nproc: int, cores: int | None = None, jobs: int | None = None) -> tuple[int, int]:
    """(jobs at a time, torch threads per rank): `jobs` when given, else one job per core up to
    `MAX_DEFAULT_JOBS`; the cores shared out among every job's ranks.

    With ``nproc`` > 1 ranks per model the ranks already share the cores: one job at a time by default."""
    cores = cores or os.cpu_count() or 1
    if jobs is None:
        jobs = 1 if nproc > 1 else max(1, min(n_models, cores, MAX_DEFAULT_JOBS))
    return jobs, max(1, cores // (jobs * nproc))


@dataclass(frozen=True)
class ModelJob:
    """One model of the demo: train into ``run_dir`` with ``sets``, then score its test split."""

    name: str
    data_dir: str
    run_dir: str
    sets: list[str]
    nproc: int
    threads: int
    log: str


@dataclass
class JobResult:
    job: ModelJob
    seconds: float
    metrics: dict[str, Any]


class JobFailed(RuntimeError):
    """A job exited with an error; the message ends with the last lines of its log."""


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return "    (no log was written)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in kept)


def job_context() -> multiprocessing.context.BaseContext:
    """The start method of the jobs: ``forkserver`` preloaded with `PRELOAD` (``spawn`` where it does not exist).
    Calling it early (`warm_up`) lets the server import while the demo builds its dataset."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # type: ignore[attr-defined]
    return ctx


def warm_up() -> None:
    """Start the job server now (its imports then overlap the demo's first stages)."""
    if job_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _job_process(target: Callable[[ModelJob], int], job: ModelJob) -> None:
    """A job's process: its output (file descriptors 1 and 2, so progress bars and native code's too) to its log,
    its threads, then `target(job)`; the exit status is what `target` returns."""
    fd = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(job.threads)
    sys.exit(target(job))


def run_jobs(
    jobs: list[ModelJob],
    parallel: int,
    on_done: Any = None,
    poll: float = 0.5,
    target: Callable[[ModelJob], int] | None = None,
) -> list[JobResult]:
    """Run `jobs` with at most `parallel` at a time; `on_done(result, done, total)` as each ends (in end order).

    Each job is `target(job)` (default `run_job`: train, then score the test split) in a process of its own
    (`job_context`), which writes the test metrics file; `target` returns the exit status. The jobs start longest
    first (`longest_first`); results come back in the order of `jobs`. A failed job stops the others (they are
    terminated) and raises `JobFailed` naming its log; Ctrl-C / SIGTERM terminate every running job before the
    exception propagates."""
    ctx = job_context()
    pending = deque(longest_first(jobs))
    running: dict[str, tuple[ModelJob, Any, float]] = {}
    results: dict[str, JobResult] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.popleft()
                Path(job.log).parent.mkdir(parents=True, exist_ok=True)
                proc = ctx.Process(target=_job_process, args=(target or run_job, job), name=f"demo-{job.name}")  # type: ignore[attr-defined]
                proc.start()
                running[job.name] = (job, proc, time.time())
            time.sleep(poll)
            for name in [n for n, (_, p, _) in running.items() if p.exitcode is not None]:
                job, proc, t0 = running.pop(name)
                if proc.exitcode != 0:
                    raise JobFailed(
                        f"demo: {job.name} failed (exit status {proc.exitcode}); the end of its log {job.log}:\n"
                        + _log_tail(Path(job.log))
                    )
                metrics = json.loads(metrics_path(Path(job.run_dir), "test").read_text())
                result = JobResult(job, time.time() - t0, metrics)
                results[name] = result
                if on_done is not None:
                    on_done(result, len(results), len(jobs))
    finally:
        for _job, proc, _t0 in running.values():
            if proc.exitcode is None:
                proc.terminate()  # SIGTERM: the job unwinds as on Ctrl-C (training ranks stopped, temp files removed)
        for _job, proc, _t0 in running.values():
            proc.join(timeout=60)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    return [results[j.name] for j in jobs]


def train_and_evaluate(job: ModelJob) -> dict[str, Any]:
    """What one job does: train the model, then score its test split (`ctr train` then `ctr evaluate`)."""
    from ctr.config import resolve_train_config
    from ctr.evaluation.evaluate import evaluate_run
    from ctr.train.trainer import train

    cfg, params = resolve_train_config(job.name, None, job.sets)
    run = train(Path(job.data_dir), Path(job.run_dir), cfg, params, nproc=job.nproc, overwrite=True)
    return evaluate_run(run, "test", num_workers=cfg.data.num_workers)  # the test split loaded as in training


def run_inline(jobs: list[ModelJob], on_done: Any = None) -> list[JobResult]:
    """The jobs one after the other in this process, their output on the console (``--jobs 1``, and the quick
    demo, whose models train in seconds: a process of their own would more than double its time)."""
    results = []
    for job in jobs:
        t0 = time.time()
        metrics = train_and_evaluate(job)
        results.append(JobResult(job, time.time() - t0, metrics))
        if on_done is not None:
            on_done(results[-1], len(results), len(jobs))
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m cli.demo_jobs SPEC``: one job by hand (SPEC: a `ModelJob` as a JSON object)."""
    args = sys.argv[1:] if argv is None else argv
    return run_job(ModelJob(**json.loads(args[0])))


def run_job(job: ModelJob) -> int:
    """The job itself (in its own process): train, then score the test split; returns the exit status."""
    from cli.main import setup_logging, terminate

    signal.signal(signal.SIGTERM, terminate)
    setup_logging(logging.INFO)
    import torch

    from features.errors import UserError

    torch.set_num_threads(job.threads)
    try:
        m = train_and_evaluate(job)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"{job.name}: test AUC {m['auc']:.4f} GAUC {m['gauc']:.4f} logloss {m['logloss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
