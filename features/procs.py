"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: deliver `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG), so a training process or
    a loader worker never outlives a `ctr` killed with SIGKILL (by a user or the OOM killer). A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except OSError:  # pragma: no cover - no glibc
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable")


def exit_when_gone(pid: int, interval: float = 1.0) -> None:
    """A daemon thread that ends this process (os._exit) when process `pid` no longer exists: for children whose
    parent is not the process they serve (forkserver children), where PR_SET_PDEATHSIG watches the wrong process."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # pid reused by another user's process: ours is gone
                os._exit(1)

    threading.Thread(target=watch, name=f"exit-when-{pid}-gone", daemon=True).start()
