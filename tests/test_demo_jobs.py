"""`ctr demo`'s model jobs (`cli.demo_jobs`): the cores shared out, several models trained side by side in processes
of their own, and a failed job stopping the others with its log's end in the message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import demo_jobs
from cli.demo_jobs import JobFailed, ModelJob, default_jobs, run_jobs
from cli.main import main as ctr
from ctr.runs import metrics_path


def test_default_jobs_share_the_cores():
    assert default_jobs(20, 1, cores=2) == (2, 1)
    assert default_jobs(20, 1, cores=1) == (1, 1)
    assert default_jobs(20, 1, cores=16) == (4, 4)  # at most MAX_DEFAULT_JOBS at a time
    assert default_jobs(3, 1, cores=16) == (3, 5)  # never more jobs than models
    assert default_jobs(20, 2, cores=16) == (1, 8)  # ranks share the cores: one model at a time
    assert default_jobs(20, 1, cores=16, jobs=3) == (3, 5)  # --jobs: the cores shared among those
    assert default_jobs(20, 2, cores=16, jobs=2) == (2, 4)
    assert default_jobs(20, 1, cores=2, jobs=1) == (1, 2)  # the quick demo: one in-process job, every core


def test_demo_trains_models_side_by_side(tmp_path, ray_local, capsys):
    out = tmp_path / "demo"
    assert ctr(["demo", "--quick", "--models", "din,sim_hard", "--jobs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 at a time" in printed and "demo finished" in printed
    for name in ("din", "sim_hard"):
        metrics = json.loads((out / "runs" / name / "metrics.json").read_text())
        assert 0.0 < metrics["auc"] < 1.0 and metrics["samples"] > 0
        assert f"{name}  " in printed.split("[4/5]")[1]
        log = (out / "logs" / f"{name}.log").read_text()
        assert "training done" in log and f"{name}: test AUC" in log  # the job's own output went to its log


def _job(tmp_path, name: str, data: str) -> ModelJob:
    return ModelJob(name, data, str(tmp_path / "runs" / name), [], 1, 1, str(tmp_path / "logs" / f"{name}.log"))


def _sleep_or_run(job: ModelJob) -> int:
    """A job target: "slow" sleeps (to be terminated), the others are the real job."""
    if job.name == "slow":
        time.sleep(120)
        return 0
    return demo_jobs.run_job(job)


def test_a_failed_job_stops_the_others(tmp_path):
    """The failing job's error reaches the message (its log's end); a job still running is terminated at once."""
    slow = _job(tmp_path, "slow", str(tmp_path))
    bad = _job(tmp_path, "din", str(tmp_path / "no-such-dataset"))
    t0 = time.time()
    with pytest.raises(JobFailed) as err:
        run_jobs([slow, bad], parallel=2, poll=0.1, target=_sleep_or_run)
    assert time.time() - t0 < 60  # not the slow job's 120 s: it was terminated
    message = str(err.value)
    assert "din failed (exit status 2)" in message and "no-such-dataset" in message and bad.log in message


def _record_start(job: ModelJob) -> int:
    """A job target: appends its name to STARTED in the run's parent directory, writes test metrics."""
    run = Path(job.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with open(run.parent / "STARTED", "a") as f:
        f.write(job.name + "\n")
    print(f"{job.name} ran in pid {os.getpid()}")  # to the job's log (its file descriptor 1)
    metrics_path(run, "test").write_text(json.dumps({"auc": 0.5, "gauc": 0.5}))
    return 0


def test_jobs_start_longest_first(tmp_path):
    """The queue starts unknown models, then the demo's longest jobs; results still come back in the given order;
    each job runs in a process of its own with its output in its log."""
    jobs = [_job(tmp_path, n, str(tmp_path)) for n in ("din", "diffumin", "new_model", "twin", "sum_pool")]
    assert [j.name for j in demo_jobs.longest_first(jobs)] == ["new_model", "diffumin", "twin", "din", "sum_pool"]
    assert set(demo_jobs.DEMO_SECONDS) >= {"din", "twin", "diffumin"}
    results = run_jobs(jobs, parallel=1, poll=0.05, target=_record_start)
    started = (tmp_path / "runs" / "STARTED").read_text().split()
    assert started == ["new_model", "diffumin", "twin", "din", "sum_pool"]
    assert [r.job.name for r in results] == [j.name for j in jobs]
    pids = {Path(j.log).read_text().split()[-1] for j in jobs}
    assert len(pids) == len(jobs) and str(os.getpid()) not in pids


def test_job_server_preloads_torch_only():
    """The job server imports torch and TorchRec before it forks (`PRELOAD`), nothing that starts threads at import
    (pyarrow's jemalloc, polars): a fork copies only the forking thread."""
    assert "torch" in demo_jobs.PRELOAD and not any(m.split(".")[0] in ("polars", "pyarrow") for m in demo_jobs.PRELOAD)
    code = (
        "import importlib, os, sys\n"
        f"for m in {demo_jobs.PRELOAD!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in ('polars', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
