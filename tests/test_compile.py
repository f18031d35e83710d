"""`train.compile`: DIN's activation unit trained through torch.compile is the same function as the eager unit
(scores, every gradient, Dice's running statistics), evaluation stays eager, a failed compilation falls back to
eager with a warning, `auto` decides by the planned steps, and a compiled `ctr train` ends where an eager one does."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from ctr import native
from ctr.config import ConfigError, resolve_train_config
from ctr.modules.attention import DinAttention
from ctr.train import setup
from ctr.train.checkpoint import check_resumable
from ctr.train.setup import COMPILE_AUTO_MIN_STEPS, compile_units
from ctr.train.trainer import train


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n, d = 48, 12, 8
    query, keys = torch.randn(b, d, generator=g), torch.randn(b, n, d, generator=g)
    lengths = torch.randint(0, n + 1, (b,), generator=g)
    lengths[0] = 0  # an empty row
    return query, keys, torch.arange(n)[None] < lengths[:, None]


def _step(unit: DinAttention, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor):
    q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
    pooled, weights = unit(q, k, mask)
    (pooled.square().sum() + weights.sum()).backward()
    return pooled.detach(), q.grad, k.grad


def test_compiled_unit_is_the_eager_unit():
    torch.manual_seed(0)
    eager = DinAttention(8, (16, 8), "dice")
    compiled = DinAttention(8, (16, 8), "dice")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_rows()
    for seed in range(3):  # three batches of different sizes: one graph with a dynamic row count
        inputs = _inputs(seed)
        for got, want in zip(_step(compiled, *inputs), _step(eager, *inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled._compile_checked and compiled._compiled_rows is not None  # it did run compiled
    for (name, p), (_, r) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6 * float(r.grad.abs().max()), msg=name)
    for (name, buf), (_, ref) in zip(compiled.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(buf, ref, rtol=1e-5, atol=1e-6, msg=name)  # Dice's running statistics


def test_a_copy_of_a_compiled_unit_trains_its_own_parameters():
    torch.manual_seed(0)
    unit = DinAttention(8, (16, 8), "dice")
    unit.compile_rows()
    _step(unit, *_inputs())
    clone = copy.deepcopy(unit)
    reference = copy.deepcopy(unit)
    reference._compiled_rows = None  # eager
    with torch.no_grad():
        unit.out.weight.zero_()  # the original changes; the copy must not see it
    for got, want in zip(_step(clone, *_inputs(1)), _step(reference, *_inputs(1)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_evaluation_stays_eager(monkeypatch):
    unit = DinAttention(8, (16, 8), "dice")
    unit.compile_rows()
    calls = []
    monkeypatch.setattr(unit, "_run_compiled", lambda *a: calls.append(1))
    unit.eval()
    unit(*_inputs())
    unit.train()
    with torch.no_grad():
        unit(*_inputs())
    assert calls == []


def test_a_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **_):
        def call(*a):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    # the eager rows on both sides (not ctr.native.din_unit, the same function to float rounding: test_din_unit.py)
    monkeypatch.setattr(native, "din_unit", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    unit, ref = DinAttention(8, (16, 8), "dice"), DinAttention(8, (16, 8), "dice")
    ref.load_state_dict(unit.state_dict())
    unit.compile_rows()
    inputs = _inputs()
    with caplog.at_level(logging.WARNING, logger="ctr.modules.attention"):
        got = _step(unit, *inputs)
    assert "did not compile (RuntimeError: no C++ compiler here)" in caplog.text
    assert unit._compiled_rows is None  # eager from now on
    for a, b in zip(got, _step(ref, *inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_compiles_long_cpu_runs_only(monkeypatch):
    monkeypatch.setattr(DinAttention, "compile_rows", lambda self: None)
    model = torch.nn.Sequential(DinAttention(8, (16,), "dice"), DinAttention(8, (16,), "sigmoid"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(native, "available", lambda: False)  # no native operators: auto compiles long CPU runs
    assert compile_units(model, "auto", COMPILE_AUTO_MIN_STEPS - 1, cpu) == 0
    assert compile_units(model, "auto", COMPILE_AUTO_MIN_STEPS, cpu) == 2
    assert compile_units(model, "auto", 10**6, cuda) == 0
    monkeypatch.setattr(native, "available", lambda: True)  # the native Dice is as fast: auto leaves Dice units eager
    assert compile_units(model, "auto", 10**6, cpu) == 1
    assert compile_units(model, True, 10, cpu) == 2
    assert compile_units(model, False, 10**6, cpu) == 0
    assert compile_units(model, True, 1, cpu) == 2
    assert compile_units(torch.nn.Linear(2, 2), True, 1, cpu) == 0  # nothing to compile


def test_compiled_training_ends_where_eager_training_does(tiny_data, tmp_path, monkeypatch):
    compiled_units = []
    real = setup.compile_units

    def spy(model, mode, planned, device):
        compiled_units.append(real(model, mode, planned, device))
        return compiled_units[-1]

    monkeypatch.setattr("ctr.train.worker.compile_units", spy)
    # eager is the rows the compiler compiles, `_rows` (ctr.native.din_unit, the same function to float rounding, is
    # held to it in test_din_unit.py; six Adagrad steps magnify either's rounding past this test's tolerance)
    monkeypatch.setattr(native, "din_unit", lambda *args, **kwargs: None)
    quick = ["data.num_workers=0", "data.batch_size=128", "train.max_steps=6", "train.validation=false"]
    states = []
    for mode in ("false", "true"):
        cfg, _ = resolve_train_config("din", None, [*quick, f"train.compile={mode}"])
        run = train(tiny_data, tmp_path / mode, cfg)
        states.append(torch.load(run / "model.pt", weights_only=True))
    assert compiled_units == [0, 1]
    eager, compiled = states
    assert eager.keys() == compiled.keys()
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-3, atol=1e-4, msg=k)


def test_a_run_resumes_with_another_compile_setting(tmp_path):
    """train.compile changes how the step is computed, not the model: a checkpoint written with one setting (or
    before the key existed) resumes under another; a real config change is still refused."""
    base = {"world_size": 1, "dataset_fingerprint": "f", "data_dir": "d"}
    cfg, _ = resolve_train_config("din", None, [])
    old = cfg.model_dump(mode="json")
    del old["train"]["compile"]  # a checkpoint from before train.compile
    new, _ = resolve_train_config("din", None, ["train.compile=true"])
    check_resumable(tmp_path, base | {"config": old}, base | {"config": new.model_dump(mode="json")})
    other, _ = resolve_train_config("din", None, ["train.compile=true", "train.seed=3"])
    with pytest.raises(ConfigError, match="train.seed"):
        check_resumable(tmp_path, base | {"config": old}, base | {"config": other.model_dump(mode="json")})
