"""Semantic-ID item embeddings (ctr/modules/sid_embedding.py, `item_repr` in ctr/models/base.py): the pieces of
every mode against brute force, hashing into a budget, SentencePiece over SID strings, the pooled lookup against a
plain sum of table rows, random hashing of item ids, every model training with each representation, the errors.

Data: the session's tiny dataset with `ctr sid`'s codes (`sid_data`, 3 levels x 256). Torch on one thread.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None) is None:
    for _name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
        del sys.modules[_name]

from model_helpers import batches, build, train_steps  # noqa: E402

from ctr.models.base import hash_ids  # noqa: E402
from ctr.modules.sid_embedding import (  # noqa: E402
    SID_TABLE,
    SidParams,
    build_pieces,
    ngram_pieces,
    piece_stats,
    prefix_pieces,
    sid_strings,
    spm_pieces,
    unigram_pieces,
)
from features.dataset import DatasetInfo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sinfo(sid_data) -> DatasetInfo:
    return DatasetInfo.load(sid_data)


def _codes(n: int = 300, levels: int = 4, k: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=(n, levels))


# ---- pieces against brute force ------------------------------------------------------------------------------------
def test_unigram_ngram_prefix_pieces_match_brute_force():
    k, levels = 5, 4
    codes = _codes(levels=levels, k=k)
    uni, rows = unigram_pieces(codes, k)
    assert rows == levels * k
    assert uni.tolist() == [[lvl * k + int(c[lvl]) for lvl in range(levels)] for c in codes]

    for n in (1, 2, 3, 4):
        got, rows = ngram_pieces(codes, k, n)
        groups = [list(range(s, min(s + n, levels))) for s in range(0, levels, n)]
        sizes = [k ** len(g) for g in groups]
        assert rows == sum(sizes)
        want = []
        for c in codes:
            row, offset = [], 0
            for g, size in zip(groups, sizes, strict=True):
                v = 0
                for lvl in g:
                    v = v * k + int(c[lvl])
                row.append(offset + v)
                offset += size
            want.append(row)
        assert got.tolist() == want, n

    got, rows = prefix_pieces(codes, k, 3)
    assert rows == k + k**2 + k**3
    table: dict[tuple, int] = {}
    for c in codes:  # every distinct prefix of each length gets its own row, lengths never share one
        for p in range(1, 4):
            table.setdefault(tuple(int(x) for x in c[:p]), 0)
    # same prefix -> same row; different prefixes (of any lengths) -> different rows
    seen: dict[int, tuple] = {}
    for c, row in zip(codes, got, strict=True):
        for p in range(1, 4):
            key = tuple(int(x) for x in c[:p])
            assert seen.setdefault(int(row[p - 1]), key) == key


def test_prefix_level_offsets_keep_c_and_0c_apart():
    codes = np.array([[3, 0], [0, 3]])
    got, _ = prefix_pieces(codes, 5, 2)
    assert got[0, 0] != got[1, 1]  # prefix (3) of item 0 vs prefix (0, 3) of item 1
    assert len({*got[0].tolist(), *got[1].tolist()}) == 4


def test_pieces_hash_into_the_budget_with_a_salt_per_group():
    k = 300
    codes = _codes(n=2000, levels=4, k=k, seed=1)
    exact, rows = ngram_pieces(codes, k, 2)
    assert rows == 2 * k**2
    hashed, rows = ngram_pieces(codes, k, 2, rows=1000, seed=3)
    assert rows == 1000 and hashed.min() >= 0 and hashed.max() < 1000
    assert np.array_equal(hashed, ngram_pieces(codes, k, 2, rows=1000, seed=3)[0])  # deterministic
    assert not np.array_equal(hashed, ngram_pieces(codes, k, 2, rows=1000, seed=4)[0])  # the seed salts it
    # equal pairs hash equally; a salt per group: the same pair in group 0 and group 1 lands in different rows
    same = np.array([[7, 9, 7, 9]])
    h, _ = ngram_pieces(same, k, 2, rows=1 << 20)
    assert h[0, 0] != h[0, 1]
    # the hash spreads: most of the budget is used by 2,000 distinct pairs
    assert len(np.unique(hashed[:, 0])) > 800
    # within the budget, no hashing: exact ids
    assert np.array_equal(ngram_pieces(codes, k, 2, rows=2 * k**2)[0], exact)
    # levels * K^8 would overflow int64 as an exact id: hashed without overflow
    deep = _codes(n=50, levels=8, k=2049, seed=2)
    h, rows = prefix_pieces(deep, 2049, 8, rows=1 << 22)
    assert rows == 1 << 22 and (h >= 0).all() and (h < rows).all()


def test_spm_pieces_merge_frequent_runs_and_spell_every_item():
    import sentencepiece as spm  # noqa: F401  (the dependency is installed)

    k = 6
    codes = _codes(n=400, levels=3, k=k, seed=5)
    weights = np.ones(len(codes))
    weights[0] = 10_000  # one head item
    pieces, rows = spm_pieces(codes, k, 40, weights)
    again, _ = spm_pieces(codes, k, 40, weights)
    assert np.array_equal(pieces, again)  # deterministic
    assert rows == 40 and pieces.max() < 40 and (pieces[:, 0] >= 1).all()  # never <unk>
    n = (pieces >= 0).sum(1)
    assert n[0] == 1  # the head item's whole SID became one piece
    assert (n >= 1).all() and (n <= 3).all() and n.mean() < 3
    # same SID -> same pieces
    dup = np.vstack([codes, codes[:1]])
    p2, _ = spm_pieces(dup, k, 40, np.append(weights, 1.0))
    assert np.array_equal(p2[-1], p2[0])
    assert len(sid_strings(codes[:1], k)[0]) == 3
    with pytest.raises(ValueError, match="distinct"):
        spm_pieces(codes, k, 10, weights)
    with pytest.raises(ValueError, match="needs sid.rows"):
        build_pieces(SidParams(mode="spm"), codes, k, None)
    stats = piece_stats(pieces, rows, weights)
    assert stats["pieces_per_impression"] < stats["pieces_per_item"]


# ---- the pooled lookup in the models -------------------------------------------------------------------------------
def _table(model, name: str) -> torch.Tensor:
    return model.embedding.embeddings[name].weight.detach()


@pytest.mark.parametrize("repr_", ["sid", "id+sid"])
def test_item_vectors_are_the_sum_of_their_piece_rows(sinfo, repr_):
    model = build(sinfo, "din", item_repr=repr_, sid={"mode": "ngram", "n": 2})
    batch = batches(sinfo, model, 1)[0]
    ids = batch.sparse.to_dict()
    emb = model.embed(ids)
    pieces = model.sid_embedding.pieces
    sid_rows = _table(model, SID_TABLE)
    for feat in ("item", "hist_item"):
        items = ids[feat].values().long()
        p = pieces[items]
        want = torch.where((p >= 0).unsqueeze(-1), sid_rows[p.clamp(min=0)], 0.0).sum(1)
        if repr_ == "id+sid":
            want = want + _table(model, "item")[items]
        torch.testing.assert_close(emb[feat].values(), want)
        assert torch.equal(emb[feat].lengths(), ids[feat].lengths())
    names = set(model.embedding.embeddings.keys())
    assert (SID_TABLE in names) and (("item" in names) == (repr_ == "id+sid"))
    assert "sid_embedding.pieces" in model.state_dict()  # the tokenization is saved with the model


def test_item_rows_hash_ids_into_a_fixed_table(sinfo):
    model = build(sinfo, "din", item_rows=97)
    assert _table(model, "item").shape[0] == 97
    batch = batches(sinfo, model, 1)[0]
    ids = batch.sparse.to_dict()
    emb = model.lookup(batch)
    items = ids["hist_item"].values().long()
    rows = hash_ids(items, 97)
    assert rows.min() >= 0 and rows.max() < 97
    torch.testing.assert_close(emb["hist_item"].values(), _table(model, "item")[rows])
    # a universal hash spreads ids: 97 buckets get used by a batch's distinct items
    assert len(torch.unique(rows)) > 80


@pytest.mark.parametrize(
    "name", ["din", "dien", "sim_soft", "sim_hard", "twin", "muse", "eta", "sdim", "tin", "r2led", "diffumin"]
)
def test_every_model_trains_with_semantic_ids(sinfo, name):
    settings = [{"item_repr": "sid"}, {"item_repr": "id+sid", "sid": {"mode": "spm", "rows": 1000}}]
    for kw in settings:
        model = build(sinfo, name, **kw)
        losses = train_steps(model, batches(sinfo, model, 6))
        assert np.isfinite(losses).all() and losses[-1] < losses[0], (name, kw, losses)
        model.eval()
        b = batches(sinfo, model, 1)[0]
        with torch.no_grad():
            assert torch.equal(model(b).logit, model(b).logit)


def test_refusals(sinfo, tiny_data):
    from features.dataset import SemanticIDsMissing

    with pytest.raises(ValueError, match="DARE"):
        build(sinfo, "din", item_repr="sid", dare=True)
    with pytest.raises(SemanticIDsMissing, match="ctr sid"):
        build(DatasetInfo.load(tiny_data), "din", item_repr="sid")
    with pytest.raises(ValueError, match="longer than"):
        build(sinfo, "din", item_repr="sid", sid={"mode": "prefix", "n": 4})


def test_item_first_seen_and_impressions(sinfo):
    import pyarrow.parquet as pq

    first = sinfo.item_first_seen()
    counts = sinfo.item_impressions("train")
    train = pq.read_table(sinfo.data_dir / "samples" / "train")
    items, ts = train["item_idx"].to_numpy(), train["ts"].to_numpy()
    assert counts.sum() == len(items) and counts[items[0]] >= 1
    assert (first[items] <= ts).all()  # every impression is at or after its item's first appearance
    seq = pq.read_table(sinfo.data_dir / "sequences")
    brute: dict[int, int] = {}
    for it, t in zip(seq["item_idx"].to_pylist(), seq["ts"].to_pylist(), strict=True):
        for i, x in zip(it, t, strict=True):
            brute[i] = min(brute.get(i, x), x)
    for split in sinfo.split_rows:
        s = pq.read_table(sinfo.data_dir / "samples" / split, columns=["item_idx", "ts"])
        for i, x in zip(s["item_idx"].to_pylist(), s["ts"].to_pylist(), strict=True):
            brute[i] = min(brute.get(i, x), x)
    never = np.iinfo(np.int64).max
    assert {i: int(v) for i, v in enumerate(first) if v != never} == brute


def test_din_sid_variant_defaults(sinfo):
    from ctr.models import get_model_class

    params = get_model_class("din_sid").Params()
    assert params.item_repr == "sid" and params.sid.mode == "spm" and params.sid.rows == 16384
    assert get_model_class("din").Params().item_repr == "id"  # the backbone is unchanged
    model = build(sinfo, "din_sid")
    assert model.sid_embedding is not None and "item" not in model.embedding.embeddings
