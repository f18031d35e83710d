"""The native CPU operators (`ctr.native`): they build wherever a C++ compiler is, and Dice through them is the eager
module's function: outputs, both gradients, running statistics, evaluation, every fallback."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ctr import native
from ctr.modules.activations import Dice
from ctr.modules.attention import DinAttention


@pytest.fixture(autouse=True)
def _native_on():
    native.set_enabled(True)
    yield
    native.set_enabled(True)


def _pair(h: int, seed: int = 0) -> tuple[Dice, Dice]:
    torch.manual_seed(seed)
    a = Dice(h)
    a.alpha.data.uniform_(-0.6, 0.6)
    b = Dice(h)
    b.load_state_dict(a.state_dict())
    return a, b


def _run(d: Dice, x: torch.Tensor, g: torch.Tensor, use_native: bool) -> tuple[torch.Tensor, ...]:
    native.set_enabled(use_native)
    x = x.clone().requires_grad_()
    out = d(x)
    out.backward(g)
    assert x.grad is not None and d.alpha.grad is not None
    return out.detach(), x.grad, d.alpha.grad.clone(), d.norm.running_mean.clone(), d.norm.running_var.clone()


def test_the_native_operators_build_wherever_a_cxx_compiler_is():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.fail("no C++ compiler on this machine: `make setup` expects g++ (Debian: build-essential)")
    assert native.available(), native.unavailable_reason()


@pytest.mark.parametrize("rows,h", [(2, 7), (3, 40), (513, 80), (4097, 33)])
def test_native_dice_in_training_is_the_eager_module(rows, h):
    """Batch statistics: output, dx (through the statistics too), dalpha and the running statistics."""
    assert native.available(), native.unavailable_reason()
    eager, fused = _pair(h)
    torch.manual_seed(1)
    x = torch.randn(rows, h) * torch.linspace(0.1, 3.0, h) + torch.linspace(-2.0, 2.0, h)
    g = torch.randn(rows, h)
    want = _run(eager, x, g, use_native=False)
    got = _run(fused, x, g, use_native=True)
    for name, w, o in zip(("out", "dx", "dalpha", "running_mean", "running_var"), want, got, strict=True):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(o, w, rtol=2e-5, atol=2e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    assert int(fused.norm.num_batches_tracked) == int(eager.norm.num_batches_tracked) == 1


def test_native_dice_on_3d_input_and_in_evaluation():
    eager, fused = _pair(16)
    x = torch.randn(8, 5, 16) * 2 + 0.5
    g = torch.randn(8, 5, 16)
    want, got = _run(eager, x, g, False), _run(fused, x, g, True)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-5)
    eager.eval()
    fused.eval()
    with torch.no_grad():
        native.set_enabled(False)
        w = eager(x)
        native.set_enabled(True)
        o = fused(x)
    torch.testing.assert_close(o, w, rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        assert native.dice(x.reshape(-1, 16), fused.alpha, fused.norm) is not None  # native in no-grad evaluation
    with torch.enable_grad():  # evaluation with a gradient wanted: the eager module's
        assert native.dice(x.reshape(-1, 16).requires_grad_(), fused.alpha, fused.norm) is None


def test_native_dice_falls_back_where_it_does_not_apply():
    d = Dice(8)
    d.train()
    one = torch.randn(1, 8)
    assert native.dice(one, d.alpha, d.norm) is None  # one row: running statistics, unchanged (the module's rule)
    before = d.norm.running_mean.clone()
    d(one)
    assert torch.equal(d.norm.running_mean, before)
    assert native.dice(torch.randn(4, 8, dtype=torch.float64), d.alpha, d.norm) is None
    native.set_enabled(False)
    assert native.dice(torch.randn(4, 8), d.alpha, d.norm) is None


def test_native_dice_is_finite_at_extremes_and_on_constant_columns():
    eager, fused = _pair(6)
    x = torch.tensor([[1e3, -1e3, 0.0, 5.0, 1e-30, 88.0], [-1e3, 1e3, 0.0, 5.0, -1e-30, -88.0]] * 4)
    g = torch.ones_like(x)
    want, got = _run(eager, x, g, False), _run(fused, x, g, True)
    for w, o in zip(want, got, strict=True):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-3 * max(1.0, float(w.abs().max())))


def test_native_dice_does_not_depend_on_the_thread_count():
    d = Dice(40)
    x = torch.randn(3000, 40)
    g = torch.randn(3000, 40)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            d.alpha.grad = None
            results.append(_run(d, x, g, True)[:3])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_dins_activation_unit_through_native_dice_is_the_eager_one():
    torch.manual_seed(0)
    b, n, dim = 64, 20, 16
    unit = DinAttention(dim, (80, 40), "dice")
    q, keys = torch.randn(b, dim), torch.randn(b, n, dim)
    mask = torch.arange(n)[None] < torch.randint(0, n + 1, (b,))[:, None]
    outs = []
    for use in (False, True):
        native.set_enabled(use)
        unit.zero_grad()
        qq, kk = q.clone().requires_grad_(), keys.clone().requires_grad_()
        pooled, weights = unit(qq, kk, mask)
        (pooled.square().sum() + weights.sum()).backward()
        grads = [p.grad.clone() for p in unit.parameters()]
        outs.append((pooled.detach(), weights.detach(), qq.grad, kk.grad, *grads))
    for w, o in zip(*outs, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5 * max(1.0, float(w.abs().max())))


@pytest.mark.parametrize("form", ["torch", "paper", "official"])
@pytest.mark.parametrize("b,steps,hd", [(5, 7, 3), (300, 12, 32)])
def test_native_gru_scan_is_the_pytorch_loop(form, b, steps, hd):
    """`gru_scan` in float32 through ctr/native/gru_scan.cpp against its PyTorch loop: states, last state and the
    gradients of the projections, attention, initial state, weight and bias; padded steps keep the state exactly."""
    from ctr.modules.gru_scan import gru_scan

    g = torch.Generator().manual_seed(b + steps)
    lengths = torch.randint(0, steps + 1, (b,), generator=g)
    lengths[0], lengths[-1] = 0, steps
    mask = torch.arange(steps) < lengths.unsqueeze(1)
    gx = torch.randn(b, steps, 3 * hd, generator=g)
    att = torch.rand(b, steps, generator=g) if form != "torch" else None
    h0 = torch.randn(b, hd, generator=g)
    weight = torch.randn(3 * hd, hd, generator=g) * 0.5
    b_c = torch.randn(hd, generator=g) if form != "official" else None
    d_states, d_last = torch.randn(b, steps, hd, generator=g), torch.randn(b, hd, generator=g)
    leaves = [v for v in (gx, att, h0, weight, b_c) if v is not None]
    results = []
    for use in (False, True):
        native.set_enabled(use)
        xs = [v.clone().requires_grad_() for v in leaves]
        it = iter(xs)
        args = [next(it) if v is not None else None for v in (gx, att, h0, weight, b_c)]
        states, last = gru_scan(args[0], args[1], mask, args[2], args[3], args[4], form)
        ((states * d_states).sum() + (last * d_last).sum()).backward()
        results.append((states.detach(), last.detach(), *[x.grad for x in xs]))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(want.abs().max())))
    states = results[1][0]
    assert torch.equal(results[1][1][0], h0[0])  # a row without behaviors ends where it started
    short = int(torch.argmin(lengths[1:-1])) + 1 if b > 2 else None
    if short is not None and 0 < lengths[short] < steps:
        n = int(lengths[short])
        assert torch.equal(states[short, n:], states[short, n - 1].expand(steps - n, -1))


def test_the_virtualenvs_ninja_is_put_on_path_when_none_is(monkeypatch):
    """torch's build runs `ninja` from PATH; an unactivated virtualenv's own (the `ninja` dependency) is added."""
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    native._ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == str(ninja.BIN_DIR)
    assert shutil.which("ninja") is not None


@pytest.mark.parametrize(
    "cpu, ceiling, name",
    [("AVX512", None, "avx512"), ("AVX512", "avx2", "avx2"), ("AVX512", "generic", "generic"), ("AVX2", None, "avx2"),
     ("AVX2", "avx512", "avx2"), ("DEFAULT", None, "generic")],
)  # fmt: skip
def test_the_build_targets_the_instruction_set_torch_dispatches_to_or_the_ceiling(monkeypatch, cpu, ceiling, name):
    """The build's name and flags follow torch's CPU capability (AVX-512 registers in DIN's unit's tiles where torch
    dispatches to AVX-512), never above it, and at most `LIFELONG_CTR_NATIVE_ISA`; an unknown ceiling is refused."""
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: cpu)
    if ceiling is None:
        monkeypatch.delenv(native.ISA_ENV, raising=False)
    else:
        monkeypatch.setenv(native.ISA_ENV, ceiling)
    got, flags = native._build_flags()
    assert got == f"ctr_native_{name}"
    assert ("-mavx512f" in flags) == (name == "avx512") and ("-mavx2" in flags) == (name != "generic")
    monkeypatch.setenv(native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="LIFELONG_CTR_NATIVE_ISA"):
        native._build_flags()


@pytest.mark.parametrize("parts", [1, 2, 3, 64])
def test_the_build_groups_every_source_into_one_unit_per_core(tmp_path, parts):
    """Each source is in exactly one translation unit, included by its own path; one per source where cores allow."""
    import re

    files = native._unity_sources(tmp_path, parts)
    assert len(files) == min(parts, len(native.SOURCES))
    if len(files) == len(native.SOURCES):
        assert sorted(files) == sorted(str(s) for s in native.SOURCES)
        return
    included = [m for f in files for m in re.findall(r'#include "(.+)"', open(f).read())]
    assert sorted(included) == sorted(str(s) for s in native.SOURCES)
    before = [os.stat(f).st_mtime_ns for f in files]
    assert native._unity_sources(tmp_path, parts) == files  # unchanged units are not rewritten (no rebuild)
    assert [os.stat(f).st_mtime_ns for f in files] == before


def _gsu_pair(dk: int, dv: int | None) -> tuple[torch.Tensor, ...]:
    from ctr.modules.gsu import InnerProductGSU

    torch.manual_seed(3)
    gsu = InnerProductGSU(dk, dk, dim=8)
    lengths = torch.tensor([0, 5, 1, 0, 37, 2, 0, 300, 9, 0])  # empty samples first, inside and last; one long
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n, b = int(lengths.sum()), len(lengths)
    target = torch.randn(b, dk, requires_grad=True)
    behaviors = torch.randn(n, dk, requires_grad=True)
    values = None if dv is None else torch.randn(n, dv, requires_grad=True)
    return gsu, target, behaviors, values, offsets


@pytest.mark.parametrize("dv", [None, 6])  # the keys pooled themselves (SIM-soft), or DARE's other tables
def test_native_relevance_pooling_is_the_eager_form(dv):
    """SIM-soft's auxiliary pooling `Σ r_i v_i` natively (one pass each way) against `relevance` + index_add: the
    output and the gradients of the target, the behaviors, the values and the search's two projections."""
    gsu, target, behaviors, values, offsets = _gsu_pair(12, dv)
    assert native.dot_pool(behaviors.detach(), target.detach(), offsets) is not None  # the native path is taken
    inputs = [target, behaviors, *([] if values is None else [values]), *gsu.parameters()]
    g = torch.randn(len(offsets) - 1, 12 if dv is None else dv)
    outs = {}
    for use in (False, True):
        native.set_enabled(use)
        out = gsu.pooled(target, behaviors, offsets, values)
        outs[use] = (out, *torch.autograd.grad(out, inputs, g))
    native.set_enabled(True)
    assert outs[True][0][[0, 3, 6, 9]].abs().max() == 0  # the empty samples pool nothing
    for got, want in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_native_relevance_pooling_does_not_depend_on_the_thread_count():
    gsu, target, behaviors, _, offsets = _gsu_pair(12, None)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out = gsu.pooled(target, behaviors, offsets)
            results.append((out, *torch.autograd.grad(out.sum(), [target, behaviors])))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("queries", ["all", "one"])
@pytest.mark.parametrize("heads, tokens", [(1, 4), (2, 4), (2, 1), (4, 9)])
def test_native_token_attention_matches_scaled_dot_product_attention(heads, tokens, queries):
    """DiffuMIN's self-attention over the C interest tokens natively against its `scaled_dot_product_attention`
    form: the module's output and the gradients of the tokens and both projections, every query or one per row
    (the denoiser's last block), with scores large enough that the softmax is far from uniform."""
    from ctr.modules.diffusion import TokenSelfAttention

    torch.manual_seed(0)
    n, d = 37, 32
    att = TokenSelfAttention(d, heads)
    att.qkv.weight.data.mul_(4.0)
    x = torch.randn(n, tokens, d, requires_grad=True)
    at = torch.randint(0, tokens, (n,)) if queries == "one" else None
    q = torch.nn.functional.linear(x.detach(), att.qkv.weight[:d].detach())
    kv = torch.nn.functional.linear(x.detach(), att.qkv.weight[d:].detach())
    assert native.token_attention(q, kv, heads, 0.5) is not None  # the native path is taken
    probs = torch.softmax(torch.einsum("nid,njd->nij", q[..., : d // heads], kv[..., : d // heads]), -1)
    if tokens > 1:
        assert probs.max() > 0.9  # a peaked softmax, not a near-average
    g = torch.randn(n, tokens if at is None else 1, d)
    outs = {}
    for use in (False, True):
        native.set_enabled(use)
        out = att(x, at)
        outs[use] = (out, *torch.autograd.grad(out, [x, att.qkv.weight, att.out.weight], g))
    native.set_enabled(True)
    for got, want in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_native_token_attention_does_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    q = torch.randn(700, 4, 32, requires_grad=True)
    kv = torch.randn(700, 4, 64, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            out = native.token_attention(q, kv, 2, 0.25)
            assert out is not None
            results.append((out, *torch.autograd.grad(out.square().sum(), [q, kv])))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _jagged_scores(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued scores (ties everywhere), some -0.0, -inf and NaN; empty, short and long samples."""
    from ctr.modules.gsu import lengths_to_offsets

    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 3, 40, 0, 7, 1000, 2, 64, 5])
    n = int(lengths.sum())
    scores = torch.randint(-4, 5, (n,), generator=g).float()
    scores[torch.rand(n, generator=g) < 0.1] = -0.0
    scores[torch.rand(n, generator=g) < 0.05] = float("-inf")
    scores[torch.rand(n, generator=g) < 0.05] = float("nan")
    return scores, lengths_to_offsets(lengths)


@pytest.mark.parametrize("k", [1, 5, 64, 1500])
def test_native_jagged_topk_equals_both_pytorch_forms_exactly(k):
    """The GSU's selection natively against the padded and the jagged PyTorch top-K: the same positions and the same
    score bits (ties to the later position, -0.0 kept, -inf and NaN never selected, K above every length)."""
    from kernels.reference.gsu_topk import jagged_topk_newest_first, topk_newest_first

    scores, offsets = _jagged_scores(k)
    masked = torch.where(torch.isnan(scores), float("-inf"), scores)
    got = native.jagged_topk(scores, offsets, k)
    assert got is not None
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    padded = torch.full((len(lengths), max(max(lengths), k)), float("-inf"))
    for b, n in enumerate(lengths):
        padded[b, :n] = masked[int(offsets[b]) : int(offsets[b]) + n]
    for want in (jagged_topk_newest_first(masked, offsets, k), topk_newest_first(padded, k)):
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1].view(torch.int32), want[1].view(torch.int32))
    assert int((got[0] >= 0).sum()) > 0 and bool((got[0] == -1).any())
    # two columns ranked apart: each column as its own call
    two = torch.stack([scores, -scores], 1)
    pos2, val2 = native.jagged_topk(two, offsets, k)
    for h in range(2):
        pos1, val1 = native.jagged_topk(two[:, h].contiguous(), offsets, k)
        assert torch.equal(pos2[:, h], pos1) and torch.equal(val2[:, h].view(torch.int32), val1.view(torch.int32))


def test_searches_take_the_native_selection_with_the_same_result(monkeypatch):
    """`ctr.modules.gsu.gsu_topk` (every search) hands its selection to the native op on the CPU, and its result is
    `kernels.gsu_topk`'s without it; the readable reference asked for by name never takes it."""
    import kernels
    from ctr.modules.gsu import gsu_topk

    scores, offsets = _jagged_scores(11)
    vectors = torch.stack([scores, torch.ones_like(scores)], 1)
    target = torch.tensor([[1.0, 0.5]]).expand(len(offsets) - 1, 2).contiguous()
    calls = []
    real = native.jagged_topk
    monkeypatch.setattr(native, "jagged_topk", lambda *a: calls.append(1) or real(*a))
    got = gsu_topk(offsets, 9, mode="dot", target=target, behavior_vectors=vectors)
    assert calls
    want = kernels.gsu_topk(offsets, 9, mode="dot", target=target, behavior_vectors=vectors)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    calls.clear()
    gsu_topk(offsets, 9, mode="dot", target=target, behavior_vectors=vectors, backend="reference")
    assert not calls


def test_native_jagged_topk_does_not_depend_on_the_thread_count():
    scores, offsets = _jagged_scores(5)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 3):
            torch.set_num_threads(t)
            results.append(native.jagged_topk(scores, offsets, 17))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("mode", ["dot", "cosine"])
@pytest.mark.parametrize("source", ["table", "jagged"])
@pytest.mark.parametrize("lengths", [[0, 5, 0, 37, 1], [900, 3, 2500, 0], []])
def test_native_gather_dot_scores_equal_the_reference(mode, source, lengths):
    """The GSU's scores with the fused gather-and-dot (`gsu_scores_cpu`'s ``dot_fn``) equal the readable reference
    within float rounding: table rows by id or per-behavior vectors, empty samples, a zero vector under cosine
    (with and without ``zero_vector_score``)."""
    from ctr.modules.gsu import lengths_to_offsets
    from kernels.reference.gsu_topk import gsu_scores_cpu, gsu_scores_reference

    g = torch.Generator().manual_seed(len(lengths))
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    total, batch, dim = int(offsets[-1]), len(lengths), 37  # a width off the 8-lane blocks
    n = 50 if source == "table" else total
    vectors = torch.randn(n, dim, generator=g) * 3
    if n > 2:
        vectors[1] = 0
    ids = torch.randint(0, n, (total,), generator=g) if source == "table" and n else None
    if ids is not None and total:
        ids[0] = 1
    target = torch.randn(batch, dim, generator=g)
    calls = []

    def dot_fn(*a):
        calls.append(1)
        return native.gather_dot(*a)

    for zero in [None, -1.1] if mode == "cosine" else [None]:
        args = (offsets, mode, target, ids, vectors)
        want = gsu_scores_reference(*args, zero_vector_score=zero)
        got = gsu_scores_cpu(*args, zero_vector_score=zero, dot_fn=dot_fn)
        assert got.dtype == torch.float32 and got.shape == (total,)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert calls


def test_native_gather_dot_checks_ids_and_thread_count():
    from ctr.modules.gsu import lengths_to_offsets

    g = torch.Generator().manual_seed(0)
    offsets = lengths_to_offsets(torch.tensor([3000, 1, 0, 4000]))
    table, query = torch.randn(100, 64, generator=g), torch.randn(4, 64, generator=g)
    ids = torch.randint(0, 100, (7001,), generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 3):
            torch.set_num_threads(t)
            results.append(native.gather_dot(table, ids, query, offsets, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    bad = ids.clone()
    bad[5] = 100
    with pytest.raises(RuntimeError, match="id 100 at behavior 5 is outside the table's 100 rows"):
        native.gather_dot(table, bad, query, offsets, False)


@pytest.mark.parametrize("shape", [(37, 50, 32), (5, 2, 8), (4, 1, 8), (0, 6, 8), (3, 7, 12)])
def test_next_dots_is_the_eager_form(shape):
    """DIEN's auxiliary dots (`ctr.modules.augru.next_dots`) natively: each state against the next clicked and next
    sampled behavior, the same values (to the sums' rounding) and the same three gradients as the sliced products."""
    from ctr.modules.augru import next_dots

    torch.manual_seed(0)
    blocks = [torch.randn(*shape) for _ in range(3)]
    b, length = shape[0], shape[1]
    grads = [torch.randn(b, length - 1), torch.randn(b, length - 1)]
    runs = []
    for on in (True, False):
        native.set_enabled(on)
        leaves = [x.clone().requires_grad_() for x in blocks]
        pos, neg = next_dots(*leaves)
        assert pos.shape == neg.shape == (b, length - 1)
        ((pos * grads[0]).sum() + (neg * grads[1]).sum()).backward()
        runs.append(([pos.detach(), neg.detach()], [x.grad for x in leaves]))
    (out, g), (out_eager, g_eager) = runs
    for a, e in zip(out, out_eager, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for a, e in zip(g, g_eager, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same products, the same sums


def test_next_dots_falls_back_where_it_does_not_apply():
    native.set_enabled(True)
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    assert native.next_dots(h, h, h) is None  # not float32
    assert native.next_dots(h.float(), h.float()[:, :3], h.float()) is None  # shapes differ
