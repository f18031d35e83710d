"""Rows summed by index (`native.index_add_rows`, `index_add.cpp`) and the gathers built on it (`gather_rows`,
`sum_rows`): PyTorch's ``index_add_`` and ``index_select`` values and gradients, the fallbacks, the sparse update; the
sparse update's distinct rows (`native.unique_inverse`): ``torch.unique``'s, in order of first occurrence."""

from __future__ import annotations

import pytest
import torch

from ctr import native


@pytest.fixture(autouse=True)
def _native_on():
    native.set_enabled(True)
    yield
    native.set_enabled(True)


@pytest.mark.parametrize(
    ("rows", "n", "d", "order"),
    [(14, 880, 16, "random"), (1024, 4300, 80, "sorted"), (5, 0, 3, "random"), (3, 7, 1, "one row"), (9, 40, 0, "")],
)
def test_index_add_rows_is_pytorchs_index_add(rows, n, d, order):
    assert native.available()
    gen = torch.Generator().manual_seed(rows + n)
    src = torch.randn(n, d, generator=gen)
    index = torch.randint(0, rows, (n,), generator=gen)
    if order == "sorted":
        index = index.sort().values
    elif order == "one row":
        index.fill_(1)
    out = native.index_add_rows(src, index, rows)
    ref = torch.zeros(rows, d).index_add_(0, index, src)
    assert out.shape == (rows, d)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        [5, 3, 5, 5, 0, 3, 9],
        [],
        [7],
        [-4, 2**40, -4, 2**62, 0, 2**62],  # negative and large values hash like any other
        list(range(1000)) * 3,  # more distinct values than the table's first size
        (torch.arange(4096) * 4096).tolist(),  # multiples of a power of two (the low bits all zero)
        [7, 0, 7, 3],  # values below twice their count: placed by value, no hashing
        [8, 0, 8, 3],  # the first range too wide for that: hashed
    ],
)
def test_unique_inverse_is_torch_unique_in_first_occurrence_order(values):
    x = torch.tensor(values, dtype=torch.int64)
    found = native.unique_inverse(x)
    assert found is not None
    unique, inverse = found
    assert unique.dtype == inverse.dtype == torch.int64 and inverse.shape == x.shape
    assert torch.equal(unique[inverse], x)
    first = list(dict.fromkeys(values))  # distinct values in order of first occurrence
    assert unique.tolist() == first
    assert torch.equal(unique.sort().values, torch.unique(x))


def test_unique_inverse_at_a_steps_size_and_where_it_declines():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 60_000, (110_000,), generator=gen)
    found = native.unique_inverse(x)
    assert found is not None
    unique, inverse = found
    assert torch.equal(unique[inverse], x) and torch.equal(unique.sort().values, torch.unique(x))
    assert native.unique_inverse(x.int()) is None and native.unique_inverse(x.view(2, -1)) is None
    native.set_enabled(False)
    assert native.unique_inverse(x) is None  # the caller's torch.unique then


def test_index_add_rows_is_the_same_on_any_thread_count():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(200_000, 24, generator=gen)  # past the size where it splits the rows over threads (4M floats)
    index = torch.randint(0, 9_000, (200_000,), generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(native.index_add_rows(src, index, 9_001))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], torch.zeros(9_001, 24).index_add_(0, index, src), rtol=1e-5, atol=1e-5)


def test_index_add_rows_refuses_an_index_outside_the_rows():
    with pytest.raises(RuntimeError, match="outside the 4 rows"):
        native.index_add_rows(torch.ones(3, 2), torch.tensor([0, 4, 1]), 4)
    with pytest.raises(RuntimeError, match="outside"):
        native.index_add_rows(torch.ones(1, 2), torch.tensor([-1]), 4)


def test_index_add_rows_falls_back_off_the_native_path():
    src, index = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 2, 1, 0, 2])
    ref = torch.zeros(3, 3, dtype=torch.float64).index_add_(0, index, src)
    assert torch.equal(native.index_add_rows(src, index, 3), ref)  # float64: PyTorch's
    native.set_enabled(False)
    src32 = src.float()
    assert torch.equal(native.index_add_rows(src32, index, 3), torch.zeros(3, 3).index_add_(0, index, src32))


@pytest.mark.parametrize("shape", [(50, 8), (30, 4, 5), (40,)])
def test_gather_rows_values_and_gradient_are_index_selects(shape):
    gen = torch.Generator().manual_seed(len(shape))
    base = torch.randn(*shape, generator=gen)
    index = torch.randint(0, shape[0], (200,), generator=gen)
    x, y = base.clone().requires_grad_(), base.clone().requires_grad_()
    a, b = native.gather_rows(x, index), y.index_select(0, index)
    assert torch.equal(a, b)
    up = torch.randn(b.shape, generator=gen)
    a.backward(up)
    b.backward(up)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


def test_gather_rows_of_a_non_contiguous_input_and_a_non_contiguous_gradient():
    base = torch.randn(8, 12)
    x = base.t().clone().requires_grad_()  # [12, 8]
    view = x[:, ::2]  # non-contiguous rows
    index = torch.tensor([3, 3, 0, 11, 7])
    out = native.gather_rows(view, index)
    (out.t() * torch.arange(5.0)).sum().backward()  # the gradient arrives transposed
    ref = x.detach().clone().requires_grad_()
    (ref[:, ::2].index_select(0, index).t() * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_gather_rows_without_gradient_is_a_plain_index_select(monkeypatch):
    calls = []
    monkeypatch.setattr(native._GatherRows, "apply", lambda *a: calls.append(a))
    x, index = torch.randn(5, 2), torch.tensor([1, 4])
    assert torch.equal(native.gather_rows(x, index), x[index])  # x needs no gradient
    with torch.no_grad():
        native.gather_rows(x.requires_grad_(), index)
    assert calls == []


def test_sum_rows_value_and_gradient():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(60, 5, generator=gen)
    index = torch.randint(0, 7, (60,), generator=gen)
    a_in, b_in = src.clone().requires_grad_(), src.clone().requires_grad_()
    a = native.sum_rows(a_in, index, 7)
    b = torch.zeros(7, 5).index_add(0, index, b_in)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    up = torch.randn(7, 5, generator=gen)
    a.backward(up)
    b.backward(up)
    assert torch.equal(a_in.grad, b_in.grad)


def test_the_sparse_update_sums_each_rows_gradients_natively(monkeypatch):
    """`cpu_tables._update` sums the gradients of each distinct row through `index_add_blocks` (the same sum as
    PyTorch's ``index_add_``; `tests/test_cpu_tables.py` holds the update itself against FBGEMM's), over the blocks
    the look-up's outputs left, a block without gradient (None) adding nothing."""
    from ctr.train import cpu_tables

    seen = []
    original = cpu_tables._index_add_blocks

    def spy(srcs, sizes, index, rows, d):
        seen.append(([None if s is None else tuple(s.shape) for s in srcs], list(sizes), rows, d))
        return original(srcs, sizes, index, rows, d)

    monkeypatch.setattr(cpu_tables, "_index_add_blocks", spy)
    tbe = _FakeTbe(rows=6, dim=4)
    indices = torch.tensor([5, 1, 5, 0, 1, 5])
    rows = cpu_tables._Rows(tbe, "sgd", indices, torch.tensor([0, 3, 6]))
    grad = torch.arange(24.0).view(6, 4)
    before = tbe.weights_host.clone().view(6, 4)
    cpu_tables._update(tbe, rows, [grad[:2].reshape(1, 8), None, grad[3:]], [2, 1, 3])
    assert seen == [([(1, 8), None, (3, 4)], [2, 1, 3], 3, 4)]
    expected = before.clone()
    used = torch.tensor([0, 1, 3, 4, 5])
    expected.index_add_(0, indices[used], grad[used], alpha=-0.5)
    torch.testing.assert_close(tbe.weights_host.view(6, 4), expected)


@pytest.mark.parametrize("native_on", [True, False])
def test_index_add_blocks_is_index_add_of_the_blocks_in_order(native_on, monkeypatch):
    """`cpu_tables._index_add_blocks`: bit for bit the sum `index_add_rows` gives the concatenated blocks (each
    row's terms in the same order), a None block as zeros; on one thread and on two (above the parallel threshold)."""
    from ctr.train import cpu_tables

    monkeypatch.setattr(native, "_use", native_on)
    gen = torch.Generator().manual_seed(3)
    for n, d in ((300, 5), (70_000, 64)):
        index = torch.randint(0, n // 7, (n,), generator=gen)
        a, b = torch.randn(n // 3, d, generator=gen), torch.randn(n - n // 3 - 11, d, generator=gen)
        sizes = [a.shape[0], 11, b.shape[0]]
        whole = torch.cat([a, torch.zeros(11, d), b])
        expected = native.index_add_rows(whole, index, n // 7)
        saved = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                got = cpu_tables._index_add_blocks([a.reshape(-1), None, b], sizes, index, n // 7, d)
                assert torch.equal(got, expected), (n, d, threads)
        finally:
            torch.set_num_threads(saved)


class _FakeTbe:
    """The attributes of FBGEMM's TBE that `_Rows` and the SGD update read: one table, two features."""

    def __init__(self, rows: int, dim: int) -> None:
        self.feature_table_map = [0, 0]
        self.D_offsets = torch.tensor([0, dim, 2 * dim])
        self.embedding_specs = [(rows, dim)]
        self.weights_offsets = torch.tensor([0, 0])  # per feature: both features read the one table
        self.momentum1_offsets = torch.tensor([0, 0])
        self.weights_host = torch.randn(rows * dim)
        self.learning_rate_tensor = torch.tensor(0.5)
