"""R2LED (ctr/models/r2led.py) and its blocks (ctr/modules/sid_routes.py): SID tables, routes against brute force,
training, no look-ahead, the missing-SID error, eval determinism, variants.

Data: a COPY of the session's tiny dataset (`tiny_data`, shared and read-only) with semantic IDs built into it
(`ctr sid`); set ``CTR_TEST_MODELS_DATA`` to a built dataset directory to copy that one instead of building the tiny
world. Torch runs on one thread (see tests/test_models.py).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

# tests/kernels would shadow the `kernels` package under a plain `pytest` (see tests/test_models.py)
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None) is None:
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]

from model_helpers import batches, subset, train_steps  # noqa: E402

from ctr.models import get_model_class  # noqa: E402
from ctr.modules.gsu import lengths_to_offsets  # noqa: E402
from ctr.modules.sid_routes import (  # noqa: E402
    PrefixGSU,
    RouteFusion,
    SIDFusion,
    prefix_codes,
    vector_topk,
)
from features.dataset import DatasetInfo, SemanticIDsMissing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source_dir(request) -> Path:
    return Path(os.environ.get("CTR_TEST_MODELS_DATA") or request.getfixturevalue("tiny_data"))


@pytest.fixture(scope="module")
def info(sid_data) -> DatasetInfo:
    """The tiny world with `ctr sid`'s semantic IDs (conftest's `sid_data`; the `tiny_data` fixture stays as built)."""
    return DatasetInfo.load(sid_data)


def build(info: DatasetInfo, seed: int = 0, **params):
    torch.manual_seed(seed)
    cls = get_model_class("r2led")
    return cls(cls.Params(**params), info)


# ---- semantic-ID tables -------------------------------------------------------------------------------------------


def test_sid_codes_and_prefix_numbers(info):
    codes, num_codes = info.sid_codes()
    codes = torch.from_numpy(codes)
    assert num_codes == 257 and codes.shape == (info.vocab_sizes["item"], 3)
    assert (codes[:2] == 256).all()  # padding and OOV rows: the reserved code
    t = pq.read_table(info.data_dir / "items.parquet", columns=["item_idx", "sid_0", "sid_1", "sid_2"])
    idx = t["item_idx"].to_numpy()
    for j in range(3):
        assert np.array_equal(codes[idx, j].numpy(), t[f"sid_{j}"].to_numpy())
    # prefix numbers: equal exactly when the prefixes are equal; -1 once a reserved code occurs
    gen = torch.Generator().manual_seed(0)
    c = torch.randint(0, 4, (200, 3), generator=gen)
    c[::17, 1] = 3  # reserved code of a 4-code toy
    p = prefix_codes(c, 4)
    for level in range(3):
        for a in range(0, 200, 7):
            for b in range(200):
                reserved = bool((c[a, : level + 1] == 3).any() or (c[b, : level + 1] == 3).any())
                same = bool((c[a, : level + 1] == c[b, : level + 1]).all())
                if reserved:
                    assert p[a, level] == -1 or p[b, level] == -1
                else:
                    assert bool(p[a, level] == p[b, level]) == same


# ---- routes against brute force -----------------------------------------------------------------------------------


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


def cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    na, nb = a.norm().clamp_min(1e-12), b.norm().clamp_min(1e-12)
    return float((a @ b) / (na * nb))


@pytest.mark.parametrize("rank", ["recency", "collab"])
@pytest.mark.parametrize("k", [1, 4, 50])
def test_prefix_route_matches_brute_force(k, rank):
    gen = torch.Generator().manual_seed(10 + k)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    n = int(offsets[-1])
    behavior = torch.randint(0, 4, (n,), generator=gen)
    behavior[behavior == 3] = -1  # reserved prefixes: never matched, not even by a reserved target
    target = torch.randint(0, 4, (len(lengths),), generator=gen)
    target[target == 3] = -1
    palette = torch.randn(4, 6, generator=gen)  # few distinct vectors: equal scores, recency breaks the tie
    vecs = palette[torch.randint(0, 4, (n,), generator=gen)]
    tvec = torch.randn(len(lengths), 6, generator=gen)
    gsu = PrefixGSU()
    if rank == "collab":
        sel = gsu(offsets, target, behavior, k, tvec, vecs, "cosine")
    else:
        sel = gsu(offsets, target, behavior, k)
    scores = []
    for b, m in enumerate(lengths):
        row = []
        for i in range(m):
            j = int(offsets[b]) + i
            match = int(target[b]) >= 0 and int(behavior[j]) == int(target[b])
            row.append(None if not match else (round(cos64(tvec[b], vecs[j]), 6) if rank == "collab" else 1.0))
        scores.append(row)
    assert sel.positions.tolist() == brute_topk(lengths, scores, k)
    assert sel.positions.shape == (len(lengths), k)


@pytest.mark.parametrize("score", ["cosine", "dot"])
@pytest.mark.parametrize("k", [1, 6, 50])
def test_vector_route_matches_brute_force(k, score):
    gen = torch.Generator().manual_seed(100 + k)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    palette = torch.randn(5, 8, generator=gen)
    palette[0] = 0  # a zero vector (an item without SID embedding): cosine 0
    vecs = palette[torch.randint(0, 5, (int(offsets[-1]),), generator=gen)]
    target = torch.randn(len(lengths), 8, generator=gen)
    sel = vector_topk(offsets, target, vecs, k, score)

    def s(b: int, j: int) -> float:
        v = cos64(target[b], vecs[j]) if score == "cosine" else float(target[b].double() @ vecs[j].double())
        return round(v, 5)

    scores = [[s(b, int(offsets[b]) + i) for i in range(m)] for b, m in enumerate(lengths)]
    assert sel.positions.tolist() == brute_topk(lengths, scores, k)


def test_routes_empty_batch():
    offsets = torch.zeros(3, dtype=torch.int64)
    sel = PrefixGSU()(offsets, torch.tensor([1, 2]), torch.zeros(0, dtype=torch.int64), 5)
    assert sel.positions.tolist() == [[-1] * 5] * 2
    sel = vector_topk(offsets, torch.randn(2, 4), torch.zeros(0, 4), 3)
    assert sel.positions.tolist() == [[-1] * 3] * 2


def test_route_fusion_masks_empty_routes():
    torch.manual_seed(0)
    fusion = RouteFusion(6, 4, 3, "attention")
    outs = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    u, w = fusion(torch.randn(2, 6), outs, mask)
    assert w is not None and w[0, 1] == 0 and torch.isclose(w[0].sum(), torch.tensor(1.0))
    assert (w[1] == 0).all() and (u[1] == 0).all()  # no route retrieved anything: zeros


# ---- the model end to end -----------------------------------------------------------------------------------------


def test_training_loss_decreases(info):
    model = build(info)
    losses = train_steps(model, batches(info, model))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.02, (first, last)


def test_routes_retrieve_only_the_past(info):
    """Every retrieved behavior is a real position of the searched prefix, strictly before the sample (ts gap > 0);
    a prefix route retrieves the most recent behaviors sharing the target's SID prefix."""
    model = build(info).eval()
    batch = batches(info, model, 1)[0]
    with torch.no_grad():
        sels, offsets = model.select_routes(batch)
    lengths = batch.dense["long_lengths"]
    gaps = batch.dense["long_ts_gap"]
    items = batch.sparse["long_item"].values()
    target = batch.sparse["item"].values()
    assert int(lengths.max()) > 50
    for route, k, sel in zip(model.rp.routes, model.route_k, sels, strict=True):
        pos, mask = sel.positions, sel.mask
        assert pos.shape == (batch.size, k)
        assert ((pos < lengths.unsqueeze(1)) | ~mask).all() and (pos >= -1).all()
        assert (mask.sum(1) <= lengths.clamp(max=k)).all()
        rows = offsets[:-1].unsqueeze(1) + pos.clamp(min=0)
        assert (gaps[rows][mask] > 0).all(), route.name
        if route.kind == "prefix":
            prefix = model.sid_prefix[:, route.level - 1]
            for b in range(batch.size):
                t = int(prefix[target[b]])
                same = [i for i in range(int(lengths[b])) if t >= 0 and int(prefix[items[offsets[b] + i]]) == t]
                assert pos[b][mask[b]].tolist() == same[::-1][:k]
        else:  # a score route keeps K whenever the prefix has K behaviors
            torch.testing.assert_close(mask.sum(1), lengths.clamp(max=k))
    assert any(bool(s.mask.any()) for s in sels[:3])  # the SID routes do match on this data


def test_eval_is_deterministic_and_per_sample(info):
    model = build(info)
    train_steps(model, batches(info, model, 2))
    model.eval()
    batch = batches(info, model, 3)[2]
    with torch.no_grad():
        a, b = model(batch).logit, model(batch).logit
    assert torch.equal(a, b)
    rows = torch.argsort(batch.dense["long_lengths"])[:12]  # includes samples without any behavior
    with torch.no_grad():
        part = model(subset(batch, rows)).logit
    torch.testing.assert_close(part, a[rows], rtol=1e-5, atol=1e-5)


def test_missing_semantic_ids_is_a_clear_error(info, source_dir, tmp_path):
    # the dataset as `ctr build` wrote it (no semantic IDs at all); only read here
    with pytest.raises(SemanticIDsMissing, match=r"ctr sid --data"):
        build(DatasetInfo.load(source_dir))
    # a manifest that says there are SIDs, an items.parquet without the columns
    data = tmp_path / "data"
    data.mkdir()
    for sub in ("samples", "sequences", "vocab"):
        (data / sub).symlink_to(info.data_dir / sub)
    shutil.copy(info.data_dir / "manifest.json", data / "manifest.json")
    t = pq.read_table(info.data_dir / "items.parquet")
    pq.write_table(t.drop_columns(["sid_1", "sid_2"]), data / "items.parquet")
    with pytest.raises(SemanticIDsMissing, match=r"sid_1.*ctr sid --data"):
        build(DatasetInfo.load(data))
    assert build(DatasetInfo.load(data), sid_levels=1, routes=[{"name": "a", "kind": "prefix", "level": 1}])
    with pytest.raises(ValueError, match="level 2"):
        build(info, sid_levels=1, routes=[{"name": "a", "kind": "prefix", "level": 2}])


def test_sid_tables_are_buffers_not_saved(info):
    model = build(info)
    state = model.state_dict()
    assert not any(k.startswith(("sid_codes", "sid_prefix")) for k in state)
    assert "sid.tables.0.weight" in state and state["sid.tables.0.weight"].shape == (257, 32)
    assert (state["sid.tables.0.weight"][256] == 0).all()  # the reserved code is the zero padding row
    other = build(info, seed=1)
    other.load_state_dict(state)
    model.eval()
    other.eval()
    batch = batches(info, model, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logit, other(batch).logit)


@pytest.mark.parametrize(
    "params",
    [
        {"routes": [{"name": "s1", "kind": "prefix", "level": 1, "rank": "collab"}, {"name": "c", "kind": "collab"}]},
        {"semantic_source": "mm", "route_fusion": "gate", "share_route_attention": True, "time_buckets": 0},
        {"route_fusion": "concat", "level_gate": False, "sid_fusion": "add", "sid_levels": 2,
         "routes": [{"name": "s2", "kind": "prefix", "level": 2, "k": 5}, {"name": "m", "kind": "semantic", "k": 7}]},
        {"sid_fusion": "id", "routes": [{"name": "s1", "kind": "prefix", "level": 1}]},
    ],
)  # fmt: skip
def test_variants_run(info, params):
    model = build(info, **params)
    losses = train_steps(model, batches(info, model, 3))
    assert all(math.isfinite(v) for v in losses)
    model.eval()
    with torch.no_grad():
        out = model(batches(info, model, 1)[0])
    assert torch.isfinite(out.logit).all() and not out.extras


def test_params_validation():
    cls = get_model_class("r2led").Params
    with pytest.raises(ValueError, match="needs level"):
        cls(routes=[{"name": "a", "kind": "prefix"}])
    with pytest.raises(ValueError, match="unique"):
        cls(routes=[{"name": "a", "kind": "collab"}, {"name": "a", "kind": "semantic"}])
    with pytest.raises(ValueError, match="dare"):
        cls(dare=True)


def test_config_resolves():
    from ctr.config import resolve_train_config

    cfg, params = resolve_train_config("r2led", None, ["model.k=7"])
    assert cfg.model["name"] == "r2led" and params.k == 7
    assert [r.name for r in params.routes] == ["sid1", "sid2", "sid3", "collab", "semantic"]
    assert params == get_model_class("r2led").Params(k=7)  # the YAML repeats the code's defaults


# ---- helpers ------------------------------------------------------------------------------------------------------


def test_equal_budget_routes():
    """budget: k (default) scales the routes' K to the model's k in all (largest remainders, at least 1 each);
    null keeps each route's own K (180 with the default routes)."""
    from ctr.models import get_model_class

    P = get_model_class("r2led").Params
    assert P().route_ks() == [14, 5, 3, 14, 14] and sum(P().route_ks()) == P().k == 50
    assert P(budget=None).route_ks() == [50, 20, 10, 50, 50]
    assert sum(P(budget=7).route_ks()) == 7 and min(P(budget=5).route_ks()) == 1
    with pytest.raises(ValueError, match="at least one behavior per route"):
        P(budget=3).route_ks()


def test_sid_fusion_once_per_key_equals_per_row():
    """`SIDFusion.forward_unique` on rows with repeated keys: the rows of `forward`, the same parameter gradients,
    and per key the same summed gradient of ``e_id`` (all of it on the key's first row)."""
    torch.manual_seed(0)
    fusion = SIDFusion(8, 3, 5)
    keys = torch.tensor([4, 1, 4, 7, 1, 4, 0])
    base_e, base_c = torch.randn(8, 8), torch.randint(0, 5, (8, 3))
    e_ref, codes = base_e[keys].clone().requires_grad_(), base_c[keys]
    e_uni = e_ref.detach().clone().requires_grad_()
    ref = fusion(e_ref, codes)
    (ref.square() * torch.arange(1.0, 8.0).unsqueeze(1)).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in fusion.named_parameters()}
    fusion.zero_grad()
    got = fusion.forward_unique(e_uni, codes, keys)
    (got.square() * torch.arange(1.0, 8.0).unsqueeze(1)).sum().backward()
    torch.testing.assert_close(got, ref)
    for n, p in fusion.named_parameters():
        torch.testing.assert_close(p.grad, grads_ref[n], msg=n)
    for k in keys.unique():
        rows = (keys == k).nonzero().squeeze(1)
        torch.testing.assert_close(e_uni.grad[rows].sum(0), e_ref.grad[rows].sum(0))
        assert e_uni.grad[rows[1:]].abs().sum() == 0  # the first row of each key takes it all


def step_of(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's logits, loss and every parameter's gradient."""
    out = model(batch)
    loss = sum(model.loss(out, batch).values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logit.detach(), loss.detach(), grads


def test_sid_fusion_once_per_item_trains_the_same(info, monkeypatch):
    """R2LED fuses each distinct (item, category) once: the logits, the loss and every gradient (the embedding
    tables' included) equal those of the fusion computed row by row, on a training batch with repeated items."""
    runs = []
    for per_row in (False, True):
        if per_row:
            monkeypatch.setattr(SIDFusion, "forward_unique", lambda self, e_id, codes, keys: self(e_id, codes))
        model = build(info).train()
        batch = batches(info, model, 1)[0]
        items = batch.sparse.to_dict()["short_item"].values()
        assert items.unique().numel() < items.numel()  # the batch repeats items
        runs.append(step_of(model, batch))
    (logit, loss, grads), (logit1, loss1, grads1) = runs
    torch.testing.assert_close(logit, logit1, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, loss1, rtol=0, atol=1e-6)
    assert grads.keys() == grads1.keys()
    tables = [n for n in grads if "embedding" in n]
    assert tables and any(grads[n].abs().sum() > 0 for n in tables)
    for n in grads:
        torch.testing.assert_close(grads[n], grads1[n], rtol=1e-5, atol=1e-7, msg=n)


def test_semantic_route_scores_a_table_of_the_same_vectors(info):
    """The semantic route's table (every item's Σ_l E_l[c_l], or the batch's distinct items' when the vocabulary is
    longer than the batch's behaviors) gives each behavior exactly its own vector, and the route's selection equals
    a top-K over the per-behavior vectors."""
    from ctr.modules.sid_routes import vector_topk

    model = build(info).eval()
    batch = batches(info, model, 1)[0]
    ids = batch.sparse.to_dict()
    items = ids["long_item"].values().long()
    target_items = ids["item"].values().long()
    offsets = lengths_to_offsets(ids["long_item"].lengths())
    with torch.no_grad():
        per_behavior = model.sid.sid_embedding(model.sid_codes[items])
        want = vector_topk(offsets, model.sid.sid_embedding(model.sid_codes[target_items]), per_behavior, 20)
        for subset_only in (False, True):
            few = items[: max(1, model.sid_codes.shape[0] - 1)] if subset_only else items
            target, table, rows = model.semantic_vectors(target_items, few)
            assert torch.equal(table[rows], model.sid.sid_embedding(model.sid_codes[few]))
            assert (table.shape[0] < model.sid_codes.shape[0]) == (model.sid_codes.shape[0] > few.numel())
        semantic = [i for i, r in enumerate(model.rp.routes) if r.kind == "semantic"]
        assert semantic
        saved = model.rp.routes, model.route_k
        try:
            model.rp.__dict__["routes"] = [saved[0][semantic[0]]]
            model.route_k = [20]
            (got,) = model.route_selections(ids, offsets)
        finally:
            model.rp.__dict__["routes"], model.route_k = saved
    assert torch.equal(got.positions, want.positions)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("params", [{}, {"share_route_attention": True}, {"time_buckets": 0}])
def test_routes_and_short_branch_on_rows_train_the_same(info, monkeypatch, params):
    """Each route's ESU and the short branch run on the behaviors as rows (`R2LED.route_rows`, `short_interest`):
    the logits, the loss and every gradient (the embedding tables' included) equal those of the slots' form."""
    from ctr.models.r2led import R2LED

    runs = []
    for slots in (False, True):
        if slots:
            monkeypatch.setattr(R2LED, "route_rows", lambda self, inp: None)
            monkeypatch.setattr(
                R2LED,
                "short_interest",
                lambda self, inp: self.attend_short(None, inp.target, inp.short, inp.short_mask),
            )
        model = build(info, **params).train()
        batch = batches(info, model, 1)[0]
        if not slots:
            inp = model.prepare_routes(batch)
            assert model.route_rows(inp) is not None  # the rows' form runs here (native operators)
            assert (inp.long_mask.sum(1) > 0).any() and (~inp.long_mask).any()
        runs.append(step_of(model, batch))
    (logit, loss, grads), (logit1, loss1, grads1) = runs
    torch.testing.assert_close(logit, logit1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads1.keys()
    assert any("route_attention" in n for n in grads) and any("embedding" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], grads1[n], rtol=1e-4, atol=1e-6, msg=n)
