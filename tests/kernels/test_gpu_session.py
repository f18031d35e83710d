"""`benchmarks/gpu_session.sh`, the prepared GPU run: it parses, its quick test selection picks the tests it names,
and on a machine without CUDA it runs every stage (the CUDA tests skip, the benchmark refuses with status 2) and
leaves its logs, so the first GPU session does not spend device time on a broken script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def quick_tests() -> str:
    """The script's QUICK_TESTS, its continuation lines (``QUICK_TESTS="$QUICK_TESTS or ..."``) appended."""
    parts = re.findall(r'^QUICK_TESTS="([^"]+)"$', SCRIPT.read_text(), re.M)
    assert parts, "QUICK_TESTS not found"
    return " ".join(p.replace("$QUICK_TESTS", "").strip() for p in parts)


def collected(expr: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-k", expr,
         "tests/kernels/test_cuda.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_quick_selection_covers_every_op_and_the_rest_runs_after():
    quick = collected(quick_tests())
    rest = collected(f"not ({quick_tests()})")
    names = {line.split("::")[1].split("[")[0] for line in quick}
    assert {"test_autotuned_launch_matches_the_reference", "test_cuda_graph_capture_and_replay"} <= names
    assert {"test_target_attention_one_head", "test_gsu_topk", "test_din_attention", "test_search_attend"} <= names
    assert 10 <= len(quick) <= 40 and not set(quick) & set(rest) and len(rest) > len(quick)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without CUDA")
def test_dry_run_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "STAGE_A_S": "60", "STAGE_B_S": "60", "STAGE_C_S": "60"}
    env["PYTHON"] = sys.executable  # CI runs the suite from a venv that is not on PATH
    env.pop("KERNELS_CUDA_TESTS_ON_CPU", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the benchmark refuses to run without CUDA
    for name in ("env.txt", "A_quick_tests.log", "B_benchmark.log", "C_cuda_tests.log", "A_quick_tests.xml"):
        assert (tmp_path / name).exists(), name
    assert "stage A_quick_tests: rc=0" in proc.stdout and "stage C_cuda_tests: rc=0" in proc.stdout
    assert "torch" in (tmp_path / "env.txt").read_text()
