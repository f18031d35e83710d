"""Autotuned launches with a fixed-config path for the interpreter and for tests.

``Tuned(kernel, configs, key, allowed)`` wraps a ``@triton.jit`` kernel in ``triton.autotune`` over ``configs``
(each sets ``BLOCK_L`` and ``STAGES``, the software-pipelining depth of the kernel's ``tl.range`` loops, plus
``num_warps`` and ``num_stages``), keyed on ``key``: the kernel's power-of-two size buckets (``BLOCK_Q``,
``BLOCK_DK``, ...) and mode flags; Triton adds every tensor argument's dtype to the key. ``allowed(config, meta)``
drops the configs that do not fit a call (e.g. register-hungry tiles for wide heads); ``default(meta)`` is the
preferred config of a call, ``(BLOCK_L, num_warps, num_stages)``, replaced by the nearest allowed one where it does
not fit (`Tuned.shipped`). Both read only the launch's keyword arguments.

Launch with ``tuned[grid](*args, **meta)``. On a GPU with no test override the autotuner benchmarks the allowed
configs once per key and caches the winner. Under the interpreter (nothing to time), with a tile, warp or stage
override, or with ``autotune=False`` (tests, tuning by hand), the kernel runs with one config: the shipped default,
with the overrides applied. The kernels write their outputs without accumulating into them, so the autotuner's
repeated runs are harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import triton

from ._common import interpreting
from .config import get_config

Allowed = Callable[[triton.Config, dict[str, Any]], bool]
Default = Callable[[dict[str, Any]], tuple[int, int, int]]


def configs(block_ls: Sequence[int], warps: Sequence[int], stages: Sequence[int]) -> list[triton.Config]:
    """The cross product as autotune configs."""
    return [
        triton.Config({"BLOCK_L": bl, "STAGES": st}, num_warps=w, num_stages=st)
        for bl in block_ls
        for w in warps
        for st in stages
    ]


class Tuned:
    """An autotuned kernel with a fixed-config fallback (module docstring)."""

    def __init__(
        self, kernel: Any, candidates: list[triton.Config], key: list[str], allowed: Allowed, default: Default
    ) -> None:
        self.fn = kernel
        self.candidates = candidates
        self.allowed = allowed
        self.default = default

        def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
            args = {**named_args, **kwargs}
            kept = [c for c in configs if allowed(c, args)]
            return kept or [configs[0]]

        self.tuner = triton.autotune(candidates, key=key, prune_configs_by={"early_config_prune": prune})(kernel)

    def shipped(self, meta: dict[str, Any]) -> tuple[int, int, int]:
        """The shipped config of a call, ``(BLOCK_L, num_warps, num_stages)``: ``default(meta)`` when ``allowed``
        keeps it, else the allowed candidate nearest to it (the largest tile not above the default's, the same
        warps and stages where possible); the default itself when no candidate fits."""
        block_l, warps, stages = self.default(meta)
        want = triton.Config({"BLOCK_L": block_l, "STAGES": stages}, num_warps=warps, num_stages=stages)
        if self.allowed(want, meta):
            return block_l, warps, stages
        fits = [c for c in self.candidates if self.allowed(c, meta)]
        if not fits:
            return block_l, warps, stages
        best = min(
            fits,
            key=lambda c: (
                c.kwargs["BLOCK_L"] > block_l, c.num_warps != warps, -c.kwargs["BLOCK_L"], abs(c.num_stages - stages)
            ),
        )  # fmt: skip
        return best.kwargs["BLOCK_L"], best.num_warps, best.num_stages

    def fixed(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The launch parameters of the one-config path: the shipped config with the overrides applied."""
        cfg = get_config()
        block_l, warps, stages = self.shipped(meta)
        return {
            "BLOCK_L": cfg.block_l or block_l,
            "STAGES": cfg.num_stages or stages,
            "num_warps": cfg.num_warps or warps,
            "num_stages": cfg.num_stages or stages,
        }

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        def launch(*args: Any, **meta: Any) -> Any:
            cfg = get_config()
            if interpreting() or cfg.autotune is False or cfg.block_l or cfg.num_warps or cfg.num_stages:
                return self.fn[grid](*args, **meta, **self.fixed(meta))
            return self.tuner[grid](*args, **meta)

        return launch
