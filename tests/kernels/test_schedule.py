"""Length-balanced work items (`kernels.triton.schedule`): coverage, order, bounds, no host sync, and the three ops
on batches where one long sample shares the batch with short and empty ones."""

from __future__ import annotations

import contextlib

import pytest
import torch

from kernels import din_attention, gsu_topk, target_attention
from kernels._backend import triton_available
from kernels.triton import config

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton does not import")

SKEWED = [200, 3, 0, 17, 1, 0, 64, 33]


def offsets_of(lengths: list[int]) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets


def plan_of(lengths: list[int], max_len: int | None = None):
    from kernels.triton.schedule import plan_work

    offsets = offsets_of(lengths)
    return plan_work(offsets, int(offsets[-1]), max(lengths) if max_len is None else max_len)


@requires_triton
def test_items_cover_every_row_once_longest_sample_first():
    plan = plan_of(SKEWED)  # conftest: chunk 32, 3 programs
    assert plan.chunk == 32 and plan.programs == 3
    items = plan.items.tolist()
    real = [(b, c) for b, c in items if b >= 0]
    assert all(b == -1 for b, _ in items[len(real) :])  # empty slots only after the real items
    covered = {b: set() for b in range(len(SKEWED))}
    for b, c in real:
        rows = range(c * plan.chunk, min((c + 1) * plan.chunk, SKEWED[b]))
        assert rows, "an item without rows"
        assert not covered[b] & set(rows), "a row in two items"
        covered[b] |= set(rows)
    assert all(covered[b] == set(range(n)) for b, n in enumerate(SKEWED))
    samples = [b for b, _ in real]
    lengths = [SKEWED[b] for b in dict.fromkeys(samples)]
    assert lengths == sorted(lengths, reverse=True)  # longest sample first, each sample's items together
    for b, n in enumerate(SKEWED):
        assert plan.count[b] == -(-n // plan.chunk)
        if n:
            assert items[plan.first[b]] == [b, 0]
    assert plan.bound >= len(real) and plan.max_items == -(-max(SKEWED) // plan.chunk)


@requires_triton
def test_understated_max_len_still_covers_every_row():
    plan = plan_of(SKEWED, max_len=1)  # the caller is wrong about the longest sample
    assert sum(1 for b, _ in plan.items.tolist() if b >= 0) == sum(-(-n // plan.chunk) for n in SKEWED)


@requires_triton
def test_shipped_chunk_is_aligned_and_sized_from_the_total():
    from kernels.triton.schedule import CHUNK_ALIGN, ITEMS_PER_PROGRAM, MIN_CHUNK, plan_work

    with config.override(block_l=None, chunk_l=None, programs=None):
        small = plan_work(offsets_of([50] * 64), 3200, 50)
        big = plan_work(offsets_of([100_000] * 16), 1_600_000, 100_000)
    assert small.chunk == MIN_CHUNK
    assert big.chunk % CHUNK_ALIGN == 0 and big.chunk > MIN_CHUNK
    assert 1_600_000 // big.chunk <= ITEMS_PER_PROGRAM * big.programs


@contextlib.contextmanager
def no_host_sync():
    """Fail on any device-to-host read of a tensor's value (the CPU stand-in for CUDA's sync debug mode)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync: a tensor's value was read on the host")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__index__")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@requires_triton
def test_building_the_plan_reads_nothing_back():
    offsets = offsets_of(SKEWED)
    from kernels.triton.schedule import plan_work

    with no_host_sync():
        plan = plan_work(offsets, int(sum(SKEWED)), max(SKEWED))
    assert plan.items.shape == (plan.bound, 2)


def _ta_inputs(lengths, n_query, seed):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return {
        "query": torch.randn(len(lengths), n_query, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True),
        "keys": torch.randn(total, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True),
        "values": torch.randn(total, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True),
        "bias": torch.randn(total, generator=gen, dtype=torch.float64, requires_grad=True),
        "temperature": (torch.rand(len(lengths), generator=gen, dtype=torch.float64) + 0.5).requires_grad_(),
    }


@requires_triton
@pytest.mark.parametrize("n_query", [1, 4])
@pytest.mark.parametrize("max_len", [None, 1])
def test_target_attention_on_a_skewed_batch(n_query, max_len):
    inp = _ta_inputs(SKEWED, n_query, seed=n_query)
    offsets = offsets_of(SKEWED)
    results = []
    for backend in ("reference", "triton"):
        tensors = [inp[k] for k in ("query", "keys", "values", "bias", "temperature")]
        for t in tensors:
            t.grad = None
        out = target_attention(
            inp["query"], inp["keys"], inp["values"], offsets, bias=inp["bias"], temperature=inp["temperature"],
            max_len=max_len, backend=backend,
        )  # fmt: skip
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        results.append([out.detach()] + [t.grad.clone() for t in tensors])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@requires_triton
@pytest.mark.parametrize("max_len", [None, 1])
def test_din_attention_on_a_skewed_batch(max_len):
    gen = torch.Generator().manual_seed(3)
    total, dim = sum(SKEWED), 8
    offsets = offsets_of(SKEWED)
    target = torch.randn(len(SKEWED), dim, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(total, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [
        torch.randn(4 * dim, 16, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(16, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(16, 1, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(1, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    results = []
    for backend in ("reference", "triton"):
        for t in [target, keys, *weights]:
            t.grad = None
        out = din_attention(
            target, keys, offsets, weights=[weights[0], weights[2]], biases=[weights[1], weights[3]],
            activation="sigmoid", softmax=True, max_len=max_len, backend=backend,
        )  # fmt: skip
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
        results.append([out.detach()] + [t.grad.clone() for t in (target, keys, *weights)])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@requires_triton
@pytest.mark.parametrize("k", [1, 5, 16, 40])
@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
@pytest.mark.parametrize("max_len", [None, 1])
def test_gsu_topk_on_a_skewed_batch(k, order, max_len):
    """Ascending scores make every tile enter the list (the wide selection), descending ones almost none after the
    first tile, random ones a few (the small selection); ``max_len = 1`` understates the longest sample, so the
    final pass merges what the tree did not."""
    gen = torch.Generator().manual_seed(k)
    offsets = offsets_of(SKEWED)
    total = sum(SKEWED)
    vectors = torch.randn(total, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(len(SKEWED), 4, generator=gen, dtype=torch.float64)
    if order != "random":
        ramp = torch.arange(total, dtype=torch.float64)
        target = torch.zeros_like(target)
        target[:, 0] = 1.0
        vectors[:, 0] = ramp if order == "ascending" else -ramp
    got = gsu_topk(offsets, k, mode="dot", target=target, behavior_vectors=vectors, max_len=max_len, backend="triton")
    want = gsu_topk(offsets, k, mode="dot", target=target, behavior_vectors=vectors, backend="reference")
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@requires_triton
def test_ops_with_max_len_read_nothing_back():
    """With ``max_len`` given, neither op reads a value back to the host (CUDA-graph capturable)."""
    inp = _ta_inputs(SKEWED, 4, seed=0)
    offsets = offsets_of(SKEWED)
    vectors = inp["keys"].detach()[:, 0]
    with no_host_sync():
        out = target_attention(inp["query"], inp["keys"], inp["values"], offsets, max_len=200, backend="triton")
        out.sum().backward()
        gsu_topk(offsets, 5, mode="dot", target=inp["query"].detach()[:, 0, 0], behavior_vectors=vectors,
                 max_len=200, backend="triton")  # fmt: skip
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):  # the guard does see a sync
        target_attention(inp["query"], inp["keys"], inp["values"], offsets, backend="triton")
