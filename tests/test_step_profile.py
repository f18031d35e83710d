"""`benchmarks/step_profile.py`: the phases of a profiled step on the tiny dataset, for a one-stage and a two-stage
model (the figures are the benchmark's; here: every phase is measured, the table renders, overrides are routed)."""

from __future__ import annotations

import math

from benchmarks.step_profile import PHASES, _applies, profile_model, table


def test_overrides_go_to_the_models_that_have_them():
    assert _applies("din", "model.seq_len=50") and not _applies("din", "model.max_len=50")
    assert _applies("sim_soft", "model.max_len=50") and not _applies("sim_soft", "model.seq_len=50")
    assert _applies("sim_soft", "data.batch_size=64")


def test_profile_phases_are_measured(tiny_data, tmp_path):
    rows = []
    for model, sets in (("din", ["model.seq_len=20"]), ("sim_soft", ["model.max_len=40", "model.short_len=10"])):
        row = profile_model(model, tiny_data, ["data.batch_size=64", *sets], steps=2, warmup=1, work=tmp_path)
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
