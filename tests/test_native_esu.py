"""The native operators of the ESUs and of TWIN's search: the masked target attention (`ctr.native.target_attention`,
the CPU path of `ctr.modules.esu.MultiHeadTargetAttention` and of `slot_attention` with one key head) is the eager
form (outputs and every gradient, padded and empty samples, shared and separate keys and values, any thread count),
and `ctr.native.segment_dots` is `per_sample_products` of the blocks' concatenation."""

from __future__ import annotations

import pytest
import torch

from ctr import native
from ctr.modules.esu import MultiHeadTargetAttention


@pytest.fixture(autouse=True)
def _native_on():
    native.set_enabled(True)
    yield
    native.set_enabled(True)


def _inputs(b: int, k: int, dq: int, dk: int, dv: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, dq, generator=g)
    keys = torch.randn(b, k, dk, generator=g)
    values = torch.randn(b, k, dv, generator=g) if dv is not None else None
    lengths = torch.randint(0, k + 1, (b,), generator=g)
    lengths[0], lengths[-1] = 0, k  # an empty sample and a full one
    mask = torch.arange(k) < lengths.unsqueeze(1)  # right-padded, as fixed_slots pads
    if b > 2:
        mask[1] = torch.rand(k, generator=g) < 0.5  # and one scattered (LAIN prompts, a selection's holes)
    return query, keys, values, mask


def _run(att: MultiHeadTargetAttention, inputs: tuple[torch.Tensor, ...], use_native: bool) -> list[torch.Tensor]:
    native.set_enabled(use_native)
    query, keys, values, mask = (t.clone().requires_grad_() if t is not None and t.is_floating_point() else t
                                 for t in inputs)  # fmt: skip
    att.zero_grad()
    out = att(query, keys, mask, values=values)
    (out * torch.linspace(-1.0, 2.0, out.shape[-1])).sum().backward()
    grads = [p.grad.clone() for p in att.parameters()]
    return [out.detach(), query.grad, keys.grad, *([] if values is None else [values.grad]), *grads]


@pytest.mark.parametrize(
    "b,k,heads,head_dim,dk,dv",
    [(1, 1, 1, 4, 8, None), (7, 5, 2, 8, 12, None), (64, 50, 2, 32, 64, None), (33, 9, 3, 5, 16, 24),
     (130, 50, 1, 16, 40, 40)],
)  # fmt: skip
def test_native_target_attention_is_the_eager_form(b, k, heads, head_dim, dk, dv):
    assert native.available(), native.unavailable_reason()
    torch.manual_seed(0)
    att = MultiHeadTargetAttention(dk + 3, dk, dv, heads=heads, head_dim=head_dim, out_dim=dk + 1)
    inputs = _inputs(b, k, dk + 3, dk, dv, seed=b + k)
    want = _run(att, inputs, use_native=False)
    got = _run(att, inputs, use_native=True)
    assert len(got) == len(want)
    for i, (w, o) in enumerate(zip(want, got, strict=True)):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, i=i: f"tensor #{i}: {m}")
    mask = inputs[3]
    assert torch.count_nonzero(got[0][~mask.any(1)]) == 0  # a sample without slots pools to zeros
    assert torch.count_nonzero(got[2][~mask]) == 0  # padded slots get no gradient


def test_native_target_attention_does_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    att = MultiHeadTargetAttention(16, 16, heads=2, head_dim=8, out_dim=16)
    inputs = _inputs(300, 50, 16, 16, None, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(att, inputs, use_native=True)
        torch.set_num_threads(3)
        three = _run(att, inputs, use_native=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three, strict=True):
        assert torch.equal(a, b)


def test_native_target_attention_declines_what_it_does_not_serve():
    q, keys, _, mask = _inputs(4, 6, 8, 8, None, seed=2)
    assert native.target_attention(q.double().view(4, 1, 8), keys.double(), mask) is None  # float64: eager
    assert native.target_attention(q.view(4, 1, 8), keys[0], mask) is None  # not [B, K, D]
    native.set_enabled(False)
    assert native.target_attention(q.view(4, 1, 8), keys, mask) is None


@pytest.mark.parametrize("bias_shape", ["none", "shared", "per query"])
def test_slot_attention_with_one_key_head_is_the_eager_form(bias_shape):
    """TWIN's ESU layout: its heads are Q queries over one key head, a cross-feature bias per slot (and query)."""
    from ctr.modules.esu import slot_attention

    b, k, nq, dk, dv = 37, 20, 4, 12, 20
    q, keys, values, mask = _inputs(b, k, nq * dk, dk, dv, seed=9)
    g = torch.Generator().manual_seed(4)
    bias = {"none": None, "shared": torch.randn(b, k, generator=g), "per query": torch.randn(b, k, nq, generator=g)}
    inputs = [q.view(b, nq, 1, dk), keys.unsqueeze(2), values.unsqueeze(2), bias[bias_shape]]
    grad_out = torch.randn(b, nq, 1, dv, generator=g)

    def run(use_native: bool) -> list[torch.Tensor]:
        native.set_enabled(use_native)
        leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
        out = slot_attention(leaves[0], leaves[1], leaves[2], mask, bias=leaves[3], scale=0.3)
        out.backward(grad_out)
        return [out.detach(), *(t.grad for t in leaves if t is not None)]

    want, got = run(False), run(True)
    for i, (w, o) in enumerate(zip(want, got, strict=True)):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"tensor #{i}: {m}")


@pytest.mark.parametrize("widths", [(32,), (16, 16), (8, 3, 21)])
def test_native_segment_dots_are_the_per_sample_products(widths):
    """Rows given as column blocks, read in place: the per-sample products of their concatenation (empty samples,
    a long one), 1 and 3 threads bit for bit; TWIN's search takes the blocks and selects what the whole keys give."""
    from ctr.modules.gsu import lengths_to_offsets, per_sample_products

    g = torch.Generator().manual_seed(len(widths))
    offsets = lengths_to_offsets(torch.tensor([0, 5, 3000, 0, 1, 777, 0]))
    n = int(offsets[-1])
    parts = [torch.randn(n, w, generator=g) for w in widths]
    queries = torch.randn(7, 4, sum(widths), generator=g)
    want = per_sample_products(torch.cat(parts, -1), queries, offsets)
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 3):
            torch.set_num_threads(t)
            got.append(native.segment_dots(parts, queries, offsets))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], got[1])
    assert native.segment_dots([p.double() for p in parts], queries.double(), offsets) is None


def test_twin_search_takes_the_keys_as_blocks():
    from ctr.modules.gsu import lengths_to_offsets
    from ctr.modules.twin import TwinAttention

    torch.manual_seed(2)
    twin = TwinAttention(32, heads=4, head_dim=8, time_buckets=0)
    offsets = lengths_to_offsets(torch.tensor([40, 0, 300, 7]))
    n = int(offsets[-1])
    item, cate = torch.randn(n, 16), torch.randn(n, 16)
    target, bias = torch.randn(4, 32), torch.zeros(n, 4)
    whole = twin.search(offsets, target, torch.cat([item, cate], -1), bias, 20)
    blocks = twin.search(offsets, target, (item, cate), bias, 20)
    assert torch.equal(whole.positions, blocks.positions)
    native.set_enabled(False)
    eager = twin.search(offsets, target, (item, cate), bias, 20)
    assert torch.equal(eager.positions, blocks.positions)
