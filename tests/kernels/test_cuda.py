"""The Triton kernels compiled for a GPU at the shipped settings (no tile override): correctness against the
references across head widths, query counts, heads, K, dtypes and lengths up to 100K (with empty, one-behavior and
fully masked samples), no register spills in any compiled kernel, and CUDA-graph capture and replay.

Skipped without CUDA: the interpreter cannot compile (its counterpart in CI is `test_shipped_settings.py`, the
same cases at shorter lengths). ``KERNELS_CUDA_TESTS_ON_CPU=1`` runs this file's logic in the interpreter with
short lengths, to check the test itself on a machine without a GPU.

Autotuning is switched off for the correctness matrix (``autotune=False``: each kernel's shipped default config;
autotuning every key would compile a dozen configs per case); one test autotunes and compares.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_cases import (
    check_din_attention,
    check_gsu_topk,
    check_search_attend,
    check_target_attention,
    offsets_of,
)

from kernels._backend import triton_available
from kernels.triton import config

ON_CPU = os.environ.get("KERNELS_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,  # the only tests allowed to skip under CI=true (tests/conftest.py)
    pytest.mark.skipif(
        not triton_available() or not (torch.cuda.is_available() or ON_CPU), reason="needs CUDA (and triton)"
    ),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LONGEST = 100_000 if DEVICE.type == "cuda" else 2_000


@pytest.fixture(autouse=True)
def shipped_settings():
    """Undo the interpreter tests' tiny tiles (tests/kernels/conftest.py): the shipped tiles, work items and grid."""
    with config.override(block_l=None, chunk_l=None, programs=None, autotune=False):
        yield


@pytest.fixture(autouse=True)
def no_spills():
    """After every test: no compiled specialization of any kernel spills registers."""
    yield
    if DEVICE.type != "cuda":
        return
    import kernels.triton._din_kernels as din_kernels
    import kernels.triton._ta_kernels as ta_kernels
    import kernels.triton.gsu_topk as gsu
    import kernels.triton.schedule as schedule
    import kernels.triton.target_attention as ta
    from kernels.triton.introspect import compiled_stats, module_kernels

    spilled = [
        f"{s['name']} {s['constexprs']} warps={s['num_warps']} stages={s['num_stages']}: {s['n_spills']} spills"
        for module in (ta, ta_kernels, gsu, din_kernels, schedule)
        for kernel in module_kernels(module).values()
        for s in compiled_stats(kernel)
        if s["n_spills"]
    ]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def _longest(width: int) -> int:
    """100K behaviors, fewer where the reference's [N, Q, H, D] gather would not fit in memory."""
    return LONGEST if width <= 4096 else LONGEST // 5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n_query", [1, 4, 16, 64])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_target_attention_one_head(dim, n_query, dtype):
    check_target_attention(DEVICE, dtype, dim, n_query, 1, _longest(n_query * dim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n_query", [1, 16])
@pytest.mark.parametrize("dim", [64, 256])
def test_target_attention_four_heads(dim, n_query, dtype):
    check_target_attention(DEVICE, dtype, dim, n_query, 4, _longest(4 * n_query * dim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("k", [16, 64, 256])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
@pytest.mark.parametrize("mode", ["cosine", "dot"])
def test_gsu_topk(mode, dim, k, dtype):
    check_gsu_topk(DEVICE, dtype, dim, k, LONGEST, mode)


@pytest.mark.parametrize("k", [16, 64, 256])
def test_gsu_topk_category(k):
    check_gsu_topk(DEVICE, torch.float32, 1, k, LONGEST, "category")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("activation", ["sigmoid", "prelu"])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("dim", [32, 64, 128])
def test_din_attention(dim, softmax, activation, dtype):
    check_din_attention(DEVICE, dtype, dim, softmax, activation, LONGEST // 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("dim", [64, 128])
def test_search_attend(dim, k, dtype):
    check_search_attend(DEVICE, dtype, dim, k, 2, LONGEST)


def test_autotuned_launch_matches_the_reference():
    with config.override(autotune=None):
        check_target_attention(DEVICE, torch.bfloat16, 64, 1, 1, LONGEST)
        check_target_attention(DEVICE, torch.bfloat16, 64, 16, 1, LONGEST)
        check_gsu_topk(DEVICE, torch.bfloat16, 64, 64, LONGEST, "cosine")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need CUDA")
def test_cuda_graph_capture_and_replay():
    """With ``max_len`` given nothing syncs with the host: the forward, the backward and the GSU are captured once
    and replayed on new values of the same shapes."""
    from kernels import gsu_topk, target_attention

    lengths = [LONGEST, 0, 1, 777, 5000]
    offsets = offsets_of(lengths, DEVICE)
    total = sum(lengths)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    query = torch.randn(len(lengths), 1, 1, 64, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    keys = torch.randn(total, 1, 64, device=DEVICE, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randn(len(lengths), 64, device=DEVICE, generator=gen)

    def step():
        keys.grad = None
        out = target_attention(query, keys, keys, offsets, max_len=LONGEST, backend="triton")
        out.float().sum().backward()
        pos, _ = gsu_topk(offsets, 64, mode="dot", target=target, behavior_vectors=keys.detach()[:, 0].float(),
                          max_len=LONGEST, backend="triton")  # fmt: skip
        return out.detach(), keys.grad, pos

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        fresh = torch.Generator(device=DEVICE).manual_seed(seed)
        with torch.no_grad():
            query.copy_(torch.randn(query.shape, device=DEVICE, generator=fresh))
            keys.copy_(torch.randn(keys.shape, device=DEVICE, generator=fresh))
            target.copy_(torch.randn(target.shape, device=DEVICE, generator=fresh))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for got, want in zip(static, eager, strict=True):
            torch.testing.assert_close(got, want)
