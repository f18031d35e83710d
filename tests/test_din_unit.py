"""DIN's activation unit in cache-sized blocks (`ctr/native/din_unit.cpp`, `DinAttention.scores`'s native path):
the eager unit's scores, every gradient and the running statistics, in training and evaluation, at every depth;
the same result at one and two threads; the checks and the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch

from ctr import native
from ctr.modules.attention import DinAttention
from ctr.native import din_unit


@pytest.fixture(autouse=True)
def _native_on():
    native.set_enabled(True)
    yield
    native.set_enabled(True)


def _pair(hidden, d, seed, softmax=False):
    torch.manual_seed(seed)
    a = DinAttention(d, hidden, "dice", softmax=softmax)
    for act in a.acts:  # away from the initial values, so that every term of the backward counts
        act.alpha.data.uniform_(-0.5, 0.5)
        act.norm.running_mean.uniform_(-1, 1)
        act.norm.running_var.uniform_(0.5, 2)
    return a, copy.deepcopy(a)


def _eager(monkeypatch):
    monkeypatch.setattr(native, "din_unit", lambda *args, **kwargs: None)


def _mask(b, n, seed, p=0.7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n + 1, (b,), generator=gen)
    lengths[0], lengths[1], lengths[-1] = 0, n, n // 2  # an empty row, a full one, padding at the very end
    return torch.arange(n)[None, :] < lengths[:, None]


@pytest.mark.parametrize(
    ("hidden", "b", "n", "d", "softmax"),
    [((80, 40), 37, 9, 6, False), ((36,), 23, 7, 5, True), ((16, 12, 8), 19, 11, 4, False),
     ((80, 40), 260, 20, 8, False),  # several parallel groups and blocks
     ((80, 40), 40, 50, 64, True),  # the shipped shape: whole 16-wide slabs of the first layer's tiles
     ((24, 8), 5, 300, 17, False)],  # samples longer than a block (a sample's rows in chunks); partial slabs
)  # fmt: skip
def test_training_matches_the_eager_unit(monkeypatch, hidden, b, n, d, softmax):
    fused, eager = _pair(hidden, d, seed=b, softmax=softmax)
    mask = _mask(b, n, seed=b)
    q = torch.randn(b, d, requires_grad=True)
    k = torch.randn(b, n, d, requires_grad=True)
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    g = torch.randn(b, d)
    assert din_unit is native.din_unit
    pooled, weights = fused(q, k, mask)
    (pooled * g).sum().backward()
    _eager(monkeypatch)
    pooled2, weights2 = eager(q2, k2, mask)
    (pooled2 * g).sum().backward()
    torch.testing.assert_close(pooled, pooled2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, weights2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-4, atol=1e-5)
    assert k.grad[~mask].abs().max() < 1e-6 if softmax is False else True  # padding gets no gradient from the unit
    for (name, p1), (_, p2) in zip(fused.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b1), (_, b2) in zip(fused.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(b1, b2, rtol=1e-6, atol=1e-6, msg=name)


def test_evaluation_matches_the_eager_unit_and_leaves_the_statistics(monkeypatch):
    fused, eager = _pair((80, 40), 6, seed=3)
    fused.eval()
    eager.eval()
    mask = _mask(41, 12, seed=3)
    q, k = torch.randn(41, 6), torch.randn(41, 12, 6)
    before = {name: t.clone() for name, t in fused.named_buffers()}
    with torch.no_grad():
        s1 = fused.scores(q, k, mask)
        _eager(monkeypatch)
        s2 = eager.scores(q, k, mask)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-6)
    for name, t in fused.named_buffers():
        assert torch.equal(t, before[name]), name


def test_evaluation_scores_are_the_readable_unit():
    att, _ = _pair((80, 40), 5, seed=4)
    att.eval()
    mask = _mask(17, 6, seed=4)
    q, k = torch.randn(17, 5), torch.randn(17, 6, 5)
    with torch.no_grad():
        s = att.scores(q, k, mask)
        rows = mask.nonzero()
        ref = att.unit(q[rows[:, 0]], k[rows[:, 0], rows[:, 1]])
    torch.testing.assert_close(s[mask], ref, rtol=1e-5, atol=1e-5)
    assert torch.all(s[~mask] == 0)


def test_as_accurate_as_the_eager_unit_against_float64(monkeypatch):
    att, _ = _pair((80, 40), 16, seed=8)
    mask = _mask(300, 30, seed=8)
    q, k, g = torch.randn(300, 16), torch.randn(300, 30, 16), torch.randn(300, 16)

    def run(dtype, fused):
        if not fused:
            monkeypatch.setattr(native, "din_unit", lambda *args, **kwargs: None)
        m = copy.deepcopy(att).to(dtype)
        qq, kk = q.to(dtype).clone().requires_grad_(), k.to(dtype).clone().requires_grad_()
        pooled, _ = m(qq, kk, mask)
        (pooled * g.to(dtype)).sum().backward()
        monkeypatch.setattr(native, "din_unit", din_unit)
        return [pooled, kk.grad, qq.grad, *(p.grad for p in m.parameters())]

    exact, eager = run(torch.float64, False), run(torch.float32, False)
    for i, (x, y, ref) in enumerate(zip(run(torch.float32, True), eager, exact, strict=True)):
        err, eager_err = (x.double() - ref).abs().max().item(), (y.double() - ref).abs().max().item()
        assert err <= 3 * eager_err + 1e-6 * ref.abs().max().item(), (i, err, eager_err)


def test_one_and_two_threads_give_the_same_result():
    att, _ = _pair((80, 40), 8, seed=5)
    mask = _mask(300, 25, seed=5)
    q, k = torch.randn(300, 8), torch.randn(300, 25, 8)
    threads = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            a = copy.deepcopy(att)
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            pooled, _ = a(qq, kk, mask)
            pooled.square().sum().backward()
            out.append([pooled, kk.grad, qq.grad, *(p.grad for p in a.parameters())])
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*out, strict=True):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)


def test_falls_back_where_the_native_unit_does_not_apply():
    att, _ = _pair((8,), 4, seed=6)
    keys, query = torch.randn(6, 4), torch.randn(2, 4)
    flat, rows = torch.tensor([0, 1, 3, 4]), torch.tensor([0, 0, 1, 1])
    first = att.linears[0]
    w_kp = first.weight[:, 4:12].detach()
    qpart = torch.randn(2, 8)
    args = (keys, flat, query, rows, qpart, w_kp, att.linears[1:], att.acts, att.out)
    assert din_unit(*args) is not None
    assert din_unit(keys, flat[:1], query, rows[:1], qpart, w_kp, att.linears[1:], att.acts, att.out) is None  # one row
    att.eval()
    w_grad = w_kp.clone().requires_grad_()
    assert din_unit(keys, flat, query, rows, qpart, w_grad, att.linears[1:], att.acts, att.out) is None  # eval + grad
    native.set_enabled(False)
    assert din_unit(*args) is None
    native.set_enabled(True)
    sig = DinAttention(4, (8,), "sigmoid")
    assert din_unit(keys, flat, query, rows, qpart, w_kp, sig.linears[1:], sig.acts, sig.out) is None
    assert din_unit(keys.double(), flat, query.double(), rows, qpart.double(), w_kp.double(), *args[6:]) is None


def test_refuses_rows_out_of_order_or_range():
    att, _ = _pair((8,), 4, seed=7)
    keys, query, qpart = torch.randn(6, 4), torch.randn(2, 4), torch.randn(2, 8)
    w_kp = att.linears[0].weight[:, 4:12].detach()
    rest = (att.linears[1:], att.acts, att.out)
    with pytest.raises(RuntimeError, match="flat must increase"):
        din_unit(keys, torch.tensor([1, 0]), query, torch.tensor([0, 0]), qpart, w_kp, *rest)
    with pytest.raises(RuntimeError, match="rows must not decrease"):
        din_unit(keys, torch.tensor([0, 1]), query, torch.tensor([1, 0]), qpart, w_kp, *rest)
    with pytest.raises(RuntimeError, match="outside the 6 keys"):
        din_unit(keys, torch.tensor([0, 6]), query, torch.tensor([0, 1]), qpart, w_kp, *rest)


def test_backward_twice_gives_the_same_gradients():
    """Backward reads each Dice's σ that forward kept, and must leave it (and every saved block) as it was: a graph
    kept with ``retain_graph`` gives the same gradients on its second backward."""
    att, _ = _pair((80, 40), 8, seed=9)
    mask = _mask(64, 20, seed=9)
    q, k = torch.randn(64, 8, requires_grad=True), torch.randn(64, 20, 8, requires_grad=True)
    pooled, _ = att(q, k, mask)
    loss = pooled.square().sum()
    first = torch.autograd.grad(loss, [q, k, *att.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [q, k, *att.parameters()])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backward_needs_the_sigmoids_forward_kept():
    att, _ = _pair((8,), 4, seed=10)
    keys, query, qpart = torch.randn(6, 4), torch.randn(2, 4), torch.randn(2, 8)
    flat, rows = torch.tensor([0, 1, 3, 4]), torch.tensor([0, 0, 1, 1])
    w_kp = att.linears[0].weight[:, 4:12].detach().contiguous()
    alpha, w_out = att.acts[0].alpha.detach(), att.out.weight.detach().reshape(-1).contiguous()
    res = torch.ops.ctr_native.din_unit_forward(keys, flat, query, rows, qpart, w_kp, [], [], [alpha], w_out, 0.0,
                                                [], [], 1e-8, True)  # fmt: skip
    pre, mean, invstd, sig = res[1:2], res[2:3], res[3:4], res[5:6]
    assert sig[0].shape == (4, 8) and bool(((sig[0] > 0) & (sig[0] < 1)).all())
    grad = torch.randn(4)
    args = (grad, keys, flat, query, rows, w_kp, [], [alpha], w_out, pre, mean, invstd)
    torch.ops.ctr_native.din_unit_backward(*args, sig)
    with pytest.raises(RuntimeError, match="keep = true"):
        torch.ops.ctr_native.din_unit_backward(*args, [])
    with pytest.raises(RuntimeError, match="saved rows"):
        torch.ops.ctr_native.din_unit_backward(*args, [sig[0][:3]])
    no_keep = torch.ops.ctr_native.din_unit_forward(keys, flat, query, rows, qpart, w_kp, [], [], [alpha], w_out, 0.0,
                                                    [], [], 1e-8, False)  # fmt: skip
    assert len(no_keep) == 5 and torch.equal(no_keep[0], res[0])  # evaluation keeps nothing, same scores


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("extra", [False, True])
def test_pooling_in_the_unit_is_the_unit_then_weighted_pool_bit_for_bit(threads, extra):
    """`forward_rows` without softmax pooling the keys (`din_unit(pool=True)`: the sum in the scores' pass, its
    gradient inside the unit's backward) against the unit's scores then `weighted_pool`: the pooled sums, the scores,
    the keys', queries' and every parameter's gradient equal bit for bit (the pooling's share of the keys' gradient
    rounded as autograd's separate term was), with and without a gradient reaching the scores themselves."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        unit, ref = _pair((80, 40), 32, seed=5)
        mask = _mask(260, 20, seed=5)
        rows = torch.arange(260).unsqueeze(1).expand(260, 20)[mask]
        keys = torch.randn(int(mask.sum()) + 7, 32)
        flat = torch.sort(torch.randperm(keys.shape[0])[: rows.numel()]).values  # some rows unread
        q = torch.randn(260, 32)
        g, gs = torch.randn(260, 32), torch.randn(rows.numel())
        outs = []
        for module, fused in ((unit, True), (ref, False)):
            k, qq = keys.clone().requires_grad_(), q.clone().requires_grad_()
            if fused:
                found = module._pooled_rows(qq, k, flat, rows)
                assert found is not None
                pooled, s = found
            else:
                s = module.scores_rows(qq, k, flat, rows)
                pooled = native.weighted_pool(s, k, flat, rows, 260)
            loss = (pooled * g).sum() + ((s * gs).sum() if extra else 0.0)
            loss.backward()
            grads = [p.grad for p in module.parameters()]
            outs.append((pooled.detach(), s.detach(), k.grad, qq.grad, grads, [b.clone() for b in module.buffers()]))
        (p1, s1, k1, q1, w1, b1), (p2, s2, k2, q2, w2, b2) = outs
        for a, b in ((p1, p2), (s1, s2), (k1, k2), (q1, q2), *zip(w1, w2, strict=True), *zip(b1, b2, strict=True)):
            assert torch.equal(a, b)
        assert k1[~torch.isin(torch.arange(keys.shape[0]), flat)].abs().max() == 0  # unread rows: no gradient
    finally:
        torch.set_num_threads(saved)
