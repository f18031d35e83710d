"""The models (sum_pool, DIN, DIEN) and their blocks (DIN attention, bilinear attention, GRU extractor, AUGRU).

Data: the session's tiny synthetic dataset (`tiny_data` in conftest.py: preset tiny, seed 0, built once); set
``CTR_TEST_MODELS_DATA`` to a built dataset directory to skip the build while iterating. Torch runs on one thread
here: on a small shared CPU, oversubscribed intra-op threads make these small ops many times slower.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import STEPS, aux_of, batches, build, check_narrow_attention_tables, loss_of, subset  # noqa: E402

from ctr.models import get_model_class
from ctr.modules.activations import make_activation
from ctr.modules.attention import BilinearAttention, DienDinAttention, DinAttention
from ctr.modules.augru import AUGRU, InterestExtractor
from features.loader import Batch

pytestmark = pytest.mark.usefixtures("one_thread")

# tests/conftest.py puts tests/ on sys.path, where tests/kernels would shadow the `kernels` package as a namespace
# package under a plain `pytest` (no repository root on sys.path); a regular package anywhere on the path wins.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None) is None:
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]


# ---- models end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sum_pool", "din", "dien", "tin"])
def test_training_loss_decreases(info, name):
    model = build(info, name)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches(info, model):
        out = model(batch)
        assert out.logit.shape == (batch.size,) and torch.isfinite(out.logit).all()
        aux = aux_of(model, out, batch)
        if name == "dien":
            assert aux is not None and aux.dim() == 0 and aux.item() > 0
        else:
            assert aux is None
        loss = loss_of(model, out, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.02, (first, last)


@pytest.mark.parametrize(
    "name, params",
    [
        ("din", {"softmax": True, "attention_activation": "sigmoid", "item_bias": True, "input_batch_norm": True}),
        ("din", {"attention_activation": "prelu", "activation": "prelu", "backend": "auto"}),
        ("dien", {"attention": "din", "augru": "official", "aux_net": "mlp"}),
        ("dien", {"aux_net": "mlp", "gru_hidden": 24, "input_batch_norm": True}),
        ("tin", {"encoding": "position", "item_bias": True, "input_batch_norm": True}),
    ],
)
def test_variants_run(info, name, params):
    """The official-code options build, train a few steps and give finite outputs."""
    model = build(info, name, **params)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in batches(info, model, 3):
        out = model(batch)
        loss = loss_of(model, out, batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model(batch)
    assert out.logit.shape == (batch.size,) and torch.isfinite(out.logit).all() and not out.extras


@pytest.mark.parametrize(
    "name, params", [("sum_pool", {}), ("din", {}), ("din", {"softmax": True}), ("din", {"backend": "auto"}),
                     ("dien", {}), ("dien", {"attention": "din", "augru": "official"}),
                     ("dien", {"sum_pooling": False, "aux_alpha": 0.0}), ("tin", {}),
                     ("tin", {"encoding": "position"})],
)  # fmt: skip
def test_eval_and_padding_invariance(info, name, params):
    """eval() works, is deterministic and per-sample: the short histories give the same logits when they are
    padded to the batch's longest history (within the full batch) as when padded only to their own."""
    model = build(info, name, **params)
    # a few training steps first, so Dice / BatchNorm running statistics are not at their initial values
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in batches(info, model, 3):
        loss = loss_of(model, model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = batches(info, model, 4)[3]
    with torch.no_grad():
        full = model(batch)
        again = model(batch)
    assert aux_of(model, full, batch) is None
    assert full.logit.shape == (batch.size,)
    torch.testing.assert_close(full.logit, again.logit, rtol=0, atol=0)

    lengths = batch.dense["hist_lengths"]
    rows = torch.argsort(lengths)[:16]
    assert int(lengths[rows].max()) < int(lengths.max()), "the batch needs histories shorter than its longest"
    with torch.no_grad():
        part = model(subset(batch, rows))
    torch.testing.assert_close(part.logit, full.logit[rows], rtol=1e-5, atol=1e-5)


def test_models_do_not_read_p_true(info):
    for name in ("sum_pool", "din", "dien", "tin"):
        model = build(info, name).eval()
        batch = batches(info, model, 1)[0]
        assert "p_true" in batch.dense
        dense = {k: v for k, v in batch.dense.items() if k != "p_true"}
        with torch.no_grad():
            a = model(batch).logit
            b = model(Batch(sparse=batch.sparse, dense=dense, size=batch.size)).logit
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_din_softmax_flag_changes_behavior(info):
    raw = build(info, "din", softmax=False).eval()
    soft = build(info, "din", softmax=True).eval()
    soft.load_state_dict(raw.state_dict())  # same parameters, only the weighting differs
    batch = batches(info, raw, 1)[0]
    with torch.no_grad():
        assert not torch.allclose(raw(batch).logit, soft(batch).logit)

    torch.manual_seed(1)
    keys, query = torch.randn(4, 7, 6), torch.randn(4, 6)
    mask = torch.arange(7) < torch.tensor([7, 3, 1, 0]).unsqueeze(1)
    att = DinAttention(6, [8, 4], "sigmoid", softmax=False)
    _, w_raw = att(query, keys, mask)
    att.softmax = True
    _, w_soft = att(query, keys, mask)
    torch.testing.assert_close(w_soft.sum(1), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # raw weights are the activation unit's scores, not normalized; softmax(scores / sqrt(D)) otherwise
    scores = att.scores(query, keys, mask)
    torch.testing.assert_close(w_raw, scores * mask)
    expect = torch.softmax((scores / 6**0.5).masked_fill(~mask, -torch.inf), 1)[:3]
    torch.testing.assert_close(w_soft[:3], expect)
    assert (w_raw[~mask] == 0).all() and (w_soft[~mask] == 0).all()


@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
def test_din_scores_equal_the_readable_unit(activation):
    """`DinAttention.scores` (first layer split by input block, flat-index gather) is `unit` on the real rows:
    the scores, their gradients and Dice's running statistics."""
    torch.manual_seed(0)
    fast = DinAttention(6, [8, 4], activation).double().train()
    if activation == "dice":
        for act in fast.acts:
            act.alpha.data.normal_()
    ref = copy.deepcopy(fast)
    query, keys = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 7, 6, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor([7, 3, 1, 0, 5]).unsqueeze(1)
    q1, k1 = query.clone().requires_grad_(), keys.clone().requires_grad_()
    q2, k2 = query.clone().requires_grad_(), keys.clone().requires_grad_()
    got = fast.scores(q1, k1, mask)
    expect = torch.zeros(5, 7, dtype=torch.float64).masked_scatter(
        mask, ref.unit(q2.unsqueeze(1).expand(5, 7, 6)[mask], k2[mask])
    )
    torch.testing.assert_close(got, expect)
    assert (got[~mask] == 0).all()
    g = torch.randn(5, 7, dtype=torch.float64)
    (got * g).sum().backward()
    (expect * g).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(k1.grad, k2.grad)
    for (name, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    none = torch.zeros(5, 7, dtype=torch.bool)
    assert (fast.scores(query, keys, none) == 0).all()


def test_dice_is_its_formula():
    """Dice in the form it is computed (x·(α + p(1 − α))) is the paper's p·x + (1 − p)·α·x."""
    torch.manual_seed(0)
    act = make_activation("dice", 5).double().train()
    act.alpha.data.normal_()
    x = torch.randn(40, 5, dtype=torch.float64)
    p = torch.sigmoid((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-8))
    torch.testing.assert_close(act(x), p * x + (1 - p) * act.alpha * x)


def test_dien_aux_loss_only_in_training(info):
    model = build(info, "dien")
    batch = batches(info, model, 1)[0]
    aux = aux_of(model, model.train()(batch), batch)
    assert aux is not None and aux.item() > 0 and aux.requires_grad
    # at start the embeddings are tiny, so h_t . e ~ 0 and each pair costs about 2 log 2
    assert abs(aux.item() - 2 * torch.log(torch.tensor(2.0)).item()) < 0.1
    assert aux_of(model, model.eval()(batch), batch) is None
    off = build(info, "dien", aux_alpha=0.0)
    assert aux_of(off, off.train()(batch), batch) is None
    half_model = build(info, "dien", aux_alpha=0.5)
    half = aux_of(half_model, half_model.train()(batch), batch)
    torch.testing.assert_close(half, 0.5 * aux)
    assert set(model.loss(model.train()(batch), batch)) == {"ctr", "aux"}


def test_dien_tower_without_sum_pooling(info):
    """sum_pooling: false (FuxiCTR's DIEN): the tower reads [e_a; h'_T; context], 2 x 2d fewer inputs."""
    with_sum, without = build(info, "dien"), build(info, "dien", sum_pooling=False)
    width = 2 * with_sum.dim
    first = [m for m in with_sum.tower.modules() if isinstance(m, torch.nn.Linear)][0]
    first_without = [m for m in without.tower.modules() if isinstance(m, torch.nn.Linear)][0]
    assert first.in_features - first_without.in_features == 2 * width
    batch = batches(info, without, 1)[0]
    emb = without.lookup(batch)
    target = torch.zeros(batch.size, width)
    beh = torch.randn(batch.size, 7, width)
    final = torch.randn(batch.size, without.augru.hidden_dim)
    x = without.tower_input(emb, target, beh, final)
    torch.testing.assert_close(x, without.tower_input(emb, target, beh * 3.0, final))  # no behavior sum in it
    assert x.shape[1] == first_without.in_features


def test_dien_dot_aux_needs_matching_width():
    cls = get_model_class("dien")
    with pytest.raises(ValueError, match="gru_hidden"):
        cls.Params(embedding_dim=8, gru_hidden=12)
    cls.Params(embedding_dim=8, gru_hidden=16)
    cls.Params(embedding_dim=8, gru_hidden=12, aux_net="mlp")


def test_dien_aux_loss_matches_the_formula():
    """L_aux = mean over real (t, t+1) of -log σ(h_t·e_{t+1}) - log(1 - σ(h_t·ê_{t+1}))."""
    torch.manual_seed(0)
    h, e, n = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    lengths = [5, 2, 0]
    mask = torch.arange(5) < torch.tensor(lengths).unsqueeze(1)
    terms = []
    for b, length in enumerate(lengths):
        for t in range(length - 1):
            terms.append(-F.logsigmoid(h[b, t] @ e[b, t + 1]) - torch.log1p(-torch.sigmoid(h[b, t] @ n[b, t + 1])))
    expect = torch.stack(terms).mean()
    model = get_model_class("dien").auxiliary_loss
    fake = type("M", (), {"aux_mlp": None})()
    torch.testing.assert_close(model(fake, h, e, n, mask), expect)


# ---- DIN attention: module vs fused kernel -----------------------------------------------------------------------


def _jagged(keys: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = torch.arange(keys.shape[1]) < lengths.unsqueeze(1)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return keys[mask], offsets, mask


@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_din_attention_kernel_matches_module(activation, softmax, training):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 0, 3, 7, 1, 7])
    module = DinAttention(6, [8, 4], activation, softmax=softmax).double()
    if activation == "dice":  # non-trivial running statistics for eval mode
        for act in module.acts:
            act.norm.running_mean.normal_()
            act.norm.running_var.uniform_(0.5, 1.5)
            act.alpha.data.normal_()
    kernel = copy.deepcopy(module)
    module.train(training)
    kernel.train(training)
    query = torch.randn(6, 6, dtype=torch.float64)
    keys = torch.randn(6, 7, 6, dtype=torch.float64)
    flat, offsets, mask = _jagged(keys, lengths)

    q1, k1 = query.clone().requires_grad_(), keys.clone().requires_grad_()
    out_m, _ = module(q1, k1, mask)
    q2, k2 = query.clone().requires_grad_(), flat.clone().requires_grad_()
    out_k = kernel.forward_jagged(q2, k2, offsets, backend="reference")
    torch.testing.assert_close(out_k, out_m)

    grad = torch.randn_like(out_m)
    out_m.backward(grad)
    out_k.backward(grad)
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(k2.grad, k1.grad[mask])
    for (name, p_m), p_k in zip(module.named_parameters(), kernel.parameters(), strict=True):
        torch.testing.assert_close(p_k.grad, p_m.grad, msg=name)
    for (name, b_m), b_k in zip(module.named_buffers(), kernel.buffers(), strict=True):
        if b_m.is_floating_point():  # Dice's running statistics move the same way
            torch.testing.assert_close(b_k, b_m, msg=name)


def test_din_kernel_backend_matches_module_backend(info):
    module = build(info, "din")
    kernel = build(info, "din", backend="auto")
    kernel.load_state_dict(module.state_dict())
    batch = batches(info, module, 1)[0]
    for train in (True, False):
        module.train(train)
        kernel.train(train)
        out_m, out_k = module(batch).logit, kernel(batch).logit
        torch.testing.assert_close(out_k, out_m, rtol=1e-5, atol=1e-5)
        if train:
            out_m.sum().backward()
            out_k.sum().backward()
            # float32 sums over ~10k behaviors (Dice's batch statistics): compare relative to each gradient's scale;
            # the float64 test above checks the kernel exactly
            for (name, p_m), p_k in zip(module.named_parameters(), kernel.parameters(), strict=True):
                scale = p_m.grad.abs().max().item()
                torch.testing.assert_close(p_k.grad, p_m.grad, rtol=1e-3, atol=1e-3 * scale + 1e-7, msg=name)


# ---- DIEN blocks -------------------------------------------------------------------------------------------------


def test_bilinear_attention_is_a_masked_softmax():
    torch.manual_seed(0)
    att = BilinearAttention(6, 4)
    keys, query = torch.randn(3, 5, 4), torch.randn(3, 6)
    mask = torch.arange(5) < torch.tensor([5, 2, 0]).unsqueeze(1)
    pooled, w = att(query, keys, mask)
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 1.0, 0.0]))
    assert (w[~mask] == 0).all()
    expect = torch.softmax(keys[1, :2] @ att.proj.weight @ query[1], 0)
    torch.testing.assert_close(w[1, :2], expect)
    torch.testing.assert_close(pooled[2], torch.zeros(4))

    din = DienDinAttention(6, 4)
    _, w2 = din(query, keys, mask)
    torch.testing.assert_close(w2.sum(1), torch.tensor([1.0, 1.0, 0.0]))
    assert (w2[~mask] == 0).all()


def test_interest_extractor_ignores_padding():
    torch.manual_seed(0)
    gru = InterestExtractor(4, 6)
    x = torch.randn(3, 5, 4)
    mask = torch.arange(5) < torch.tensor([5, 2, 0]).unsqueeze(1)
    noisy = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 10)
    a, b = gru(x, mask), gru(noisy, mask)
    torch.testing.assert_close(a, b)
    assert (a[~mask] == 0).all()
    torch.testing.assert_close(a[1, :2], gru(x[1:2, :2], mask[1:2, :2])[0])


@pytest.mark.parametrize("form", ["paper", "official"])
def test_augru_state_is_kept_past_the_length(form):
    torch.manual_seed(0)
    cell = AUGRU(4, 6, form=form)
    x, att = torch.randn(3, 5, 4), torch.rand(3, 5)
    lengths = torch.tensor([5, 2, 0])
    mask = torch.arange(5) < lengths.unsqueeze(1)
    h0 = torch.randn(3, 6)
    states, final = cell(x, att, mask, h0)
    assert states.shape == (3, 5, 6) and final.shape == (3, 6)
    # padded inputs and attention do not matter
    noisy_x = torch.where(mask.unsqueeze(-1), x, torch.randn_like(x) * 10)
    noisy_a = torch.where(mask, att, torch.rand_like(att))
    states2, final2 = cell(noisy_x, noisy_a, mask, h0)
    torch.testing.assert_close(states2, states)
    torch.testing.assert_close(final2, final)
    # the final state is the state at the last real position, and equals running the unpadded row alone
    torch.testing.assert_close(final[1], states[1, 1])
    torch.testing.assert_close(states[1, 2:], states[1, 1].expand(3, 6))
    torch.testing.assert_close(final[2], h0[2])
    _, alone = cell(x[1:2, :2], att[1:2, :2], mask[1:2, :2], h0[1:2])
    torch.testing.assert_close(alone[0], final[1])


def test_augru_zero_attention_keeps_the_initial_state():
    torch.manual_seed(0)
    x, mask = torch.randn(4, 6, 5), torch.ones(4, 6, dtype=torch.bool)
    h0 = torch.randn(4, 3)
    paper = AUGRU(5, 3, form="paper")
    states, final = paper(x, torch.zeros(4, 6), mask, h0)
    torch.testing.assert_close(final, h0)
    torch.testing.assert_close(states, h0.unsqueeze(1).expand(4, 6, 3))
    # attention 1 is a plain GRU step (PyTorch's convention, same parameters)
    gru = torch.nn.GRU(5, 3, batch_first=True)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(paper.x2h.weight)
        gru.bias_ih_l0.copy_(paper.x2h.bias)
        gru.weight_hh_l0.copy_(paper.h2h.weight)
        gru.bias_hh_l0.zero_()
    # PyTorch's GRU gate order is (r, z, n) with h' = (1 - z) n + z h; ours is u = z' = 1 - z: compare via a flip
    with torch.no_grad():
        gru.weight_ih_l0[3:6].neg_()
        gru.bias_ih_l0[3:6].neg_()
        gru.weight_hh_l0[3:6].neg_()
    expect, _ = gru(x, h0.unsqueeze(0))
    got, _ = paper(x, torch.ones(4, 6), mask, h0)
    torch.testing.assert_close(got, expect)
    # the official TF form does not keep the state at attention 0 (it is a plain GRU step there)
    official = AUGRU(5, 3, form="official")
    _, moved = official(x, torch.zeros(4, 6), mask, h0)
    assert not torch.allclose(moved, h0)


@pytest.mark.parametrize("form", ["paper", "official"])
def test_augru_is_its_formula(form):
    """Every state equals the module docstring's equations, written out gate by gate (a readable loop)."""
    torch.manual_seed(0)
    cell = AUGRU(5, 4, form=form).double()
    x, att = torch.randn(3, 6, 5, dtype=torch.float64), torch.rand(3, 6, dtype=torch.float64)
    mask = torch.arange(6) < torch.tensor([6, 3, 0]).unsqueeze(1)
    h = torch.randn(3, 4, dtype=torch.float64)
    states, final = cell(x, att, mask, h)
    w_x, b_x, w_h = cell.x2h.weight, cell.x2h.bias, cell.h2h.weight
    (wr, wu, wc), (br, bu, bc), (ur, uu, uc) = w_x.split(4), b_x.split(4), w_h.split(4)
    for t in range(6):
        xt, a = x[:, t], att[:, t : t + 1]
        r = torch.sigmoid(xt @ wr.T + h @ ur.T + br)
        u = torch.sigmoid(xt @ wu.T + h @ uu.T + bu)
        if form == "paper":
            cand = torch.tanh(xt @ wc.T + r * (h @ uc.T) + bc)
            new = (1 - a * u) * h + a * u * cand
        else:
            cand = torch.tanh(xt @ wc.T + (r * h) @ uc.T + bc)
            new = (1 - a) * u * h + (1 - (1 - a) * u) * cand
        h = torch.where(mask[:, t : t + 1], new, h)
        torch.testing.assert_close(states[:, t], h)
    torch.testing.assert_close(final, h)


@pytest.mark.parametrize("encoding", ["time", "position"])
def test_tin_matches_a_per_sample_reference(info, encoding):
    """TIN's attention, one sample at a time: w = softmax((e_t + T[0]) . (e_i + T[idx_i]) / sqrt(2d)), u = Σ w (e_i +
    T[idx_i]); idx = the log2 time-gap bucket (time) or the distance from the target, 1 = most recent (position)."""
    model = build(info, "tin", encoding=encoding).eval()
    batch = batches(info, model, 1)[0]
    emb = model.lookup(batch)
    items, cates = emb["hist_item"], emb["hist_cate"]
    lengths = batch.dense["hist_lengths"].tolist()
    gaps = batch.dense["hist_ts_gap"]
    table = torch.randn_like(model.attention.table.weight)  # away from its zero start
    with torch.no_grad():
        model.attention.table.weight.copy_(table)
    start, checked = 0, 0
    with torch.no_grad():
        target = torch.cat([emb["item"].values(), emb["cate"].values()], -1)
        for b, n in enumerate(lengths):
            e = torch.cat([items.values()[start : start + n], cates.values()[start : start + n]], -1)
            if encoding == "time":
                idx = [
                    min(1 + int(math.floor(math.log2(max(int(g), 1)))), model.p.buckets - 1)
                    for g in gaps[start : start + n]
                ]
            else:
                idx = [min(n - j, model.p.buckets - 1) for j in range(n)]
            enc = e + table[torch.tensor(idx, dtype=torch.long)]
            if n:
                w = torch.softmax(enc @ (target[b] + table[0]) / math.sqrt(e.shape[-1]), 0)
                u = w @ enc
            else:
                u = torch.zeros(e.shape[-1])
            x = torch.cat([u, target[b], u * target[b], *[c[b] for c in model.context_vector(emb)]])
            want = model.tower(x.unsqueeze(0)).squeeze()
            torch.testing.assert_close(model(batch).logit[b], want, rtol=1e-4, atol=1e-5)
            start += n
            checked += n > 0
            if b >= 20:
                break
    assert checked > 5


def test_din_dare_tables(info):
    """dare: true adds attention tables fed from the same ids; the unit scores with them, the pool uses the
    representation tables (changing an attention table changes the logits, the loader is unchanged)."""
    model = build(info, "din", dare=True)
    tables = {c.name: c for c in model.embedding.embedding_configs()}
    assert tables["item_att"].num_embeddings == info.vocab_sizes["item"]
    assert "hist_item_att" in tables["item_att"].feature_names
    assert model.features() == build(info, "din").features()
    losses = []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.embedding.embeddings["item_att"].weight.detach().clone()
    for batch in batches(info, model, 3):
        loss = loss_of(model, model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(before, model.embedding.embeddings["item_att"].weight.detach())
    with pytest.raises(ValueError, match="dare"):
        get_model_class("din").Params(dare=True, backend="auto")


@pytest.mark.parametrize("name", ["din", "dien"])
def test_narrow_dare_attention_tables(info, name):
    """``dare_att_dim``: the attention tables (a second collection) are that wide, the representation tables keep
    embedding_dim, the attention reads them (changing one changes the logits) and they learn."""
    model = build(info, name, dare=True, dare_att_dim=4)
    rep = {c.name: c for c in model.embedding.embedding_configs()}
    assert "item_att" not in rep and rep["item"].embedding_dim == 16
    check_narrow_attention_tables(info, model, name, "hist_item_att")
    with pytest.raises(ValueError, match="dare_att_dim needs dare"):
        get_model_class(name).Params(dare_att_dim=4)


def test_dien_dare_scores_in_the_attention_space(info):
    """DIEN with DARE: the AUGRU's attention depends on the attention tables only, not on the interest states (a
    change of the representation tables leaves the attention weights unchanged)."""
    model = build(info, "dien", dare=True).eval()
    batch = batches(info, model, 1)[0]
    seen = []
    hook = model.attention.register_forward_hook(lambda m, i, o: seen.append(o[1].detach().clone()))
    with torch.no_grad():
        model(batch)
        model.embedding.embeddings["item"].weight.mul_(-2.0)
        model(batch)
    hook.remove()
    torch.testing.assert_close(seen[0], seen[1])
