"""benchmarks/kernels.py: it imports without a GPU, answers --help, refuses to produce numbers without CUDA, and its
cases call the kernels and the references with matching arguments (run here on tiny CPU inputs, Triton in the
interpreter)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from kernels._backend import triton_available

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_kernels", None)


def test_help(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_exits_2_and_writes_nothing(bench, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench.main(["--quick", "--out", str(out)]) == 2
    assert not out.exists()
    assert "no CUDA device" in capsys.readouterr().err


def test_config_and_slug(bench):
    cfg = bench.make_config(bench.parse_args(["--quick", "--ops", "gsu_topk", "--batch", "4"]))
    assert cfg.ops == ("gsu_topk",) and cfg.batch == 4 and cfg.lengths == (1_000,) and cfg.iters == 3
    assert bench.make_config(bench.parse_args([])).lengths == (1_000, 10_000, 100_000)
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@pytest.mark.skipif(not triton_available(), reason="triton does not import")
@pytest.mark.parametrize("op", ["gsu_topk", "target_attention", "din_attention"])
def test_cases_run_kernel_and_reference_on_cpu(bench, op):
    cfg = bench.Config(batch=3, dim=8, k=4, lengths=(20,))
    cases = bench.build_cases(cfg, op, 20, torch.device("cpu"))
    assert cases and all(c.bytes > 0 and c.flops >= 0 and c.shapes["L_max"] == 20 for c in cases)
    for case in cases:
        # Every case's kernel agrees with its reference, and with_reference rebuilds the same reference call.
        parity = case.compare(case.kernel(), case.with_reference(case.reference_fn)())
        if "positions_equal_fraction" in parity:
            assert parity["positions_equal_fraction"] > 0.9, (case.variant, parity)
        else:
            assert parity["max_abs_diff"] < 0.1, (case.variant, parity)


def test_goals_and_table_report_missing_measurements(bench):
    def impl(ms, error=None):
        return {
            "median_ms": ms,
            "peak_extra_bytes": None if ms is None else 2**20,
            "error": error,
            "GBps": None if ms is None else 2000.0,
            "TFLOPs": None,
            "bandwidth_fraction": None if ms is None else 0.8,
            "flops_fraction": None,
        }

    result = {
        "op": "target_attention",
        "variant": "forward",
        "L": 100_000,
        "shapes": {"N_total": 10},
        "impls": {"triton": impl(1.0), "eager": impl(3.0), "compile": impl(None, "out of memory")},
        "speedup_vs_eager": 3.0,
        "speedup_vs_compile": None,
    }
    goals = bench.evaluate_goals([result])
    assert [g["met"] for g in goals] == [True, None]
    assert "out of memory" in goals[1]["note"]
    report = {
        "gpu": "test",
        "config": {"batch": 1, "dim": 8, "k": 4},
        "ceilings": {"copy": {"GBps": 2500.0}, "matmul_bf16": {"TFLOPs": 700.0}},
        "results": [result],
        "goals": goals,
    }
    table = bench.markdown_table(report)
    assert "(out of memory)" in table and "| n/a" in table
    assert bench.evaluate_goals([{**result, "L": 1_000}])[0]["goal"] == "faster than torch.compile(reference)"


def test_merge_keeps_other_pairs_and_refuses_another_gpu(bench, tmp_path):
    path = tmp_path / "kernels.json"
    assert bench.merge_previous(path, "gpu-a", set()) == ([], [])
    old = {
        "gpu": "gpu-a",
        "runs": [{"date": "d"}],
        "results": [{"op": "gsu_topk", "L": 1000}, {"op": "gsu_topk", "L": 10}],
    }
    path.write_text(json.dumps(old))
    kept, runs = bench.merge_previous(path, "gpu-a", {("gsu_topk", 10)})
    assert kept == [{"op": "gsu_topk", "L": 1000}] and runs == [{"date": "d"}]
    with pytest.raises(ValueError, match="not merging"):
        bench.merge_previous(path, "gpu-b", set())
