"""Two-stage lifelong models (SIM hard / soft, MUSE) and their blocks (GSU strategies, SimTier, SA-TA, DARE tables).

Data: the session's tiny synthetic dataset (`tiny_data` in conftest.py); set ``CTR_TEST_MODELS_DATA`` to a built
dataset directory to skip the build while iterating. Torch runs on one thread (see tests/test_models.py).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

# tests/kernels would shadow the `kernels` package under a plain `pytest` (see tests/test_models.py)
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None) is None:
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]

from model_helpers import aux_of, batches, build, check_narrow_attention_tables, subset, train_steps  # noqa: E402

from ctr.modules.esu import SimilarityAwareTargetAttention, SimTier, slot_attention, time_gap_bucket  # noqa: E402
from ctr.modules.gsu import CategoryGSU, CosineGSU, InnerProductGSU, gather_slots, lengths_to_offsets  # noqa: E402
from features.dataset import DatasetInfo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 30
MODELS = ("sim_hard", "sim_soft", "muse", "eta", "sdim", "twin")


# ---- GSU strategies against brute force ---------------------------------------------------------------------------


def brute_topk(lengths: list[int], scores: list[list[float | None]], k: int) -> list[list[int]]:
    """Per sample: candidates (score not None) by score descending, then position descending; padded with -1."""
    out = []
    for n, s in zip(lengths, scores, strict=True):
        cand = [(s[i], i) for i in range(n) if s[i] is not None]
        cand.sort(key=lambda t: (-t[0], -t[1]))
        pos = [i for _, i in cand[:k]]
        out.append(pos + [-1] * (k - len(pos)))
    return out


def random_lengths(gen: torch.Generator) -> list[int]:
    return [0, 1, 5, 0, 17, 3, 40, 2] + torch.randint(0, 30, (6,), generator=gen).tolist()


@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize("k", [1, 4, 20, 50])
def test_category_gsu_matches_brute_force(k, prefilter):
    gen = torch.Generator().manual_seed(k)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    cates = torch.randint(1, 4, (int(offsets[-1]),), generator=gen)
    target = torch.randint(1, 4, (len(lengths),), generator=gen)
    sel = CategoryGSU(prefilter=prefilter)(offsets, target, cates, k)
    scores = [
        [1.0 if int(cates[offsets[b] + i]) == int(target[b]) else None for i in range(n)] for b, n in enumerate(lengths)
    ]
    assert sel.positions.tolist() == brute_topk(lengths, scores, k)
    # hard search = the K most recent of the target's category, newest first
    assert sel.mask.sum().item() == sum(min(k, sum(s is not None for s in row)) for row in scores)


@pytest.mark.parametrize("k", [1, 6, 50])
def test_inner_product_gsu_matches_brute_force(k):
    gen = torch.Generator().manual_seed(100 + k)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    torch.manual_seed(k)
    gsu = InnerProductGSU(6, 4, dim=5)
    target = torch.randn(len(lengths), 6, generator=gen)
    # few distinct behavior vectors, so that equal scores happen and recency must break them
    palette = torch.randn(5, 4, generator=gen)
    behaviors = palette[torch.randint(0, 5, (int(offsets[-1]),), generator=gen)]
    sel = gsu(offsets, target, behaviors, k)
    w_a, w_b = gsu.w_a.weight.double(), gsu.w_b.weight.double()
    scores = [
        [float((w_b @ behaviors[offsets[b] + i].double()) @ (w_a @ target[b].double())) for i in range(n)]
        for b, n in enumerate(lengths)
    ]
    # group float-equal scores exactly as the module computes them (identical vectors give bit-identical scores)
    rounded = [[round(s, 9) for s in row] for row in scores]
    assert sel.positions.tolist() == brute_topk(lengths, rounded, k)
    # the differentiable relevance equals the search score
    r = gsu.relevance(target, behaviors, offsets)
    flat = torch.tensor([s for row in scores for s in row], dtype=torch.float32)
    torch.testing.assert_close(r.detach(), flat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("zero_score", [None, -1.1])
@pytest.mark.parametrize("k", [3, 50])
def test_cosine_gsu_matches_brute_force(dtype, zero_score, k):
    gen = torch.Generator().manual_seed(7 + k)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    rows = torch.randn(9, 8, generator=gen)
    rows[0] = 0  # padding row
    rows[4] = 0  # an item without an embedding
    table = (rows * 40).round().clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else rows
    gsu = CosineGSU(table, zero_vector_score=zero_score)
    ids = torch.randint(0, 9, (int(offsets[-1]),), generator=gen)  # repeated ids: exact ties
    target = torch.randint(1, 9, (len(lengths),), generator=gen)
    target[target == 4] = 5
    sel = gsu(offsets, target, ids, k)
    t = table.double()

    def cos(a: int, b: int) -> float:
        if not bool(t[b].any()):
            return 0.0 if zero_score is None else zero_score
        return float(F.cosine_similarity(t[a], t[b], dim=0))

    scores = [
        [round(cos(int(target[b]), int(ids[offsets[b] + i])), 6) for i in range(n)] for b, n in enumerate(lengths)
    ]
    assert sel.positions.tolist() == brute_topk(lengths, scores, k)
    got = sel.scores[sel.mask]
    want = torch.tensor([scores[b][p] for b, row in enumerate(sel.positions.tolist()) for p in row if p >= 0])
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefilter", [True, False])
def test_category_gsu_never_matches_placeholder_categories(prefilter):
    """A target of a placeholder category (OOV, the importers' "no category") selects nothing; others unchanged."""
    offsets = lengths_to_offsets(torch.tensor([4, 4, 3]))
    behavior = torch.tensor([1, 1, 5, 1, 7, 5, 7, 7, 9, 9, 1])
    target = torch.tensor([1, 7, 9])
    plain = CategoryGSU(prefilter=prefilter)(offsets, target, behavior, 3)
    skip = CategoryGSU(prefilter=prefilter, unmatched=(1,))(offsets, target, behavior, 3)
    assert plain.positions[0].tolist() == [3, 1, 0]
    assert skip.positions[0].tolist() == [-1, -1, -1]
    assert torch.equal(skip.positions[1:], plain.positions[1:])


@pytest.mark.parametrize("prefilter", [True, False])
def test_gsu_empty_batch_and_k_beyond_length(prefilter):
    gsu = CategoryGSU(prefilter=prefilter)
    offsets = torch.tensor([0, 0, 0], dtype=torch.int64)
    sel = gsu(offsets, torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64), 5)
    assert sel.positions.tolist() == [[-1] * 5] * 2 and not sel.mask.any()
    offsets = torch.tensor([0, 3, 3], dtype=torch.int64)
    sel = gsu(offsets, torch.tensor([3, 1]), torch.tensor([3, 2, 3]), 4)
    assert sel.positions.tolist() == [[2, 0, -1, -1], [-1] * 4]  # newest first, then empty slots
    sel = gsu(offsets, torch.tensor([5, 1]), torch.tensor([3, 2, 3]), 2)  # no candidate at all
    assert sel.positions.tolist() == [[-1, -1], [-1, -1]]


# ---- ESU blocks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("bias_dims", [0, 2, 3])
def test_slot_attention_matches_the_kernel_reference(bias_dims, q):
    """The dense CPU paths of `slot_attention` (one query; several) are `kernels.target_attention` (reference) on the
    slots as a jagged batch: outputs and gradients, with empty slots, an all-masked sample and per-query bias."""
    import kernels

    torch.manual_seed(0)
    b, k, h, dk, dv = 4, 6, 2, 5, 7
    mask = torch.arange(k) < torch.tensor([6, 2, 0, 4]).unsqueeze(1)
    shapes = {"query": (b, q, h, dk), "keys": (b, k, h, dk), "values": (b, k, h, dv)}
    if bias_dims:
        shapes["bias"] = (b, k) if bias_dims == 2 else (b, k, q)
    base = {n: torch.randn(*shape, dtype=torch.float64) for n, shape in shapes.items()}
    a = {n: t.clone().requires_grad_() for n, t in base.items()}
    r = {n: t.clone().requires_grad_() for n, t in base.items()}
    got = slot_attention(a["query"], a["keys"], a["values"], mask, bias=a.get("bias"), scale=0.7)
    bias = r.get("bias")
    expect = kernels.target_attention(
        r["query"], r["keys"].reshape(b * k, h, dk), r["values"].reshape(b * k, h, dv), torch.arange(b + 1) * k,
        bias=None if bias is None else bias.reshape(b * k, *bias.shape[2:]), mask=mask.reshape(-1), scale=0.7,
        backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(got, expect)
    assert (got[2] == 0).all()
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (expect * g).sum().backward()
    for n in base:
        torch.testing.assert_close(a[n].grad, r[n].grad, msg=n)


@pytest.mark.parametrize("separate_values", [False, True])
@pytest.mark.parametrize("heads", [1, 2, 3])
def test_absorbed_target_attention_is_the_projected_one(heads, separate_values):
    """`MultiHeadTargetAttention` on the CPU folds ``W_k`` into the query and projects the pooled values; written out
    with the K keys and values projected (and `slot_attention` over them) it is the same function: outputs and every
    gradient (weights, query, keys, values, LAIN's temperature), with empty slots and an all-masked sample."""
    from ctr.modules.esu import MultiHeadTargetAttention

    torch.manual_seed(0)
    b, k, dq, dk, dv, d = 5, 7, 6, 9, 4, 3
    att = MultiHeadTargetAttention(dq, dk, dv if separate_values else None, heads=heads, head_dim=d, out_dim=8)
    att = att.double()
    mask = torch.arange(k) < torch.tensor([7, 3, 0, 1, 5]).unsqueeze(1)
    base = {
        "query": torch.randn(b, dq, dtype=torch.float64),
        "keys": torch.randn(b, k, dk, dtype=torch.float64),
        "values": torch.randn(b, k, dv, dtype=torch.float64),
        "temperature": torch.rand(b, dtype=torch.float64) + 0.5,
    }
    a = {n: t.clone().requires_grad_() for n, t in base.items()}
    r = {n: t.clone().requires_grad_() for n, t in base.items()}
    values_a = a["values"] if separate_values else None
    got = att(a["query"], a["keys"], mask, values=values_a, temperature=a["temperature"])
    got_grads = torch.autograd.grad(got.pow(2).sum(), [*a.values(), *att.parameters()], allow_unused=True)
    q = (att.w_q(r["query"]) / r["temperature"].unsqueeze(-1)).reshape(b, 1, heads, d)
    kk = att.w_k(r["keys"]).reshape(b, k, heads, d)
    vv = att.w_v(r["values"] if separate_values else r["keys"]).reshape(b, k, heads, d)
    expect = att.w_o(slot_attention(q, kk, vv, mask, scale=d**-0.5).reshape(b, heads * d))
    expect_grads = torch.autograd.grad(expect.pow(2).sum(), [*r.values(), *att.parameters()], allow_unused=True)
    torch.testing.assert_close(got, expect)
    assert (got[2] == 0).all()  # nothing selected: the pooled value is zero, W_o has no bias
    for x, y in zip(got_grads, expect_grads, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y)


def test_gather_slots_is_indexing():
    """`gather_slots` (index_select + index_copy) equals ``values[rows]`` zeroed outside the mask, with gradients."""
    torch.manual_seed(0)
    values = torch.randn(9, 3, dtype=torch.float64)
    rows = torch.tensor([[2, 0, 0], [5, 8, 4], [0, 0, 0]])
    mask = torch.tensor([[True, False, False], [True, True, True], [False, False, False]])
    v1, v2 = values.clone().requires_grad_(), values.clone().requires_grad_()
    got = gather_slots(v1, rows, mask)
    expect = torch.where(mask.unsqueeze(-1), v2[rows], 0.0)
    torch.testing.assert_close(got, expect)
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (expect * g).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad)
    ids = torch.arange(9) * 10
    assert gather_slots(ids, rows, mask).tolist() == [[20, 0, 0], [50, 80, 40], [0, 0, 0]]


def test_time_gap_buckets():
    gap = torch.tensor([1, 2, 3, 60, 3600, 86400, 10**12])
    assert time_gap_bucket(gap, 32).tolist() == [1, 2, 2, 6, 12, 17, 31]


def test_simtier_paper_and_code():
    sim = torch.tensor([[-1.0, -0.95, 0.0, 0.05, 0.999, 1.0, 0.3]])
    mask = torch.tensor([[True, True, True, True, True, True, False]])
    paper = SimTier("paper", tiers=20)
    c = paper(sim, mask)
    assert c.shape == (1, 20) and c.sum().item() == 6
    assert c[0, 0] == 2 and c[0, 10] == 2 and c[0, 19] == 2  # [-1,-0.9), [0,0.1), [0.9,1]
    code = SimTier("code", eps=0.1)
    assert code.out_dim == 22
    out = code(sim, torch.ones_like(mask))
    tiers = (torch.ceil(sim * 10).long() + 10)[0].tolist()  # the release: ceil(10 cos) + 10
    counts = torch.zeros(22)
    for t in tiers:
        counts[t] += 1
    torch.testing.assert_close(out[0], torch.log1p(counts) * code.weight)
    # jagged form over a whole prefix gives the same histogram
    jag = code.forward_jagged(sim[0], torch.tensor([0, 7]))
    torch.testing.assert_close(jag, out)


def test_sata_paper_formula():
    torch.manual_seed(0)
    att = SimilarityAwareTargetAttention(6, 6, dim=4, heads=1, mode="paper")
    with torch.no_grad():
        att.gamma.copy_(torch.tensor([[0.5], [2.0], [-1.0]]))
    q, keys, r = torch.randn(2, 6), torch.randn(2, 5, 6), torch.rand(2, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out, w = att(q, keys, r, mask)
    for b in range(2):
        n = int(mask[b].sum())
        a_id = (att.w_k(keys[b, :n]) @ att.w_q(q[b])) / 2.0  # sqrt(4)
        alpha = 0.5 * a_id + 2.0 * r[b, :n] - a_id * r[b, :n]
        wb = torch.softmax(alpha, 0)
        torch.testing.assert_close(w[b, 0, :n], wb)
        torch.testing.assert_close(out[b], wb @ att.w_v(keys[b, :n]))
        assert (w[b, 0, n:] == 0).all()


# ---- models end to end --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_training_loss_decreases(info, name):
    model = build(info, name)
    losses = train_steps(model, batches(info, model))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.02, (first, last)


@pytest.mark.parametrize(
    ("name", "params"),
    [("twin", {}), ("eta", {}), ("muse", {"gsu": "id_cosine"}), ("muse", {"gsu": "inner_product"}), ("diffumin", {})],
)
def test_prefix_looked_up_twice_trains_the_same(info, name, params):
    """`prefix_grad = False`: the GSU's look-up of the whole prefix without gradient, then the selected rows with it,
    gives the logits, the loss terms and every gradient (the embedding tables' included) of one look-up with
    gradient, on a training batch."""
    runs = []
    for one_lookup in (False, True):
        model = build(info, name, **params).train()
        assert model.embeds_prefix and not model.prefix_grad
        if one_lookup:
            model.prefix_grad = True
        batch = batches(info, model, 1)[0]
        torch.manual_seed(1)  # DiffuMIN draws its diffusion noise: the same draws on both runs
        out = model(batch)
        terms = model.loss(out, batch)
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((out.logit.detach(), {k: v.detach() for k, v in terms.items()}, grads))
    (logit, terms, grads), (logit1, terms1, grads1) = runs
    torch.testing.assert_close(logit, logit1, rtol=0, atol=1e-6)
    assert terms.keys() == terms1.keys() and grads.keys() == grads1.keys()
    for k in terms:
        torch.testing.assert_close(terms[k], terms1[k], rtol=0, atol=1e-6)
    tables = [n for n in grads if "embedding" in n]
    assert tables and any(grads[n].abs().sum() > 0 for n in tables)
    for n in grads:
        torch.testing.assert_close(grads[n], grads1[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_selection_is_inside_the_prefix(info, name):
    """Every selected behavior is a real position of the searched prefix, strictly before the sample (ts gap > 0),
    with no duplicate; SIM hard picks the most recent behaviors of the target's category."""
    model = build(info, name).eval()
    batch = batches(info, model, 1)[0]
    with torch.no_grad():
        sel, offsets = model.select(batch)
    lengths = batch.dense["long_lengths"]
    assert int(lengths.max()) > model.p.k  # the batch has users with more behaviors than K
    assert sel.positions.shape == (batch.size, model.p.k)
    pos, mask = sel.positions, sel.mask
    assert ((pos < lengths.unsqueeze(1)) | ~mask).all() and (pos >= -1).all()
    assert (mask.sum(1) <= lengths.clamp(max=model.p.k)).all()
    rows = offsets[:-1].unsqueeze(1) + pos.clamp(min=0)
    assert (batch.dense["long_ts_gap"][rows][mask] > 0).all()
    for b in range(batch.size):
        p = pos[b][mask[b]].tolist()
        assert len(set(p)) == len(p)
    if name == "sim_hard":
        cates = batch.sparse["long_cate"].values()
        target = batch.sparse["cate"].values()
        placeholder = set(info.placeholder_categories())
        for b in range(batch.size):
            same = [i for i in range(int(lengths[b])) if int(cates[offsets[b] + i]) == int(target[b])]
            if int(target[b]) in placeholder:  # "no category" matches nothing
                same = []
            assert pos[b][mask[b]].tolist() == same[::-1][: model.p.k]
    if name != "sim_hard":  # a score-based GSU keeps K whenever the prefix has K behaviors
        torch.testing.assert_close(mask.sum(1), lengths.clamp(max=model.p.k))


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_per_sample(info, name):
    """In eval, a sample's logit does not depend on the other samples of its batch (jagged GSU, padding)."""
    model = build(info, name)
    train_steps(model, batches(info, model, 2))
    model.eval()
    batch = batches(info, model, 3)[2]
    with torch.no_grad():
        full = model(batch).logit
        assert aux_of(model, model(batch), batch) is None
    lengths = batch.dense["long_lengths"]
    rows = torch.argsort(lengths)[:12]
    with torch.no_grad():
        part = model(subset(batch, rows)).logit
    torch.testing.assert_close(part, full[rows], rtol=1e-5, atol=1e-5)
    empty = torch.nonzero(lengths == 0).flatten()[:4]  # samples without any behavior: a batch of only those
    assert empty.numel() > 0
    with torch.no_grad():
        alone = model(subset(batch, empty)).logit
    torch.testing.assert_close(alone, full[empty], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_dare_tables(info, name):
    """dare: true adds attention tables `item_att` / `cate_att` (sized like `item` / `cate`) fed from the same ids,
    the loader is unchanged, and they learn."""
    model = build(info, name, dare=True)
    tables = {c.name: c for c in model.embedding.embedding_configs()}
    assert tables["item_att"].num_embeddings == info.vocab_sizes["item"]
    assert tables["cate_att"].num_embeddings == info.vocab_sizes["cate"]
    assert "long_item_att" in tables["item_att"].feature_names
    assert model.features() == build(info, name).features()  # the loader delivers the same features
    before = model.embedding.embeddings["item_att"].weight.detach().clone()
    losses = train_steps(model, batches(info, model, 3))
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(before, model.embedding.embeddings["item_att"].weight.detach())


@pytest.mark.parametrize("name", MODELS)
def test_narrow_dare_attention_tables(info, name):
    """``dare_att_dim: 4`` (embedding_dim 16): the attention tables live in a second collection of that width, the
    GSU / ESU / short branch read them (scaling one changes the logits), they learn, and values keep 2d."""
    model = build(info, name, dare=True, dare_att_dim=4)
    assert model.att_width == 8
    check_narrow_attention_tables(info, model, name, "long_item_att")


def test_narrow_dare_refusals(info):
    """What dare_att_dim cannot do says so: without dare, with LAIN, with TIN's ESU (one encoding for keys and
    values)."""
    from ctr.models import get_model_class

    with pytest.raises(ValueError, match="needs dare"):
        get_model_class("sim_soft").Params(dare_att_dim=4)
    with pytest.raises(ValueError, match="LAIN"):
        get_model_class("sim_soft").Params(dare=True, dare_att_dim=4, lain={"enabled": True})
    with pytest.raises(ValueError, match="esu: tin"):
        build(info, "sim_hard", esu="tin", dare=True, dare_att_dim=4)


@pytest.mark.parametrize(
    "name, params",
    [
        ("sim_hard", {"time_buckets": 0, "short_softmax": True}),
        ("sim_soft", {"aux_pooling": "mean", "aux_alpha": 0.5}),
        ("muse", {"simtier_scope": "prefix", "short_simtier": True, "sata_heads": 2}),
        ("muse", {"mode": "code", "hidden": [256, 128, 64], "activation": "dice_ln"}),
        ("sim_soft", {"dare": True, "dare_aux_alpha": 1.0}),
        ("sim_hard", {"esu": "tin"}),
        ("eta", {"esu": "tin", "dare": True}),
        ("twin", {"dare": True, "dare_aux_alpha": 0.5}),
        ("muse", {"gsu": "category"}),
        ("muse", {"gsu": "id_cosine"}),
        ("muse", {"gsu": "inner_product"}),
        ("sim_soft", {"short_attention": "mhta"}),
        ("twin", {"short_attention": "mhta", "short_heads": 1, "short_head_dim": 16}),
        ("eta", {"short_attention": "mhta", "dare": True}),
        ("sim_soft_lain", {"short_attention": "mhta"}),
    ],
)
def test_variants_run(info, name, params):
    model = build(info, name, **params)
    losses = train_steps(model, batches(info, model, 3))
    assert all(math.isfinite(v) for v in losses)
    model.eval()
    with torch.no_grad():
        batch = batches(info, model, 1)[0]
        out = model(batch)
    assert torch.isfinite(out.logit).all() and aux_of(model, out, batch) is None


@pytest.mark.parametrize("lain", [False, True])
def test_mhta_short_branch_is_its_formula(info, lain):
    """``short_attention: mhta``: per head h, softmax over the real slots of ``(W_q^h e_t)·(W_k^h e_s) / sqrt(d_h)``
    (LAIN: conditioned query and keys, the logits over τ(L), its prompts first), the values ``W_v^h e_s`` pooled, the
    heads concatenated and mapped by ``W_o`` to 2d."""
    torch.manual_seed(0)
    model = build(info, "sim_soft_lain" if lain else "sim_soft", short_attention="mhta", short_heads=2).eval()
    att = model.short_attention
    b, s, d = 5, 7, 2 * model.dim
    query, keys, values = torch.randn(b, d), torch.randn(b, s, d), torch.randn(b, s, d)
    mask = torch.arange(s) < torch.tensor([7, 3, 1, 0, 5]).unsqueeze(1)
    lc = model.length_context(batches(info, model, 1)[0]) if lain else None
    if lc is not None:
        lc = type(lc)(length=lc.length[:b], h=lc.h[:b], prompts=lc.prompts[:b] if lc.prompts is not None else None)
    with torch.no_grad():
        got = model.attend_short(lc, query, keys, mask, values)
        q, k, v, m, tau = query, keys, values, mask, torch.ones(b)
        if lc is not None:
            br = model.lain_branch(lc, query, keys, mask, values, branch="short")
            q, k, v, m, tau = br.query, br.keys, br.values, br.mask, br.temperature
            assert br.prompts > 0 and tau is not None
        want = torch.zeros(b, d)
        hd = att.head_dim
        for i in range(b):
            heads = []
            for h in range(att.heads):
                rows = slice(h * hd, (h + 1) * hd)
                qh = att.w_q.weight[rows] @ q[i]
                logits = torch.stack([qh @ (att.w_k.weight[rows] @ k[i, j]) for j in range(k.shape[1])])
                logits = logits / math.sqrt(hd) / tau[i]
                real = m[i]
                pooled = torch.zeros(hd)
                if real.any():
                    w = torch.softmax(logits[real], 0)
                    vals = torch.stack([att.w_v.weight[rows] @ v[i, j] for j in range(k.shape[1])])[real]
                    pooled = (w.unsqueeze(1) * vals).sum(0)
                heads.append(pooled)
            want[i] = att.w_o.weight @ torch.cat(heads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sim_soft_aux_loss(info):
    model = build(info, "sim_soft")
    batch = batches(info, model, 1)[0]
    aux = aux_of(model, model.train()(batch), batch)
    assert aux is not None and aux.requires_grad and aux.item() > 0
    aux.backward()
    assert model.gsu.w_a.weight.grad is not None and model.gsu.w_a.weight.grad.abs().sum() > 0
    off = build(info, "sim_soft", aux_alpha=0.0)
    assert aux_of(off, off.train()(batch), batch) is None


def test_muse_table_is_frozen_and_not_saved(info):
    model = build(info, "muse")
    assert model.gsu.table.dtype == torch.float32 and not model.gsu.table.requires_grad
    assert model.gsu.table.shape == (info.vocab_sizes["item"], info.manifest["mm_emb"]["dim"])
    assert not any("table" in k for k in model.state_dict())
    items = pq.read_table(info.data_dir / "items.parquet", columns=["item_idx", "mm_emb"]).slice(0, 3).to_pylist()
    for row in items:
        torch.testing.assert_close(model.gsu.table[row["item_idx"]], torch.tensor(row["mm_emb"]))


@pytest.fixture(scope="module")
def int8_info(info, tmp_path_factory) -> DatasetInfo:
    """The tiny world with its multimodal table quantized to int8 (x / max|x| * 127), the rest linked."""
    root = tmp_path_factory.mktemp("int8-world")
    for sub in ("samples", "sequences", "vocab"):
        (root / sub).symlink_to(info.data_dir / sub)
    t = pq.read_table(info.data_dir / "items.parquet")
    emb = np.asarray(t["mm_emb"].combine_chunks().flatten()).reshape(t.num_rows, -1)
    q = np.clip(np.round(emb / np.abs(emb).max() * 127), -127, 127).astype(np.int8)
    col = pa.FixedSizeListArray.from_arrays(pa.array(q.ravel(), type=pa.int8()), q.shape[1])
    pq.write_table(t.set_column(t.schema.get_field_index("mm_emb"), "mm_emb", col), root / "items.parquet")
    manifest = dict(info.manifest)
    manifest["mm_emb"] = {**manifest["mm_emb"], "dtype": "int8"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return DatasetInfo.load(root)


def test_muse_int8_table(info, int8_info):
    model = build(int8_info, "muse")
    assert model.gsu.table.dtype == torch.int8
    assert int8_info.mm_table().dtype == np.int8
    bs = batches(int8_info, model, 3)
    losses = train_steps(model, bs)
    assert all(math.isfinite(v) for v in losses)
    # the int8 GSU picks what a float GSU over the same (cast) vectors picks
    model.eval()
    with torch.no_grad():
        sel, _ = model.select(bs[0])
        model.gsu.table = model.gsu.table.float()
        sel_f, _ = model.select(bs[0])
    assert torch.equal(sel.positions, sel_f.positions)


def test_configs_resolve():
    from ctr.config import resolve_train_config

    for name in MODELS:
        k = 0 if name == "sdim" else 7  # SDIM has no top-K
        cfg, params = resolve_train_config(name, None, [f"model.k={k}"])
        assert cfg.model["name"] == name and params.k == k and params.max_len == 10000


# ---- helpers ------------------------------------------------------------------------------------------------------


def test_placeholder_categories_from_the_vocabulary(tmp_path, info):
    """OOV always; the idx of raw cate_id 0 when the dataset has it (importers' "no category"), not otherwise."""
    from features.dataset import DatasetInfo as Info
    from features.schema import OOV_IDX

    assert info.placeholder_categories() == (OOV_IDX,)  # the synthetic world has no raw category 0
    (tmp_path / "vocab").mkdir()
    pq.write_table(pa.table({"raw": pa.array([0, 5, 9], pa.int64()), "idx": pa.array([2, 3, 4], pa.int32())}),
                   tmp_path / "vocab" / "cate.parquet")  # fmt: skip
    fake = Info(tmp_path, {}, {}, [], [], {}, False)
    assert fake.placeholder_categories() == (OOV_IDX, 2)


def test_muse_gsu_choice_selects_like_the_sim_gsus(info):
    """MUSE with a SIM GSU (its paper's baselines): category selects what SIM hard selects; the ESU is unchanged."""
    muse = build(info, "muse", gsu="category").eval()
    sim = build(info, "sim_hard").eval()
    batch = batches(info, muse, 1)[0]
    with torch.no_grad():
        a, _ = muse.select(batch)
        b, _ = sim.select(batch)
    assert torch.equal(a.positions, b.positions)
    assert sorted(muse.state_dict()) == sorted(build(info, "muse").state_dict())


def test_dare_aux_loss(info):
    """DARE's auxiliary head: a 'dare_aux' loss term in training only, weighted; it needs dare: true."""
    model = build(info, "sim_hard", dare=True, dare_aux_alpha=0.5)
    batch = batches(info, model, 1)[0]
    out = model.train()(batch)
    terms = model.loss(out, batch)
    bce = F.binary_cross_entropy_with_logits(out.extras["dare_aux_logit"], batch.dense["label"])
    torch.testing.assert_close(terms["dare_aux"], 0.5 * bce)
    assert "dare_aux" not in model.loss(model.eval()(batch), batch)
    from ctr.models import get_model_class

    with pytest.raises(ValueError, match="needs dare: true"):
        get_model_class("sim_hard").Params(dare_aux_alpha=1.0)
