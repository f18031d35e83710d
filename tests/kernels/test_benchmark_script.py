"""benchmarks/kernels.py: it imports without a GPU, answers --help, refuses to produce numbers without CUDA, builds
its grid and length distributions as documented, loads (or stages) the FBGEMM peer behind a guard, reports rows
that were not measured, and its cases call the kernels, the references and FBGEMM's kernel with matching arguments
(run here on tiny CPU inputs, Triton in the interpreter). `kernels.triton.introspect` is tested on what the CPU can
show: interpreted and never-compiled kernels, and a JIT cache filled by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from kernels._backend import triton_available

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton does not import")
needs_fbgemm = pytest.mark.skipif(
    importlib.util.find_spec("fbgemm_gpu") is None, reason="fbgemm_gpu(-cpu) is not installed"
)


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
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--quick", "--max-seconds", "--batch-sizes", "--stage-fbgemm", "--resume"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_exits_2_and_writes_nothing(bench, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench.main(["--quick", "--out", str(out)]) == 2
    assert not out.exists()
    assert "no CUDA device" in capsys.readouterr().err


def test_config_and_slug(bench):
    cfg = bench.make_config(bench.parse_args(["--quick", "--iters", "5", "--memory-cap-gb", "2"]))
    assert cfg.iters == 5 and cfg.warmup == 1 and cfg.memory_cap_bytes == 2 * 2**30
    assert bench.make_config(bench.parse_args([])).iters == 10
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ---------------------------------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("dist", ["uniform", "powerlaw"])
@pytest.mark.parametrize("length", [1, 1_000, 100_000])
def test_lengths_first_is_longest_within_bounds_and_seeded(bench, dist, length):
    draw = lambda seed: bench.jagged_lengths(500, length, torch.Generator().manual_seed(seed), dist)  # noqa: E731
    lengths = draw(3)
    assert lengths.dtype == torch.int64 and lengths.shape == (500,)
    assert lengths[0] == length and int(lengths.max()) == length
    low = length // 2 if dist == "uniform" else 1
    assert int(lengths.min()) >= low
    assert torch.equal(lengths, draw(3)) and (length == 1 or not torch.equal(lengths, draw(4)))


def test_powerlaw_is_the_documented_pareto_law(bench):
    length, batch = 100_000, 4096
    lengths = bench.jagged_lengths(batch, length, torch.Generator().manual_seed(7), "powerlaw")
    u = torch.rand(batch, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_m = bench.POWERLAW_SCALE * length
    want = torch.clamp(torch.floor(x_m * (1 - u) ** (-1 / bench.POWERLAW_ALPHA)), 1, length).long()
    want[0] = length
    assert torch.equal(lengths, want)
    # Most samples are short: the median near 2^(1/alpha) x_m (1.8% of L), a few reach L.
    median = float(lengths[1:].double().median())
    assert 0.012 * length < median < 0.025 * length
    assert 0 < int((lengths[1:] == length).sum()) < 0.02 * batch
    with pytest.raises(ValueError, match="distribution"):
        bench.jagged_lengths(2, 10, torch.Generator(), "zipf")


def test_shape_lengths_are_seeded_by_the_shape(bench):
    a = bench.Shape("target_attention", 64, "powerlaw", 10_000, 64, 16)
    same = bench.shape_lengths(a, 0)
    assert torch.equal(same, bench.shape_lengths(a, 0)) and same[0] == 10_000
    assert not torch.equal(same, bench.shape_lengths(bench.Shape("target_attention", 64, "powerlaw", 10_000, 64), 0))


# ---------------------------------------------------------------------------------------------------- grid


def test_default_grid_puts_the_goal_shapes_first(bench):
    grid = bench.make_grid(bench.parse_args([]))
    assert len(set(grid)) == len(grid) == 82
    n_cases = sum(len(_variants(bench, s)) for s in grid)
    assert n_cases == 104
    goal = grid[:12]
    assert {(s.op, s.length, s.dim, s.passes) for s in goal} == {("target_attention", 100_000, 64, ("forward",))}
    assert {(s.batch, s.dist, s.queries) for s in goal} == {
        (b, d, q) for b in (16, 64, 256) for d in ("uniform", "powerlaw") for q in (1, 16)
    }
    assert {s.op for s in grid[12:16]} == {"gsu_topk"}
    # target_attention forward covers the whole D = 64 cross product
    ta64 = {(s.batch, s.dist, s.length, s.queries) for s in grid if s.op == "target_attention" and s.dim == 64}
    assert len(ta64) == 4 * 2 * 3 * 2
    assert all(s.passes == ("forward",) for s in grid if s.op == "gsu_topk")
    assert all(s.queries == 1 for s in grid if s.op != "target_attention")
    assert {s.op for s in bench.make_grid(bench.parse_args(["--ops", "din_attention"]))} == {"din_attention"}


def _variants(bench, shape):
    from kernel_bench.run import OP_MODULES

    return OP_MODULES[shape.op].variants(shape)


def test_axis_flags_give_the_cross_product(bench):
    args = bench.parse_args(
        ["--ops", "target_attention", "gsu_topk", "--batch-sizes", "1", "256", "--dists", "powerlaw", "--dims", "128"]
    )
    grid = bench.make_grid(args)
    ta = [s for s in grid if s.op == "target_attention"]
    gsu = [s for s in grid if s.op == "gsu_topk"]
    assert len(ta) == 2 * 1 * 3 * 2 and len(gsu) == 2 * 1 * 3  # B x dist x L (x Q for target_attention)
    assert all(s.dim == 128 and s.dist == "powerlaw" for s in grid)
    assert all(s.passes == ("forward", "backward") for s in ta) and all(s.passes == ("forward",) for s in gsu)
    quick = bench.make_grid(bench.parse_args(["--quick", "--passes", "forward"]))
    assert {(s.batch, s.length, s.dim, s.queries, s.passes) for s in quick} == {(8, 1_000, 64, 1, ("forward",))}
    assert len(quick) == 3 * 2  # every op, both distributions
    assert bench.make_grid(bench.parse_args(["--ops", "gsu_topk", "--passes", "backward"])) == []


def test_time_budget_stops_before_a_case_that_would_overrun(bench):
    from kernel_bench.run import Budget

    assert Budget(None, start=0.0, last_case_s=1e9).exceeded(now=1e9) is None
    budget = Budget(100.0, start=0.0)
    assert budget.exceeded(now=99.0) is None
    budget.last_case_s = 5.0
    assert budget.exceeded(now=94.0) is None
    assert "--max-seconds 100 reached after 96 s" in budget.exceeded(now=96.0)


# ---------------------------------------------------------------------------------------------------- cases


@needs_triton
@pytest.mark.parametrize(
    "op,dist,queries",
    [("gsu_topk", "powerlaw", 1), ("target_attention", "uniform", 1), ("target_attention", "powerlaw", 16),
     ("din_attention", "uniform", 1)],
)  # fmt: skip
def test_cases_run_kernel_and_reference_on_cpu(bench, op, dist, queries):
    cfg = bench.Config(k=4)
    shape = bench.Shape(op, 3, dist, 20, 8, queries, ("forward",) if op == "gsu_topk" else ("forward", "backward"))
    cases = bench.build_cases(cfg, shape, torch.device("cpu"))
    assert [c.variant for c in cases] == _variants(bench, shape)
    assert all(c.bytes > 0 and c.flops >= 0 and c.shapes["L_max"] == 20 and c.shape == shape for c in cases)
    for case in cases:
        # Every case's kernel agrees with its reference, and with_reference rebuilds the same reference call.
        parity = case.compare(case.kernel(), case.with_reference(case.reference_fn)())
        if "positions_equal_fraction" in parity:
            assert parity["positions_equal_fraction"] > 0.9, (case.variant, parity)
        else:
            assert parity["max_abs_diff"] < 0.1, (case.variant, parity)
        assert (case.peer is None) and (case.peer_absent is not None) == (op == "target_attention")


# ---------------------------------------------------------------------------------------------------- FBGEMM peer


def test_peer_from_an_empty_dir_is_absent_with_a_reason(bench, tmp_path):
    peer = bench.load_peer(tmp_path, try_installed=False)
    assert peer.module is None and "no staged copy" in peer.error and "--stage-fbgemm" in peer.error
    record = peer.record()
    assert record["present"] is False and record["error"] == peer.error
    # a broken staged copy is a recorded failure too, not an exception
    (tmp_path / "triton_jagged_dense_flash_attention.py").write_text("from .common import nothing_here\n")
    (tmp_path / "common.py").write_text("")
    broken = bench.load_peer(tmp_path, try_installed=False)
    assert broken.module is None and "ImportError" in broken.error


@needs_fbgemm
def test_stage_copies_the_installed_sources_and_they_load(bench, tmp_path, capsys):
    dest = tmp_path / "peers" / "fbgemm_sll"
    assert bench.main(["--stage-fbgemm", "--fbgemm-sll-dir", str(dest)]) == 0
    assert "staged" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["VERSION", "common.py", "triton_jagged_dense_flash_attention.py"]
    version = (dest / "VERSION").read_text().strip()
    assert version.startswith("fbgemm_gpu") and version == bench.stage(dest)
    if triton_available():
        peer = bench.load_peer(dest, try_installed=False)
        assert peer.error is None and peer.source == f"staged copy: {dest}" and peer.version == version
        assert hasattr(peer.module, "JaggedDenseFlashAttention")


@needs_triton
@needs_fbgemm
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # its padded target columns divide 0 by 0 (masked out)
@pytest.mark.parametrize("queries", [1, 16])
def test_peer_mapping_matches_the_reference(bench, tmp_path, queries):
    """FBGEMM's kernel on our inputs (pre-scaled query, padded bias): float32, since the interpreter's 16-bit dots
    are wrong; forward, and forward + backward for the keys and values."""
    from kernel_bench.target_attention import peer_calls, peer_compare

    from kernels.reference import target_attention_reference

    bench.stage(tmp_path)
    peer = bench.load_peer(tmp_path, try_installed=False)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([20, 7, 12, 1])
    offsets = bench.offsets_of(lengths)
    n, batch, dim, scale = int(lengths.sum()), 4, 16, 1 / math.sqrt(16)
    query = torch.randn(batch, queries, dim, generator=gen).requires_grad_()
    keys = torch.randn(n, dim, generator=gen).requires_grad_()
    values = torch.randn(n, dim, generator=gen).requires_grad_()
    bias = (-2 * torch.rand(n, generator=gen)).requires_grad_()
    tau = (torch.rand(batch, generator=gen) + 0.5).requires_grad_()
    grad_out = torch.randn(batch, queries, dim, generator=gen)
    forward, backward = peer_calls(peer.module, 20, query, keys, values, offsets, bias.detach(), tau.detach(), scale,
                                   grad_out)  # fmt: skip
    out = target_attention_reference(query[:, :, None], keys[:, None], values[:, None], offsets, bias, tau, scale)
    out = out.squeeze(2)
    assert peer_compare(forward(), out.detach())["max_abs_diff"] < 1e-5
    want = (out, *torch.autograd.grad(out, [query, keys, values, bias, tau], grad_out))
    assert peer_compare(backward(), want)["max_abs_diff"] < 1e-5


# ---------------------------------------------------------------------------------------------------- report


def _impl(ms, error=None):
    return {
        "median_ms": ms,
        "peak_extra_bytes": None if ms is None else 2**20,
        "first_call_s": None if ms is None else 1.5,
        "error": error,
        "GBps": None if ms is None else 2000.0,
        "TFLOPs": None,
        "bandwidth_fraction": None if ms is None else 0.8,
        "flops_fraction": None,
    }


def test_goals_and_tables_report_missing_measurements(bench):
    result = {
        "op": "target_attention",
        "variant": "forward",
        "B": 64,
        "dist": "powerlaw",
        "L": 100_000,
        "Q": 16,
        "D": 64,
        "shapes": {"N_total": 10},
        "parity": {"max_abs_diff": 0.01},
        "parity_fbgemm": {"vs_reference": {"error": "reference: out of memory"}, "vs_triton": {"max_abs_diff": 0.02}},
        "impls": {
            "triton": _impl(1.0),
            "eager": _impl(3.0),
            "compile": _impl(None, "out of memory"),
            "fbgemm": _impl(2.0),
        },
        "speedup_vs_eager": 3.0,
        "speedup_vs_compile": None,
        "speedup_vs_fbgemm": 2.0,
    }
    skipped = bench.null_result(
        bench.Shape("target_attention", 256, "uniform", 100_000, 128, 16), "forward", 7, "skipped: cap"
    )
    goals = bench.evaluate_goals([result, skipped])
    by_goal = {g["goal"]: g for g in goals if g["B"] == 64}
    assert by_goal[">= 80% of the copy bandwidth"]["met"] is True
    assert by_goal[">= 3x torch.compile(reference)"]["met"] is None
    assert "out of memory" in by_goal[">= 3x torch.compile(reference)"]["note"]
    assert by_goal["ahead of FBGEMM jagged_dense_flash_attention"]["met"] is True
    skipped_goals = [g for g in goals if g["B"] == 256]
    assert all(g["met"] is None and "skipped: cap" in g["note"] for g in skipped_goals)
    assert not any("copy bandwidth" in g["goal"] for g in skipped_goals)  # D = 128 is not a goal shape
    report = {
        "gpu": "test",
        "complete": False,
        "stopped": "--max-seconds 5 reached",
        "config": {"k": 4},
        "ceilings": {"copy": {"GBps": 2500.0}, "matmul_bf16": {"TFLOPs": 700.0}},
        "peers": {"fbgemm": bench.Peer(None, error="no staged copy in x").record()},
        "results": [result, skipped],
        "goals": goals,
        "kernel_stats": [
            {"name": "_k", "constexprs": {"BLOCK": "64"}, "n_regs": 40, "n_spills": 0, "shared": 2048,
             "num_warps": 4, "num_stages": 3},
            {"name": "_k", "constexprs": {}, "n_regs": None, "n_spills": None, "shared": None,
             "num_warps": None, "num_stages": None},
        ],
    }  # fmt: skip
    table = bench.markdown_table(report)
    assert "(out of memory)" in table and "Incomplete run" in table and "FBGEMM peer absent" in table
    assert "| (skipped: cap) |" in table and "vs Triton" in table
    assert "| _k | BLOCK=64 | 40 | 0 | 2.0 | 4 | 3 |" in table and "| _k |  | — | — | — | — | — |" in table
    assert "1.5 / — / 1.5" in table  # first calls: Triton / compile / FBGEMM
    summary = {s["goal"]: s for s in bench.summarize_goals(goals)}
    assert summary["faster than torch.compile(reference)"]["not_measured"] == 2


def test_merge_keeps_other_rows_and_refuses_another_gpu(bench, tmp_path):
    path = tmp_path / "kernels.json"
    assert bench.merge_previous(path, "gpu-a") == ([], [])
    old_row = {"op": "gsu_topk", "variant": "dot", "L": 1000}  # a row from before the grid: no B/dist/Q/D
    new_row = {"op": "gsu_topk", "variant": "dot", "B": 16, "dist": "uniform", "L": 1000, "Q": 1, "D": 64}
    path.write_text(json.dumps({"gpu": "gpu-a", "runs": [{"date": "d"}], "results": [old_row, new_row]}))
    rows, runs = bench.merge_previous(path, "gpu-a")
    assert rows == [old_row, new_row] and runs == [{"date": "d"}]
    assert bench.kept_rows(rows, {bench.result_key(new_row)}) == [old_row]
    with pytest.raises(ValueError, match="not merging"):
        bench.merge_previous(path, "gpu-b")


# ---------------------------------------------------------------------------------------------------- introspect


def _plain(x_ptr, n, BLOCK):  # a kernel's Python body: never run, only wrapped
    pass


@needs_triton
def test_compiled_stats_of_interpreted_uncompiled_and_cached_kernels():
    import triton
    from triton.runtime.jit import JITFunction

    from kernels.triton.introspect import compiled_stats, jit_function, module_kernels

    interpreted = triton.jit(_plain)  # TRITON_INTERPRET=1 (conftest): an InterpretedFunction
    assert compiled_stats(interpreted) == [] and compiled_stats(_plain) == [] and compiled_stats(3) == []
    jit = JITFunction(_plain)
    assert compiled_stats(jit) == []  # never compiled
    launched = types.SimpleNamespace(
        name="_plain",
        n_regs=40,
        n_spills=2,
        metadata=types.SimpleNamespace(shared=2048, num_warps=4, num_stages=3, num_ctas=1),
        src=types.SimpleNamespace(constants={(2,): 64}, signature={"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}),
    )
    compiled_only = types.SimpleNamespace(
        name="_plain", metadata=types.SimpleNamespace(shared=0, num_warps=8, num_stages=2, num_ctas=1), src=None
    )
    jit.device_caches[0] = ({"key-a": launched, "key-b": compiled_only}, {}, None, None, None)
    stats = compiled_stats(jit)
    assert [s["n_regs"] for s in stats] == [40, None] and [s["n_spills"] for s in stats] == [2, None]
    first = stats[0]
    assert first["constexprs"] == {"BLOCK": "64"} and first["signature"] == {"x_ptr": "*fp32", "n": "i32"}
    assert (first["shared"], first["num_warps"], first["num_stages"], first["device"]) == (2048, 4, 3, "0")
    assert first["name"] == "_plain" and first["function"].endswith(":_plain") and stats[1]["key"] != first["key"]
    # decorators (an Autotuner, heuristics) hold the JITFunction in .fn, possibly nested
    wrapped = types.SimpleNamespace(fn=types.SimpleNamespace(fn=jit))
    assert jit_function(wrapped) is jit and compiled_stats(wrapped) == stats
    cycle = types.SimpleNamespace()
    cycle.fn = cycle
    assert compiled_stats(cycle) == []
    module = types.ModuleType("fake_kernels")
    module.kernel, module.wrapped, module.interpreted, module.number = jit, wrapped, interpreted, 3
    assert module_kernels(module) == {"kernel": jit, "wrapped": wrapped}
