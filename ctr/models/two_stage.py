"""The shared frame of two-stage lifelong models (SIM, MUSE): GSU over the whole prefix, ESU over the top K, a
short-term DIN branch over the last S, a tower.

Data (two loader views, both oldest first, never at or after the sample's ts)::

    long   = the last `max_len` behaviors of the prefix [0, hist_len)    -> the GSU searches all of them
    short  = the last `short_len` behaviors                              -> DIN attention (the short-term branch)

Forward::

    Selection = GSU(target, long)                      positions [B, K] best first, -1 = empty  (kernels.gsu_topk)
    E_K       = embeddings of the K selected behaviors [B, K, 2d] (+ their time gaps [B, K])
    u_long    = ESU(e_t, E_K)                          subclass: SIM multi-head TA + time buckets, MUSE SA-TA + SimTier
    u_short   = DIN(e_t, E_short)                      `ctr.modules.attention.DinAttention`
    logit     = MLP([e_t; u_short; u_short ⊙ e_t; u_long...; context])

Only the K selected behaviors are embedded when the GSU works on ids (SIM hard: categories; MUSE: a frozen table):
the model rebuilds the KeyedJaggedTensor with the selected ids in place of the whole `long` prefix (same keys, so a
sharded collection sees the same features) and looks up once. A GSU on learned embeddings (SIM soft) embeds the
whole prefix (`embeds_prefix = True`). When the loss reaches those embeddings only through the K selected (TWIN,
ETA, MUSE on ID embeddings, DiffuMIN: `prefix_grad = False`), training looks the prefix up twice: once without
gradient for the GSU, then only the selected rows with gradient, as above. The values are the same; what changes is
the fused sparse optimizer's backward, which otherwise sorts and updates every looked-up row of the prefix (10K
per sample) to apply a zero gradient to all but K of them. SIM soft (its auxiliary loss pools the whole prefix) and
SDIM (bucket pooling over the prefix) keep the one lookup with gradient.

DARE (Feng et al., ICLR 2025, ``dare: true``): separate *attention* and *representation* embedding tables. The
attention tables are extra TorchRec tables `item_att` / `cate_att` (sized like `item` / `cate`) in the same
collection; their features (`item_att`, `long_item_att`, `short_item_att`, ...) are copies of the id features that
this model adds itself before the lookup (`embedding_features()`), so the loader is unchanged. The GSU's learned
scores, the ESU's and the short branch's attention scores use the attention embeddings; the pooled values and the
target in the tower use the representation embeddings. DARE's own model has no projection matrices (dot products
of the raw attention embeddings); we keep each model's projections. ``dare_att_dim`` (default: ``embedding_dim``)
makes the attention tables narrower, as DARE does to make the search cheaper: they then live in a second
`EmbeddingCollection` (TorchRec asks one collection's tables to share a width), and every GSU score, ESU query/key
and short-branch score is ``2 · dare_att_dim`` wide while the values keep ``2 · embedding_dim``.

LAIN (``lain: {enabled: true, ...}``; registered as ``sim_hard_lain``, ``sim_soft_lain``, ``muse_lain``,
``r2led_lain``; `ctr.modules.lain`, Zhang et al., AAAI 2026) plugs into both attention branches (models.md §6.4):
the length ``L = hist_len`` (the whole prefix, not the searched window) is encoded once per batch (`LengthContext`);
the prompts ``P(L)`` are prepended to the short sequence and, **after** retrieval, to the K selected behaviors (so
the GSU, which is not modulated, cannot filter them out; in a key wider than the behavior embedding, e.g. SIM's
``[e; e(Δt)]``, the prompt's extra part is zero); the query and keys of the short branch (``short``) and of the ESU
(``long``) are conditioned on ``h_len``; the ESU's softmax logits and the short branch's activation-unit scores are
divided by ``τ(L)``. Values are the prompt-extended behaviors. Similarity features (MUSE's ``R`` for the prompts is
0; SimTier) count behaviors only. LAIN is built after the rest of the model, so the backbone's parameters start as
the plain model's with the same seed, and ``lain.active = False`` computes exactly the backbone.

Defaults (the Params classes of ``sim.py`` and ``muse.py``) and sources:

* ``k: 50``, ``short_len: 50``: FuxiCTR / LongCTR SIM and TWIN (topk 50, short 50), MUSE (K = 50, recent 50).
* ``max_len: 10000``: the papers search up to ~54K (SIM) and 100K (MUSE production); 10K keeps a CPU epoch short
  while covering the p99 history of the demo world. The loader reads ``seq[max(0, hist_len - max_len):hist_len]``.
* short branch: DIN's activation unit [80, 40] Dice, no softmax (paper form, as ``din.yaml``), so that a two-stage
  model contains the DIN baseline it is compared with. ``short_attention: mhta`` is FuxiCTR LongCTR's short branch
  instead (SIM, ETA, SDIM, TWIN there): multi-head scaled dot-product target attention with ``W_q, W_k, W_v`` and
  ``W_o`` back to 2d (``short_heads`` x ``short_head_dim``, `ctr.modules.esu.MultiHeadTargetAttention`), no time
  embedding; LAIN conditions its query and keys and divides its logits by τ(L) as it does the ESU's.
* ``target_cross: true``: the tower also gets ``u ⊙ e_t`` for the short and the long interest (DIN official code,
  DARE's "target representation").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from features.dataset import DatasetInfo
from features.loader import Batch, SequenceView

from ..modules.activations import make_activation
from ..modules.attention import DinAttention
from ..modules.esu import MultiHeadTargetAttention
from ..modules.gsu import Selection, lengths_to_offsets, to_slots
from ..modules.lain import LainConditioner, LainParams, lain_din_attention, prepend_prompts
from ..modules.mlp import MLP
from .base import ATT_SUFFIX, CTRModel, ModelOutput, ModelParams, check_dare_att_dim, pair_values
from .slots import tail_rows, window_rows, without_short
from .stage_input import LongRows, StageInput

ATT_SOURCES = ("item", "cate", "long_item", "long_cate", "short_item", "short_cate")


class TwoStageParams(ModelParams):
    max_len: int = 10000  # behaviors the GSU searches (the last max_len of the prefix)
    k: int = 50  # GSU top-K
    short_len: int = 50  # S, the short-term branch
    dare: bool = False  # separate attention / representation embedding tables (DARE)
    dare_att_dim: int | None = None  # width of each DARE attention table (None: embedding_dim; narrower: faster)
    short_attention_hidden: list[int] = [80, 40]
    short_attention_activation: Literal["sigmoid", "relu", "prelu", "dice"] = "dice"
    short_softmax: bool = False  # DIN paper: raw weights; official DIN code: masked softmax
    # the short branch: DIN's activation unit (above) or multi-head target attention (FuxiCTR LongCTR's short branch)
    short_attention: Literal["din", "mhta"] = "din"
    short_heads: int = Field(2, ge=1)  # mhta: heads x head_dim (FuxiCTR: num_heads, attention_dim / num_heads)
    short_head_dim: int = Field(32, ge=1)
    target_cross: bool = True
    hidden: list[int] = [200, 80]
    activation: str = "dice"
    batch_norm: bool = False
    dropout: float = 0.0
    # the kernels' backend (GSU top-k, ESU attention): None = $KERNELS_BACKEND, else auto (Triton on CUDA)
    backend: Literal["auto", "triton", "reference"] | None = None
    lain: LainParams = Field(default_factory=LainParams)  # LAIN plug-in (off: the model above, unchanged)
    # DARE's auxiliary CTR head: an MLP on [e_t; u_long; u_long ⊙ e_t] (DARE's code, ``aux_loss``), its BCE added with
    # this weight (training only); 0 = off. Needs dare: true.
    dare_aux_alpha: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _dare_aux_needs_dare(self) -> TwoStageParams:
        if self.dare_aux_alpha > 0 and not self.dare:
            raise ValueError("dare_aux_alpha > 0 needs dare: true (it is DARE's auxiliary loss)")
        check_dare_att_dim(self.dare, self.dare_att_dim, self.lain.enabled)
        return self


@dataclass
class LengthContext:
    """LAIN's per-batch length state: L [B] (the whole prefix), h_len [B, d_len], the prompts [B, k, 2d] or None."""

    length: torch.Tensor
    h: torch.Tensor
    prompts: torch.Tensor | None


@dataclass
class BranchInput:
    """One attention branch after LAIN: the query, keys, values and mask (prompts first), and τ(L) or None."""

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    temperature: torch.Tensor | None
    prompts: int  # slots prepended before the behaviors


def _pad_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` to ``width``."""
    extra = width - x.shape[-1]
    return x if extra == 0 else torch.cat([x, x.new_zeros(*x.shape[:-1], extra)], dim=-1)


class TwoStageModel(CTRModel):
    """Base class of SIM / MUSE: subclasses implement `search` (the GSU) and `long_interest` (the ESU), set
    `long_dim` and call `build_tower()` at the end of their ``__init__``."""

    Params: ClassVar[type[ModelParams]] = TwoStageParams
    att_sources = ATT_SOURCES
    embeds_prefix: ClassVar[bool] = False  # True: the GSU needs learned embeddings of the whole prefix (SIM soft)
    # with embeds_prefix: True when the loss reaches prefix embeddings beyond the selected rows (module docstring)
    prefix_grad: ClassVar[bool] = True
    # the GSU keeps every behavior of a prefix of at most k (a top-k of a score over all of them), the extras its
    # search returns come from `whole_extras` without it, and the ESU does not depend on the slots' order: `fits_k`
    # (at max_len <= k)
    keeps_all_within_k: ClassVar[bool] = False

    def __init__(self, params: TwoStageParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__(params, info, device)
        self.p = params
        d = 2 * self.dim
        self.att_width = 2 * self.att_dim  # [item; cate] of the attention tables (== d without a narrower DARE)
        self.short_attention: nn.Module
        if params.short_attention == "mhta":
            self.short_attention = MultiHeadTargetAttention(
                self.att_width, self.att_width, d, heads=params.short_heads, head_dim=params.short_head_dim, out_dim=d,
                backend=params.backend,
            )  # fmt: skip
        else:
            self.short_attention = DinAttention(
                self.att_width,
                params.short_attention_hidden,
                params.short_attention_activation,
                softmax=params.short_softmax,
            )
        self.n_context = len(self.context_features()) + (1 if params.use_user else 0)
        self.tower: nn.Module | None = None
        self.long_dim = 0
        self.lain: LainConditioner | None = None
        self.lain_long_key_dim = d  # width of the ESU's attention keys (SIM: [e; e(Δt)]), for LAIN's K' = W_k[K; h]

    # ---- data contract -------------------------------------------------------------------------------------------
    def views(self) -> tuple[SequenceView, ...]:
        p: TwoStageParams = self.params  # type: ignore[assignment]
        return (SequenceView("long", p.max_len), SequenceView("short", p.short_len))

    # ---- pieces for subclasses ------------------------------------------------------------------------------------
    def build_tower(self, in_dim: int | None = None, head: Callable[[int], nn.Module] | None = None) -> None:
        """The tower MLP (``hidden``, ``activation``, ...) then one logit (or ``head(width)``). Its input defaults to
        `tower_input`'s ``[e_t; u_short; (u_short ⊙ e_t); long parts (long_dim); context]``."""
        d = 2 * self.dim
        if in_dim is None:
            in_dim = (3 if self.p.target_cross else 2) * d + self.long_dim + self.dim * self.n_context
        mlp = MLP(
            in_dim, self.p.hidden, activation=self.p.activation, batch_norm=self.p.batch_norm, dropout=self.p.dropout,
            out_dim=None if head is not None else 1,
        )  # fmt: skip
        self.tower = nn.Sequential(mlp, head(mlp.out_dim)) if head is not None else mlp
        self.dare_aux: nn.Module | None = None
        if self.p.dare_aux_alpha > 0:
            if head is not None or self.long_dim == 0:
                raise ValueError(f"{self.name}: dare_aux_alpha needs the frame's tower and long-term parts")
            self.dare_aux = MLP(d + self.long_dim, self.p.hidden, activation=self.p.activation, out_dim=1)
        if self.p.lain.enabled:  # built last: the backbone's parameters start as the plain model's with the same seed
            branches = {"short": (d, d), "long": (d, self.lain_long_key_dim)}
            self.lain = LainConditioner(self.p.lain, branches, d, self.info.median_hist_len)

    # ---- LAIN ------------------------------------------------------------------------------------------------------
    def length_context(self, batch: Batch) -> LengthContext | None:
        """LAIN's length encoding and prompts for this batch; None without LAIN or when it is switched off."""
        if self.lain is None or not self.lain.active:
            return None
        length = batch.dense["hist_len"]
        h = self.lain.encode(length)
        return LengthContext(length=length, h=h, prompts=self.lain.prompts(h))

    def lain_branch(
        self,
        lc: LengthContext | None,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None = None,
        branch: str = "long",
    ) -> BranchInput:
        """An ESU's inputs with LAIN applied: ``[P; keys]`` / ``[P; values]`` (prompts zero-padded to each width),
        ``Q'``, ``K'`` and τ(L). Without LAIN (``lc`` None) the inputs come back unchanged, τ None."""
        values = keys if values is None else values
        if lc is None:
            return BranchInput(query, keys, values, mask, None, 0)
        assert self.lain is not None
        n = 0
        if lc.prompts is not None:
            n = lc.prompts.shape[1]
            values = prepend_prompts(_pad_width(lc.prompts, values.shape[-1]), values, mask)[0]
            keys, mask = prepend_prompts(_pad_width(lc.prompts, keys.shape[-1]), keys, mask)
        return BranchInput(
            query=self.lain.condition_query(query, lc.h, branch),
            keys=self.lain.condition_key(keys, lc.h, branch),
            values=values,
            mask=mask,
            temperature=self.lain.temperature(lc.length),
            prompts=n,
        )

    def attend_short(
        self,
        lc: LengthContext | None,
        query: torch.Tensor,
        keys: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The short-term attention ``[B, 2d]``, with LAIN's prompts, conditioning and τ when ``lc`` is given."""
        if isinstance(self.short_attention, MultiHeadTargetAttention):
            br = self.lain_branch(lc, query, keys, mask, values, branch="short")
            return self.short_attention(br.query, br.keys, br.mask, values=br.values, temperature=br.temperature)
        if lc is None:
            return self.short_attention(query, keys, mask, values=values)[0]
        assert self.lain is not None
        return lain_din_attention(
            self.short_attention, self.lain, lc.h, lc.length, query, keys, mask, values=values, branch="short"
        )

    def pair(self, emb: dict[str, Any], prefix: str, att: bool = False) -> torch.Tensor:
        """``[e(item); e(cate)]`` of a feature pair, jagged values ``[N, 2d]`` (``prefix`` "" for the target)."""
        suffix = ATT_SUFFIX if att and self.p.dare else ""
        return pair_values(emb, f"{prefix}item{suffix}", f"{prefix}cate{suffix}")

    def pair_parts(self, emb: dict[str, Any], prefix: str, att: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`pair`'s two halves as looked up, ``(e(item) [N, d], e(cate) [N, d])``, for readers that need no copy
        (where the look-up laid the pair out side by side, the halves are its column views)."""
        suffix = ATT_SUFFIX if att and self.p.dare else ""
        return emb[f"{prefix}item{suffix}"].values(), emb[f"{prefix}cate{suffix}"].values()

    def search(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any] | None
    ) -> tuple[Selection, dict[str, torch.Tensor]]:
        """The GSU: (selection over the `long` view, what the model's `loss` needs of the search, by name).
        ``emb`` is given when `embeds_prefix` (the whole prefix embedded), else None."""
        raise NotImplementedError

    def long_interest(self, inp: StageInput) -> list[torch.Tensor]:
        """The ESU: the long-term parts of the tower input (widths summing to `long_dim`)."""
        raise NotImplementedError

    def search_attend(
        self, batch: Batch, ids: dict[str, Any], offsets: torch.Tensor, emb: dict[str, Any]
    ) -> tuple[Selection, dict[str, torch.Tensor], torch.Tensor] | None:
        """GSU and ESU in one fused op (`kernels.search_attend`, no ``[B, K, 2d]`` gather of the selected
        behaviors): ``(selection, search extras, ESU output)``, or None where the model or its configuration has no
        fused form (the default). Called with the whole prefix embedded (`embeds_prefix`)."""
        return None

    def short_interest(self, inp: StageInput) -> torch.Tensor:
        """The short branch's attention of the target over the last S behaviors: ``[B, 2d]``. DIN's unit without
        LAIN reads them as rows (`DinAttention.forward_rows`: the same function, no padded layout)."""
        if inp.lc is None and isinstance(self.short_attention, DinAttention):
            r = inp.short_rows
            return self.short_attention.forward_rows(inp.target_att, r.values_att, r.flat, r.rows, values=r.values)[0]
        return self.attend_short(inp.lc, inp.target_att, inp.short_att, inp.short_mask, values=inp.short)

    # ---- the shared forward ----------------------------------------------------------------------------------------
    def select(self, batch: Batch) -> tuple[Selection, torch.Tensor]:
        """The GSU alone (for inspection and tests): (selection, offsets of the `long` view)."""
        ids = batch.sparse.to_dict()
        offsets = lengths_to_offsets(ids["long_item"].lengths())
        emb = self.embed(ids) if self.embeds_prefix else None
        selection, _ = self.search(batch, ids, offsets, emb)
        return selection, offsets

    def prepare(self, batch: Batch) -> StageInput:
        """GSU, then one embedding lookup (target, context, selected or whole long, short) -> `StageInput`."""
        ids = batch.sparse.to_dict()
        long_item = ids["long_item"]
        offsets = lengths_to_offsets(long_item.lengths())
        esu_out = None
        tail = False  # the short window read from the embedded prefix (`short_in_prefix`)
        whole = self.fits_k()  # the GSU keeps every behavior: no search, one look-up
        if self.embeds_prefix and (self.prefix_grad or not torch.is_grad_enabled() or whole):
            tail = self.short_in_prefix()
            emb = self.embed(without_short(ids) if tail else ids)
            fused = self.search_attend(batch, ids, offsets, emb)
            if fused is not None:
                selection, extras, esu_out = fused
                values = None
            elif whole:  # every behavior kept, the rows in order, so laid out rather than gathered
                values = self.pair(emb, "long_")
                selection, extras = Selection.whole(long_item.lengths()), self.whole_extras(batch, offsets, emb, values)
            else:
                selection, extras = self.search(batch, ids, offsets, emb)
                values = self.pair(emb, "long_")
            compact = False
        else:
            from torchrec.sparse.jagged_tensor import JaggedTensor

            prefix = None
            if self.embeds_prefix:  # the GSU's look-up, without gradient; the selected rows are looked up again
                with torch.no_grad():
                    prefix = self.embed(ids)
            selection, extras = self.search(batch, ids, offsets, prefix)
            rows, mask = selection.rows(offsets), selection.mask
            n = mask.sum(1).int()
            picked = dict(ids)
            for f in ("long_item", "long_cate"):
                picked[f] = JaggedTensor(values=ids[f].values()[rows[mask]], lengths=n)
            emb = self.embed(picked)
            values, compact, whole = self.pair(emb, "long_"), True, False
        whole = whole and esu_out is None
        values_att = self.pair(emb, "long_", att=True) if self.p.dare and values is not None else values
        long_rows = LongRows(
            values, values_att, long_item.values(), batch.dense["long_ts_gap"], selection.rows(offsets),
            selection.mask, compact=compact, whole=whole,
        )  # fmt: skip
        target = self.pair(emb, "")
        target_att = self.pair(emb, "", att=True) if self.p.dare else target
        if tail:
            # where every prefix is its own tail, the short window's rows are the long branch's (one [N, 2d] copy)
            pairs = None if values is None or compact else (values, values_att)
            short_rows = tail_rows(emb, offsets, self.p.short_len, self.p.dare, pairs)  # type: ignore[arg-type]
        else:
            short_rows = window_rows(emb, self.p.short_len, self.p.dare)
        return StageInput(
            batch=batch,
            emb=emb,
            target=target,
            target_att=target_att,
            target_ids=ids["item"].values(),
            selection=selection,
            long_rows=long_rows,
            long_offsets=offsets,
            short_rows=short_rows,
            short_item=ids["short_item"],
            short_len=self.p.short_len,
            extras=extras,
            lc=self.length_context(batch),
            esu_out=esu_out,
        )

    def fits_k(self) -> bool:
        """Whether no searched prefix can hold more than ``k`` behaviors (``max_len <= k``; the loader reads at most
        the last ``max_len``) and the model's GSU keeps all of a prefix that fits (`keeps_all_within_k`: TWIN, ETA, SIM
        soft).
        Then, on every batch:

        * the search is skipped: its choice is known (`Selection.whole`, the prefix in its own order) and the ESU of
          these models is a function of the set of kept behaviors, not of their order (attention sums over slots);
          what else the search computes (SIM soft's auxiliary head over the whole prefix) comes from `whole_extras`;
        * training looks the prefix up once, with gradient, instead of once for the search and again for the
          selected rows (`prefix_grad = False`): the loss reaches every row, the sparse update sees each row once,
          and the short window comes from the prefix's tail.

        The same logits, loss and gradients as the search and the two look-ups, to float rounding (the slots' sum runs
        in another order; `tests/test_fits_k.py`). Decided from the configuration, not from each batch's lengths: with
        sharded tables every look-up is a collective, so every rank must make the same number of them, and ranks'
        batches (a dry rank's stand-in batch too) differ. Only for a GSU that keeps all it can: one that keeps fewer
        (a category filter) would give unselected rows a zero gradient, which Adagrad ignores but Adam's momentum
        not."""
        return self.keeps_all_within_k and self.p.max_len <= self.p.k

    def whole_extras(
        self, batch: Batch, offsets: torch.Tensor, emb: dict[str, Any], behaviors: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What `search` returns beside its selection, where `fits_k` skips the search (none by default; SIM soft's
        auxiliary head, which reads the whole prefix whatever the search keeps). ``behaviors``: ``pair(emb,
        "long_")``, the prefix's rows the ESU reads too (one copy)."""
        return {}

    def short_in_prefix(self) -> bool:
        """Whether the short window is the tail of the long view, so that a model which embeds the whole prefix reads
        its short branch's embeddings there instead of looking the same behaviors up again: both views are the last
        behaviors strictly before the sample (the loader's contract), so the last ``short_len`` of the long view are
        the short view whenever ``short_len <= max_len`` and the long view holds behaviors (not TWIN-V2's
        clusters). The same rows, so the same values (`tests/test_two_stage.py`); the look-up and its sparse update
        skip ``B x S`` rows a step (half of them at L = 50)."""
        views = {v.name: v for v in self.views()}
        long, short = views.get("long"), views.get("short")
        return long is not None and short is not None and not long.clusters and short.length <= long.length

    def tower_input(self, inp: StageInput, long: list[torch.Tensor] | None = None) -> torch.Tensor:
        u_short = self.short_interest(inp)
        parts = [inp.target, u_short]
        if self.p.target_cross:
            parts.append(u_short * inp.target)
        parts += self.long_interest(inp) if long is None else long
        parts += self.context_vector(inp.emb)
        return torch.cat(parts, dim=-1)

    def forward(self, batch: Batch) -> ModelOutput:
        assert self.tower is not None, "a TwoStageModel subclass must call build_tower() in __init__"
        inp = self.prepare(batch)
        long = self.long_interest(inp) if self.dare_aux is not None else None  # shared with DARE's head
        logit = self.tower(self.tower_input(inp, long)).squeeze(-1)
        if not self.training:
            return ModelOutput(logit=logit)
        extras = dict(inp.extras)
        if self.dare_aux is not None and long is not None:
            extras["dare_aux_logit"] = self.dare_aux(torch.cat([inp.target, *long], dim=-1)).squeeze(-1)
        return ModelOutput(logit=logit, extras=extras)

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """BCE (+ DARE's auxiliary head, ``dare_aux``, when on; + the subclass's own terms)."""
        terms = super().loss(out, batch)
        if "dare_aux_logit" in out.extras:
            aux = F.binary_cross_entropy_with_logits(out.extras["dare_aux_logit"], batch.dense["label"])
            terms["dare_aux"] = self.p.dare_aux_alpha * aux
        return terms


class DiceHead(nn.Module):
    """MUSE code's output: ``Linear(→2)`` then LayerNorm-Dice on the two logits; returns ``z1 − z0`` (a 2-way softmax
    over (z0, z1) is the sigmoid of the difference, so BCE on it equals the release's 2-logit cross-entropy)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, 2)
        self.dice = make_activation("dice_ln", 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dice(self.linear(x))
        return (z[..., 1] - z[..., 0]).unsqueeze(-1)


__all__ = ["BranchInput", "DiceHead", "LengthContext", "StageInput", "TwoStageModel", "TwoStageParams", "to_slots"]
