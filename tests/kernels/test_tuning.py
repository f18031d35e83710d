"""The autotuning lists (`kernels.triton._tune`): for every launch shape the kernels are tested and benchmarked at, at
least one config fits in registers by the kernel's own rule, and the shipped config (what the interpreter, the CUDA
tests with ``autotune=False`` and any untuned launch run) is one of them."""

from __future__ import annotations

import itertools

import pytest
import triton

from kernels._backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton does not import")


def _attention_metas() -> list[dict]:
    metas = []
    for n_query, dim, side in itertools.product([1, 2, 4, 16, 64], [1, 8, 16, 32, 64, 128, 256], [0, 16]):
        use_dot = n_query >= 2
        low = 16 if use_dot else 1
        metas.append({
            "USE_DOT": use_dot, "BLOCK_Q": max(triton.next_power_of_2(n_query), low), "BLOCK_DK": max(dim, low),
            "BLOCK_DV": max(dim, low), "HAS_SIDE": side > 0, "BLOCK_D2": max(side, low) if side else 1,
        })  # fmt: skip
    return metas


def _din_metas() -> list[dict]:
    widths = [16, 32, 64, 128, 256]
    return [
        {"BLOCK_D": d, "BLOCK_DV": v, "BLOCK_H1": h1, "BLOCK_H2": h2}
        for d, v, h1, h2 in itertools.product(widths, [16, 64, 256], widths, [16, 64, 256])
    ]


def _cases():
    from kernels.triton import din_attention, gsu_topk, target_attention

    yield "target_attention forward", target_attention._FWD, _attention_metas()
    yield "target_attention backward", target_attention._BWD, _attention_metas()
    yield "gsu_topk", gsu_topk._ITEMS, [{"BLOCK_D": d} for d in [1, 2, 4, 8, 16, 32, 64, 128]]
    yield "din_attention forward", din_attention._FWD, _din_metas()
    yield "din_attention backward", din_attention._BWD, _din_metas()


def test_every_shape_has_a_fitting_config_and_ships_one():
    for name, tuned, metas in _cases():
        for meta in metas:
            fits = [c for c in tuned.candidates if tuned.allowed(c, meta)]
            assert fits, f"{name}: no config fits {meta}"
            block_l, warps, stages = tuned.shipped(meta)
            shipped = triton.Config({"BLOCK_L": block_l, "STAGES": stages}, num_warps=warps, num_stages=stages)
            assert tuned.allowed(shipped, meta), f"{name}: the shipped {block_l, warps, stages} does not fit {meta}"
