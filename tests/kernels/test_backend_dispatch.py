"""Backend selection: argument over environment over auto; Triton on CPU only in the interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch

import kernels
from kernels import _backend, gsu_topk, target_attention

requires_triton = pytest.mark.skipif(not _backend.triton_available(), reason="triton does not import")


def test_requested_backend_precedence(monkeypatch):
    assert _backend.requested_backend() == "auto"
    monkeypatch.setenv("KERNELS_BACKEND", "Reference")
    assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend("triton") == "triton"  # the argument wins
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        _backend.requested_backend()
    with pytest.raises(ValueError, match="backend argument"):
        _backend.requested_backend("fast")


def test_auto_uses_the_reference_on_cpu():
    t = torch.zeros(2)
    assert _backend.resolve_backend("op", (t, None), None) == "reference"
    assert _backend.resolve_backend("op", (t,), "reference") == "reference"


@requires_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    t = torch.zeros(2)
    assert _backend.resolve_backend("op", (t,), "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.resolve_backend("op", (t,), "triton")


def test_triton_requested_without_triton(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="does not import"):
        _backend.resolve_backend("op", (torch.zeros(1),), "triton")
    assert _backend.resolve_backend("op", (torch.zeros(1),), None) == "reference"


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@requires_triton
@pytest.mark.parametrize("env, argument, expected", [
    (None, None, "reference"),
    ("triton", None, "triton"),
    ("reference", "triton", "triton"),
    ("triton", "reference", "reference"),
])  # fmt: skip
def test_ops_dispatch_by_env_and_argument(monkeypatch, env, argument, expected):
    gsu_module = importlib.import_module("kernels.gsu_topk")  # the attribute kernels.gsu_topk is the function
    gsu_triton = importlib.import_module("kernels.triton.gsu_topk")
    ta_triton = importlib.import_module("kernels.triton.target_attention")

    if env is not None:
        monkeypatch.setenv("KERNELS_BACKEND", env)
    triton_calls = _spy(monkeypatch, gsu_triton, "gsu_topk_triton")
    reference_calls = _spy(monkeypatch, gsu_module, "gsu_topk_reference")
    offsets = torch.tensor([0, 3])
    gsu_topk(offsets, 2, mode="dot", target=torch.ones(1, 2), behavior_vectors=torch.ones(3, 2), backend=argument)
    assert (len(triton_calls), len(reference_calls)) == ((1, 0) if expected == "triton" else (0, 1))

    ta_calls = _spy(monkeypatch, ta_triton, "target_attention_fwd_triton")
    q, k = torch.ones(1, 1, 2), torch.ones(3, 2)
    target_attention(q, k, k, offsets, backend=argument)
    assert len(ta_calls) == (1 if expected == "triton" else 0)


def test_public_api():
    assert set(kernels.__all__) >= {"gsu_topk", "target_attention", "din_attention"}
