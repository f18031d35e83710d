"""`ctr.malloc.keep_freed_memory`: in effect on Linux with glibc (CI's machine), off when asked, once per process."""

from __future__ import annotations

import subprocess
import sys

CHECK = "from ctr.malloc import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LIFELONG_CTR_MALLOC"}
    if env_value is not None:
        env["LIFELONG_CTR_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


def test_applied_on_glibc_and_off_when_asked():
    assert _run(None).split() == ["True", "True"]
    assert _run("default").split() == ["False", "False"]
