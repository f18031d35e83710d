"""TWIN: the union over heads, the consistency-preserved GSU against brute force (ties included), the two relevance
paths, the per-behavior cross bias, the ESU against a readable reference, and the behavior types from the loader.

The model-level checks every two-stage model passes run for ``twin`` in tests/test_two_stage.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from model_helpers import batches, build, train_steps  # noqa: E402
from test_two_stage import random_lengths  # noqa: E402

from ctr.modules.gsu import lengths_to_offsets
from ctr.modules.twin import TwinAttention, union_round_robin
from features.loader import LoaderConfig, SequenceView, SplitLoader
from features.sequence_store import SequenceStore

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_union(rankings: list[list[int]], k: int) -> list[int]:
    """Round robin over the heads' rankings (rank 0 of each head, then rank 1, ...) until k distinct positions."""
    out: list[int] = []
    for r in range(max((len(x) for x in rankings), default=0)):
        for ranking in rankings:
            if r < len(ranking) and ranking[r] >= 0 and ranking[r] not in out and len(out) < k:
                out.append(ranking[r])
    return out + [-1] * (k - len(out))


def test_union_round_robin_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3, 8):
        pos = torch.randint(-1, 6, (40, 3, k), generator=gen)
        pos = torch.where(pos < 0, -1, pos)
        pos, _ = torch.sort(pos, dim=2, descending=True)  # real slots first, as a GSU returns them
        sel = union_round_robin(pos, torch.rand(40, 3, k, generator=gen), k)
        for b in range(40):
            assert sel.positions[b].tolist() == brute_union(pos[b].tolist(), k), (k, b)


def randomize_cross(twin: TwinAttention) -> TwinAttention:
    """Cross embeddings away from their neutral (zero) start, so that the tests see the mechanism."""
    with torch.no_grad():
        for table in (twin.time, twin.btype):
            if table is not None:
                table.weight.normal_()
        if twin.time is not None:
            twin.time.weight[0] = 0  # the empty slot's row stays zero
    return twin


def _setup(seed: int, *, btype: bool = True, time_buckets: int = 8):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(gen)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    n = int(offsets[-1])
    torch.manual_seed(seed)
    twin = randomize_cross(TwinAttention(6, heads=3, head_dim=4, time_buckets=time_buckets, btype=btype, cross_dim=3))
    palette = torch.randn(4, 6, generator=gen)  # few distinct behaviors: equal scores happen
    item = torch.randint(0, 4, (n,), generator=gen)
    keys = palette[item]
    gap = 2 ** torch.randint(0, 3, (n,), generator=gen)  # few distinct gap buckets
    bt = torch.randint(0, 2, (n,), generator=gen) if btype else None
    target = torch.randn(len(lengths), 6, generator=gen)
    return twin, lengths, offsets, keys, item, gap, bt, target


@pytest.mark.parametrize("path", ["query", "projected"])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_gsu_is_the_union_of_the_heads_rankings_of_alpha(k, path):
    """The CP-GSU's choice equals brute force over the same α the ESU uses: per head, every behavior of the prefix
    ranked by α (ties to the most recent), then the round-robin union (100% consistency with an exact cache)."""
    twin, lengths, offsets, keys, item, gap, bt, target = _setup(k)
    with torch.no_grad():
        bias = twin.cross_bias(twin.cross_features(gap, bt, gap > 0))
        sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        alpha = copy.deepcopy(twin).double().relevance(target.double(), keys.double(), sample, bias.double())
        sel = twin.search(offsets, target, keys, bias, k, path=path, item_ids=item)
    width = max(1, min(k, max(lengths)))  # no wider than the longest prefix: the rest could only be empty
    assert sel.positions.shape == (len(lengths), width)
    for b, n in enumerate(lengths):
        rows = alpha[offsets[b] : offsets[b] + n]
        rankings = []
        for a in range(twin.heads):
            scores = [round(float(x), 6) for x in rows[:, a]]  # equal behaviors give float-equal scores
            order = sorted(range(n), key=lambda i, s=scores: (-s[i], -i))
            rankings.append(order[:k])
        union = brute_union(rankings, k)
        assert sel.positions[b].tolist() == union[:width] and set(union[width:]) <= {-1}, (b, path)


def test_projected_path_gives_the_query_paths_scores():
    """The paper's per-item projection cache and the folded query compute the same α."""
    twin, lengths, offsets, keys, item, gap, bt, target = _setup(3)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    bias = twin.cross_bias(twin.cross_features(gap, bt, gap > 0))
    via_query = twin.relevance(target, keys, sample, bias, path="query")
    via_cache = twin.relevance(target, keys, sample, bias, path="projected")
    torch.testing.assert_close(via_query, via_cache, rtol=1e-5, atol=1e-5)
    # the cache is a function of the item alone: one projection per distinct item, gathered
    proj = twin.item_projection(keys)
    for i in torch.unique(item):
        rows = proj[item == i]
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_cross_bias_moves_only_its_behavior():
    """Changing one behavior's cross features changes its α and no other (FuxiCTR's constant bias could not)."""
    twin, lengths, offsets, keys, item, gap, bt, target = _setup(5)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    with torch.no_grad():
        before = twin.relevance(target, keys, sample, twin.cross_bias(twin.cross_features(gap, bt, gap > 0)))
        gap2, bt2 = gap.clone(), bt.clone()
        j = int(offsets[6]) + 3  # a behavior of a sample with 40 behaviors
        gap2[j], bt2[j] = 10**7, 1 - bt2[j]
        after = twin.relevance(target, keys, sample, twin.cross_bias(twin.cross_features(gap2, bt2, gap2 > 0)))
    changed = (before != after).any(1)
    assert changed[j] and changed.sum() == 1


def test_esu_matches_a_readable_reference():
    """head_a = softmax over the K of α_a, values the full key [k; cross] through W^v_a; u = concat W^o."""
    torch.manual_seed(0)
    twin = randomize_cross(TwinAttention(6, heads=2, head_dim=3, time_buckets=8, btype=True, cross_dim=2, out_dim=5))
    b, k = 4, 7
    target, keys = torch.randn(b, 6), torch.randn(b, k, 6)
    mask = torch.rand(b, k) < 0.7
    mask[0] = False  # a sample with nothing selected: u = 0
    gap, bt = torch.randint(1, 1000, (b, k)), torch.randint(0, 3, (b, k))
    cross = twin.cross_features(gap, bt, mask)
    bias = twin.cross_bias(cross)
    values = torch.cat([keys, cross.flatten(-2)], -1)
    got = twin(target, keys, values, bias, mask)
    q = twin.w_q(target).view(b, 2, 3)
    kh = twin.w_h(keys).view(b, k, 2, 3)
    heads = []
    for a in range(2):
        alpha = (kh[:, :, a] * q[:, None, a]).sum(-1) / math.sqrt(3) + bias[..., a]
        w = torch.softmax(alpha.masked_fill(~mask, -torch.inf), 1).nan_to_num(0.0)
        heads.append(torch.einsum("bk,bkf,fd->bd", w, values, twin.w_v[a]))
    want = twin.w_o(torch.cat(heads, -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros(5))


@pytest.mark.parametrize(("time_buckets", "btype"), [(8, True), (8, False), (0, True), (0, False)])
def test_cross_bias_from_projected_tables_is_the_reference(time_buckets, btype):
    """The GSU's form (each table mapped to its heads' scalars, then read per behavior) equals the features' bias,
    on a jagged prefix and on [B, K] slots, padded positions included; btype's int8 range stays in its table."""
    torch.manual_seed(3)
    twin = randomize_cross(TwinAttention(6, heads=3, head_dim=2, time_buckets=time_buckets, btype=btype, cross_dim=4))
    if twin.beta is not None:
        with torch.no_grad():
            twin.beta.uniform_(0.5, 1.5)
    for shape in ((97,), (5, 11)):
        gap = torch.randint(0, 10**7, shape)
        bt = torch.randint(-128, 128, shape) if btype else None
        mask = gap > 10**6
        want = twin.cross_bias(twin.cross_features(gap, bt, mask))
        got = twin.cross_bias_of(gap, bt, mask)
        assert got.shape == (*shape, 3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if time_buckets or btype:
            assert got.abs().sum() > 0


def test_cross_features_start_neutral():
    twin = TwinAttention(6, heads=2, head_dim=3, time_buckets=8, btype=True)
    gap = torch.tensor([1, 100, 10**6])
    assert torch.equal(twin.cross_bias(twin.cross_features(gap, torch.tensor([0, 1, 2]), gap > 0)), torch.zeros(3, 2))


def test_no_cross_features():
    twin = TwinAttention(6, heads=2, head_dim=3, time_buckets=0, btype=False)
    assert twin.w_c is None and not any(p is None for p in twin.parameters())
    gap = torch.ones(5, dtype=torch.long)
    assert torch.equal(twin.cross_bias(twin.cross_features(gap, None, gap > 0)), torch.zeros(5, 2))


def test_loader_delivers_behavior_types(info):
    """A view with btype=True carries each behavior's type from the sequence store, aligned with its items."""
    assert info.has_btype
    view = SequenceView("long", 200, btype=True)
    loader = SplitLoader(info, "train", LoaderConfig(batch_size=64, views=(view,), shuffle=False), ["long_item"])
    batch = next(iter(loader))
    store = SequenceStore.open(info.data_dir)
    lengths = batch.dense["long_lengths"].numpy()
    hist = batch.dense["hist_len"].numpy()
    users = batch.dense["user_idx"].numpy()
    got = batch.dense["long_btype"].numpy()
    start = 0
    for u, h, n in zip(users, hist, lengths, strict=True):
        base = store.offsets[u]
        want = np.asarray(store.btype[base + h - n : base + h])
        assert np.array_equal(got[start : start + n], want)
        start += n
    assert start == len(got)


@pytest.mark.parametrize("params", [{"gsu_path": "projected"}, {"use_btype": False, "time_buckets": 0}])
def test_variants_run(info, params):
    model = build(info, "twin", **params)
    losses = train_steps(model, batches(info, model, 3))
    assert all(math.isfinite(v) for v in losses)


# ---- TWIN-V2 ---------------------------------------------------------------------------------------------------------


def test_twin_v2_trains_on_virtual_items(cluster_info):
    model = build(cluster_info, "twin_v2")
    losses = train_steps(model, batches(cluster_info, model, 12))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    model.eval()
    batch = batches(cluster_info, model, 1)[0]
    size = batch.dense["long_size"]
    assert (size > 1).any()  # the batch has clusters, not only singletons
    with torch.no_grad():
        sel, offsets = model.select(batch)
        lengths = batch.dense["long_lengths"]
        assert ((sel.positions < lengths.unsqueeze(1)) | (sel.positions < 0)).all()
        assert (batch.dense["long_ts_gap"] > 0).all()
        # ln n_c moves the scores: without it the same weights rank otherwise for some sample
        off = build(cluster_info, "twin_v2", cluster_size_bias=False)
        off.load_state_dict(model.state_dict())
        sel_off, _ = off.eval().select(batch)
    assert not torch.equal(sel.positions, sel_off.positions)


def test_twin_v2_needs_clusters(info):
    from features.errors import DatasetError

    with pytest.raises(DatasetError, match="ctr cluster"):
        build(info, "twin_v2")


@pytest.mark.parametrize("lengths", [[0, 1, 5, 17, 40, 9], [0, 3000, 1, 900, 2500, 0]])
def test_cpu_search_of_every_head_at_once_equals_one_search_per_head(lengths):
    """The CPU's search (α of every head in one pass, `per_sample_products`, then each head's top k natively) picks
    what one `gsu_topk` per head picks: integer-valued keys and biases make the scores exact and ties common; the
    long batch takes the per-sample matmuls, the short one the vectorized products."""
    from ctr import native

    gen = torch.Generator().manual_seed(1)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    n = int(offsets[-1])
    twin = TwinAttention(8, heads=3, head_dim=4, time_buckets=0, btype=False, cross_dim=3)
    with torch.no_grad():
        for w in (twin.w_q.weight, twin.w_h.weight):
            w.copy_(torch.randint(-1, 2, w.shape, generator=gen).float())
    keys = torch.randint(-2, 3, (n, 8), generator=gen).float()
    bias = torch.randint(-3, 4, (n, 3), generator=gen).float()
    target = torch.randint(-1, 2, (len(lengths), 8), generator=gen).float()
    sels = {}
    for use in (True, False):
        native.set_enabled(use)
        sels[use] = twin.search(offsets, target, keys, bias, 7)
    native.set_enabled(True)
    assert torch.equal(sels[True].positions, sels[False].positions)
    assert torch.equal(sels[True].scores, sels[False].scores)
    assert int((sels[True].positions >= 0).sum()) > 0
