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

import pytest
from dataset_content import assert_same_content

from pipelines.build import FAULT_ACTION_ENV, FAULT_DIR_ENV, FAULT_STAGE_ENV, build_dataset
from pipelines.config import load_build_config
from pipelines.synthetic import generate

HELPER = Path(__file__).with_name("build_faults_helper.py")


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
