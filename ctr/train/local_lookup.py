"""The sequence tables' look-up on a world of one rank, without TorchRec's distribution steps around it.

A `ShardedEmbeddingCollection` runs the same steps on one rank as on many: it permutes the batch's
`KeyedJaggedTensor` into its shards' feature order, sends every shard's features through an input all-to-all (the
splits, then the data), looks each table group up, sends the embeddings back through an output all-to-all, and builds
one `JaggedTensor` per feature from awaitables. With one rank (every table placed whole: `single_rank_constraints`),
every step but the permutation and the look-up hands the tensors over unchanged, at about 1.3 ms a step of Python and
small operators (SDIM on MovieLens at batch 1,024 and L = 50: 1.8 ms of its 35 ms step in the collection, 0.4 of it
the rows' `index_select`).

`install(module, world_size)` gives every such collection under `module` a forward that does only what changes the
data: the permutation into its shards' feature order (`KeyedJaggedTensor.permute`, where the batch comes in another
order), each table group's own look-up on its features' ids and offsets (the same TBE module, so the fused sparse
optimizer, `ctr.train.cpu_tables`' update and checkpoints are untouched), and the per-feature views of its rows. Such
a collection names its feature order (``ctr_feature_order``): a batch built in that order (`CTRModel.embed`) needs no
permutation. The embeddings are the same rows, and the gradients reach each table group in the same order, so
training is the same bit for bit (`tests/test_local_lookup.py`, against the collection's own forward). Anything it
does not cover keeps TorchRec's path: more than one rank, a sharding other than table-wise, index deduplication,
features that also return their ids, trackers, weighted look-ups, variable batch sizes per feature.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


def _groups(sec: Any) -> list[tuple[Any, list[str]]] | None:
    """(table group module, its features in order) for every group of a sharded collection, in its feature order;
    None where the collection must keep TorchRec's path."""
    from torchrec.distributed.embedding_lookup import GroupedEmbeddingsLookup
    from torchrec.distributed.types import ShardingType

    if list(sec._sharding_type_to_sharding) != [ShardingType.TABLE_WISE.value]:
        return None
    if sec._use_index_dedup or sec._need_indices or sec._features_to_permute_indices:
        return None
    if getattr(sec, "post_lookup_tracker_fn", None) is not None or getattr(sec, "post_odist_tracker_fn", None):
        return None
    groups: list[tuple[Any, list[str]]] = []
    for lookup in sec._lookups:
        if type(lookup) is not GroupedEmbeddingsLookup or lookup.optim_state_tracker_fn is not None:
            return None
        for emb in lookup._emb_modules:
            groups.append((emb, list(emb._config.feature_names())))
    names = [f for s in sec._sharding_type_to_sharding.values() for f in s.feature_names()]
    return groups if [f for _, fs in groups for f in fs] == names else None


def _forward(self: Any, features: Any) -> dict[str, Any]:
    """The collection's look-up on one rank (see the module docstring): feature -> JaggedTensor of embeddings."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from ..models.base import Embeddings

    if features.variable_stride_per_key() or features.weights_or_none() is not None:
        return self._ctr_torchrec_forward(features)
    keys = tuple(features.keys())
    order = self._ctr_orders.get(keys)
    if order is None:
        if set(self.ctr_feature_order) - set(keys):
            return self._ctr_torchrec_forward(features)  # (TorchRec raises its own error on such a batch)
        index = [keys.index(f) for f in self.ctr_feature_order]
        order = self._ctr_orders[keys] = (index, torch.tensor(index, dtype=torch.int32, device=features.device()))
    if order[0] != list(range(len(keys))):
        features = features.permute(*order)
    out = Embeddings()
    stride = features.stride()
    lengths = features.lengths().view(-1, stride) if stride else features.lengths().view(len(keys), 0)
    per_key = features.length_per_key()
    start = 0
    for emb, names in self._ctr_groups:
        n = len(names)
        group = features if n == len(keys) else features.split([start, n, len(keys) - start - n])[1]
        counts, group_lengths = per_key[start : start + n], lengths[start : start + n]
        # a table group this path does not train (`ctr.train.cpu_tables`): its own module
        if not _blocks(self, emb, group, names, counts, group_lengths, out):
            rows = emb(group)
            for name, part, length in zip(names, rows.split(counts), group_lengths, strict=True):
                out[name] = JaggedTensor(values=part, lengths=length)
        start += n
    return out


def _blocks(
    self: Any, emb: Any, group: Any, names: list[str], counts: list[int], lengths: torch.Tensor, out: Any
) -> bool:
    """One table group's rows through `cpu_tables.lookup_blocks`, into ``out``: a feature alone, or a pair
    (``ctr_pairs``, same lengths in this batch) side by side as ``[n, 2D]`` (its rows interleaved in the look-up
    order: each table's rows keep their relative order, so the update sums each row's gradients as before);
    False where the group's TBE does not train through `cpu_tables` (nothing written)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    from . import cpu_tables

    firsts = [0]
    for c in counts[:-1]:
        firsts.append(firsts[-1] + c)
    pos = {f: i for i, f in enumerate(names)}
    partner: dict[int, tuple[int, int]] = {}  # the pair's first position in the group -> (item position, cate's)
    for a, b in self.ctr_pairs:
        ia, ib = pos.get(a), pos.get(b)
        if ia is None or ib is None or counts[ia] != counts[ib] or not torch.equal(lengths[ia], lengths[ib]):
            continue
        partner[min(ia, ib)] = (ia, ib)
    layout: list[tuple[int, ...]] = []
    taken: set[int] = set()
    for i in range(len(names)):
        if i in taken:
            continue
        pair = partner.get(i)
        if pair is not None and not taken.intersection(pair):
            layout.append(pair)
            taken.update(pair)
        else:
            layout.append((i,))
            taken.add(i)
    order = None
    if any(len(b) == 2 for b in layout):
        parts = []
        for b in layout:
            if len(b) == 1:
                parts.append(torch.arange(firsts[b[0]], firsts[b[0]] + counts[b[0]]))
            else:  # item row j then category row j: [f_item + j, f_cate + j]
                pair_firsts = torch.tensor([firsts[b[0]], firsts[b[1]]])
                parts.append((torch.arange(counts[b[0]]).unsqueeze(1) + pair_firsts).reshape(-1))
        order = torch.cat(parts)
    sizes = [sum(counts[i] for i in b) for b in layout]
    tbe = emb.emb_module
    found = cpu_tables.lookup_blocks(tbe, group.values(), group.offsets(), order, sizes)
    if found is None:
        return False
    dim = found[0].shape[1] if found else 0
    for b, rows in zip(layout, found, strict=True):
        if len(b) == 1:
            out[names[b[0]]] = JaggedTensor(values=rows, lengths=lengths[b[0]])
            continue
        block = rows.view(-1, 2 * dim)
        (ia, ib) = b
        out[names[ia]] = JaggedTensor(values=block[:, :dim], lengths=lengths[ia])
        out[names[ib]] = JaggedTensor(values=block[:, dim:], lengths=lengths[ib])
        out.pairs[(names[ia], names[ib])] = block
    return True


def install(module: torch.nn.Module, world_size: int, pairs: list[tuple[str, str]] | None = None) -> int:
    """Give every sharded embedding collection under `module` the one-rank look-up where it applies (one rank, the
    layout `_groups` accepts), with the model's feature ``pairs`` (`CTRModel.embedding_pairs`) laid out side by
    side; returns how many have it."""
    if world_size != 1:
        return 0
    n = 0
    for m in module.modules():
        if type(m).__name__ != "ShardedEmbeddingCollection" or hasattr(m, "_ctr_torchrec_forward"):
            continue
        groups = _groups(m)
        if groups is None:
            log.debug("%s keeps TorchRec's look-up path", type(m).__name__)
            continue
        m._ctr_torchrec_forward = m.forward
        m._ctr_groups = groups
        m.ctr_feature_order = [f for _, fs in groups for f in fs]
        m._ctr_orders = {}
        m.ctr_pairs = list(pairs or [])
        m.forward = types.MethodType(_forward, m)
        n += 1
    if n:
        log.info("%d embedding collection(s) look up without TorchRec's input and output distribution (one rank)", n)
    return n
