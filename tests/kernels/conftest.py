"""Kernel tests run the Triton kernels on the CPU in Triton's interpreter.

TRITON_INTERPRET must be set before the kernel modules (kernels/triton/*) are imported: they are imported lazily on
the first Triton call, so setting it here, at collection, is early enough. Tests that need Triton skip cleanly when
the package does not import; the reference tests run regardless.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

# tests/conftest.py puts tests/ first on sys.path, where this directory would shadow the `kernels` package as a
# namespace package: put the repository root in front and drop such a shadow if it was already imported.
_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None) is None:
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]

import pytest  # noqa: E402

from kernels.triton import config  # noqa: E402


@pytest.fixture(autouse=True)
def tiny_tiles():
    """Interpreted programs cost milliseconds each: 16-row tiles and at most 2 programs per sample, so that tiny
    inputs still run several tiles per program and several programs per sample."""
    with config.override(block_l=16, chunk_l=32, programs=3):
        yield


@pytest.fixture(autouse=True)
def _clear_backend_env(monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
