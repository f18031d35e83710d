"""What the CPU benchmarks (`pipeline.py`, `lifelong.py`, `train.py`) share: a job run in its own process with its
wall time and the peak PSS of its process tree sampled every 0.5 s (the root process and any JVMs reported apart),
the machine it ran on, and the bytes a job wrote.

The kernel benchmark (`kernels.py`, `kernel_bench/`) does not use it: it times CUDA kernels in-process.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]


class JobError(RuntimeError):
    """A measured job failed or timed out; `stats` holds what was measured until then."""

    def __init__(self, message: str, stats: dict[str, Any]):
        super().__init__(message)
        self.stats = stats


def _pss(p: psutil.Process) -> int:
    try:
        return p.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def _is_jvm(p: psutil.Process) -> bool:
    try:
        return p.name() == "java" or os.path.basename((p.cmdline() or [""])[0]) == "java"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tree_pss(proc: psutil.Process) -> tuple[int, int, int]:
    """(PSS of the whole tree, of the root process alone, of the JVMs in the tree)."""
    root = _pss(proc)
    total, jvm = root, 0
    for p in proc.children(recursive=True):
        pss = _pss(p)
        total += pss
        if _is_jvm(p):
            jvm += pss
    return total, root, jvm


def _kill_tree(proc: psutil.Process) -> None:
    """End the job's process and its descendants (by pid: only what this job started)."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo; None elsewhere): these machines are drawn from several kinds."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Where a benchmark ran (kept with its results): the CPU and the vector instructions torch dispatches to (and
    `ctr.native` builds for) too, since runs on different kinds of machine are not comparable."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run_measured(
    cmd: list[str], log_path: Path, timeout: float | None = None, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> dict:
    """Run `cmd`, sampling the PSS of its process tree; returns wall seconds and peak bytes (tree, root, JVMs).
    Raises JobError (with the measurements so far) when it exits non-zero or runs past `timeout` seconds."""
    t0 = time.time()
    peak = {"peak_pss_bytes": 0, "driver_peak_pss_bytes": 0, "jvm_peak_pss_bytes": 0}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        ps = psutil.Process(proc.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    values = _tree_pss(ps)
                except psutil.NoSuchProcess:
                    return
                for key, value in zip(peak, values, strict=True):
                    peak[key] = max(peak[key], value)
                time.sleep(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(ps)
            rc, timed_out = proc.wait(), True
        stop.set()
        th.join()
    stats = {"seconds": round(time.time() - t0, 2), **peak}
    if not peak["jvm_peak_pss_bytes"]:
        del stats["jvm_peak_pss_bytes"]
    if timed_out:
        raise JobError(f"timeout after {timeout:.0f} s", stats | {"timeout": True})
    if rc != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise JobError(f"exit {rc}: {' | '.join(tail)[-500:]} (log {log_path})", stats)
    return stats


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
