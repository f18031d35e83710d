"""What every model shares: parameters, the embedding tables, the batch -> logit contract, and the registry.

A model is built from (its params, the dataset's `DatasetInfo`), tells the loader which sequence views and sparse
features it needs (`views()`, `features()`), maps a `Batch` to `ModelOutput(logit [B], extras)`, and says what its
training loss is: `loss(output, batch)` gives the named, weighted terms the trainer sums and logs.

Embedding tables are one TorchRec `EmbeddingCollection` (`self.embedding`): one table per id space, shared by every
feature of that space: the target `item`, the behaviors `hist_item`, DIEN's sampled `hist_neg_item` all look up the
`item` table (one `EmbeddingConfig` with several `feature_names`). `DistributedModelParallel` finds the collection
and shards it; the rest of the model is dense and trained by a normal optimizer. TorchRec asks every table of one
collection to share one dimension, so `embedding_dim` is per model, not per table; the one exception, DARE's
narrower attention tables (`dare_att_dim`), are a second collection (`self.att_embedding`), sharded the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from torch import nn

from features.dataset import DatasetInfo
from features.loader import Batch, SequenceView, sparse_feature_names

from ..modules.gsu import gather_rows, lengths_to_offsets, to_slots
from ..modules.sid_embedding import SID_TABLE, SemanticIdEmbedding, SidParams, build_pieces

ATT_SUFFIX = "_att"  # DARE's attention copy of a feature: `long_item` -> `long_item_att` (table `item_att`)


class ModelParams(BaseModel):
    """Parameters every model has. Subclasses add their own; unknown keys are errors (they name the key)."""

    model_config = ConfigDict(extra="forbid")

    embedding_dim: int = 16
    use_user: bool = False  # embed user_idx (a huge, sparse table; off by default as in most CTR baselines)
    use_context: bool = True  # embed the context columns of the samples (e.g. user_segment)
    # How items are represented, for the target, the behaviors and the GSU (Singh et al., RecSys '24): their ids,
    # their semantic IDs (`sid`, see `modules.sid_embedding`; needs `ctr sid`), or the sum of both (`id+sid`)
    item_repr: Literal["id", "sid", "id+sid"] = "id"
    # random hashing of the item ids into this many rows (the paper's baseline at a fixed table size); None = a row
    # per item id
    item_rows: int | None = Field(None, ge=2)
    # the tables start uniform in [-a, a]; None = TorchRec's default a = sqrt(1 / rows) (FuxiCTR starts its tables
    # at normal(0, 1e-4), which a = 1.7e-4 matches in scale)
    embedding_init: float | None = Field(None, gt=0)
    sid: SidParams = Field(default_factory=SidParams)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Configs of runs trained before the backends were named one way (`kernel_backend`, DIN's `kernel`)."""
        if isinstance(data, dict) and ("kernel_backend" in data or data.get("backend") == "kernel"):
            data = dict(data)
            if "kernel_backend" in data:
                data["backend"] = data.pop("kernel_backend")
            if data.get("backend") == "kernel":
                data["backend"] = "auto"
        return data


def check_dare_att_dim(dare: bool, att_dim: int | None, lain: bool) -> None:
    """``dare_att_dim`` (DARE's narrower attention tables) needs ``dare: true``, and no LAIN (its prompts have the
    representation width)."""
    if att_dim is None:
        return
    if att_dim < 1:
        raise ValueError(f"dare_att_dim must be >= 1, got {att_dim}")
    if not dare:
        raise ValueError("dare_att_dim needs dare: true (it is the width of DARE's attention tables)")
    if lain:
        raise ValueError("dare_att_dim with LAIN is not supported (LAIN's prompts have the representation width)")


class Embeddings(dict):
    """feature -> JaggedTensor of embeddings, as a collection's look-up returns them, with ``pairs``: for
    ``(f_item, f_cate)`` features looked up side by side (`ctr.train.local_lookup`), their ``[e(item); e(cate)]``
    rows ``[N, 2d]`` as one tensor, whose halves are the two features' values. `pair_values` reads it without the
    concatenation (and without the gradient's split back into the halves)."""

    def __init__(self, *args: Any, pairs: dict[tuple[str, str], torch.Tensor] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pairs: dict[tuple[str, str], torch.Tensor] = dict(pairs or {})


def pair_values(emb: dict[str, Any], item: str, cate: str) -> torch.Tensor:
    """``[e(item); e(cate)]`` of two features with the same lengths, ``[N, 2d]``: the looked-up pair where the
    look-up laid it out (`Embeddings.pairs`), else the concatenation of their values."""
    pairs = getattr(emb, "pairs", None)
    if pairs:
        block = pairs.get((item, cate))
        if block is not None:
            return block
    return torch.cat([emb[item].values(), emb[cate].values()], dim=-1)


@dataclass
class ModelOutput:
    logit: torch.Tensor  # [B], pre-sigmoid
    # What the model's `loss` needs beyond the logit, by name (SIM-soft's auxiliary logit, DIEN's unweighted
    # interest-extractor loss); empty at evaluation.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class CTRModel(nn.Module):
    """Base class: builds the shared embedding collection; subclasses define `views` and `forward`."""

    name: ClassVar[str]
    Params: ClassVar[type[ModelParams]] = ModelParams

    def __init__(self, params: ModelParams, info: DatasetInfo, device: torch.device | None = None) -> None:
        super().__init__()
        from torchrec import EmbeddingCollection, EmbeddingConfig

        self.params = params
        self.info = info
        self.dim = params.embedding_dim
        # DARE's attention tables may be narrower than the representation tables (`dare_att_dim`); TorchRec asks
        # the tables of one collection to share a width, so narrower ones live in a second collection
        dare = getattr(params, "dare", False)
        self.att_dim = (getattr(params, "dare_att_dim", None) or self.dim) if dare else self.dim
        sizes = dict(info.vocab_sizes)
        self.item_rows = params.item_rows
        if params.item_rows is not None:
            sizes["item"] = params.item_rows
        self.sid_embedding = self._sid_embedding(params, info, sizes)
        # item features (their ids): hashed (`item_rows`) and/or pooled from semantic IDs in `embed`
        self._item_features = [f for f in loaded_features(self) if self.space_of(f) == "item"]
        spaces: dict[str, list[str]] = {}
        self.embedded_features = self.embedding_features()  # what `embed` looks up, in order
        for feat in self.embedded_features:
            spaces.setdefault(self.space_of(feat), []).append(feat)

        def collection(names: list[str], dim: int) -> EmbeddingCollection:
            return EmbeddingCollection(
                tables=[
                    EmbeddingConfig(
                        name=space,
                        embedding_dim=dim,
                        # a DARE attention table (`item_att`) has as many rows as its id space (`item`)
                        num_embeddings=sizes[space if space in sizes else space.removesuffix(ATT_SUFFIX)],
                        feature_names=spaces[space],
                        weight_init_max=params.embedding_init,
                        weight_init_min=-params.embedding_init if params.embedding_init else None,
                    )
                    for space in names
                ],
                device=device or torch.device("cpu"),
            )

        split = self.att_dim != self.dim
        att = [s for s in spaces if split and s.endswith(ATT_SUFFIX)]
        self.embedding = collection([s for s in spaces if s not in att], self.dim)
        self.att_embedding = collection(att, self.att_dim) if att else None
        self._att_features = [f for f in self.embedded_features if self.space_of(f) in att]

    def _sid_embedding(
        self, params: ModelParams, info: DatasetInfo, sizes: dict[str, int]
    ) -> SemanticIdEmbedding | None:
        """The semantic-ID pieces of every item (``item_repr`` sid / id+sid); records the piece table's rows."""
        if params.item_repr == "id":
            return None
        if getattr(params, "dare", False):
            raise ValueError(
                f"item_repr {params.item_repr} with DARE is not supported (DARE's attention tables are item-id tables)"
            )
        codes, num_codes = info.sid_codes(params.sid.levels)  # a dataset without SIDs fails here, with the fix
        weights = info.item_impressions("train").astype(np.float64) if params.sid.mode == "spm" else None
        pieces, rows = build_pieces(params.sid, codes, num_codes, weights)
        sizes[SID_TABLE] = rows
        return SemanticIdEmbedding(pieces, rows, self.dim, params.sid.layer_norm)

    # ---- what the loader must deliver -------------------------------------------------------------------------
    def views(self) -> tuple[SequenceView, ...]:
        """The sequence views this model reads (see features.loader)."""
        raise NotImplementedError

    def context_features(self) -> list[str]:
        return [c.removesuffix("_idx") for c in self.info.context_columns] if self.params.use_context else []

    def features(self) -> list[str]:
        """Sparse features, in KeyedJaggedTensor order."""
        ctx = self.context_features()
        names = sparse_feature_names(self.views(), [f"{c}_idx" for c in ctx])
        return [n for n in names if n != "user" or self.params.use_user]

    # DARE (Feng et al., ICLR 2025): the features whose ids also look up the attention tables (`item_att`, ...)
    att_sources: ClassVar[tuple[str, ...]] = ()

    def embedding_features(self) -> list[str]:
        """Every feature the embedding collection looks up: `features()` (what the loader delivers) plus any feature
        a model builds itself in `embed` (DARE's attention copies `item_att`, `long_item_att`, ...)."""
        feats = loaded_features(self)
        if self.params.item_repr == "sid":  # the items' vectors come from their pieces only
            feats = [f for f in feats if self.space_of(f) != "item"]
        if self.params.item_repr != "id":
            feats = feats + [SID_TABLE]
        return feats

    def embedding_pairs(self) -> list[tuple[str, str]]:
        """The ``(f_item, f_cate)`` features read together as ``[e(item); e(cate)]`` (`pair_values`): every item
        feature with its category feature of the same prefix (and DARE suffix), both looked up."""
        feats = set(self.embedding_features())
        pairs = []
        for f in self.embedding_features():
            base, suffix = (f.removesuffix(ATT_SUFFIX), ATT_SUFFIX) if f.endswith(ATT_SUFFIX) else (f, "")
            if base == "item" or base.endswith("_item"):
                cate = base.removesuffix("item") + "cate" + suffix
                if cate in feats:
                    pairs.append((f, cate))
        return pairs

    def embed(self, ids: dict[str, Any]) -> dict[str, Any]:
        """Look up every embedding feature (DARE's ``*_att`` from their source ids) in one collection call;
        ``ids``: feature -> JaggedTensor of ids (``batch.sparse.to_dict()``, possibly with some replaced)."""
        from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

        sid = None
        if self.item_rows is not None or self.sid_embedding is not None:
            ids, sid = self._item_ids(ids, JaggedTensor)

        def kjt(feats: list[str], collection: Any) -> KeyedJaggedTensor:
            # a collection that looks up on one rank (`ctr.train.local_lookup`) takes its own feature order unpermuted
            order = getattr(collection, "ctr_feature_order", None)
            if order is not None and sorted(order) == sorted(feats):
                feats = order
            jts = [ids[f.removesuffix(ATT_SUFFIX) if f.endswith(ATT_SUFFIX) else f] for f in feats]
            return KeyedJaggedTensor(
                keys=list(feats),
                values=torch.cat([jt.values().long() for jt in jts]),
                lengths=torch.cat([jt.lengths().int() for jt in jts]),
            )

        if self.att_embedding is None:
            out = self.embedding(kjt(self.embedded_features, self.embedding))
        else:
            main = [f for f in self.embedded_features if f not in self._att_features]
            att = self.att_embedding(kjt(self._att_features, self.att_embedding))
            rep = self.embedding(kjt(main, self.embedding))
            out = Embeddings({**rep, **att}, pairs={**getattr(rep, "pairs", {}), **getattr(att, "pairs", {})})
        if sid is not None:
            out = self._pool_sid(out, ids, *sid, JaggedTensor)
        return out

    def _item_ids(self, ids: dict[str, Any], jagged: Any) -> tuple[dict[str, Any], tuple | None]:
        """The ids `embed` looks up once items are hashed (`item_rows`) or pooled from pieces: item features'
        ids hashed into the ID table, and the pieces of the batch's unique items as the ``item_sid`` feature (all
        in the first row: an unpooled lookup keeps the order). Returns (ids, (raw item ids, unique inverse, segment
        of each piece, number of unique items)) or (ids, None) without SIDs."""
        ids = dict(ids)
        raw = {f: ids[f] for f in self._item_features}
        if self.item_rows is not None:
            for f, jt in raw.items():
                ids[f] = jagged(values=hash_ids(jt.values().long(), self.item_rows), lengths=jt.lengths())
        if self.sid_embedding is None:
            return ids, None
        first = raw[self._item_features[0]]
        uniq, inverse = torch.unique(torch.cat([jt.values().long() for jt in raw.values()]), return_inverse=True)
        flat, seg = self.sid_embedding.piece_ids(uniq)
        lengths = torch.zeros_like(first.lengths())
        lengths[0] = flat.numel()
        ids[SID_TABLE] = jagged(values=flat, lengths=lengths)
        return ids, (raw, inverse, seg, uniq.numel())

    def _pool_sid(self, out: dict[str, Any], ids: dict[str, Any], raw: dict[str, Any], inverse: torch.Tensor,
                  seg: torch.Tensor, n_items: int, jagged: Any) -> dict[str, Any]:  # fmt: skip
        """Item features' vectors from their pooled pieces (``sid``), or added to their id rows (``id+sid``)."""
        assert self.sid_embedding is not None
        out = dict(out)
        pooled = self.sid_embedding.pool(out.pop(SID_TABLE).values(), seg, n_items)
        parts = inverse.split([raw[f].values().numel() for f in raw])
        for f, part in zip(raw, parts, strict=True):
            v = gather_rows(pooled, part)
            if self.params.item_repr == "id+sid":
                v = out[f].values() + v
            out[f] = jagged(values=v, lengths=raw[f].lengths())
        return out

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The embedding tables' parameters (every collection): what the fused sparse optimizer updates."""
        params = list(self.embedding.parameters())  # (the semantic-ID piece table `item_sid` is one of its tables)
        if self.att_embedding is not None:
            params += list(self.att_embedding.parameters())
        return params

    @staticmethod
    def space_of(feature: str) -> str:
        """The id space (= table) of a sparse feature: `hist_neg_item` -> `item`, `user_segment` -> itself, and
        DARE's attention features `long_item_att` -> `item_att` (a second table over the `item` ids)."""
        for space in ("item_att", "cate_att", "item", "cate"):
            if feature == space or feature.endswith("_" + space):
                return space
        return feature

    # ---- helpers for subclasses -----------------------------------------------------------------------------
    def lookup(self, batch: Batch) -> dict[str, Any]:
        """feature -> JaggedTensor of embeddings (values [sum lengths, dim])."""
        if self.item_rows is not None or self.sid_embedding is not None:
            return self.embed(batch.sparse.to_dict())
        return self.embedding(batch.sparse)

    @staticmethod
    def single(jt: Any) -> torch.Tensor:
        """A feature with exactly one id per sample -> [B, dim]."""
        return jt.values()

    @staticmethod
    def pair_jagged(emb: dict[str, Any], item: str, cate: str) -> Any:
        """``[e(item); e(cate)]`` of two features as one JaggedTensor (`pair_values`; the lengths are item's)."""
        from torchrec.sparse.jagged_tensor import JaggedTensor

        return JaggedTensor(values=pair_values(emb, item, cate), lengths=emb[item].lengths())

    @staticmethod
    def padded(jt: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Jagged [sum L, dim] -> right-padded [B, max_len, dim] and a bool mask [B, max_len] (True = real).

        Each row is oldest first, so the newest behavior is at position length - 1.
        """
        lengths = jt.lengths().long()
        values = jt.values()
        b = lengths.shape[0]
        width = max(1, min(max_len, int(lengths.max()) if b else 1))
        pos = torch.arange(width, device=values.device)
        mask = pos.unsqueeze(0) < lengths.unsqueeze(1)
        dest = mask.reshape(-1).nonzero().squeeze(1)
        if bool((lengths > width).any()):  # a row longer than the window keeps its first `width` behaviors
            index = (lengths_to_offsets(lengths)[:-1].unsqueeze(1) + pos.unsqueeze(0)).reshape(-1).index_select(0, dest)
            values = gather_rows(values, index)
        return to_slots(values, mask, dest), mask

    @staticmethod
    def window_rows(jt: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The behaviors `padded` lays out, as rows of ``jt.values()``: their positions (increasing) and samples
        (nondecreasing), for `DinAttention.forward_rows`, which reads them without the padded copy."""
        lengths = jt.lengths().long()
        n = lengths.clamp(max=max_len)
        b, total = lengths.shape[0], int(n.sum()) if lengths.numel() else 0
        rows = torch.repeat_interleave(torch.arange(b, device=lengths.device), n, output_size=total)
        flat = torch.arange(total, device=lengths.device)
        if total != jt.values().shape[0]:  # a row longer than the window keeps its first `max_len` behaviors
            shift = lengths_to_offsets(lengths)[:-1] - lengths_to_offsets(n)[:-1]
            flat = flat + shift.index_select(0, rows)
        return flat, rows

    def context_vector(self, emb: dict[str, Any]) -> list[torch.Tensor]:
        """The embedded user (if used) and context features, each [B, dim]."""
        parts = [self.single(emb["user"])] if self.params.use_user else []
        return parts + [self.single(emb[c]) for c in self.context_features()]

    def loss(self, out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        """The training loss as named terms, each already weighted; the trainer sums them and logs each.

        ``ctr`` is the binary cross-entropy of the logit against the click label (every model); a model with an
        auxiliary objective adds its term (`DIEN`'s interest-extractor loss, SIM-soft's search CTR loss).
        """
        return {"ctr": F.binary_cross_entropy_with_logits(out.logit.float(), batch.dense["label"])}

    def forward(self, batch: Batch) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def loaded_features(model: CTRModel) -> list[str]:
    """What the loader delivers plus DARE's attention copies: `embedding_features` before the item representation
    (``item_repr``) swaps item ids for semantic-ID pieces."""
    feats = model.features()
    if getattr(model.params, "dare", False):
        feats = feats + [f + ATT_SUFFIX for f in feats if f in model.att_sources]
    return feats


_HASH_P = (1 << 31) - 1  # a Mersenne prime above every item index


def hash_ids(ids: torch.Tensor, rows: int, a: int = 1_103_515_245, b: int = 12_345) -> torch.Tensor:
    """Random hashing of item ids into ``rows`` buckets, ``((a·id + b) mod p) mod rows`` with p = 2^31 − 1 (a
    universal hash; ids < 2^31, so the product fits in int64)."""
    return ((ids * a + b) % _HASH_P) % rows


MODELS: dict[str, type[CTRModel]] = {}


def register(cls: type[CTRModel]) -> type[CTRModel]:
    """Class decorator: make a model available to `ctr train --model NAME` under `cls.name`."""
    if cls.name in MODELS:
        raise ValueError(f"model name {cls.name!r} registered twice")
    MODELS[cls.name] = cls
    return cls


def register_lain_variant(backbone: type[CTRModel], name: str) -> type[CTRModel]:
    """Register `name`: `backbone` with the LAIN plug-in on by default (``lain.enabled: true``; the backbone's Params
    must have a ``lain`` field) and its DIN-form attentions in the softmax form (``softmax`` / ``short_softmax``:
    true), where LAIN's temperature is a sharpness. The same model and code, under its own name so that runs and
    reports show it beside its backbone (``ctr train --model NAME --print-config`` shows its defaults)."""
    from ..modules.lain import LainParams

    # LAIN's temperature sharpens a softmax; DIN's paper form has none (raw weights, where dividing by τ only scales
    # the pooled vector), so the variants default their DIN-form attentions to the softmax form (official DIN code)
    softmax = {f: (bool, True) for f in ("softmax", "short_softmax") if f in backbone.Params.model_fields}
    params = create_model(
        f"{backbone.Params.__name__}Lain",
        __base__=backbone.Params,
        __module__=backbone.__module__,
        lain=(LainParams, Field(default_factory=lambda: LainParams(enabled=True))),
        **softmax,  # type: ignore[arg-type]
    )
    doc = f"{backbone.__name__} + LAIN (Zhang et al., AAAI 2026): ``lain.enabled: true`` by default."
    return _register_variant(backbone, name, "Lain", params, doc)


def _register_variant(backbone: type[CTRModel], name: str, suffix: str, params: type, doc: str) -> type[CTRModel]:
    """Register the subclass ``<Backbone><suffix>`` of `backbone` under `name`, with `params` as its Params."""
    attrs = {"name": name, "Params": params, "__doc__": doc, "__module__": backbone.__module__}
    model = type(f"{backbone.__name__}{suffix}", (backbone,), attrs)
    # Module attributes, so that pickle finds both classes (validated Params travel to spawned training ranks).
    module = sys.modules[backbone.__module__]
    setattr(module, params.__name__, params)
    setattr(module, model.__name__, model)
    return register(model)


def register_sid_variant(backbone: type[CTRModel], name: str, sid: SidParams) -> type[CTRModel]:
    """Register `name`: `backbone` with semantic-ID items by default (``item_repr: sid`` and the given ``sid``
    settings; Singh et al., RecSys '24), under its own name so that the demo, the report and the quality checks show
    it beside its backbone. The same model and code (``ctr train --model NAME --print-config`` shows its defaults)."""
    params = create_model(
        f"{backbone.Params.__name__}Sid",
        __base__=backbone.Params,
        __module__=backbone.__module__,
        item_repr=(Literal["id", "sid", "id+sid"], "sid"),
        sid=(SidParams, Field(default_factory=lambda: sid.model_copy())),
    )  # type: ignore[call-overload]
    doc = f"{backbone.__name__} with semantic-ID items: ``item_repr: sid``, ``sid: {sid.model_dump()}``."
    return _register_variant(backbone, name, "Sid", params, doc)


def get_model_class(name: str) -> type[CTRModel]:
    from . import _import_all

    _import_all()
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_names() -> list[str]:
    from . import _import_all

    _import_all()
    return sorted(MODELS)
