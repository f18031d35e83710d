"""DiffuMIN (ctr/models/diffumin.py): OMIE's orthonormal channels, routing and per-channel selection against brute
force with ties, no look-ahead on real batches, a deterministic evaluation, the diffusion sampler, and each loss
term decreasing on the tiny world."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from model_helpers import batches, build, loss_of, subset  # noqa: E402

from ctr.models.diffumin import encode_first_token  # noqa: E402
from ctr.modules.diffusion import DMIG  # noqa: E402
from ctr.modules.gsu import lengths_to_offsets  # noqa: E402
from ctr.modules.multi_interest import (  # noqa: E402
    orthonormal_rows,
    orthonormal_rows_qr,
    route,
    select_by_channel,
    select_per_channel,
    select_routed_sorted,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_orthonormal_rows_match_qr():
    p = torch.randn(16, 4, 32, dtype=torch.float64)
    o = orthonormal_rows(p)
    eye = torch.eye(4, dtype=torch.float64).expand(16, 4, 4)
    torch.testing.assert_close(o @ o.transpose(1, 2), eye)
    torch.testing.assert_close(o, orthonormal_rows_qr(p))
    # the span is the projections': each row c is a combination of rows 0..c (R is triangular)
    coef = torch.linalg.lstsq(p.transpose(1, 2), o.transpose(1, 2)).solution  # [16, 4, 4]
    assert coef.tril(-1).abs().max() < 1e-8


def brute_force(lengths, behaviors, channels, cap, p, mode):
    """Per sample and channel, the selected positions by the definitions (ties: higher A, then most recent)."""
    out, start = [], 0
    for b, n in enumerate(lengths.tolist()):
        e = behaviors[start : start + n]
        a = e @ channels[b].T  # [n, C]
        route = [int(torch.argmax(a[i])) for i in range(n)]  # first maximum on ties
        per = []
        for c in range(channels.shape[1]):
            cand = [i for i in range(n) if route[i] == c] if mode == "paper" else list(range(n))
            cand.sort(key=lambda i: (-float(a[i, c]), -i))
            if mode == "paper":
                per.append(cand[: min(cap, math.ceil(p * len(cand)))])
            else:
                per.append([i for i in cand[:cap] if route[i] == c])
        out.append(per)
        start += n
    return out


@pytest.mark.parametrize("lengths", [[0, 1, 5, 17, 40, 9], [0, 1, 900, 2000, 5, 3000]])
@pytest.mark.parametrize("mode, p, cap", [("paper", 0.5, 3), ("paper", 1.0, 50), ("paper", 0.3, 2), ("code", 0.5, 4)])
def test_selection_matches_brute_force_with_ties(mode, p, cap, lengths):
    """Integer-valued vectors make equal scores and equal routes common: the ties resolve as documented. The long
    batch takes the CPU's per-sample routing and scoring (`SEGMENT_MIN_WORK`), the short one the vectorized form."""
    from kernels.reference.gsu_topk import SEGMENT_MIN_WORK

    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor(lengths)
    dim = 16
    assert (int(lengths.sum()) * dim >= SEGMENT_MIN_WORK * len(lengths)) == (int(lengths.max()) > 100)
    behaviors = torch.randint(-2, 3, (int(lengths.sum()), dim), generator=g).float()
    channels = torch.randint(-1, 2, (len(lengths), 3, dim), generator=g).float()
    sel, n_routed = select_per_channel(
        lengths_to_offsets(lengths), behaviors, channels, cap=cap, p=p, mode=mode, backend="reference"
    )
    want = brute_force(lengths, behaviors, channels, cap, p, mode)
    offsets = lengths_to_offsets(lengths)
    a, routed = route(behaviors, channels, torch.repeat_interleave(torch.arange(len(lengths)), lengths), offsets)
    # select_per_channel takes the one-sort form for the paper's selection on the CPU: the per-channel one too
    by_channel = select_by_channel(a, routed, offsets, n_routed, cap, p, mode, backend="reference")
    for got_sel in (sel, by_channel):
        pos = got_sel.positions.view(len(lengths), 3, cap)
        for b in range(len(lengths)):
            for c in range(3):
                got = [int(x) for x in pos[b, c] if x >= 0]
                assert got == want[b][c], (b, c, got, want[b][c])
    assert n_routed.sum().item() == int(lengths.sum())


@pytest.mark.parametrize("cap, p", [(1, 0.5), (3, 0.5), (7, 1.0), (40, 0.25)])
def test_one_sort_selection_equals_per_channel_bit_for_bit(cap, p):
    """`select_routed_sorted` (the CPU's paper selection) gives `select_by_channel`'s positions and scores exactly:
    ties (integer scores, -0.0 against 0.0), NaN scores (never selected), empty samples, groups under and over the
    cap, a long sample (the padded and the jagged top-K of gsu_topk both behind the per-channel form)."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([0, 1, 2, 13, 0, 60, 7, 300, 5])
    n, c = int(lengths.sum()), 4
    offsets = lengths_to_offsets(lengths)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    a = torch.randint(-3, 4, (n, c), generator=g).float()
    a[torch.rand(n, c, generator=g) < 0.1] = -0.0
    a[torch.rand(n, c, generator=g) < 0.03] = float("nan")
    routed = torch.randint(0, c, (n,), generator=g)
    n_routed = torch.bincount(sample * c + routed, minlength=len(lengths) * c).view(-1, c)
    want = select_by_channel(a, routed, offsets, n_routed, cap, p, "paper", backend="reference")
    got = select_routed_sorted(a, routed, sample, offsets, n_routed, cap, p)
    assert torch.equal(got.positions, want.positions)
    assert torch.equal(got.scores.view(torch.int32), want.scores.view(torch.int32))  # the sign of -0.0 too
    assert int((want.positions >= 0).sum()) > len(lengths)  # something was selected
    nan_rows = torch.isnan(a.gather(1, routed.unsqueeze(1)).squeeze(1)).nonzero().squeeze(1)
    assert nan_rows.numel() > 0
    rows = got.rows(offsets)[got.mask]
    assert not set(nan_rows.tolist()) & set(rows.tolist())


def test_selection_on_real_batches_has_no_look_ahead(info):
    """Every selected behavior is a real position of the sample's prefix, strictly before it (ts gap > 0), routed
    to the channel whose block holds it, and no behavior is selected twice (routing is exclusive)."""
    model = build(info, "diffumin").eval()
    batch = batches(info, model, 1)[0]
    with torch.no_grad():
        sel, offsets = model.select(batch)
        emb = model.embed(batch.sparse.to_dict())
        channels = model.channels_of(model.pair(emb, ""))
        behaviors = model.pair(emb, "long_")
    lengths = batch.dense["long_lengths"]
    c, cap = model.p.channels, model.p.per_channel
    assert sel.positions.shape == (batch.size, c * cap)
    pos, mask = sel.positions, sel.mask
    assert ((pos < lengths.unsqueeze(1)) | ~mask).all()
    rows = sel.rows(offsets)
    assert (batch.dense["long_ts_gap"][rows][mask] > 0).all()
    sample = torch.repeat_interleave(torch.arange(batch.size), lengths)
    route = torch.einsum("nd,ncd->nc", behaviors, channels[sample]).argmax(-1)
    block = torch.arange(c * cap).div(cap, rounding_mode="floor").expand(batch.size, -1)
    assert (route[rows][mask] == block[mask]).all()
    for b in range(batch.size):
        p = pos[b][mask[b]].tolist()
        assert len(set(p)) == len(p)
    assert int(mask.sum()) > 0 and int(lengths.max()) > cap


def test_eval_is_deterministic_and_per_sample(info):
    model = build(info, "diffumin")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in batches(info, model, 2):
        loss = loss_of(model, model.train()(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = batches(info, model, 3)[2]
    with torch.no_grad():
        full = model(batch).logit
        torch.testing.assert_close(model(batch).logit, full, rtol=0, atol=0)  # the sampler is deterministic
        rows = torch.argsort(batch.dense["long_lengths"])[:12]
        torch.testing.assert_close(model(subset(batch, rows)).logit, full[rows], rtol=1e-5, atol=1e-5)


def test_sampler_schedule_and_randomness():
    dmig = DMIG(8, steps=10, t0=50)
    ts = dmig.schedule()
    assert ts[0] == 50 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    r = torch.nn.functional.normalize(torch.randn(5, 3, 8), dim=-1)
    o = torch.randn(5, 3, 8)
    dmig.eval()
    torch.testing.assert_close(dmig(r, o), dmig(r, o), rtol=0, atol=0)
    dmig.train()
    assert not torch.equal(dmig(r, o), dmig(r, o))  # training samples with noise
    code = DMIG(8, mode="code").eval()
    assert not torch.equal(code(r, o), code(r, o))  # the release samples at evaluation too
    with pytest.raises(ValueError):
        DMIG(8, steps=10, t0=5)


@pytest.mark.parametrize("layers", [1, 2])
def test_denoiser_at_one_token_is_the_whole_output_there(layers):
    """The channel-folded denoiser call computes only the token each copy reads in its last block: the same value
    and the same gradients (inputs and every weight) as the whole output's diagonal, the readable form."""
    torch.manual_seed(0)
    dmig = DMIG(8, layers=layers)
    b, c, d = 6, 3, 8
    r = torch.nn.functional.normalize(torch.randn(b, c, d), dim=-1).requires_grad_()
    o, x = torch.randn(b, c, d, requires_grad=True), torch.randn(b, c, d, requires_grad=True)
    t = torch.randint(0, dmig.timesteps, (b, c))
    eye = torch.eye(c, dtype=torch.bool)
    tokens = torch.where(eye.view(1, c, c, 1), x.unsqueeze(2), r.unsqueeze(1)).reshape(b * c, c, d)
    whole = dmig.denoiser(tokens, t.reshape(-1), o.reshape(b * c, d))  # every token of every copy
    reference = whole.view(b, c, c, d).diagonal(dim1=1, dim2=2).transpose(1, 2)
    fast = dmig.predict(x, r, o, t)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    g = torch.randn(b, c, d)
    inputs = [r, o, x, *dmig.parameters()]
    fast_grads = torch.autograd.grad(fast, inputs, g, allow_unused=True)
    ref_grads = torch.autograd.grad(reference, inputs, g, allow_unused=True)
    for got, want in zip(fast_grads, ref_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_short_branch_first_token_equals_the_whole_encoder(layers, training):
    """`encode_first_token` (the last layer computes token 0's output alone) equals the stock encoder's output at
    token 0, and so do the gradients of the tokens and of every parameter; empty and full short windows included."""
    torch.manual_seed(0)
    d, s = 32, 12
    layer = torch.nn.TransformerEncoderLayer(d, 2, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).double().train(training)
    tokens = torch.randn(9, s + 1, d, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([0, 1, 2, 3, 12, 5, 6, 7, 11])
    pad = torch.cat([torch.zeros(9, 1, dtype=torch.bool), torch.arange(s) >= lengths[:, None]], 1)
    want, got = enc(tokens, src_key_padding_mask=pad)[:, 0], encode_first_token(enc, tokens, pad)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn_like(want)
    inputs = [tokens, *enc.parameters()]
    grads_got = torch.autograd.grad((got * w).sum(), inputs)
    for g_got, g_want in zip(grads_got, torch.autograd.grad((want * w).sum(), inputs), strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)
    with torch.no_grad():  # evaluation: the first layers may take PyTorch's fused inference path
        torch.testing.assert_close(encode_first_token(enc, tokens, pad), want.detach(), rtol=0, atol=1e-10)


def test_each_loss_term_decreases(info):
    """CTR, diffusion and contrastive terms each lower after training on the tiny world; the ablation (weights 0)
    has the CTR term only."""
    model = build(info, "diffumin", diffusion_weight=1.0, contrastive_weight=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history: dict[str, list[float]] = {}
    for batch in batches(info, model, 30):
        terms = model.loss(model.train()(batch), batch)
        for k, v in terms.items():
            history.setdefault(k, []).append(float(v.detach()))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    assert set(history) == {"ctr", "diffusion", "contrastive"}
    for k, values in history.items():
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < first, (k, first, last)
    ablation = build(info, "diffumin", diffusion_weight=0.0, contrastive_weight=0.0)
    batch = batches(info, ablation, 1)[0]
    assert set(ablation.loss(ablation.train()(batch), batch)) == {"ctr"}


def test_refusals(info):
    from ctr.models import get_model_class

    with pytest.raises(ValueError, match="LAIN or DARE"):
        get_model_class("diffumin").Params(dare=True)
    with pytest.raises(ValueError, match="channels"):
        build(info, "diffumin", channels=64)


def test_native_and_eager_interests_give_the_same_loss_and_gradients(info):
    """The interests' pooling Σ_k <e_k, o_c> e_k natively (`ctr.native.dot_pool`, empty slots zero vectors) and
    eagerly (masked elementwise products): the same loss and parameter gradients within float rounding."""
    from ctr import native

    model = build(info, "diffumin").train()
    batch = batches(info, model, 1)[0]
    results = []
    for on in (True, False):
        native.set_enabled(on)
        try:
            model.zero_grad()
            torch.manual_seed(5)  # the diffusion loss and the sampler draw noise
            loss = loss_of(model, model(batch), batch)
            loss.backward()
            results.append(
                (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            )
        finally:
            native.set_enabled(True)
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and "project.weight" in g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-5, msg=name)
