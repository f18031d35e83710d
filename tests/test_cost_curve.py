"""`benchmarks/cost_curve.py` (ours only: the FuxiCTR side needs its virtualenv, `peers.py`'s business) and
`peers.py`'s architecture-equal overrides: the curve's points are measured at each L with the batch the behavior
cap would otherwise shrink, the table renders, and our model with FuxiCTR's architecture resolves and builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cost_curve_ours_only(tiny_data, tmp_path):
    results = tmp_path / "curve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cost_curve.py"), "--data", str(tiny_data), "--models",
           "din,sim_soft", "--lengths", "5,40", "--batch-size", "32", "--steps", "2", "--warmup", "1", "--no-peers",
           "--work", str(tmp_path / "work"), "--results", str(results)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(results.read_text())
    assert [(p["model"], p["length"]) for p in res["points"]] == [
        ("din", 5), ("sim_soft", 5), ("din", 40), ("sim_soft", 40)
    ]  # fmt: skip
    for p in res["points"]:
        ours = p["ours"]
        assert ours["samples_per_s"] > 0 and ours["batch_samples"] == 32  # the cap does not shrink the batch
        read = max(ours["behaviors_per_sample"].values())
        assert 0 < read <= p["length"]  # each sample reads at most the last L
        assert "fuxictr" not in p
    by = {(p["model"], p["length"]): max(p["ours"]["behaviors_per_sample"].values()) for p in res["points"]}
    assert by[("din", 40)] > by[("din", 5)]
    assert "| din |" in out.stdout and "L=40" in out.stdout


def test_architecture_sets_resolve_and_build(tiny_data):
    """Our SIM soft / TWIN with FuxiCTR LongCTR's short branch and what its model lacks: the overrides resolve and
    the model builds with multi-head target attention as its short branch."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from ctr.config import resolve_train_config
    from ctr.models import get_model_class
    from ctr.modules.esu import MultiHeadTargetAttention
    from features.dataset import DatasetInfo

    info = DatasetInfo.load(tiny_data)
    for model in ("sim_soft", "twin"):
        cfg = peers.our_config(model, [])
        params = peers.fuxictr_params(peers.PEERS[model], cfg, type("A", (), {"max_len": 50})())
        sets = peers.architecture_sets(peers.PEERS[model], params, cfg)
        _, p = resolve_train_config(model, None, sets)
        assert p.short_attention == "mhta" and not p.target_cross
        assert p.short_heads * p.short_head_dim == params["attention_dim"]
        built = get_model_class(model)(p, info)
        assert isinstance(built.short_attention, MultiHeadTargetAttention)


def test_our_overrides_keep_the_batch_at_long_windows():
    """At L = 1,000 the default behavior cap (1M padded behaviors) would split a batch of 1,024: `our_overrides`
    raises it to fit the window (twice the window plus the short one); at L = 50 it leaves the default alone."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    cfg = {"model": {"max_len": 10_000, "short_len": 50}, "data": {"max_batch_behaviors": 1_000_000}}
    long = peers.our_overrides("sim_soft", cfg, argparse.Namespace(batch_size=1024, epochs=1, max_len=1000))
    assert "model.max_len=1000" in long and f"data.max_batch_behaviors={1024 * 2050}" in long
    short = peers.our_overrides("sim_soft", cfg, argparse.Namespace(batch_size=1024, epochs=1, max_len=50))
    assert not any(s.startswith("data.max_batch_behaviors") for s in short)
    dien = {"model": {"seq_len": 100}, "data": {"max_batch_behaviors": 1_000_000}}
    at_1000 = peers.our_overrides("dien", dien, argparse.Namespace(batch_size=1024, epochs=1, max_len=1000))
    assert f"data.max_batch_behaviors={1024 * 2000}" in at_1000
