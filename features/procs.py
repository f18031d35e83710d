"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys

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
