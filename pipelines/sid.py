"""Semantic IDs: residual quantization of the items' multimodal embeddings (for R2LED's SID routes).

`build_semantic_ids(DATA_DIR)` reads ``DATA_DIR/items.parquet`` (``mm_emb``), fits an RQ-KMeans quantizer, and adds
to every item row::

    sid_0 .. sid_{levels-1}   int32, 0-based codes, coarse -> fine (sid_0 alone is the coarsest route)
    sid_suffix                int32, 0-based disambiguation index among items with the same full code

then rewrites items.parquet and records a ``semantic_ids`` block in manifest.json (both atomically: written aside,
then ``os.replace``). Every original column and row is kept, in the same order; earlier ``sid_*`` columns are
replaced, so a re-run with the same arguments gives the same files (idempotent).

Method (R2LED, Liu et al., arXiv 2602.06622, says "Semantic IDs" but its tokenizer is not public; see models.md
§5.2: RQ-KMeans or TIGER's RQ-VAE, 3 levels x 256 codes, optional 4th code for collisions)::

    r_0 = x
    for level l = 0 .. levels-1:
        C_l = k-means(r_l, K)            k-means++ init, then `iters` Lloyd iterations (stops early once stable)
        c_l = argmin_k ||r_l - C_l[k]||²
        r_{l+1} = r_l - C_l[c_l]         x̂_l = Σ_{j<=l} C_j[c_j], reconstruction_mse[l] = mean ||x - x̂_l||² / D

Choices (documented, not from the paper):

* **RQ-KMeans by default**: deterministic under a seed, no training loop, the common choice in recent industrial
  SID work. TIGER's RQ-VAE (Rajput et al., NeurIPS 2023), which the semantic-ID ranking paper (Singh et al.,
  RecSys '24) uses with 8 levels, β = 0.25 and dead-code reset, is ``method="rq-vae"`` (`pipelines.rqvae`).
* **Subsampled fitting**: the codebooks are fitted on at most ``fit_sample`` items drawn without replacement
  (default 65,536 = 256 points per centroid at K = 256), then *every* item is encoded with them in chunks. With
  1M items x 128 dims, fitting costs 3 levels x 20 iterations over 64K points (seconds) and encoding one pass over
  the catalog; memory is the float32 catalog plus one chunk x K distance block. With fewer items than
  ``fit_sample`` the fit is exact Lloyd on all items. Empty clusters are re-seeded with the points farthest from
  their centroid. Measured (one CPU thread, 1M items x 128 int8, 3 x 256): 50 s in all, of which about 11 s
  reading items.parquet, 19 s fitting, 8 s encoding, 6 s writing.
* **Deterministic under a seed**: the fitting sample and each level's k-means++ draws come from the seed (level l
  from ``(seed, l)``). The distances are float32 BLAS products, so a different BLAS or thread count could in
  principle flip an exact tie; on one machine a re-run gives identical files.
* **Collisions: a suffix index, TIGER-style** (Rajput et al. append a 4th code so that each item's SID is unique).
  Items sharing the full code ``(sid_0 .. sid_{L-1})`` get ``sid_suffix`` = 0, 1, 2, ... in order of their final
  residual norm (the item closest to the code's reconstruction gets 0; ties by row order); an item alone in its
  code gets 0. An extra k-means level would not guarantee uniqueness (identical embeddings, groups larger than K),
  the suffix does by construction, needs no fitting and leaves the semantic levels untouched, so prefix routes
  (R2LED's multi-granularity recall) ignore it. ``(sid_0, .., sid_{L-1}, sid_suffix)`` is unique per item.
* **int8 embeddings** (e.g. Taobao-MM's SCL int8 vectors) are dequantized as ``x / 127`` (symmetric int8 with an
  unknown scale). k-means is invariant to a global scale, so the codes do not depend on the choice; the reported
  MSE is in the dequantized units.
* **Items without an embedding** (a null ``mm_emb``, or an all-zero vector) are not used to fit. With
  ``missing="category"`` (default) such an item gets the codes of its category's mean embedding (the mean over the
  category's embedded items), so SID routes still group it with its category; if the category has no embedded
  item, or with ``missing="reserved"``, it gets the reserved code ``K`` (= ``codebook_size``) at every level. So
  code tables need ``K + 1`` rows per level (recorded as ``num_codes``). The reconstruction and utilization
  statistics count embedded items only.

items.parquet has one row per real item (item_idx >= 2); the padding and out-of-vocabulary indices have no row.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.dataset import items_path, manifest_path, read_manifest, write_manifest
from features.schema import MM_EMB_COLUMN

log = logging.getLogger(__name__)

METHOD = "rq-kmeans"
SUFFIX_COLUMN = "sid_suffix"
INT8_SCALE = 127.0
_DIST_BLOCK = 1 << 24  # floats per distance block (chunk x K), 64 MiB in float32


def sid_columns(levels: int) -> list[str]:
    """The code columns written for `levels` levels: ``sid_0 .. sid_{levels-1}``."""
    return [f"sid_{i}" for i in range(levels)]


def _is_sid_column(name: str) -> bool:
    return name == SUFFIX_COLUMN or (name.startswith("sid_") and name[4:].isdigit())


# --------------------------------------------------------------------------------------------------------------------
# k-means building blocks (numpy, float32, chunked)
# --------------------------------------------------------------------------------------------------------------------
def _chunk_rows(k: int) -> int:
    return max(1024, _DIST_BLOCK // max(1, k))


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``x [N, D]``: the index of its nearest centroid and the squared distance to it."""
    c_sq = np.einsum("kd,kd->k", centroids, centroids)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    step = _chunk_rows(len(centroids))
    for s in range(0, len(x), step):
        xb = x[s : s + step]
        d = xb @ centroids.T
        d *= -2.0
        d += c_sq
        best = np.argmin(d, axis=1)
        x_sq = np.einsum("nd,nd->n", xb, xb)
        idx[s : s + step] = best
        dist[s : s + step] = np.maximum(d[np.arange(len(xb)), best] + x_sq, 0.0)
    return idx, dist


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, SODA 2007): each next center is drawn with probability
    proportional to the squared distance to the nearest center so far. Returns ``[k, D]`` (copies of rows of x)."""
    n = len(x)
    x_sq = np.einsum("nd,nd->n", x, x, dtype=np.float64)

    def dist_to(i: int) -> np.ndarray:
        return np.maximum(x_sq - 2.0 * (x @ x[i]).astype(np.float64) + x_sq[i], 0.0)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    d2 = dist_to(int(chosen[0]))
    for j in range(1, k):
        cum = np.cumsum(d2)
        total = cum[-1]
        if total <= 0:  # fewer distinct points than k: duplicates
            chosen[j] = rng.integers(n)
        else:
            chosen[j] = min(int(np.searchsorted(cum, rng.random() * total, side="right")), n - 1)
        np.minimum(d2, dist_to(int(chosen[j])), out=d2)
    return x[chosen].copy()


def kmeans(x: np.ndarray, k: int, *, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means from a k-means++ start: at most `iters` (assign, update) rounds, stopping early when the
    assignment no longer changes. Empty clusters are re-seeded with the points farthest from their centroid.
    Returns the centroids ``[k, D]`` float32."""
    centroids = kmeans_plusplus(x, k, rng)
    prev: np.ndarray | None = None
    for _ in range(iters):
        assign, dist = nearest(x, centroids)
        if prev is not None and np.array_equal(assign, prev):
            break
        prev = assign
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=k)
        used = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[used]
        sums = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
        centroids[used] = (sums / counts[used, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            centroids[empty[: len(far)]] = x[far]
    return centroids


# --------------------------------------------------------------------------------------------------------------------
# the residual quantizer
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ResidualQuantizer:
    """Codebooks of a residual quantizer: ``codebooks[l]`` [K, D] quantizes the residual after levels < l."""

    codebooks: np.ndarray  # [levels, K, D] float32

    @property
    def levels(self) -> int:
        return int(self.codebooks.shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.codebooks.shape[1])

    def encode(self, x: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [N, D] -> (codes [N, levels] int32, squared error after each level [N, levels] float64,
        final residual norm [N] float64)."""
        x = np.asarray(x, dtype=np.float32)
        n = len(x)
        codes = np.empty((n, self.levels), dtype=np.int32)
        err = np.empty((n, self.levels), dtype=np.float64)
        for s in range(0, n, chunk):
            r = x[s : s + chunk].copy()
            for lvl, book in enumerate(self.codebooks):
                c, _ = nearest(r, book)
                r -= book[c]
                codes[s : s + chunk, lvl] = c
                err[s : s + chunk, lvl] = np.einsum("nd,nd->n", r, r, dtype=np.float64)
        return codes, err, np.sqrt(err[:, -1]) if self.levels else np.zeros(n)

    def decode(self, codes: np.ndarray, levels: int | None = None) -> np.ndarray:
        """codes [N, >= levels] -> the reconstruction from the first `levels` levels (default all), [N, D]."""
        use = self.levels if levels is None else levels
        out = np.zeros((len(codes), self.codebooks.shape[2]), dtype=np.float32)
        for lvl in range(use):
            out += self.codebooks[lvl][codes[:, lvl]]
        return out

    def reconstruction_mse(self, x: np.ndarray) -> list[float]:
        """Mean squared error per element after 1, 2, ..., levels levels."""
        _, err, _ = self.encode(x)
        dim = max(1, x.shape[1])
        return [float(v) / dim for v in err.mean(0)] if len(x) else [0.0] * self.levels


def fit_rq_kmeans(
    x: np.ndarray,
    levels: int = 3,
    codebook_size: int = 256,
    *,
    seed: int = 0,
    iters: int = 20,
    fit_sample: int | None = 65536,
) -> ResidualQuantizer:
    """Fit RQ-KMeans codebooks on ``x [N, D]`` (float): level l runs k-means on the residuals of levels < l.

    Deterministic under `seed`. At most `fit_sample` rows (drawn without replacement; None = all) are used to fit;
    level l's draws do not depend on the number of levels, so the first l codebooks of a deeper quantizer equal
    those of a shallower one with the same seed. With fewer distinct points than `codebook_size`, some centroids
    are duplicates (utilization < 1).
    """
    if levels < 1 or codebook_size < 1:
        raise ValueError(f"levels and codebook_size must be >= 1, got {levels} and {codebook_size}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty [N, D] matrix of embeddings, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    sample = x
    if fit_sample is not None and len(x) > fit_sample:
        sample = x[np.sort(rng.choice(len(x), size=fit_sample, replace=False))]
    residual = sample.copy()
    books = []
    for lvl in range(levels):
        level_rng = np.random.default_rng([seed, lvl])
        book = kmeans(residual, codebook_size, iters=iters, rng=level_rng)
        c, _ = nearest(residual, book)
        residual -= book[c]
        books.append(book)
    return ResidualQuantizer(np.stack(books))


def disambiguate(codes: np.ndarray, rank_key: np.ndarray) -> np.ndarray:
    """TIGER-style suffix: 0, 1, ... among rows with the same full code, in order of `rank_key` (then row order).

    codes [N, L] int, rank_key [N] -> suffix [N] int32; ``(codes, suffix)`` is unique per row.
    """
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    keys = (np.arange(n), rank_key, *[codes[:, j] for j in range(codes.shape[1] - 1, -1, -1)])
    order = np.lexsort(keys)
    sc = codes[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (sc[1:] != sc[:-1]).any(1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    suffix = np.empty(n, dtype=np.int32)
    suffix[order] = np.arange(n) - group_start
    return suffix


def prefix_unique(codes: np.ndarray, length: int) -> float:
    """Fraction of rows whose first ``length`` codes no other row shares (1 - the collision rate of the prefix)."""
    return 1.0 - collision_rate(codes[:, :length]) if len(codes) else 1.0


def collision_rate(codes: np.ndarray) -> float:
    """Fraction of rows whose full code (all columns) is shared with another row."""
    n = len(codes)
    if n == 0:
        return 0.0
    order = np.lexsort([codes[:, j] for j in range(codes.shape[1] - 1, -1, -1)])
    sc = codes[order]
    same_as_prev = np.zeros(n, dtype=bool)
    same_as_prev[1:] = (sc[1:] == sc[:-1]).all(1)
    shared = same_as_prev.copy()
    shared[:-1] |= same_as_prev[1:]
    return float(shared.mean())


# --------------------------------------------------------------------------------------------------------------------
# items.parquet I/O
# --------------------------------------------------------------------------------------------------------------------
def item_embeddings(items: pa.Table, path: str = "items.parquet") -> tuple[np.ndarray, np.ndarray, str]:
    """The ``mm_emb`` column as float32 ``[N, D]`` (zeros where missing), a bool ``present [N]`` (non-null, not
    all zero, finite), and the stored value type (``float`` or ``int8``, the latter dequantized as x / 127)."""
    if MM_EMB_COLUMN not in items.column_names:
        raise ValueError(
            f"{path}: no {MM_EMB_COLUMN} column; semantic IDs quantize the items' multimodal embeddings. How to fix: "
            f"build the dataset from an items table with an {MM_EMB_COLUMN} fixed_size_list<float32 | int8>[D] column"
        )
    arr = items[MM_EMB_COLUMN].combine_chunks()
    if isinstance(arr, pa.ChunkedArray):  # an empty table
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], type=arr.type)
    typ = arr.type
    if not pa.types.is_fixed_size_list(typ):
        raise ValueError(f"{path}: {MM_EMB_COLUMN} must be fixed_size_list<float32 | int8>[D], got {typ}")
    dim = typ.list_size
    value_type = typ.value_type
    n = len(arr)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False)).reshape(-1, dim)
    x = np.zeros((n, dim), dtype=np.float32)
    if pa.types.is_int8(value_type):
        x[valid] = flat.astype(np.float32) / INT8_SCALE
        kind = "int8"
    else:
        x[valid] = flat.astype(np.float32)
        kind = "float"
    present = valid & np.isfinite(x).all(1) & (x != 0).any(1)
    x[~present] = 0.0
    return x, present, kind


def _sig(v: float) -> float:
    """`v` to 8 significant digits (for manifest.json)."""
    return float(f"{v:.8g}")


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_semantic_ids(
    data_dir: str | Path,
    levels: int = 3,
    codebook_size: int = 256,
    *,
    seed: int = 0,
    iters: int = 20,
    fit_sample: int | None = 65536,
    missing: Literal["category", "reserved"] = "category",
    method: Literal["rq-kmeans", "rq-vae"] = "rq-kmeans",
    steps: int = 3000,
) -> dict[str, Any]:
    """Add semantic-ID columns to ``DATA_DIR/items.parquet`` and a ``semantic_ids`` block to its manifest.json.

    Args:
        data_dir: a dataset directory written by ``ctr build`` (items.parquet with ``mm_emb``, manifest.json).
        levels: residual levels L (columns ``sid_0 .. sid_{L-1}``); R2LED reconstruction default 3.
        codebook_size: codes per level K (default 256); codes are 0..K-1, K is the reserved "no embedding" code.
        seed: fixes the fitting sample and every k-means++ draw; same inputs + seed give the same codes.
        iters: Lloyd iterations per level (at most; stops early once assignments are stable).
        fit_sample: fit the codebooks on at most this many items (None = all); every item is encoded.
        missing: codes for items without an embedding: ``category`` (their category's mean embedding, else
            reserved) or ``reserved`` (K at every level).
        method: ``rq-kmeans`` (default) or ``rq-vae`` (`pipelines.rqvae`: an encoder, a residual quantizer trained
            with β = 0.25 and dead-code reset, a decoder; the codes quantize the encoder's latent).
        steps: rq-vae training steps (batches of 1,024 items).

    Returns:
        The ``semantic_ids`` block written to manifest.json: levels, codebook_size, num_codes, method, seed, iters,
        items, fit_items, missing policy and count, input dtype, reconstruction_mse per level (mean over embedded
        items of ||x - x̂||² / D after 1..L levels), variance (the same for x̂ = the mean, for scale),
        collision_rate_before / collision_rate_after (fraction of items sharing their full code, without / with
        the suffix), max_suffix, utilization and perplexity per level, prefix_unique (for each prefix length
        1..L, the share of items no other item shares it with), columns, seconds; rq-vae adds latent_dim,
        decoder_mse, steps, loss_first / loss_last and dead_code_resets per level (its reconstruction_mse is the
        latent's quantization error per latent dimension).

    See the module docstring for the method and every choice. Both files are replaced atomically.
    """
    t0 = time.time()
    data_dir = Path(data_dir)
    items_file, manifest_file = items_path(data_dir), manifest_path(data_dir)
    if not manifest_file.exists() or not items_file.exists():
        raise FileNotFoundError(
            f"{data_dir}: needs items.parquet and manifest.json; DATA_DIR must be a dataset directory from `ctr build`"
        )
    if method not in ("rq-kmeans", "rq-vae"):
        raise ValueError(f"method must be 'rq-kmeans' or 'rq-vae', got {method!r}")
    if missing not in ("category", "reserved"):
        raise ValueError(f"missing must be 'category' or 'reserved', got {missing!r}")
    items = pq.read_table(items_file)
    items = items.drop_columns([c for c in items.column_names if _is_sid_column(c)])
    x, present, kind = item_embeddings(items, str(items_file))
    n = len(x)
    if not present.any():
        raise ValueError(f"{items_file}: no item has a usable {MM_EMB_COLUMN} (all null or zero)")

    x_emb = x if present.all() else x[present]
    quantizer: Any
    if method == "rq-kmeans":
        quantizer = fit_rq_kmeans(x_emb, levels, codebook_size, seed=seed, iters=iters, fit_sample=fit_sample)
        err_dim = x.shape[1]
    else:
        from pipelines.rqvae import train_rq_vae

        quantizer = train_rq_vae(x_emb, levels, codebook_size, seed=seed, steps=steps)
        err_dim = quantizer.latent_dim
    codes = np.full((n, levels), codebook_size, dtype=np.int32)
    rank = np.full(n, np.inf)
    emb_codes, sq_err, resid = quantizer.encode(x_emb)
    codes[present] = emb_codes
    rank[present] = resid
    n_missing = n - len(x_emb)
    if n_missing and missing == "category" and "cate_idx" in items.column_names:
        cate = np.asarray(items["cate_idx"].to_numpy(zero_copy_only=False), dtype=np.int64)
        n_cate = int(cate.max()) + 1
        cp = cate[present]
        sums = np.stack([np.bincount(cp, weights=x_emb[:, j], minlength=n_cate) for j in range(x.shape[1])], 1)
        counts = np.bincount(cp, minlength=n_cate)
        has = counts > 0
        means = (sums[has] / counts[has, None]).astype(np.float32)
        cate_codes = np.full((n_cate, levels), codebook_size, dtype=np.int32)
        cate_codes[has] = quantizer.encode(means)[0]
        codes[~present] = cate_codes[cate[~present]]
    suffix = disambiguate(codes, rank)

    used = [np.bincount(emb_codes[:, j], minlength=codebook_size) for j in range(levels)]
    probs = [u / max(1, u.sum()) for u in used]
    mean = x_emb.mean(0, dtype=np.float64)
    variance = float(np.einsum("nd,nd->", x_emb, x_emb, dtype=np.float64) / x_emb.size - (mean**2).mean())
    block: dict[str, Any] = {
        "levels": levels,
        "codebook_size": codebook_size,
        "num_codes": codebook_size + 1,
        "method": method,
        "seed": seed,
        "iters": iters,
        "items": n,
        "fit_items": int(min(int(present.sum()), fit_sample if fit_sample is not None else n)),
        "input_dtype": kind,
        "dequantize": f"x / {INT8_SCALE:g}" if kind == "int8" else None,
        "missing_policy": missing,
        "missing_items": n_missing,
        "reserved_code": codebook_size,
        "reserved_items": int((codes[:, 0] == codebook_size).sum()),
        "reconstruction_mse": [_sig(float(v) / err_dim) for v in sq_err.mean(0)],
        "variance": _sig(variance),
        "collision_rate_before": _sig(collision_rate(codes)),
        "collision_rate_after": _sig(collision_rate(np.column_stack([codes, suffix]))),
        "max_suffix": int(suffix.max()) if n else 0,
        "utilization": [_sig(float((u > 0).mean())) for u in used],
        "perplexity": [_sig(float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))) for p in probs],
        "prefix_unique": [_sig(prefix_unique(codes, p)) for p in range(1, levels + 1)],
        "columns": [*sid_columns(levels), SUFFIX_COLUMN],
    }
    if method == "rq-vae":
        block |= {
            "latent_dim": quantizer.latent_dim,
            "decoder_mse": _sig(quantizer.decoder_mse(x_emb)),
            "steps": steps,
            "loss_first": _sig(quantizer.loss_first),
            "loss_last": _sig(quantizer.loss_last),
            "dead_code_resets": quantizer.resets,
        }

    out = items
    for j, name in enumerate(sid_columns(levels)):
        out = out.append_column(name, pa.array(codes[:, j], type=pa.int32()))
    out = out.append_column(SUFFIX_COLUMN, pa.array(suffix, type=pa.int32()))
    _write_atomic(items_file, lambda p: pq.write_table(out, p))
    block["seconds"] = round(time.time() - t0, 3)
    manifest = read_manifest(data_dir)
    manifest["semantic_ids"] = block
    write_manifest(data_dir, manifest)
    log.info(
        "semantic ids: %d items, %d x %d codes, mse %s, collisions %.4f -> %.4f, %.1f s",
        n, levels, codebook_size, block["reconstruction_mse"], block["collision_rate_before"],
        block["collision_rate_after"], block["seconds"],
    )  # fmt: skip
    return block


def load_semantic_id_quantizer(
    data_dir: str | Path,
    levels: int = 3,
    codebook_size: int = 256,
    *,
    seed: int = 0,
    iters: int = 20,
    fit_sample: int | None = 65536,
) -> tuple[ResidualQuantizer, np.ndarray, np.ndarray]:
    """Refit the quantizer `build_semantic_ids` fits with the same arguments (for tests and analysis).

    Returns (quantizer, embeddings [N, D] float32 in items.parquet row order, present [N] bool); the codebooks are
    ``quantizer.codebooks`` [levels, K, D] and ``quantizer.decode(codes, l)`` the reconstruction from l levels.
    """
    items_file = items_path(data_dir)
    x, present, _ = item_embeddings(pq.read_table(items_file, columns=[MM_EMB_COLUMN]), str(items_file))
    q = fit_rq_kmeans(x[present], levels, codebook_size, seed=seed, iters=iters, fit_sample=fit_sample)
    return q, x, present
