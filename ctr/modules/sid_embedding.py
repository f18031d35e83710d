"""Semantic-ID item embeddings for ranking (Singh et al., "Better Generalization with Semantic IDs: A Case Study in
Ranking for Recommendations", RecSys '24; models-wave2.md part B).

An item is represented by its semantic ID ``(c_0 .. c_{L-1})`` (``ctr sid``: coarse -> fine codes of a residual
quantizer over its content embedding) instead of, or beside, its random item id. The codes are cut into *pieces*,
each piece is a row of one trainable table, and the item vector is the **sum** of its pieces' rows (then an optional
LayerNorm). Items that share pieces share rows, so the table's collisions are semantic: what a popular item learned
reaches the rare and new items near it (generalization), while fine pieces keep room to memorize.

Pieces (``K`` = codes per level, the reserved code of padding / OOV / items without an embedding included)::

    unigram      piece_l = l·K + c_l                          L pieces, L·K rows
    ngram(N)     non-overlapping groups g of N levels:        ⌈L/N⌉ pieces, Σ_g K^|g| rows
                 piece_g = offset_g + Σ_j c_{gN+j}·K^(|g|-1-j)
    prefix(P)    prefixes of length 1..P (Zheng et al.,       P pieces, Σ_p K^p rows
                 RecSys '25 "prefix-ngram"), each length with its own offset, so (c) and (0, c) never collide
    spm(V)       SentencePiece pieces learned over the SID    1..L pieces (frequent code runs merge), V rows
                 strings, one per item, weighted by its training impressions

When the exact rows of ``unigram`` / ``ngram`` / ``prefix`` exceed the table budget ``rows``, each piece is hashed
into ``[0, rows)`` with a salt of its own group (level / group / prefix length): the paper's bigram used exact K²
tables, which a budget may not allow.

**SentencePiece over SIDs** (no public implementation; models-wave2.md B.5): each (level, code) becomes one private-use
code point ``chr(0xF0000 + l·K + c)``; the trainer sees one "sentence" per distinct SID string with its weight
(the number of training-split impressions of the items that carry it, plus one per item so that every symbol of the
catalog is in the vocabulary), ``split_by_whitespace=false``, ``split_by_unicode_script=false``,
``character_coverage=1.0``, ``add_dummy_prefix=false``, no BOS / EOS, ``vocab_size`` = the table budget (a soft
limit: a catalog with fewer possible merges gives fewer pieces). The paper does not say which SentencePiece
algorithm it used; we use **BPE**, because sentencepiece 0.2's unigram-LM trainer merged no multi-code pieces over
SID strings in our trials (it kept single symbols only), which would make ``spm`` a unigram table. Training is
single-threaded and deterministic; the pieces of every item are also a persistent buffer, saved with the model.

**How the lookup runs on TorchRec.** The piece table is one more table (``item_sid``) of the model's
``EmbeddingCollection``, sharded by the planner like the others. Per batch, the item ids of every item feature
(target, behaviors, DIEN's negatives, retrieved slots) are deduplicated, the pieces of the unique items are looked up
as one jagged feature, and a segment sum pools them per item (models-wave2.md N.2: pool once per unique item, not
per behavior). This replaces a pooled ``EmbeddingBagCollection``: a sharded pooled lookup pools per *sample row*, and
needs the same number of rows on every rank, while the deduplicated items of a batch differ in number from rank to
rank; an unpooled lookup followed by the sum gives the same vectors (tests compare them with a plain sum).
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

log = logging.getLogger(__name__)

SID_TABLE = "item_sid"  # the table (and feature) of the pieces
SPM_BASE = 0xF0000  # Supplementary Private Use Area-A: room for 65,534 (level, code) symbols
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class SidParams(BaseModel):
    """How a model turns semantic IDs into item vectors (``model.sid``; used when ``item_repr`` is sid or id+sid)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["unigram", "ngram", "prefix", "spm"] = "unigram"
    n: int | None = Field(
        None, ge=1, description="ngram: levels per group (default 2); prefix: the longest prefix (default: all levels)"
    )
    levels: int | None = Field(None, ge=1, description="SID levels used (coarsest first); None = all the dataset has")
    rows: int | None = Field(
        None, ge=2, description="table budget: spm's vocabulary size (required); the others hash into it when larger"
    )
    layer_norm: bool = False  # LayerNorm over the pooled vector (models-wave2.md B.6, optional)
    seed: int = 0  # salts of the hashed pieces


# --------------------------------------------------------------------------------------------------------------------
# pieces: [V, P] int64, -1 = no piece (numpy, computed once when the model is built)
# --------------------------------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 (wrapping arithmetic): a fixed, well-mixed 64-bit hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _hash_groups(codes: np.ndarray, salt: int, rows: int) -> np.ndarray:
    """Hash each row of ``codes [V, m]`` (a group of codes) with ``salt`` into ``[0, rows)``."""
    h = np.full(len(codes), np.uint64(salt) & _MASK64, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(codes.shape[1]):
            h = _splitmix64(h ^ (codes[:, j].astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return (h % np.uint64(rows)).astype(np.int64)


def _group_pieces(
    codes: np.ndarray, groups: list[list[int]], num_codes: int, rows: int | None, seed: int
) -> tuple[np.ndarray, int]:
    """One piece per group of levels: exact mixed-radix ids with a per-group offset when ``Σ_g K^|g|`` fits in
    ``rows`` (or no budget is set), else each group hashed with its own salt into ``rows``. Returns (pieces, rows)."""
    exact = sum(num_codes ** len(g) for g in groups)  # Python int: no overflow
    out = np.empty((len(codes), len(groups)), dtype=np.int64)
    if rows is None or exact <= rows:
        offset = 0
        for gi, g in enumerate(groups):
            ids = np.zeros(len(codes), dtype=np.int64)
            for lvl in g:
                ids = ids * num_codes + codes[:, lvl]
            out[:, gi] = offset + ids
            offset += num_codes ** len(g)
        return out, exact if rows is None else rows
    for gi, g in enumerate(groups):
        out[:, gi] = _hash_groups(codes[:, g], salt=(seed << 16) + gi + 1, rows=rows)
    return out, rows


def unigram_pieces(codes: np.ndarray, num_codes: int, rows: int | None = None, seed: int = 0) -> tuple[np.ndarray, int]:
    """``l·K + c_l`` for every level l (hashed per level into ``rows`` when L·K exceeds it)."""
    return _group_pieces(codes, [[lvl] for lvl in range(codes.shape[1])], num_codes, rows, seed)


def ngram_pieces(
    codes: np.ndarray, num_codes: int, n: int, rows: int | None = None, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Non-overlapping groups of ``n`` consecutive levels (the last one shorter when n does not divide L)."""
    levels = codes.shape[1]
    return _group_pieces(codes, [list(range(s, min(s + n, levels))) for s in range(0, levels, n)], num_codes, rows,
                         seed)  # fmt: skip


def prefix_pieces(
    codes: np.ndarray, num_codes: int, p: int, rows: int | None = None, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Prefixes of length 1..p, each length with its own offset (or salt): ``(c)`` and ``(0, c)`` differ."""
    return _group_pieces(codes, [list(range(k)) for k in range(1, p + 1)], num_codes, rows, seed)


def sid_strings(codes: np.ndarray, num_codes: int) -> list[str]:
    """One string per item, one private-use code point per (level, code)."""
    if codes.shape[1] * num_codes > 0xFFFFD - SPM_BASE:
        raise ValueError(f"{codes.shape[1]} levels x {num_codes} codes do not fit in the private-use plane")
    points = SPM_BASE + np.arange(codes.shape[1]) * num_codes + codes
    return ["".join(map(chr, row)) for row in points.tolist()]


def spm_pieces(codes: np.ndarray, num_codes: int, vocab: int, weights: np.ndarray) -> tuple[np.ndarray, int]:
    """SentencePiece (BPE) pieces of each item's SID string, trained on the distinct strings weighted by
    ``weights [V]`` (summed over items sharing a string). Returns ([V, L] piece ids padded with -1, vocab)."""
    import sentencepiece as spm

    strings = sid_strings(codes, num_codes)
    symbols = len(np.unique(SPM_BASE + np.arange(codes.shape[1]) * num_codes + codes))
    if vocab < symbols + 1:
        raise ValueError(
            f"sid.rows={vocab}: an spm table needs a row for each of the {symbols} distinct (level, code) symbols "
            f"in the catalog plus <unk>; set sid.rows >= {symbols + 1}"
        )
    uniq, inverse = np.unique(np.asarray(strings, dtype=object), return_inverse=True)
    total = np.bincount(inverse, weights=weights.astype(np.float64), minlength=len(uniq))
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sids.tsv"
        path.write_text("".join(f"{s}\t{int(round(w))}\n" for s, w in zip(uniq.tolist(), total.tolist(), strict=True)),
                        encoding="utf-8")  # fmt: skip
        spm.SentencePieceTrainer.train(
            input=str(path), input_format="tsv", model_writer=model, model_type="bpe", vocab_size=vocab,
            hard_vocab_limit=False, character_coverage=1.0, split_by_whitespace=False, split_by_unicode_script=False,
            split_by_number=False, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", max_sentencepiece_length=codes.shape[1], bos_id=-1, eos_id=-1,
            unk_id=0, pad_id=-1, num_threads=1, minloglevel=2, max_sentence_length=1 << 16,
        )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    encoded = sp.encode(uniq.tolist())
    width = codes.shape[1]
    table = np.full((len(uniq), width), -1, dtype=np.int64)
    for i, ids in enumerate(encoded):
        table[i, : len(ids)] = ids
    if (table == 0).any():  # pragma: no cover - every symbol is in the training strings with coverage 1.0
        raise RuntimeError("sentencepiece mapped a SID symbol to <unk>")
    log.info("spm over SIDs: %d pieces (asked %d), %.3f pieces per item", sp.get_piece_size(), vocab,
             float((table[inverse] >= 0).sum(1).mean()) if len(inverse) else 0.0)  # fmt: skip
    return table[inverse], vocab


def build_pieces(
    params: SidParams, codes: np.ndarray, num_codes: int, weights: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """The pieces of every item (``[V, P]``, -1 padded) and the table's rows, for ``params``."""
    levels = codes.shape[1]
    if params.mode == "unigram":
        return unigram_pieces(codes, num_codes, params.rows, params.seed)
    if params.mode == "ngram":
        return ngram_pieces(codes, num_codes, params.n or 2, params.rows, params.seed)
    if params.mode == "prefix":
        p = params.n or levels
        if p > levels:
            raise ValueError(f"sid.n={p}: longer than the {levels} SID levels in use")
        return prefix_pieces(codes, num_codes, p, params.rows, params.seed)
    if params.rows is None:
        raise ValueError("sid.mode spm needs sid.rows (its vocabulary size = the table budget)")
    w = np.ones(len(codes)) if weights is None else 1.0 + weights
    return spm_pieces(codes, num_codes, params.rows, w)


# --------------------------------------------------------------------------------------------------------------------
# the module: pieces of the unique items of a batch -> pooled vectors
# --------------------------------------------------------------------------------------------------------------------
class SemanticIdEmbedding(nn.Module):
    """Holds the item -> pieces map (a persistent buffer) and the optional LayerNorm; the piece table itself is the
    ``item_sid`` table of the model's EmbeddingCollection (so that the planner shards it with the others)."""

    def __init__(self, pieces: np.ndarray, rows: int, dim: int, layer_norm: bool = False) -> None:
        super().__init__()
        if pieces.size and (pieces.max() >= rows or pieces[pieces >= 0].min() < 0):
            raise ValueError(f"pieces outside [0, {rows})")
        self.rows = rows
        self.register_buffer("pieces", torch.from_numpy(np.ascontiguousarray(pieces)).long())
        self.norm = nn.LayerNorm(dim) if layer_norm else None

    def piece_ids(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pieces of ``items [U]``: (flat piece ids [Σ n_u], segment index [Σ n_u] in 0..U-1)."""
        p = self.pieces[items]
        keep = p >= 0
        seg = torch.arange(len(items), device=items.device).unsqueeze(1).expand_as(p)
        return p[keep], seg[keep]

    def pool(self, piece_emb: torch.Tensor, seg: torch.Tensor, n_items: int) -> torch.Tensor:
        """Sum the looked-up piece rows ``[Σ n_u, d]`` per item -> ``[U, d]`` (then the optional LayerNorm)."""
        out = piece_emb.new_zeros(n_items, piece_emb.shape[-1]).index_add_(0, seg, piece_emb)
        return self.norm(out) if self.norm is not None else out


def piece_stats(pieces: np.ndarray, rows: int, weights: np.ndarray | None = None) -> dict[str, float]:
    """Mean pieces per item (impression-weighted too when ``weights`` is given) and the share of rows used."""
    n = (pieces >= 0).sum(1)
    used = np.unique(pieces[pieces >= 0]).size
    out = {"pieces_per_item": float(n.mean()) if len(n) else 0.0, "rows_used": used / rows}
    if weights is not None and weights.sum() > 0:
        out["pieces_per_impression"] = float((n * weights).sum() / weights.sum())
    return out
