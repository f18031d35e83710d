"""Faults in the build: Ray workers killed with SIGKILL in stage A and in stage B, a build killed as a whole, and a
build over a two-node Ray cluster. Each writes the same dataset content as an undisturbed local build.

Builds that need their own Ray (a cluster, fault hooks in the workers' environment, a process to kill) run in a
subprocess (tests/build_faults_helper.py): the session's in-process Ray (`ray_local`) must not see them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from features.schema import SPLITS
from pipelines.build import FAULT_ACTION_ENV, FAULT_DIR_ENV, FAULT_STAGE_ENV, build_dataset
from pipelines.config import load_build_config
from pipelines.synthetic import generate

HELPER = Path(__file__).with_name("build_faults_helper.py")
MANIFEST_CONTENT = ("tables", "vocab_sizes", "users", "sequence_length", "hist_len", "item_attributes", "mm_emb")


def _frame(directory: Path) -> pl.DataFrame | None:
    if not any(directory.glob("*.parquet")):
        return None
    df = pl.read_parquet(directory / "*.parquet")
    return df.sort([c for c, t in df.schema.items() if not t.is_nested()])


def dataset_content(data: Path) -> dict[str, Any]:
    """What a dataset says, independent of how it was cut into files: every table sorted, the manifest's counts."""
    content: dict[str, Any] = {
        "sequences": _frame(data / "sequences"),
        "items": pl.read_parquet(data / "items.parquet"),
        **{f"samples/{s}": _frame(data / "samples" / s) for s in SPLITS},
        **{f"vocab/{f.stem}": pl.read_parquet(f) for f in sorted((data / "vocab").glob("*.parquet"))},
    }
    manifest = json.loads((data / "manifest.json").read_text())
    quarantine = data / "quarantine"
    for table in sorted(p for p in quarantine.iterdir() if p.is_dir()) if quarantine.exists() else []:
        rows = _frame(table)  # source_file is the raw file's path: keep the part below the raw directory
        content[f"quarantine/{table.name}"] = rows.with_columns(
            pl.col("source_file").str.strip_prefix(manifest["raw_dir"] + os.sep)
        ).sort(rows.columns)
    content["manifest"] = {k: manifest[k] for k in MANIFEST_CONTENT}
    content["split"] = {k: v for k, v in manifest["split"].items() if not isinstance(v, dict)} | {
        s: {k: v for k, v in manifest["split"][s].items() if k != "files"} for s in SPLITS
    }
    return content


def assert_same_content(a: Path, b: Path) -> None:
    ca, cb = dataset_content(a), dataset_content(b)
    assert ca.keys() == cb.keys()
    for key, value in ca.items():
        if isinstance(value, pl.DataFrame):
            assert value.equals(cb[key]), f"{key} differs between {a} and {b}"
        else:
            assert value == cb[key], f"{key} differs between {a} and {b}"
    assert ca["sequences"].height > 0 and ca["samples/train"].height > 0


def _no_leftovers(out: Path) -> None:
    assert (out / "manifest.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary siblings left"
    assert not [p for p in out.rglob(".*")], "temporary files of killed task attempts left in the dataset"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """The tiny world, as `tiny_data` (the undisturbed local build, default config) was built from."""
    raw = tmp_path_factory.mktemp("faults") / "raw"
    generate("tiny", 0, raw)
    return raw


@pytest.fixture(scope="module")
def cluster_builds(raw) -> dict[str, Any]:
    """On a two-node Ray cluster (head + a second node, 1 CPU each): an undisturbed build, then a build in which one
    stage A task and one stage B task SIGKILL their worker on their first attempt."""
    root = raw.parent
    faults = root / "faults"  # created by the helper between the builds: that arms the hooks
    env = os.environ | {FAULT_STAGE_ENV: "A,B", FAULT_DIR_ENV: str(faults), "RAY_DEDUP_LOGS": "0"}
    args = [sys.executable, str(HELPER), "cluster", str(raw), str(root / "plain"), str(root / "killed"), str(faults)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"plain": root / "plain", "killed": root / "killed", "info": info}


@pytest.mark.slow
def test_two_node_cluster_build_equals_local_build(cluster_builds, tiny_data):
    assert cluster_builds["info"]["nodes"] == 2 and cluster_builds["info"]["cpus"] == 2
    assert_same_content(cluster_builds["plain"], tiny_data)
    _no_leftovers(cluster_builds["plain"])


@pytest.mark.slow
def test_workers_killed_in_stage_a_and_b_build_equals_undisturbed(cluster_builds):
    assert cluster_builds["info"]["faults"] == ["fault-A", "fault-B"], "the fault hooks did not fire"
    assert_same_content(cluster_builds["killed"], cluster_builds["plain"])
    _no_leftovers(cluster_builds["killed"])


@pytest.mark.slow
def test_build_killed_as_a_whole_leaves_no_dataset_and_the_next_build_cleans_up(raw, tmp_path, tiny_data, ray_local):
    out, faults = tmp_path / "data", tmp_path / "faults"
    faults.mkdir()
    env = os.environ | {FAULT_STAGE_ENV: "B", FAULT_DIR_ENV: str(faults), FAULT_ACTION_ENV: "hang"}
    log = (tmp_path / "build.log").open("w")
    # its own session: the kill takes the driver and the Ray processes it started, as a crash of the machine would
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), "local", str(raw), str(out)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (faults / "fault-B").exists():  # a stage B task has written part of the dataset and hangs
            assert proc.poll() is None, (tmp_path / "build.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the build never reached stage B"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not out.exists(), "a killed build left something at --out"
    staged = list(tmp_path.glob(".data.tmp-*"))
    assert len(staged) == 1 and any((staged[0] / "sequences").glob("*.parquet")), "expected the staged build"

    build_dataset(raw, out, load_build_config(None, []))  # the lock is free: the stale sibling is removed
    _no_leftovers(out)
    assert not (tmp_path / ".data.lock").exists()
    assert_same_content(out, tiny_data)
