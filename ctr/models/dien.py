"""DIEN: Deep Interest Evolution Network (Zhou et al., "Deep Interest Evolution Network for Click-Through Rate
Prediction", AAAI 2019).

Over the view ``hist`` (the last `seq_len` behaviors, with one sampled non-clicked item per position)::

    e_a = [e(item); e(cate)]                               target, [B, 2d]
    e_t = [e(hist_item_t); e(hist_cate_t)]                 behaviors, [B, L, 2d]; ê_t the sampled negatives
    h_t = GRU(e_t)                                         interest extractor, [B, L, H]
    L_aux = mean over real (t, t+1) of −log σ(h_t · e_{t+1}) − log(1 − σ(h_t · ê_{t+1}))
    a_t = softmax_t(h_t W e_a)                             attention over the real positions
    h'_t = AUGRU(h_t, a_t)                                 interest evolving layer; h'_T its final state
    logit = MLP([e_a; Σ_t e_t; e_a ⊙ Σ_t e_t; h'_T; context])   (sum_pooling: false: MLP([e_a; h'_T; context]))
    loss  = BCE(logit, y) + aux_alpha · L_aux              (`DIEN.loss`: terms ``ctr`` and ``aux``)

Defaults and where they come from (paper = the AAAI paper; official = mouna99/dien ``script/model.py`` and
``script/utils.py``, model ``Model_DIN_V2_Gru_Vec_attGru_Neg``):

* ``gru_hidden: null`` = the behavior width 2d (official: HIDDEN_SIZE 36 = 2 × 18). The paper's auxiliary loss is
  the inner product ``h_t · e_{t+1}``, so with ``aux_net: dot`` the GRU width *must* equal 2d (checked).
* ``aux_net: dot`` (paper Eq. 4). ``aux_net: mlp`` is the official ``auxiliary_net``: ``[h_t; e_{t+1}]`` → 100
  sigmoid → 50 sigmoid → click probability (a 2-way softmax there, one sigmoid logit here). The official net starts
  with a ``tf.layers.batch_normalization`` left in inference mode (``training`` is never passed), i.e. a fixed
  affine map; it is omitted.
* ``aux_alpha: 1.0`` (official; the paper's α is a hyper-parameter). The paper sums over t and averages over
  samples; we take the mean over every real (sample, t) pair, as the brief asks (the official code's mean divides by
  B × (L − 1), padding included). FuxiCTR's default is 0 (no auxiliary loss).
* ``aux_negatives: popularity`` (official): for every behavior, an item that is none of the sample's window items,
  drawn with the probability of its share of the training period's behaviors (`features.negatives`, by the
  loader). The paper samples "from the item set except the clicked" without naming a distribution; the
  official ``data_iterator.py`` draws uniformly from ``mid_list_for_random``, one entry per line of
  ``reviews-info``, i.e. each item as often as it was reviewed (over every review there, the test period's too;
  here only behaviors before the validation split count). ``uniform``: uniformly over the catalog. Drawn in
  training only (evaluation batches carry empty negatives).
* ``attention: bilinear`` (paper Eq. 5, FuxiCTR's default). ``attention: din`` is the official
  ``din_fcn_attention``: query ``PReLU(Dense_H(e_a))``, activation unit ``attention_hidden`` [80, 40] with
  ``attention_activation`` sigmoid, masked softmax, no scaling.
* ``augru: paper`` (paper Eq. 6-8, FuxiCTR's ``AUGRUCell``: ``u' = a·u``, attention 0 keeps the state).
  ``augru: official`` is the TF ``VecAttGRUCell`` (``u' = (1 − a)·u`` in TF's convention, where attention 0 is a
  plain GRU step); see `ctr.modules.augru`.
* Tower ``hidden: [200, 80]``, ``activation: dice`` (official ``build_fcn_net`` with Dice; 2-way softmax there, one
  logit here). Its input holds the sum of the behaviors and its product with the target, as the official code's
  does (``sum_pooling: true``); ``false`` leaves them out (FuxiCTR's DIEN, ``enable_sum_pooling: false``).
  ``input_batch_norm: false``: the official code's BatchNorm on the tower input is also left in inference mode; the
  paper has none.
* The official tower also takes the user id embedding (here ``use_user``) and trains with Adam lr 1e-3 halved every
  epoch, batch 128, maxlen 100 (the trainer's business). Padded positions never change the GRU/AUGRU states.

DARE (Feng et al., ICLR 2025; ``dare: true``, ``dare_att_dim``): DIEN's attention reads the interest states
``h_t``, which are a function of the representation embeddings, so attention and representation share one table
through the GRU. Under DARE the attention reads the attention tables instead::

    a_t = softmax_t(e_t^att W e_a^att)                     (or the official activation unit on the same inputs)
    h'_T = AUGRU(h_t, a_t)                                 h_t = GRU(e_t^repr) as above

so the relevance is learned in its own space (``2 · dare_att_dim`` wide) and the AUGRU still integrates the
evolving interest. DARE itself has no DIEN; this is the option the lifelong-models issue asks for, and it is our
mapping of DARE's rule (attention embeddings score, representation embeddings are pooled) onto DIEN.

LAIN (``lain: {enabled: true, ...}``; registered as ``dien_lain``; `ctr.modules.lain`, Zhang et al., AAAI 2026):
the full prefix length ``L = hist_len`` conditions the attention that drives the AUGRU (models.md §6.4)::

    h = SLE(L);  [P(h); e_1..e_T]  --GRU-->  [h_P; h_1..h_T]      k prompt tokens first (mask 1): the extractor
                                                                 reads them before the oldest behavior
    a = softmax(score(W_q[e_a; h], W_k[h_t; h]) / τ(L))          over prompts + behaviors; score = bilinear | din
    h'_T = AUGRU([h_P; h_1..h_T], a)

The auxiliary loss is taken over the behavior positions only (pairs of real behaviors, as without LAIN), and the
tower's sum-pooled behaviors exclude the prompts. ``lain.enabled: false`` (the default) builds no LAIN parameter
and runs the code above unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from features.loader import Batch, SequenceView

from ..modules.activations import BatchNorm1dAnySize
from ..modules.attention import BilinearAttention, DienDinAttention, masked_softmax
from ..modules.augru import AUGRU, InterestExtractor, next_dots
from ..modules.lain import LainConditioner, LainParams, prepend_prompts
from ..modules.mlp import MLP
from .base import (
    CTRModel,
    ModelOutput,
    ModelParams,
    check_dare_att_dim,
    pair_values,
    register,
    register_lain_variant,
)


class DIENParams(ModelParams):
    seq_len: int = 50
    aux_alpha: float = 1.0
    aux_net: Literal["dot", "mlp"] = "dot"
    gru_hidden: int | None = None  # None = 2 * embedding_dim (required by aux_net: dot); after aux_* for its check
    aux_hidden: list[int] = [100, 50]  # aux_net: mlp (official)
    aux_activation: str = "sigmoid"
    aux_negatives: Literal["popularity", "uniform"] = "popularity"  # how the auxiliary loss's negatives are drawn
    attention: Literal["bilinear", "din"] = "bilinear"
    attention_hidden: list[int] = [80, 40]  # attention: din (official)
    attention_activation: Literal["sigmoid", "relu", "prelu", "dice"] = "sigmoid"
    augru: Literal["paper", "official"] = "paper"
    hidden: list[int] = [200, 80]
    activation: str = "dice"
    batch_norm: bool = False  # BatchNorm after every hidden Linear of the tower
    input_batch_norm: bool = False
    # the tower's [Σ_t e_t; e_a ⊙ Σ_t e_t] (official code); false: [e_a; h'_T; context] only (FuxiCTR's DIEN, whose
    # enable_sum_pooling defaults to false)
    sum_pooling: bool = True
    dropout: float = 0.0
    # DARE: the attention that drives the AUGRU scores the target against the behaviors with separate attention
    # tables (`item_att`, `cate_att`, `dare_att_dim` wide); the GRUs, the auxiliary loss and the tower keep the
    # representation tables (module docstring)
    dare: bool = False
    dare_att_dim: int | None = None
    lain: LainParams = Field(default_factory=LainParams)  # LAIN plug-in (off: the model above, unchanged)

    @model_validator(mode="after")
    def _dare_without_lain(self) -> DIENParams:
        if self.dare and self.lain.enabled:
            raise ValueError("dare: true with LAIN is not supported on dien (LAIN conditions the interest states)")
        check_dare_att_dim(self.dare, self.dare_att_dim, self.lain.enabled)
        return self

    @field_validator("gru_hidden")
    @classmethod
    def _dot_needs_matching_width(cls, v: int | None, info: ValidationInfo) -> int | None:
        width = 2 * info.data.get("embedding_dim", 16)
        if v is not None and v != width and info.data.get("aux_net") == "dot" and info.data.get("aux_alpha", 0) > 0:
            raise ValueError(
                f"aux_net 'dot' takes h_t · e_(t+1), so gru_hidden must equal the behavior width 2 * embedding_dim "
                f"= {width}, got {v}; leave it null or use aux_net 'mlp'"
            )
        return v


@register
class DIEN(CTRModel):
    name = "dien"
    Params = DIENParams
    att_sources = ("item", "cate", "hist_item", "hist_cate")  # DARE: the features that also look up `*_att`

    def __init__(self, params: DIENParams, info, device=None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(params, info, device)
        self.p = params
        d = 2 * self.dim
        h = params.gru_hidden or d
        self.extractor = InterestExtractor(d, h)
        self.aux_mlp = None
        if params.aux_net == "mlp":
            self.aux_mlp = MLP(h + d, params.aux_hidden, activation=params.aux_activation, out_dim=1)
        # DARE: the attention's query and keys are the target's and the behaviors' attention embeddings (2 att_dim)
        q, k = (2 * self.att_dim, 2 * self.att_dim) if params.dare else (d, h)
        if params.attention == "bilinear":
            self.attention: nn.Module = BilinearAttention(q, k)
        else:
            self.attention = DienDinAttention(q, k, params.attention_hidden, params.attention_activation)
        self.augru = AUGRU(h, h, form=params.augru)
        n_ctx = len(self.context_features()) + (1 if params.use_user else 0)
        n_in = (3 * d if params.sum_pooling else d) + h + self.dim * n_ctx
        self.input_norm = BatchNorm1dAnySize(n_in) if params.input_batch_norm else nn.Identity()
        self.tower = MLP(
            n_in, params.hidden, activation=params.activation, batch_norm=params.batch_norm,
            dropout=params.dropout, out_dim=1,
        )  # fmt: skip
        self.lain: LainConditioner | None = None
        if params.lain.enabled:  # built last: the backbone's parameters start as a plain DIEN's with the same seed
            self.lain = LainConditioner(params.lain, {"hist": (d, h)}, d, info.median_hist_len)

    def views(self) -> tuple[SequenceView, ...]:
        p: DIENParams = self.params  # type: ignore[assignment]  (set by CTRModel before it asks for the views)
        return (SequenceView("hist", p.seq_len, negatives=True, negative_sampling=p.aux_negatives),)

    def _behaviors(self, emb: dict, prefix: str, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        return self.padded(self.pair_jagged(emb, f"{prefix}_item{suffix}", f"{prefix}_cate{suffix}"), self.p.seq_len)

    def auxiliary_loss(
        self, states: torch.Tensor, clicked: torch.Tensor, sampled: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Unweighted L_aux: h_t against the next clicked behavior and the next sampled one, mean over real pairs.

        states [B, L, H], clicked / sampled [B, L, 2d], mask [B, L]; the pair (t, t+1) is real when t+1 is.
        """
        valid = mask[:, 1:]
        if self.aux_mlp is None:
            # over every pair, padding included, then masked: a boolean gather's backward is a serial scatter on
            # the CPU, dearer than the few padded dot products it would save
            pos_logit, neg_logit = next_dots(states, clicked, sampled)
        else:  # the MLP runs on the real pairs only
            h, pos, neg = states[:, :-1][valid], clicked[:, 1:][valid], sampled[:, 1:][valid]
            pos_logit = self.aux_mlp(torch.cat([h, pos], dim=-1)).squeeze(-1)
            neg_logit = self.aux_mlp(torch.cat([h, neg], dim=-1)).squeeze(-1)
        # −log σ(x) = softplus(−x), −log(1 − σ(x)) = softplus(x)
        losses = F.softplus(-pos_logit) + F.softplus(neg_logit)
        if self.aux_mlp is None:
            return (losses * valid.to(losses.dtype)).sum() / max(1, int(valid.sum()))
        return losses.sum() / max(1, losses.numel())

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """BCE + ``aux_alpha`` x the interest extractor's auxiliary loss (training only)."""
        terms = super().loss(out, batch)
        if "aux" in out.extras:
            terms["aux"] = self.p.aux_alpha * out.extras["aux"]
        return terms

    def forward(self, batch: Batch) -> ModelOutput:
        if self.lain is not None:
            return self._forward_lain(batch)
        emb = self.embed(batch.sparse.to_dict()) if self.p.dare else self.lookup(batch)
        target = pair_values(emb, "item", "cate")
        beh, mask = self._behaviors(emb, "hist")
        interests = self.extractor(beh, mask)  # [B, L, H]
        extras = {}
        if self.training and self.p.aux_alpha > 0:
            neg, _ = self._behaviors(emb, "hist_neg")
            extras["aux"] = self.auxiliary_loss(interests, beh, neg, mask)
        if self.p.dare:  # DARE: relevance in the attention space, the AUGRU integrates the interest states
            query = pair_values(emb, "item_att", "cate_att")
            _, att = self.attention(query, self._behaviors(emb, "hist", suffix="_att")[0], mask)
        else:
            _, att = self.attention(target, interests, mask)
        _, final = self.augru(interests, att, mask)
        logit = self.tower(self.input_norm(self.tower_input(emb, target, beh, final))).squeeze(-1)
        return ModelOutput(logit=logit, extras=extras)

    def tower_input(self, emb: dict, target: torch.Tensor, beh: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """``[e_a; Σ_t e_t; e_a ⊙ Σ_t e_t; h'_T; context]``, without the two sum-pooled blocks with ``sum_pooling:
        false``; beh [B, L, 2d] holds the behaviors only (zeros at padding, no LAIN prompt)."""
        if not self.p.sum_pooling:
            return torch.cat([target, final, *self.context_vector(emb)], dim=-1)
        summed = beh.sum(1)
        return torch.cat([target, summed, target * summed, final, *self.context_vector(emb)], dim=-1)

    def _forward_lain(self, batch: Batch) -> ModelOutput:
        """`forward` with LAIN's prompts before the behaviors and its conditioned, tempered attention."""
        assert self.lain is not None
        emb = self.lookup(batch)
        target = pair_values(emb, "item", "cate")
        beh, mask = self._behaviors(emb, "hist")
        length = batch.dense["hist_len"]
        h = self.lain.encode(length)
        seq, seq_mask = prepend_prompts(self.lain.prompts(h), beh, mask)
        k = seq.shape[1] - beh.shape[1]
        interests = self.extractor(seq, seq_mask)  # [B, k + L, H]
        extras = {}
        if self.training and self.p.aux_alpha > 0:
            neg, _ = self._behaviors(emb, "hist_neg")
            extras["aux"] = self.auxiliary_loss(interests[:, k:], beh, neg, mask)
        query = self.lain.condition_query(target, h, "hist")
        keys = self.lain.condition_key(interests, h, "hist")
        if isinstance(self.attention, BilinearAttention):
            scores = torch.bmm(keys, self.attention.proj(query).unsqueeze(-1)).squeeze(-1)
        else:
            assert isinstance(self.attention, DienDinAttention)
            unit = self.attention.unit
            scores = unit.scores(self.attention.prelu(self.attention.proj(query)), keys, seq_mask) * unit.scale
        att = masked_softmax(self.lain.temper(scores, length), seq_mask)
        _, final = self.augru(interests, att, seq_mask)
        logit = self.tower(self.input_norm(self.tower_input(emb, target, beh, final))).squeeze(-1)
        return ModelOutput(logit=logit, extras=extras)


DIENLain = register_lain_variant(DIEN, "dien_lain")
