"""DIN: Deep Interest Network (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018).

Input over the view ``hist`` (the last `seq_len` behaviors, default 50)::

    e_t = [e(item); e(cate)]                       target ad, [B, 2d]
    E_i = [e(hist_item_i); e(hist_cate_i)]         behaviors, [B, L, 2d]
    s_i = MLP_au([e_t; E_i; e_t − E_i; e_t ⊙ E_i])  activation unit (`ctr.modules.attention.DinAttention`)
    u   = Σ_i w_i E_i                              w_i = s_i (paper) | masked softmax(s_i / sqrt(2d)) (official)
    logit = MLP([u; e_t; u ⊙ e_t; context]) (+ b_item)

Defaults and where they come from:

* ``softmax: false``: the paper (after Eq. 3) drops the softmax to keep the intensity of user interest; FuxiCTR's
  ``din_use_softmax`` defaults to False too. The official demo code (zhougr1993/DeepInterestNetwork
  ``din/model.py``) masks, divides by sqrt(H) and takes a softmax: ``softmax: true``.
* Activation unit ``attention_hidden: [80, 40]`` (official code; FuxiCTR LongCTR uses [64]). The paper's Fig. 2
  draws the unit with PReLU/Dice, and a single hidden layer (recalled as 36 units, not re-verified), so the default
  ``attention_activation: dice``; the official code uses ``sigmoid``.
* Tower ``hidden: [200, 80]`` with ``activation: dice`` and a 1-logit output: the paper's Fig. 2 (200 → 80 → 2
  softmax, PReLU/Dice; one sigmoid logit is the same model). The official code uses 80 → 40 sigmoid/Dice.
* ``input_batch_norm: false``: the paper has no BatchNorm; the official code puts one on the tower input
  (``true``). The official code also maps ``u`` through ``Dense_128(BN(u))`` before the tower; not reproduced.
* ``item_bias: false``: the official code adds a learned per-item bias to the logit (``true``); a dense
  ``nn.Embedding(n_items, 1)``, trained by the dense optimizer.
* The tower's input uses ``[u; e_t; u ⊙ e_t]`` (official code; the paper concatenates the pooled user vector with
  the ad and the other features), plus the context embeddings of this library.
* Not reproduced: the paper's mini-batch aware L2 regularization, and the official SGD schedule (lr 1.0 → 0.1).

``dare: true`` (Feng et al., ICLR 2025): the activation unit scores with separate attention tables (``item_att``,
``cate_att``, sized like ``item`` / ``cate``); the pooled behaviors and the tower use the representation tables.
``dare_att_dim`` makes the attention tables narrower than ``embedding_dim`` (DARE's smaller attention dimension;
a second embedding collection, sharded like the first).

``backend: module`` (the default) computes the attention with the readable padded module; ``auto`` (Triton on CUDA,
its PyTorch reference elsewhere), ``triton`` or ``reference`` with the fused `kernels.din_attention` on the jagged
behaviors, that backend of the kernel; same parameters, same output.

LAIN (``lain: {enabled: true, ...}``; registered as ``din_lain``; `ctr.modules.lain`, Zhang et al., AAAI 2026):
the full prefix length ``L = hist_len`` conditions the activation unit, as models.md §6.4 proposes for DIN::

    h = SLE(L);  E' = [P(h); E]  (k prompt tokens, mask 1)
    s_i = MLP_au([q'; k'_i; q' − k'_i; q' ⊙ k'_i]),  q' = W_q[e_t; h],  k'_i = W_k[E'_i; h]
    u = Σ_i w_i E'_i,  w_i = s_i / τ(L) (paper form) | masked softmax(s_i / (sqrt(2d) τ(L))) (official form)

With the paper's raw weights, τ is a length-dependent gain on ``u`` rather than a sharpness (there is no softmax
to flatten); with ``softmax: true`` it is the temperature of the notes. The tower is unchanged (it sees ``u``, the
original ``e_t`` and the context). LAIN needs ``backend: module`` (the fused kernel takes one scale per batch).
``lain.enabled: false`` (the default) builds no LAIN parameter and runs the code above unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from features.loader import Batch, SequenceView

from ..modules.activations import BatchNorm1dAnySize
from ..modules.attention import DinAttention
from ..modules.dense_embedding import DenseEmbedding
from ..modules.gsu import lengths_to_offsets
from ..modules.lain import LainConditioner, LainParams, lain_din_attention
from ..modules.mlp import MLP
from ..modules.sid_embedding import SidParams
from .base import (
    CTRModel,
    ModelOutput,
    ModelParams,
    check_dare_att_dim,
    pair_values,
    register,
    register_lain_variant,
    register_sid_variant,
)


class DINParams(ModelParams):
    seq_len: int = 50
    attention_hidden: list[int] = [80, 40]
    attention_activation: Literal["sigmoid", "relu", "prelu", "dice"] = "dice"
    softmax: bool = False  # paper: raw weights; official code: masked softmax of scores / sqrt(2d)
    hidden: list[int] = [200, 80]
    activation: str = "dice"
    batch_norm: bool = False  # BatchNorm after every hidden Linear of the tower
    input_batch_norm: bool = False  # official code: BatchNorm on the tower input
    dropout: float = 0.0
    item_bias: bool = False  # official code: a learned per-item bias added to the logit
    backend: Literal["module", "auto", "triton", "reference"] = "module"
    # DARE: separate attention tables (`item_att`, `cate_att`) for the activation unit's query and keys; the pooled
    # values and the tower keep the representation tables
    dare: bool = False
    # width of each attention table (None: embedding_dim); DARE shows it can be narrower (faster search)
    dare_att_dim: int | None = None
    lain: LainParams = Field(default_factory=LainParams)  # LAIN plug-in (off: the model above, unchanged)

    @model_validator(mode="after")
    def _lain_needs_module_backend(self) -> DINParams:
        if self.lain.enabled and self.backend != "module":
            raise ValueError("lain.enabled needs backend 'module' (the fused kernel has no per-sample temperature)")
        if self.dare and (self.lain.enabled or self.backend != "module"):
            raise ValueError("dare: true needs backend 'module' and no LAIN (its keys and values differ)")
        check_dare_att_dim(self.dare, self.dare_att_dim, self.lain.enabled)
        return self


@register
class DIN(CTRModel):
    name = "din"
    Params = DINParams
    att_sources = ("item", "cate", "hist_item", "hist_cate")

    def __init__(self, params: DINParams, info, device=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, info, device)
        self.p = params
        d = 2 * self.dim  # behavior / target width: [item; cate]
        # the activation unit scores [item; cate] of the attention tables (2 dare_att_dim wide with DARE)
        self.attention = DinAttention(
            2 * self.att_dim, params.attention_hidden, params.attention_activation, softmax=params.softmax
        )
        n_ctx = len(self.context_features()) + (1 if params.use_user else 0)
        n_in = 3 * d + self.dim * n_ctx
        self.input_norm = BatchNorm1dAnySize(n_in) if params.input_batch_norm else nn.Identity()
        self.tower = MLP(
            n_in, params.hidden, activation=params.activation, batch_norm=params.batch_norm,
            dropout=params.dropout, out_dim=1,
        )  # fmt: skip
        self.item_bias = None
        if params.item_bias:
            self.item_bias = DenseEmbedding(info.vocab_sizes["item"], 1)
            nn.init.zeros_(self.item_bias.weight)
        self.lain: LainConditioner | None = None
        if params.lain.enabled:  # built last: the backbone's parameters start as a plain DIN's with the same seed
            self.lain = LainConditioner(params.lain, {"hist": (d, d)}, d, info.median_hist_len)

    def views(self) -> tuple[SequenceView, ...]:
        return (SequenceView("hist", self.params.seq_len),)  # type: ignore[attr-defined]

    def forward(self, batch: Batch) -> ModelOutput:
        emb = self.embed(batch.sparse.to_dict()) if self.p.dare else self.lookup(batch)
        target = pair_values(emb, "item", "cate")
        if self.p.dare:  # DARE: attention embeddings score, representation embeddings are pooled
            values, mask = self.padded(self.pair_jagged(emb, "hist_item", "hist_cate"), self.p.seq_len)
            keys, _ = self.padded(self.pair_jagged(emb, "hist_item_att", "hist_cate_att"), self.p.seq_len)
            query = pair_values(emb, "item_att", "cate_att")
            pooled, _ = self.attention(query, keys, mask, values=values)
        elif self.lain is not None and self.lain.active:  # switched off: the backbone's own path below
            pooled = self._lain_attention(emb, target, batch.dense["hist_len"])
        elif self.p.backend != "module":
            keys = pair_values(emb, "hist_item", "hist_cate")
            offsets = lengths_to_offsets(emb["hist_item"].lengths())
            pooled = self.attention.forward_jagged(
                target, keys, offsets, max_len=self.p.seq_len, backend=self.p.backend
            )
        else:  # the behaviors as rows: the same function as on their padded layout, without building it
            keys = pair_values(emb, "hist_item", "hist_cate")
            flat, rows = self.window_rows(emb["hist_item"], self.p.seq_len)
            pooled, _ = self.attention.forward_rows(target, keys, flat, rows)
        x = torch.cat([pooled, target, pooled * target, *self.context_vector(emb)], dim=-1)
        logit = self.tower(self.input_norm(x)).squeeze(-1)
        if self.item_bias is not None:
            logit = logit + self.item_bias(batch.sparse["item"].values()).squeeze(-1)
        return ModelOutput(logit=logit)

    def _lain_attention(self, emb: dict, target: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """DinAttention.forward with LAIN's prompts, QK conditioning and temperature (see the module docstring)."""
        assert self.lain is not None
        keys, mask = self.padded(self.pair_jagged(emb, "hist_item", "hist_cate"), self.p.seq_len)
        return lain_din_attention(self.attention, self.lain, self.lain.encode(length), length, target, keys, mask)


DINLain = register_lain_variant(DIN, "din_lain")
# The semantic-ID paper's headline representation (SentencePiece pieces of the SIDs, replacing the item ids of the
# target and the history) at 16,384 rows: a third of the demo world's 50K items, where sharing rows must generalize.
# Chosen before any demo run of it (benchmarks/sid.py measures every mode and size against random hashing).
DINSid = register_sid_variant(DIN, "din_sid", SidParams(mode="spm", rows=16384))
