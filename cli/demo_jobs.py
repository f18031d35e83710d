"""`ctr demo`'s model jobs: each model is trained and then scored on the test split in a process of its own, several
at a time, each with its share of the cores.

Why: a training step on the CPU is a chain of many small operators, and torch's intra-op threads barely overlap
them. On 2 cores one process with 2 threads used about 1.1 of them; two processes with 1 thread each trained the
same models about 1.4x faster in total (measured back to back: TWIN 60 steps twice, 69 s one after the other at 2
threads against 49 s side by side at 1 thread; DiffuMIN 30 steps twice, 101 s against 72 s). Each job writes its
whole output (logging, progress bars) to ``OUT/logs/<model>.log``; the demo prints one line per model as it ends.

A job is ``python -m cli.demo_jobs SPEC`` (a JSON object): `train_and_evaluate`, what ``ctr train`` then ``ctr
evaluate`` run, in one process. One job at a time (``--jobs 1``, the quick demo) runs them in the demo's own process
(`run_inline`): a process start (torch and TorchRec imported again) costs more than a quick model's training.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ctr.runs import metrics_path

MAX_DEFAULT_JOBS = 4  # beyond a few jobs, memory (each holds its own tables and loader) matters more than cores

# Seconds each model's job took in a full demo on 2 cores (two jobs side by side, 1 thread each; the sixth fresh-clone
# run in the README, validation included). Used only to start the longest jobs first, so that the last minutes are
# not one long job alone on one core while the other idles (longest-first list scheduling); in alphabetical order
# DiffuMIN (the longest) started third and TWIN ended the demo alone. A model not listed starts first.
DEMO_SECONDS = {
    "diffumin": 293, "r2led_lain": 122, "r2led": 114, "twin": 113, "sim_soft_lain": 87, "twin_v2": 84,
    "sim_soft": 83, "sdim": 77, "eta": 70, "muse_lain": 66, "muse": 61, "dien_lain": 49, "sim_hard_lain": 47,
    "dien": 46, "sim_hard": 42, "din_lain": 30, "din": 27, "din_sid": 27, "tin": 15, "sum_pool": 14,
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


def job_command(job: ModelJob) -> list[str]:
    """The command line of one job: this module's `main` in a fresh interpreter."""
    return [sys.executable, "-m", "cli.demo_jobs", json.dumps(asdict(job))]


def run_jobs(jobs: list[ModelJob], parallel: int, on_done: Any = None, poll: float = 0.5) -> list[JobResult]:
    """Run `jobs` with at most `parallel` at a time; `on_done(result, done, total)` as each ends (in end order).

    The jobs start longest first (`longest_first`); results come back in the order of `jobs`. A failed job stops
    the others (they are terminated) and raises `JobFailed` naming its log; Ctrl-C / SIGTERM terminate every
    running job before the exception propagates."""
    pending = deque(longest_first(jobs))
    running: dict[str, tuple[ModelJob, subprocess.Popen[bytes], float, Any]] = {}
    results: dict[str, JobResult] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.popleft()
                Path(job.log).parent.mkdir(parents=True, exist_ok=True)
                handle = open(job.log, "wb")  # noqa: SIM115 - closed when the job ends
                env = {**os.environ, "OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
                proc = subprocess.Popen(
                    job_command(job),
                    stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                )  # fmt: skip
                running[job.name] = (job, proc, time.time(), handle)
            time.sleep(poll)
            for name in [n for n, (_, p, _, _) in running.items() if p.poll() is not None]:
                job, proc, t0, handle = running.pop(name)
                handle.close()
                if proc.returncode != 0:
                    raise JobFailed(
                        f"demo: {job.name} failed (exit status {proc.returncode}); the end of its log {job.log}:\n"
                        + _log_tail(Path(job.log))
                    )
                metrics = json.loads(metrics_path(Path(job.run_dir), "test").read_text())
                result = JobResult(job, time.time() - t0, metrics)
                results[name] = result
                if on_done is not None:
                    on_done(result, len(results), len(jobs))
    finally:
        for _job, proc, _t0, _handle in running.values():
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: the job unwinds as on Ctrl-C (training ranks stopped, temp files removed)
        for _job, proc, _t0, handle in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            handle.close()
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
    """The job itself (in its own process): train, then score the test split."""
    args = sys.argv[1:] if argv is None else argv
    from cli.main import setup_logging, terminate

    job = ModelJob(**json.loads(args[0]))
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
