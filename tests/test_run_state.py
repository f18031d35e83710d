"""Run state that cannot lie: every sample once per epoch on any number of ranks, checkpoint generations, killed and
resumed runs that end where an uninterrupted one ends, refused resumes, run-directory ownership, the dataset check
of `ctr evaluate`, no validation split, and what a killed training leaves behind (nothing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch

from cli.main import main as ctr
from ctr.config import ConfigError, resolve_train_config
from ctr.evaluation.evaluate import evaluate_run
from ctr.train.checkpoint import COMPLETE, latest_complete, load_rank
from ctr.train.trainer import FAULT_ENV, train
from features.errors import DatasetError, UserError
from features.outputs import DirLock, OutputError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["data.num_workers=0", "data.batch_size=128", "train.log_every=5"]


def _train(data: Path, run: Path, sets: list[str], model: str = "sum_pool", **kw) -> Path:
    cfg, _ = resolve_train_config(model, None, QUICK + sets)
    return train(data, run, cfg, **kw)


def _split_keys(data: Path, split: str) -> Counter:
    t = pq.read_table(data / "samples" / split, columns=["user_idx", "item_idx", "ts"])
    return Counter(zip(*(t[c].to_pylist() for c in ("user_idx", "item_idx", "ts")), strict=True))


@pytest.mark.parametrize("nproc", [3, 5])
def test_training_sees_every_sample_once_per_epoch(tiny_data, tmp_path, nproc, caplog):
    """What each rank trained on, recorded by the trainer: the union is the train split, nothing twice, for N that
    divides nothing (before: 67% of an epoch at N = 3, and ranks without row groups trained 0 steps)."""
    run = _train(tiny_data, tmp_path / "run", ["train.epochs=1", "train.record_samples=true"], nproc=nproc)
    seen: Counter = Counter()
    for r in range(nproc):
        t = pq.read_table(run / "samples_seen" / f"epoch0-rank{r}.parquet")
        keys = Counter(zip(*(t[c].to_pylist() for c in ("user_idx", "item_idx", "ts")), strict=True))
        assert keys, f"rank {r} trained on nothing"
        seen += keys
    assert seen == _split_keys(tiny_data, "train")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["world_size"] == nproc
    if nproc > (os.cpu_count() or 1):  # more ranks than cores works (gloo), with a warning
        assert f"--nproc {nproc} is more than" in caplog.text


def _ctr_subprocess(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "-q", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, **kw
    )


def _train_args(data: Path, run: Path, model: str, sets: list[str]) -> list[str]:
    out = ["train", "--data", str(data), "--model", model, "--out", str(run)]
    for s in QUICK + sets:
        out += ["--set", s]
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    ("model", "extra", "fault"),
    [
        ("din", [], "train:7"),  # between checkpoints
        ("sim_soft", ["model.dropout=0.3", "model.max_len=200"], "valid:2"),  # inside the 2nd validation
    ],
)
def test_killed_run_resumes_to_the_same_result(tiny_data, tmp_path, model, extra, fault):
    """SIGKILL at a step (or during a validation), then --resume: the same best model, the same validations, the
    same summary as an uninterrupted run (every RNG, the loader position and the early-stopping state resume)."""
    sets = ["train.max_steps=14", "train.eval_every=4", "train.checkpoint_every=3", "train.patience=5", *extra]
    straight = tmp_path / "straight"
    done = _ctr_subprocess(_train_args(tiny_data, straight, model, sets))
    assert done.returncode == 0, done.stderr[-2000:]

    run = tmp_path / "killed"
    killed = _ctr_subprocess(_train_args(tiny_data, run, model, sets), env={FAULT_ENV: fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "train_summary.json").exists()
    resumed = _ctr_subprocess([*_train_args(tiny_data, run, model, sets), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    sa, sb = (json.loads((r / "train_summary.json").read_text()) for r in (straight, run))
    assert sa == sb
    evals = [
        [
            (r["step"], r["auc"], r["gauc"], r["best"])
            for r in map(json.loads, (d / "train_log.jsonl").open())
            if r["kind"] == "eval"
        ]
        for d in (straight, run)
    ]
    assert evals[0] == evals[1] and len(evals[0]) == 4  # steps 4, 8, 12, and 14 where training stopped


def test_resume_refuses_what_differs(tiny_data, tmp_path):
    run = _train(tiny_data, tmp_path / "run", ["train.max_steps=4", "train.checkpoint_every=2"])
    with pytest.raises(ConfigError, match=r"data\.batch_size=128 \(now 64\)"):
        _train(tiny_data, run, ["train.max_steps=8", "data.batch_size=64"], resume=True)
    with pytest.raises(ConfigError, match=r"optim\.dense_lr"):
        _train(tiny_data, run, ["train.max_steps=8", "optim.dense_lr=0.5"], resume=True)
    other = tmp_path / "data-copy"
    shutil.copytree(tiny_data, other, ignore=shutil.ignore_patterns("_cache", ".*lock"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created_at"] = "2001-01-01T00:00:00Z"  # a rebuild
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="dataset .* fingerprint"):
        _train(other, run, ["train.max_steps=8"], resume=True)
    # a worker's refusal in a 2-process run is one clear error too
    assert ctr([*_train_args(tiny_data, run, "sum_pool", ["train.max_steps=8"]), "--resume", "--nproc", "2"]) == 2


def test_resume_skips_a_partial_generation(tiny_data, tmp_path, caplog):
    run = _train(
        tiny_data,
        tmp_path / "run",
        ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.eval_every=100"],
    )
    gens = sorted((run / "checkpoints").glob("gen-*"))
    assert [g.name for g in gens][-2:] == ["gen-000000004", "gen-000000006"]
    (gens[-1] / COMPLETE).unlink()  # the kill fell while generation 6 was written
    found = latest_complete(run / "checkpoints")
    assert found is not None and found[0].name == "gen-000000004"
    state = load_rank(found[0], 0)  # weights_only=True
    assert state["state"]["step"] == 4 and set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    _train(
        tiny_data,
        run,
        ["train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.eval_every=100"],
        resume=True,
    )
    assert "incomplete" in caplog.text
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 6


def test_run_directory_is_claimed_not_clobbered(tiny_data, tmp_path):
    run = _train(tiny_data, tmp_path / "run", ["train.max_steps=2"])
    evaluate_run(run, "test")
    assert (run / "predictions.parquet").exists()
    with pytest.raises(OutputError, match="--overwrite"):
        _train(tiny_data, run, ["train.max_steps=2"])
    (run / "notes.txt").write_text("mine")
    _train(tiny_data, run, ["train.max_steps=3"], overwrite=True)
    assert not (run / "predictions.parquet").exists() and not (run / "metrics.json").exists()  # old outputs gone
    assert (run / "notes.txt").read_text() == "mine"  # what we did not write stays
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 3

    users = tmp_path / "users-folder"
    users.mkdir()
    (users / "thesis.tex").write_text("keep")
    with pytest.raises(OutputError, match="not a run directory"):
        _train(tiny_data, users, ["train.max_steps=2"], overwrite=True)
    assert (users / "thesis.tex").read_text() == "keep"
    with pytest.raises(OutputError, match="dataset directory"):
        _train(tiny_data, tiny_data / "runs" / "x", ["train.max_steps=2"])


def test_two_trainings_into_one_run_directory(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with DirLock(run / ".lock", "run directory"), pytest.raises(OutputError, match="another process"):
        _train(tiny_data, run, ["train.max_steps=2"])


def test_evaluate_refuses_another_dataset(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("_cache", ".*lock"))
    run = _train(data, tmp_path / "run", ["train.max_steps=2"])
    capsys.readouterr()
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["created_at"] = "2001-01-01T00:00:00Z"  # rebuilt under the trained run
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="not the dataset"):
        evaluate_run(run, "test")
    assert ctr(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not the dataset" in err and len(err.splitlines()) == 1


def test_schema_version_is_checked(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("_cache", ".*lock"))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="schema version 0.*ctr build"):
        _train(data, tmp_path / "run", ["train.max_steps=2"])


def test_expected_failures_are_one_line(tiny_data, tmp_path, capsys):
    assert ctr(["train", "--data", str(tmp_path), "--model", "din", "--out", str(tmp_path / "r")]) == 2
    assert "manifest.json" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert ctr(["evaluate", "--run", str(tmp_path / "run")]) == 2
    assert "config.json" in capsys.readouterr().err
    run = _train(tiny_data, tmp_path / "trained", ["train.max_steps=1"])
    (run / "model.pt").unlink()
    assert ctr(["evaluate", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.pt" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        ctr(["train", "--data", str(tiny_data), "--model", "din", "--out", str(tmp_path / "n"), "--nproc", "0"])
    assert exit_info.value.code == 2
    assert isinstance(DatasetError("x"), UserError)


def test_no_validation_split_keeps_the_last_model(tmp_path, ray_local):
    from pipelines.build import build_dataset
    from pipelines.config import load_build_config
    from pipelines.synthetic import generate

    generate("tiny", 1, tmp_path / "raw")
    data = tmp_path / "data"
    build_dataset(tmp_path / "raw", data, load_build_config(None, ["split.valid_fraction=0"]))
    split = json.loads((data / "manifest.json").read_text())["split"]
    assert split["valid"]["rows"] == 0 and split["test"]["rows"] > 0 and split["train"]["rows"] > 0
    run = _train(data, tmp_path / "run", ["train.epochs=2", "train.max_steps=6", "train.eval_every=2"])
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["best_valid_score"] is None and summary["best_step"] == 6 and "last" in summary["model"]
    assert not [r for r in map(json.loads, (run / "train_log.jsonl").open()) if r["kind"] == "eval"]
    assert np.isfinite(evaluate_run(run, "test")["auc"])
    with pytest.raises(DatasetError, match="valid split has no samples"):
        evaluate_run(run, "valid")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _shared_memory(procs: list[psutil.Process]) -> set[str]:
    paths: set[str] = set()
    for p in procs:
        try:
            files = [m.path for m in p.memory_maps()] + [f.path for f in p.open_files()]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        paths |= {f for f in files if f.startswith("/dev/shm/")}
    return paths


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_training_leaves_nothing_behind(tiny_data, tmp_path, sig):
    """2 ranks with a loader worker each (forkserver): kill the `ctr train`, then look for what is left."""
    run = tmp_path / "run"
    args = _train_args(tiny_data, run, "din", ["data.num_workers=1", "train.epochs=50", "train.log_every=1"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "-q", *args, "--nproc", "2"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    log = run / "train_log.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be killed"
    family = _descendants(proc.pid)
    assert len(family) >= 4, family  # 2 ranks, their forkservers / loader workers
    shm = _shared_memory([psutil.Process(proc.pid), *family])  # what the tree maps or holds open in /dev/shm
    proc.send_signal(sig)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    assert not [p for p in shm if os.path.exists(p)], shm  # other tests' segments (xdist) are not ours to judge
    leftovers = {p.name for p in run.iterdir()} - {"config.json", "train_log.jsonl", "checkpoints", ".lock"}
    if sig == signal.SIGTERM:  # unwound: the rendezvous store and error folder are removed
        assert not leftovers, leftovers
    else:  # SIGKILL cannot clean up: at most the rendezvous file, which the next run replaces
        assert leftovers <= {".dist_store", ".dist_errors", "model.pt", "tensorboard"}, leftovers
