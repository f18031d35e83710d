"""`ctr.native.attention_rows` (target attention over jagged rows, two column blocks) is its eager form
(`attention_rows_reference`) and the slot op (`ctr.native.target_attention`) on the slots laid out from the same
rows: outputs and every gradient, empty samples, with and without the second block, scored or not, with a bias, on
any thread count."""

from __future__ import annotations

import pytest
import torch

from ctr import native
from ctr.modules.gsu import lengths_to_offsets, to_slots
from ctr.native.attention_rows import attention_rows_reference


@pytest.fixture(autouse=True)
def _native_on():
    native.set_enabled(True)
    yield
    native.set_enabled(True)


def _inputs(b: int, h: int, da: int, dx: int, scored: bool, bias: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 13, (b,), generator=g)
    lengths[0] = 0  # a sample without rows
    if b > 2:
        lengths[-1] = 12
    offsets = lengths_to_offsets(lengths)
    n = int(offsets[-1])
    q = torch.randn(b, h, da + (dx if scored else 0), generator=g)
    a = torch.randn(n, da, generator=g)
    x = torch.randn(n, dx, generator=g) if dx else None
    bb = torch.randn(n, h, generator=g) if bias else None
    return q, a, x, bb, offsets, lengths


def _run(fn, q, a, x, bias, offsets, scored):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, a, x, bias)]
    out = fn(leaves[0], leaves[1], offsets, leaves[2], leaves[3], scored)
    w = torch.linspace(-1.0, 2.0, out.shape[-1])
    (out * w).sum().backward()
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize(
    "b,h,da,dx,scored,bias",
    [(1, 1, 8, 0, False, False), (9, 4, 32, 16, False, True), (33, 2, 16, 8, True, False), (64, 3, 12, 5, True, True),
     (40, 4, 32, 0, True, True)],
)  # fmt: skip
def test_attention_rows_is_the_eager_form(b, h, da, dx, scored, bias):
    assert native.available(), native.unavailable_reason()
    q, a, x, bb, offsets, _ = _inputs(b, h, da, dx, scored, bias, seed=b + h)
    got = _run(native.attention_rows, q, a, x, bb, offsets, scored)
    want = _run(attention_rows_reference, q, a, x, bb, offsets, scored)
    assert len(got) == len(want)
    for i, (o, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"tensor #{i}: {m}")
    assert torch.count_nonzero(got[0][0]) == 0  # the sample without rows pools to zeros


def test_attention_rows_is_the_slot_op_on_the_laid_out_rows():
    """TWIN's ESU both ways: keys [a], values [a; x], a per-row bias, H queries over one key head."""
    b, h, da, dx = 50, 4, 32, 16
    q, a, x, bb, offsets, lengths = _inputs(b, h, da, dx, False, True, seed=3)
    mask = torch.arange(int(lengths.max())) < lengths.unsqueeze(1)
    rows = _run(native.attention_rows, q, a, x, bb, offsets, False)

    def slots(q, a, offsets, x, bias, scored):
        keys = to_slots(a, mask)
        return native.target_attention(q, keys, mask, to_slots(torch.cat([a, x], -1), mask), to_slots(bias, mask))

    laid = _run(slots, q, a, x, bb, offsets, False)
    for i, (o, w) in enumerate(zip(rows, laid, strict=True)):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"tensor #{i}: {m}")


def test_attention_rows_does_not_depend_on_the_thread_count():
    q, a, x, bb, offsets, _ = _inputs(300, 4, 32, 16, True, True, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(native.attention_rows, q, a, x, bb, offsets, True)
        torch.set_num_threads(3)
        three = _run(native.attention_rows, q, a, x, bb, offsets, True)
    finally:
        torch.set_num_threads(threads)
    for o, t in zip(one, three, strict=True):
        assert torch.equal(o, t)


def test_attention_rows_declines_what_it_does_not_serve():
    q, a, x, _, offsets, _ = _inputs(4, 2, 8, 4, False, False, seed=2)
    assert native.attention_rows(q.double(), a.double(), offsets, x.double()) is None  # float64: eager
    assert native.attention_rows(q[0], a, offsets, x) is None  # not [B, H, D]
    native.set_enabled(False)
    assert native.attention_rows(q, a, offsets, x) is None


def test_attention_rows_rejects_inconsistent_offsets():
    q, a, x, _, offsets, _ = _inputs(4, 2, 8, 4, False, False, seed=2)
    bad = offsets.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="offsets must run from 0 to N"):
        native.attention_rows(q, a, bad, x)
