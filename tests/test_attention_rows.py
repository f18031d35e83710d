"""DIN's attention on behaviors given as rows of a jagged block (`DinAttention.forward_rows`) is `forward` on their
padded layout: the same pooled vectors, weights, gradients (keys, values, query, every parameter) and Dice running
statistics, with the native unit (Dice) and the eager one (sigmoid), raw scores and softmax, a block read whole or
by a tail window. The models that read rows so (DIN; the short branch of the two-stage models) give what their
padded inputs gave: `window_rows` and `ShortRows` select the rows `padded` and `fixed_slots` laid out."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import batches, build

from ctr.models.base import CTRModel
from ctr.modules.attention import DinAttention
from ctr.modules.gsu import lengths_to_offsets, to_slots

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [3, 0, 5, 1, 7, 2, 0, 4, 6]  # two samples without behaviors


def _block(width: int | None, d: int, seed: int = 0):
    """A jagged block of LENGTHS rows per sample, and the window read from it: every row (``width`` None) or each
    sample's last ``width`` -> (keys [M, d], values [M, d + 1], flat, rows, mask [B, W])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    offsets = lengths_to_offsets(lengths)
    m = int(offsets[-1])
    keys, values = torch.randn(m, d, generator=g), torch.randn(m, d + 1, generator=g)
    w = int(lengths.max()) if width is None else width
    n = lengths.clamp(max=w)
    flat = torch.cat([torch.arange(int(offsets[b + 1] - n[b]), int(offsets[b + 1])) for b in range(len(LENGTHS))])
    rows = torch.repeat_interleave(torch.arange(len(LENGTHS)), n)
    mask = torch.arange(w).unsqueeze(0) < n.unsqueeze(1)
    return keys, values, flat, rows, mask


@pytest.mark.parametrize("activation", ["dice", "sigmoid"])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("width", [None, 4])  # the whole block in order / each sample's tail
@pytest.mark.parametrize("separate_values", [False, True])
def test_rows_are_the_padded_layout(activation, softmax, width, separate_values):
    d = 8
    keys, values, flat, rows, mask = _block(width, d)
    if not separate_values:
        values = keys
    torch.manual_seed(0)
    att = DinAttention(d, (12, 5), activation, softmax=softmax).train()
    att_rows = copy.deepcopy(att)
    query = torch.randn(len(LENGTHS), d)
    ka, va, qa = (t.clone().requires_grad_() for t in (keys, values, query))
    kb, vb, qb = (t.clone().requires_grad_() for t in (keys, values, query))

    pooled, weights = att(
        qa, to_slots(ka[flat], mask), mask, values=to_slots(va[flat], mask) if separate_values else None
    )
    pooled_rows, weights_rows = att_rows.forward_rows(qb, kb, flat, rows, values=vb if separate_values else None)
    torch.testing.assert_close(pooled_rows, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights_rows, weights[mask], rtol=1e-5, atol=1e-6)
    assert pooled_rows[1].abs().sum() == 0 and pooled_rows[6].abs().sum() == 0  # no behaviors: zeros

    g = torch.randn_like(pooled)
    (pooled * g).sum().backward()
    (pooled_rows * g).sum().backward()
    for a, b in ((ka, kb), (qa, qb)) + (((va, vb),) if separate_values else ()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    if width is not None:  # rows outside the window get no gradient
        outside = torch.ones(keys.shape[0], dtype=torch.bool)
        outside[flat] = False
        assert outside.any() and kb.grad[outside].abs().sum() == 0
    for (name, p), p_rows in zip(att.named_parameters(), att_rows.parameters(), strict=True):
        torch.testing.assert_close(p_rows.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, buf), buf_rows in zip(att.named_buffers(), att_rows.buffers(), strict=True):
        torch.testing.assert_close(buf_rows, buf, rtol=1e-5, atol=1e-6, msg=name)


def test_rows_in_evaluation_use_the_running_statistics():
    keys, _, flat, rows, mask = _block(4, 8)
    torch.manual_seed(0)
    att = DinAttention(8, (12, 5), "dice").train()
    query = torch.randn(len(LENGTHS), 8)
    att(query, to_slots(keys[flat], mask), mask)  # moves the running statistics off their start
    att.eval()
    with torch.no_grad():
        pooled, _ = att(query, to_slots(keys[flat], mask), mask)
        pooled_rows, _ = att.forward_rows(query, keys, flat, rows)
    torch.testing.assert_close(pooled_rows, pooled, rtol=1e-5, atol=1e-6)


class _JT:
    def __init__(self, values: torch.Tensor, lengths: torch.Tensor) -> None:
        self._values, self._lengths = values, lengths

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths


@pytest.mark.parametrize("max_len", [7, 4])  # every row fits / rows longer than the window keep their first 4
def test_window_rows_select_what_padded_lays_out(max_len):
    keys, _, _, _, _ = _block(None, 3)
    jt = _JT(keys, torch.tensor(LENGTHS))
    slots, mask = CTRModel.padded(jt, max_len)
    flat, rows = CTRModel.window_rows(jt, max_len)
    assert torch.equal(rows, mask.nonzero()[:, 0])
    assert torch.equal(to_slots(keys[flat], mask), slots)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sim_soft", {}),
        ("sim_soft", {"dare": True}),  # scored on the attention embeddings, pooled on the representations
        ("sim_soft", {"short_len": 7, "max_len": 30}),  # the tail of longer prefixes
        ("sim_hard", {}),  # the short view's own look-up
        ("sim_soft", {"short_softmax": True}),
    ],
)
def test_the_short_branch_on_rows_is_the_short_branch_on_slots(info, name, params):
    model = build(info, name, **params).train()
    batch = batches(info, model, 1)[0]
    inp = model.prepare(batch)
    r = inp.short_rows
    assert isinstance(model.short_attention, DinAttention) and inp.lc is None
    assert r.mask.any() and not r.mask.all()
    twin = copy.deepcopy(model.short_attention)
    u_rows = model.short_interest(inp)
    u_slots = twin(inp.target_att, inp.short_att, inp.short_mask, values=inp.short)[0]
    torch.testing.assert_close(u_rows, u_slots, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(u_rows)
    grads_rows = torch.autograd.grad((u_rows * g).sum(), [*model.short_attention.parameters(), inp.target_att])
    grads_slots = torch.autograd.grad((u_slots * g).sum(), [*twin.parameters(), inp.target_att])
    for a, b in zip(grads_rows, grads_slots, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [None, 4])
def test_native_weighted_pool_is_the_eager_sum_on_any_thread_count(width):
    from ctr import native

    _, values, flat, rows, _ = _block(width, 8, seed=3)
    w = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(4))
    g = torch.randn(len(LENGTHS), values.shape[1], generator=torch.Generator().manual_seed(5))
    wa, va = w.clone().requires_grad_(), values.clone().requires_grad_()
    ref = torch.zeros(len(LENGTHS), values.shape[1]).index_add(0, rows, wa.unsqueeze(1) * va[flat])
    (ref * g).sum().backward()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            wb, vb = w.clone().requires_grad_(), values.clone().requires_grad_()
            out = native.weighted_pool(wb, vb, flat, rows, len(LENGTHS))
            assert out is not None
            (out * g).sum().backward()
            results.append((out.detach(), wb.grad, vb.grad))
    finally:
        torch.set_num_threads(threads)
    for out, gw, gv in results:
        torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw, wa.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gv, va.grad, rtol=1e-6, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(results[0], (out, gw, gv), strict=True))
    # one side without a gradient (SDIM's weights, the hash functions' shares): the other side's is the same
    for need_w in (False, True):
        wc, vc = w.clone().requires_grad_(need_w), values.clone().requires_grad_(not need_w)
        out = native.weighted_pool(wc, vc, flat, rows, len(LENGTHS))
        assert out is not None
        (out * g).sum().backward()
        assert (vc.grad is None) == need_w and (wc.grad is None) != need_w
        assert torch.equal(wc.grad, results[0][1]) if need_w else torch.equal(vc.grad, results[0][2])
    empty = torch.zeros(0, dtype=torch.int64)
    out = native.weighted_pool(torch.zeros(0), values, empty, empty, 3)
    assert out is not None and torch.equal(out, torch.zeros(3, values.shape[1]))
    assert native.weighted_pool(w.double(), values.double(), flat, rows, len(LENGTHS)) is None  # the eager form then
