"""`benchmarks/step_profile.py`: the phases of a profiled step on the tiny dataset, for a one-stage and a two-stage
model (the figures are the benchmark's; here: every phase is measured, the table renders, overrides are routed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmarks.step_profile import PHASES, _applies, profile_model, table, thread_split


def test_overrides_go_to_the_models_that_have_them():
    assert _applies("din", "model.seq_len=50") and not _applies("din", "model.max_len=50")
    assert _applies("sim_soft", "model.max_len=50") and not _applies("sim_soft", "model.seq_len=50")
    assert _applies("sim_soft", "data.batch_size=64")


def test_profile_phases_are_measured(tiny_data, tmp_path):
    rows = []
    for model, sets in (("din", ["model.seq_len=20"]), ("sim_soft", ["model.max_len=40", "model.short_len=10"])):
        before = torch.get_num_threads()
        row = profile_model(model, tiny_data, ["data.batch_size=64", *sets], 2, 1, tmp_path, threads=1)
        assert row["threads"] == 1  # the step ran on the threads asked for, not the trainer's default
        assert torch.get_num_threads() == before  # and the process's count is back
        assert row["samples_per_s"] > 0 and row["loader_samples_per_s"] > 0 and row["step_ms"] > 0
        assert set(row["phases_ms"]) == set(PHASES)
        assert all(math.isfinite(v) and v >= 0 for v in row["phases_ms"].values())
        # the embedding lookup, the fused sparse update and the backward are each seen by the profiler
        assert row["phases_ms"]["lookup"] > 0 and row["phases_ms"]["sparse update"] > 0
        assert row["phases_ms"]["backward"] > 0
        assert math.isclose(sum(row["phases_ms"].values()), row["profiled_ms"], rel_tol=1e-6)
        rows.append(row)
    rows.append({"model": "muse", "error": "DatasetError: no multimodal item embeddings"})
    text = table(rows)
    assert text.count("\n") == 4 and "| din |" in text and "error: DatasetError" in text


def test_thread_split_recovers_serial_and_parallel_shares():
    """Two runs of T(t) = s + p / t give back s and p, per phase too; a part slower with more threads shows a
    negative parallel share instead of being clipped."""

    def run(t: int) -> dict:
        phases = {ph: 1.0 + i + (4.0 + i) / t for i, ph in enumerate(PHASES)}
        phases["dense optimizer"] = 0.5 + 0.1 * t  # slower with threads
        return {"threads": t, "step_ms": 10.0 + 24.0 / t, "phases_ms": phases}

    for lo, hi in ((1, 2), (2, 8)):
        sp = thread_split([run(lo)], [run(hi)])
        assert sp["threads"] == [lo, hi] and sp["runs"] == [1, 1]
        assert math.isclose(sp["step"]["serial_ms"], 10.0, abs_tol=1e-3)
        assert math.isclose(sp["step"]["parallel_ms_one_thread"], 24.0, abs_tol=1e-3)
        for i, ph in enumerate(PHASES[:-1]):
            assert math.isclose(sp["phases"][ph]["serial_ms"], 1.0 + i, abs_tol=1e-3)
            assert math.isclose(sp["phases"][ph]["parallel_ms_one_thread"], 4.0 + i, abs_tol=1e-3)
        assert sp["phases"]["dense optimizer"]["parallel_ms_one_thread"] < 0
    assert "phases" not in thread_split([{"threads": 1, "step_ms": 3.0}], [{"threads": 2, "step_ms": 2.0}])
    # each count's median run: an outlier round moves nothing
    noisy = thread_split([run(1), run(1), {**run(1), "step_ms": 99.0}], [run(2), {**run(2), "step_ms": 1.0}, run(2)])
    assert noisy["runs"] == [3, 3] and math.isclose(noisy["step"]["serial_ms"], 10.0, abs_tol=1e-3)


def test_results_name_the_kind_of_machine():
    """Every benchmark's results say which CPU and which vector instructions torch dispatched to: machines of
    different kinds are drawn, and their figures are not comparable."""
    from benchmarks._common import machine_info

    info = machine_info()
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpus"] and "cpu" in info
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        assert info["cpu"]
