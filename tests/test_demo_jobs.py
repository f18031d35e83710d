"""`ctr demo`'s model jobs (`cli.demo_jobs`): the cores shared out, several models trained side by side in processes
of their own, and a failed job stopping the others with its log's end in the message."""

from __future__ import annotations

import json
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


def test_a_failed_job_stops_the_others(tmp_path, monkeypatch):
    """The failing job's error reaches the message (its log's end); a job still running is terminated at once."""
    slow = _job(tmp_path, "slow", str(tmp_path))
    bad = _job(tmp_path, "din", str(tmp_path / "no-such-dataset"))
    real_command = demo_jobs.job_command

    def command(job: ModelJob) -> list[str]:
        if job.name == "slow":
            return [sys.executable, "-c", "import time; time.sleep(120)"]
        return real_command(job)

    monkeypatch.setattr(demo_jobs, "job_command", command)
    t0 = time.time()
    with pytest.raises(JobFailed) as err:
        run_jobs([slow, bad], parallel=2, poll=0.1)
    assert time.time() - t0 < 60  # not the slow job's 120 s: it was terminated
    message = str(err.value)
    assert "din failed (exit status 2)" in message and "no-such-dataset" in message and bad.log in message


def test_jobs_start_longest_first(tmp_path, monkeypatch):
    """The queue starts unknown models, then the demo's longest jobs; results still come back in the given order."""
    jobs = [_job(tmp_path, n, str(tmp_path)) for n in ("din", "diffumin", "new_model", "twin", "sum_pool")]
    assert [j.name for j in demo_jobs.longest_first(jobs)] == ["new_model", "diffumin", "twin", "din", "sum_pool"]
    assert set(demo_jobs.DEMO_SECONDS) >= {"din", "twin", "diffumin"}
    started: list[str] = []

    def command(job: ModelJob) -> list[str]:
        started.append(job.name)
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-c", f"import json; open({str(metrics_path(Path(job.run_dir), 'test'))!r}, 'w')"
                ".write(json.dumps({'auc': 0.5, 'gauc': 0.5}))"]  # fmt: skip

    monkeypatch.setattr(demo_jobs, "job_command", command)
    results = run_jobs(jobs, parallel=1, poll=0.05)
    assert started == ["new_model", "diffumin", "twin", "din", "sum_pool"]
    assert [r.job.name for r in results] == [j.name for j in jobs]
