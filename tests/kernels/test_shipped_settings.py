"""The kernels at their shipped tiles, work items and grid (no tile override), in the interpreter: the CI
counterpart of `test_cuda.py` on a subset of its cases, at lengths the interpreter runs in seconds (several work
items of 1,024 rows for the longest sample). The interpreter computes 16-bit dots in float32, so what this adds over
the tiny-tile tests is the shipped shapes: 64-256-row tiles, K_PAD up to 256, tensor-core tiles for Q >= 2, wide
heads, the default chunking and the persistent grid."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import check_din_attention, check_gsu_topk, check_search_attend, check_target_attention

from kernels._backend import triton_available
from kernels.triton import config

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton does not import")
CPU = torch.device("cpu")
LONGEST = 2_500


@pytest.fixture(autouse=True)
def shipped_settings():
    with config.override(block_l=None, chunk_l=None, programs=None):
        yield


@pytest.mark.parametrize(
    ("dim", "n_query", "n_head", "dtype"),
    [
        (64, 1, 1, torch.float32),
        (32, 4, 4, torch.bfloat16),
        (128, 16, 1, torch.float32),
        (256, 2, 1, torch.float32),
        (64, 64, 1, torch.bfloat16),
    ],
)
def test_target_attention(dim, n_query, n_head, dtype):
    check_target_attention(CPU, dtype, dim, n_query, n_head, LONGEST)


@pytest.mark.parametrize(
    ("mode", "dim", "k", "dtype"),
    [
        ("cosine", 64, 16, torch.bfloat16),
        ("dot", 256, 64, torch.float32),
        ("dot", 32, 256, torch.float32),
        ("category", 1, 64, torch.float32),
    ],
)
def test_gsu_topk(mode, dim, k, dtype):
    check_gsu_topk(CPU, dtype, dim, k, LONGEST, mode)


@pytest.mark.parametrize(
    ("dim", "softmax", "activation", "dtype"),
    [(64, True, "sigmoid", torch.float32), (32, False, "prelu", torch.bfloat16)],
)
def test_din_attention(dim, softmax, activation, dtype):
    check_din_attention(CPU, dtype, dim, softmax, activation, LONGEST)


def test_search_attend():
    check_search_attend(CPU, torch.float32, 64, 50, 2, LONGEST)
