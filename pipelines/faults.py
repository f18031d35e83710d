"""Test-only fault injection of `ctr build` (tests/test_build_faults.py).

With LIFELONG_CTR_FAULT_KILL_STAGE=A (or B, or "A,B") and LIFELONG_CTR_FAULT_DIR=DIR in the environment of the Ray
workers, the first task to reach the fault point of that stage (the one that creates DIR/fault-<stage>) kills its
own worker with SIGKILL, or with LIFELONG_CTR_FAULT_ACTION=hang sleeps there (so that a test can kill the whole
build mid-way). Stage A is the map side (`pipelines.rows`, after its quarantine files are written), stage B the
reduce side (`pipelines.partition`, after a partition's sequences are written). Every later attempt and every other
task runs normally; while DIR does not exist the hook does nothing. Unset (always, outside tests), the hook costs an
environment lookup.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_STAGE_ENV = "LIFELONG_CTR_FAULT_KILL_STAGE"
FAULT_DIR_ENV = "LIFELONG_CTR_FAULT_DIR"
FAULT_ACTION_ENV = "LIFELONG_CTR_FAULT_ACTION"


def fault_point(stage: str) -> None:
    stages = os.environ.get(FAULT_STAGE_ENV)
    marker_dir = os.environ.get(FAULT_DIR_ENV)
    if not stages or not marker_dir or stage not in stages.split(","):
        return
    try:
        fd = os.open(os.path.join(marker_dir, f"fault-{stage}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # a task already took this stage's fault (this may be its retry)
    except FileNotFoundError:
        return  # DIR does not exist (yet): the hook is not armed
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    if os.environ.get(FAULT_ACTION_ENV) == "hang":
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)
