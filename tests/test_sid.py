"""Semantic IDs (pipelines/sid.py): RQ-KMeans codes, collision suffix, int8 input, missing embeddings, the rewrite
of items.parquet and the manifest block.

The end-to-end tests copy items.parquet and manifest.json of the session's tiny dataset (`tiny_data`, read-only)
into a temporary directory; set ``CTR_TEST_MODELS_DATA`` to a built dataset directory to skip the build. The other
tests write small dataset directories of their own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sid import (
    SUFFIX_COLUMN,
    build_semantic_ids,
    collision_rate,
    disambiguate,
    fit_rq_kmeans,
    load_semantic_id_quantizer,
)


@pytest.fixture(scope="module")
def tiny_dir(request) -> Path:
    prebuilt = os.environ.get("CTR_TEST_MODELS_DATA")
    return Path(prebuilt or request.getfixturevalue("tiny_data"))


@pytest.fixture
def data_dir(tiny_dir, tmp_path) -> Path:
    """A writable copy of the tiny dataset's items.parquet and manifest.json (all build_semantic_ids reads)."""
    out = tmp_path / "data"
    out.mkdir()
    for name in ("items.parquet", "manifest.json"):
        shutil.copy(tiny_dir / name, out / name)
    return out


def write_dataset(root: Path, emb: np.ndarray | list, cate: np.ndarray, value_type: pa.DataType) -> Path:
    """A minimal dataset directory: items.parquet (item_idx, cate_idx, mm_emb) and a manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    dim = next(len(e) for e in emb if e is not None)
    typ = pa.list_(value_type, dim)
    items = pa.table({
        "item_idx": pa.array(np.arange(len(emb), dtype=np.int32) + 2),
        "cate_idx": pa.array(np.asarray(cate, dtype=np.int32)),
        "mm_emb": pa.array([None if e is None else list(e) for e in emb], type=typ),
    })  # fmt: skip
    pq.write_table(items, root / "items.parquet")
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "vocab_sizes": {"item": len(emb) + 2}}))
    return root


# ---- the quantizer ---------------------------------------------------------------------------------------------


def test_reconstruction_falls_with_levels_on_random_data():
    x = np.random.default_rng(1).standard_normal((3000, 16)).astype(np.float32)
    q = fit_rq_kmeans(x, levels=4, codebook_size=32, seed=0)
    assert q.codebooks.shape == (4, 32, 16)
    mse = q.reconstruction_mse(x)
    assert all(a > b for a, b in zip(mse, mse[1:], strict=False)), mse
    assert mse[0] < float(((x - x.mean(0)) ** 2).mean())
    codes, err, _ = q.encode(x)
    for lvl in range(1, 5):  # decode(codes, l) is the reconstruction whose error encode reports
        np.testing.assert_allclose(((x - q.decode(codes, lvl)) ** 2).sum(1), err[:, lvl - 1], rtol=1e-4, atol=1e-4)
    # the first levels of a deeper quantizer are the shallower one (level draws do not depend on depth)
    shallow = fit_rq_kmeans(x, levels=2, codebook_size=32, seed=0)
    np.testing.assert_array_equal(shallow.codebooks, q.codebooks[:2])


def test_reconstruction_falls_with_levels_on_the_tiny_world(data_dir):
    for levels, k in ((4, 16), (3, 256)):
        block = build_semantic_ids(data_dir, levels=levels, codebook_size=k)
        mse = block["reconstruction_mse"]
        assert len(mse) == levels and all(a > b for a, b in zip(mse, mse[1:], strict=False)), mse
        assert mse[0] < block["variance"]
    q, x, present = load_semantic_id_quantizer(data_dir, levels=3, codebook_size=256)
    assert present.all() and q.codebooks.shape == (3, 256, x.shape[1])
    np.testing.assert_allclose(q.reconstruction_mse(x), block["reconstruction_mse"], rtol=1e-4)
    items = pq.read_table(data_dir / "items.parquet")
    codes = np.column_stack([items[f"sid_{i}"].to_numpy() for i in range(3)])
    np.testing.assert_array_equal(codes, q.encode(x)[0])


def test_deterministic_under_a_seed():
    x = np.random.default_rng(2).standard_normal((5000, 8)).astype(np.float32)
    a = fit_rq_kmeans(x, 3, 64, seed=7, fit_sample=2000)
    b = fit_rq_kmeans(x, 3, 64, seed=7, fit_sample=2000)
    c = fit_rq_kmeans(x, 3, 64, seed=8, fit_sample=2000)
    np.testing.assert_array_equal(a.codebooks, b.codebooks)
    np.testing.assert_array_equal(a.encode(x)[0], b.encode(x)[0])
    assert not np.array_equal(a.codebooks, c.codebooks)


# ---- collisions -------------------------------------------------------------------------------------------------


def test_disambiguate_suffix():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    rank = np.array([0.5, 0.0, 0.1, 0.5, 0.0])
    suffix = disambiguate(codes, rank)
    # the group (1, 2): rank 0.1 first, then the two 0.5 in row order
    np.testing.assert_array_equal(suffix, [1, 0, 0, 2, 0])
    assert collision_rate(codes) == pytest.approx(0.6)
    assert collision_rate(np.column_stack([codes, suffix])) == 0.0


def test_collisions_resolved(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 8)).astype(np.float32)
    emb = np.concatenate([base, base[:100], base[:20]])  # identical embeddings cannot be split by any level
    root = write_dataset(tmp_path / "d", emb, rng.integers(2, 6, len(emb)), pa.float32())
    block = build_semantic_ids(root, levels=2, codebook_size=8)
    assert block["collision_rate_before"] >= 120 / len(emb)
    assert block["collision_rate_after"] == 0.0
    items = pq.read_table(root / "items.parquet")
    full = np.column_stack([items[c].to_numpy() for c in block["columns"]])
    assert len(np.unique(full, axis=0)) == len(emb)
    assert block["max_suffix"] == int(items[SUFFIX_COLUMN].to_numpy().max()) >= 2
    suffix = items[SUFFIX_COLUMN].to_numpy()
    assert (suffix >= 0).all() and items.schema.field(SUFFIX_COLUMN).type == pa.int32()


# ---- input kinds ------------------------------------------------------------------------------------------------


def test_int8_embeddings_are_dequantized(tmp_path):
    rng = np.random.default_rng(4)
    q8 = rng.integers(-127, 128, (400, 16)).astype(np.int8)
    cate = rng.integers(2, 5, 400)
    block = build_semantic_ids(write_dataset(tmp_path / "i8", q8, cate, pa.int8()), levels=3, codebook_size=16)
    ref = build_semantic_ids(
        write_dataset(tmp_path / "f32", q8.astype(np.float32) / 127.0, cate, pa.float32()), levels=3, codebook_size=16
    )
    assert block["input_dtype"] == "int8" and block["dequantize"] == "x / 127"
    assert block["reconstruction_mse"] == ref["reconstruction_mse"]
    a, b = pq.read_table(tmp_path / "i8" / "items.parquet"), pq.read_table(tmp_path / "f32" / "items.parquet")
    for col in block["columns"]:
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())
    assert pq.read_schema(tmp_path / "i8" / "items.parquet").field("mm_emb").type.value_type == pa.int8()


@pytest.mark.parametrize("policy", ["category", "reserved"])
def test_missing_embeddings_get_the_fallback_code(tmp_path, policy):
    rng = np.random.default_rng(5)
    emb: list = [list(v) for v in rng.standard_normal((200, 8)).astype(np.float32)]
    cate = np.full(200, 2)
    cate[100:] = 3
    emb[5] = None  # null, category 2
    emb[150] = [0.0] * 8  # all zero, category 3
    emb[199] = None
    cate[199] = 4  # a category without any embedded item: always reserved
    root = write_dataset(tmp_path / "d", emb, cate, pa.float32())
    block = build_semantic_ids(root, levels=2, codebook_size=8, missing=policy)
    assert block["missing_items"] == 3 and block["missing_policy"] == policy
    items = pq.read_table(root / "items.parquet")
    codes = np.column_stack([items["sid_0"].to_numpy(), items["sid_1"].to_numpy()])
    np.testing.assert_array_equal(codes[199], [8, 8])
    if policy == "reserved":
        assert block["reserved_items"] == 3
        for row in (5, 150):
            np.testing.assert_array_equal(codes[row], [8, 8])
    else:
        assert block["reserved_items"] == 1
        q, x, present = load_semantic_id_quantizer(root, levels=2, codebook_size=8)
        assert present.sum() == 197
        for row, sel in ((5, slice(0, 100)), (150, slice(100, 199))):
            mean = x[sel][present[sel]].mean(0, keepdims=True)
            np.testing.assert_array_equal(codes[row], q.encode(mean)[0][0])
    assert (codes[present_rows(emb)] < 8).all()
    assert block["collision_rate_after"] == 0.0


def present_rows(emb: list) -> np.ndarray:
    return np.array([e is not None and any(v != 0 for v in e) for e in emb])


def test_no_embedding_column_is_a_clear_error(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    pq.write_table(pa.table({"item_idx": pa.array([2, 3], pa.int32())}), root / "items.parquet")
    (root / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="mm_emb"):
        build_semantic_ids(root)


# ---- the rewrite of items.parquet and manifest.json --------------------------------------------------------------


def test_items_and_manifest_rewritten_and_idempotent(data_dir):
    before = pq.read_table(data_dir / "items.parquet")
    manifest_before = json.loads((data_dir / "manifest.json").read_text())
    block = build_semantic_ids(data_dir, levels=3, codebook_size=64, seed=3)
    after = pq.read_table(data_dir / "items.parquet")
    # every original column and row, unchanged and in order; then the new int32 columns
    assert after.column_names == before.column_names + ["sid_0", "sid_1", "sid_2", SUFFIX_COLUMN]
    assert after.select(before.column_names).equals(before)
    for col in block["columns"]:
        assert after.schema.field(col).type == pa.int32()
    for i in range(3):
        codes = after[f"sid_{i}"].to_numpy()
        assert codes.min() >= 0 and codes.max() < 64
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "semantic_ids"} == manifest_before
    sid = manifest["semantic_ids"]
    assert sid == block
    for key in ("levels", "codebook_size", "method", "seed", "reconstruction_mse", "collision_rate_before",
                "collision_rate_after", "utilization"):  # fmt: skip
        assert key in sid, key
    assert sid["levels"] == 3 and sid["codebook_size"] == 64 and sid["seed"] == 3 and sid["method"] == "rq-kmeans"
    assert len(sid["utilization"]) == 3 and all(0 < u <= 1 for u in sid["utilization"])
    assert sid["collision_rate_after"] == 0.0
    assert not list(data_dir.glob(".*tmp*")), "no temporary files left behind"

    again = build_semantic_ids(data_dir, levels=3, codebook_size=64, seed=3)
    assert pq.read_table(data_dir / "items.parquet").equals(after)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in block.items() if k != "seconds"}
    # a re-run with fewer levels replaces every earlier sid column
    build_semantic_ids(data_dir, levels=2, codebook_size=16, seed=3)
    cols = pq.read_schema(data_dir / "items.parquet").names
    assert cols == before.column_names + ["sid_0", "sid_1", SUFFIX_COLUMN]


# ---- RQ-VAE (pipelines/rqvae.py) and the prefix statistics -------------------------------------------------------
def _clustered(n: int = 3000, dim: int = 16, centers: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)).astype(np.float32)
    return c[rng.integers(0, centers, n)] + 0.1 * rng.normal(size=(n, dim)).astype(np.float32)


def test_rq_vae_trains_and_dead_code_reset_raises_codebook_use():
    from pipelines.rqvae import train_rq_vae

    x = _clustered()
    kw = {"levels": 3, "codebook_size": 64, "steps": 150, "batch": 256, "seed": 1}
    model = train_rq_vae(x, **kw)
    assert model.loss_last < model.loss_first
    codes, err, resid = model.encode(x)
    assert codes.shape == (len(x), 3) and codes.min() >= 0 and codes.max() < 64
    assert (np.diff(err.mean(0)) < 0).all()  # each level lowers the latent's quantization error
    np.testing.assert_allclose(resid, np.sqrt(err[:, -1]))
    again = train_rq_vae(x, **kw)
    assert np.array_equal(again.encode(x)[0], codes)  # deterministic under the seed
    no_reset = train_rq_vae(x, **kw, dead_code_reset=False)
    use = [len(np.unique(codes[:, j])) for j in range(3)]
    use_no_reset = [len(np.unique(no_reset.encode(x)[0][:, j])) for j in range(3)]
    assert sum(model.resets) > 0 and sum(use) > sum(use_no_reset), (use, use_no_reset)
    assert model.decoder_mse(x) < float(x.var())  # the decoder reconstructs better than the mean


def test_prefix_unique_matches_brute_force():
    from pipelines.sid import prefix_unique

    codes = np.random.default_rng(3).integers(0, 3, size=(200, 4))
    for p in range(1, 5):
        keys = [tuple(r[:p]) for r in codes.tolist()]
        want = sum(keys.count(k) == 1 for k in keys) / len(keys)
        assert prefix_unique(codes, p) == pytest.approx(want)


def test_build_semantic_ids_rq_vae_block(data_dir):
    block = build_semantic_ids(data_dir, levels=4, codebook_size=32, method="rq-vae", steps=60)
    assert block["method"] == "rq-vae" and block["steps"] == 60 and len(block["dead_code_resets"]) == 4
    assert block["decoder_mse"] > 0 and block["latent_dim"] >= 1
    assert len(block["prefix_unique"]) == 4 and block["prefix_unique"] == sorted(block["prefix_unique"])
    t = pq.read_table(data_dir / "items.parquet")
    assert [c for c in t.column_names if c.startswith("sid_")] == ["sid_0", "sid_1", "sid_2", "sid_3", SUFFIX_COLUMN]
    assert json.loads((data_dir / "manifest.json").read_text())["semantic_ids"]["method"] == "rq-vae"
    with pytest.raises(ValueError, match="method"):
        build_semantic_ids(data_dir, method="vq")
