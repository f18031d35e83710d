"""Backend selection shared by every op: Triton on CUDA tensors, the PyTorch reference elsewhere.

Order of precedence: the op's ``backend=`` argument, then the ``KERNELS_BACKEND`` environment variable, then
``"auto"``. ``"auto"`` picks Triton when every tensor is on a CUDA device and Triton imports, the reference otherwise.

``"triton"`` on CPU tensors runs the kernels in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the
environment *before* the kernel modules are imported (the tests set it in ``tests/kernels/conftest.py``). The kernel
modules are imported lazily, on the first Triton call, so importing ``kernels`` never imports Triton.

An op whose Triton kernel does not cover a request (a K beyond the kernel's limit, Dice with batch statistics, ...)
runs the reference instead; the reason is logged (``warning`` when Triton was asked for by name, ``debug`` under
``"auto"``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "reference")
ENV_VAR = "KERNELS_BACKEND"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument if given, else ``$KERNELS_BACKEND``, else ``"auto"``."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower() or "auto"
    if choice not in BACKENDS:
        source = "backend argument" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    return choice


_warned: set[str] = set()


def resolve_backend(
    op: str, tensors: tuple[torch.Tensor | None, ...], backend: str | None, unsupported: str | None = None
) -> Literal["triton", "reference"]:
    """Pick the implementation for one call of ``op``.

    ``unsupported`` is the reason the Triton kernel cannot serve this call, or None when it can.
    """
    choice = requested_backend(backend)
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if choice == "reference":
        return "reference"
    if choice == "auto":
        if not present or not all(t.is_cuda for t in present) or not triton_available():
            return "reference"
        if unsupported is not None:
            logger.debug("%s: using the reference (%s)", op, unsupported)
            return "reference"
        return "triton"
    # choice == "triton": asked for by name
    if not triton_available():
        raise RuntimeError(f"{op}: backend 'triton' requested but the triton package does not import")
    if unsupported is not None:
        key = f"{op}: {unsupported}"
        if key not in _warned:
            _warned.add(key)
            logger.warning("%s: the Triton kernel does not cover this call (%s); using the reference", op, unsupported)
        return "reference"
    if present and not present[0].is_cuda:
        check_interpreter(op)
    return "triton"


def check_interpreter(op: str) -> None:
    """Raise unless Triton kernels will run in the interpreter (the only way they run on CPU tensors)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "yes", "on"):
        raise RuntimeError(
            f"{op}: the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before the kernels are first used"
        )
