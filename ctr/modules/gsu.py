"""General Search Units (GSU): pick the top-K behaviors of a whole lifelong prefix for the ESU.

Every strategy scores the behaviors of each sample's jagged prefix (values ``[total_L, ...]`` plus int64 ``offsets
[B + 1]``, oldest first) against the sample's target and keeps the best K through the fused ``kernels.gsu_topk``
(forward only: the selection carries no gradient; the Triton kernel on CUDA, its PyTorch reference elsewhere). The
result is a `Selection`: positions ``[B, K]`` within each sample, best first, ``-1`` in empty slots (a sample with
fewer than K candidates), and the scores; equal scores go to the more recent behavior.

* `CategoryGSU` (SIM hard search, Pi et al., CIKM 2020, §4.1): ``r_i = 1[cate_i = cate_target]``; the K most recent
  behaviors of the target's category (SIM's "User Behavior Tree" user -> category -> behaviors). MUSE's
  ``utils.py::sim_hard_top_k`` does the same (stable argsort of the match mask, newest first, zero-padded).
* `InnerProductGSU` (SIM soft search, §4.1): ``r_i = (W_b e_i) · (W_a e_t)`` with ``W_a``, ``W_b`` linear maps
  without bias (FuxiCTR ``LongCTR/SIM``); served with MIPS in the paper, an exact top-K here. Its `relevance` gives
  the same scores *with* gradient for SIM's auxiliary CTR task (see ``ctr/models/sim.py``).
* `CosineGSU` (MUSE, Wu et al., arXiv 2512.07216, §4): ``r_i = cos(v_t, v_i)`` on frozen multimodal item vectors
  (float32 or int8 rows of ``items.parquet``'s ``mm_emb``; no learnable parameters). MUSE's code
  (``utils.py::sim_mm_top_k``) scores an all-zero vector (padding or no embedding) ``-1.1`` so that it is picked
  last: ``zero_vector_score=-1.1``; the default keeps the plain cosine (0) of the paper.

The frozen table comes from `features.dataset.DatasetInfo.mm_table` (a plain tensor, not a TorchRec table), kept
with ``register_buffer(..., persistent=False)`` so that checkpoints stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kernels
from kernels.reference.gsu_topk import SEGMENT_MIN_WORK

from .. import native
from ..native import gather_rows


def gsu_topk(offsets: torch.Tensor, k: int, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.gsu_topk` with the CPU's selection native where it is built (`ctr.native.jagged_topk`: each sample's
    top-K in one pass instead of a padded top-K or a sort of the whole batch; the same positions and scores exactly)
    and its scores too (`ctr.native.gather_dot`: each behavior's vector read in place, no [total_L, D] copy; equal
    within float rounding). Every search of this library goes through here."""
    return kernels.gsu_topk(offsets, k, cpu_select=native.jagged_topk, cpu_dot=native.gather_dot, **kwargs)


def per_sample_products(
    rows: torch.Tensor, queries: torch.Tensor, offsets: torch.Tensor, sample: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, Q]``: each jagged row ``rows [N, D]`` (sample b's at ``offsets[b] .. offsets[b + 1]``) against its
    sample's ``queries [B, Q, D]``. On the CPU with long samples (`SEGMENT_MIN_WORK`), one matmul per sample over its
    contiguous rows instead of a gathered ``[N, Q, D]`` copy of the queries (`kernels.reference.gsu_topk`'s rule).
    ``sample [N]``: each row's sample, when the caller has it."""
    b, n = queries.shape[0], rows.shape[0]
    if not rows.is_cuda and b > 0 and n * rows.shape[1] >= SEGMENT_MIN_WORK * b:
        out = rows.new_empty(n, queries.shape[1])
        bounds = offsets.tolist()
        for i in range(b):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                torch.mm(rows[lo:hi], queries[i].t(), out=out[lo:hi])
        return out
    if sample is None:
        sample = torch.repeat_interleave(torch.arange(b, device=rows.device), offsets[1:] - offsets[:-1], output_size=n)
    return torch.einsum("nd,nqd->nq", rows, gather_rows(queries, sample))


@dataclass
class Selection:
    """The GSU's top-K of each sample: positions ``[B, K]`` int64 within the sample (best first, ``-1`` = empty
    slot; the real ones come first) and their scores ``[B, K]`` float32 (0 in empty slots). `whole`: every
    behavior, in prefix order."""

    positions: torch.Tensor
    scores: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``[B, K]`` bool, True where a behavior was selected (left-aligned)."""
        return self.positions >= 0

    @property
    def k(self) -> int:
        return int(self.positions.shape[1])

    @classmethod
    def whole(cls, lengths: torch.Tensor) -> Selection:
        """Every behavior of each prefix, in prefix order (oldest first), ``[B, longest]``: what a top-k GSU keeps
        when no prefix is longer than k, in an order that only an ESU indifferent to slot order may read
        (`TwoStageModel.fits_k`). Scores are 0."""
        longest = int(lengths.max()) if lengths.numel() else 0
        slot = torch.arange(max(longest, 1), device=lengths.device)
        positions = torch.where(slot < lengths.unsqueeze(1).long(), slot, -1)
        return cls(positions=positions, scores=torch.zeros(positions.shape, device=lengths.device))

    def rows(self, offsets: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` rows of the jagged values (``offsets[b] + position``); empty slots point at the sample's first
        row (or row 0), so gather with them and then zero with `mask`."""
        start = offsets[:-1].unsqueeze(1)
        rows = start + self.positions.clamp(min=0)
        total = int(offsets[-1]) if offsets.numel() else 0
        return rows.clamp(max=max(total - 1, 0))


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """int ``[B]`` -> int64 ``[B + 1]``."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.long(), 0, out=offsets[1:])
    return offsets


def gather_slots(values: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Jagged ``values [total_L, ...]`` at ``rows [B, K]`` -> ``[B, K, ...]``, zero where ``mask`` is False.

    Only the selected rows are gathered (``index_select``) and placed with ``index_copy``: the backward is then a
    plain ``index_add`` over distinct rows, not the accumulating ``index_put`` of ``values[rows]``, which runs
    serially on the CPU (a fifth of SIM-soft's step at L = 1,000 before this).
    """
    if values.shape[0] == 0:
        return values.new_zeros(*rows.shape, *values.shape[1:])
    dest = mask.reshape(-1).nonzero().squeeze(1)
    return to_slots(gather_rows(values, rows.reshape(-1).index_select(0, dest)), mask, dest)


def to_slots(values: torch.Tensor, mask: torch.Tensor, dest: torch.Tensor | None = None) -> torch.Tensor:
    """Jagged ``values [N, ...]`` whose rows fill the True positions of ``mask [B, W]`` in row-major order (each
    row's real positions first) -> ``[B, W, ...]`` with zeros elsewhere. ``dest``: the flat True positions, if known.

    ``index_copy`` into zeros rather than ``out[mask] = values``: the same result, and a backward that gathers
    instead of an accumulating ``index_put``.
    """
    if dest is None:
        dest = mask.reshape(-1).nonzero().squeeze(1)
    out = values.new_zeros(mask.numel(), *values.shape[1:]).index_copy(0, dest, values)
    return out.view(*mask.shape, *values.shape[1:])


class CategoryGSU(nn.Module):
    """SIM hard search: the K most recent behaviors of the target's category (no parameters).

    ``prefilter`` (default): first keep the behaviors of the target's category (one vectorized compare, like SIM's
    user -> category index), then run ``kernels.gsu_topk`` on those candidates only and map the positions back. Same
    result; on the CPU reference it avoids sorting every sample padded to the longest prefix of the batch.
    ``backend`` (all GSUs): passed to ``kernels.gsu_topk`` (None = ``$KERNELS_BACKEND``, else auto).
    ``unmatched``: category indices that never match (a target of one of them selects nothing): the placeholder
    categories (out of vocabulary, the importers' "unknown" 0), which group unrelated items.
    """

    def __init__(self, backend: str | None = None, prefilter: bool = True, unmatched: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.backend = backend
        self.prefilter = prefilter
        self.unmatched = tuple(sorted(set(unmatched)))

    def forward(
        self,
        offsets: torch.Tensor,
        target_category: torch.Tensor,
        behavior_category: torch.Tensor,
        k: int,
        max_len: int | None = None,
    ) -> Selection:
        if self.unmatched:  # -2 matches no behavior (category indices are >= 0)
            skip = torch.isin(target_category, torch.tensor(self.unmatched, device=target_category.device))
            target_category = torch.where(skip, -2, target_category.long())
        if not self.prefilter:
            positions, scores = gsu_topk(
                offsets, k, mode="category", target_category=target_category,
                behavior_category=behavior_category, max_len=max_len, backend=self.backend,
            )  # fmt: skip
            return Selection(positions, scores)
        b = offsets.numel() - 1
        n = behavior_category.shape[0]
        sample = torch.repeat_interleave(
            torch.arange(b, device=offsets.device), offsets[1:] - offsets[:-1], output_size=n
        )
        candidates = torch.nonzero(behavior_category.long() == target_category.long()[sample]).squeeze(1)
        sub_offsets = lengths_to_offsets(torch.bincount(sample[candidates], minlength=b))
        local, scores = gsu_topk(
            sub_offsets, k, mode="category", target_category=target_category,
            behavior_category=behavior_category[candidates], backend=self.backend,
        )  # fmt: skip
        if candidates.numel() == 0:
            return Selection(local, scores)
        rows = candidates[(sub_offsets[:-1].unsqueeze(1) + local.clamp(min=0)).clamp(max=candidates.numel() - 1)]
        positions = torch.where(local >= 0, rows - offsets[:-1].unsqueeze(1), -1)
        return Selection(positions, scores)


class InnerProductGSU(nn.Module):
    """SIM soft search: ``r_i = (W_b e_i) · (W_a e_t)`` (``W_a``, ``W_b``: Linear without bias, as in FuxiCTR).

    Args:
        target_dim: width of ``e_t``.
        behavior_dim: width of ``e_i``.
        dim: the common search space (FuxiCTR's ``attention_dim``, 64).
    """

    def __init__(self, target_dim: int, behavior_dim: int, dim: int = 64, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.w_a = nn.Linear(target_dim, dim, bias=False)
        self.w_b = nn.Linear(behavior_dim, dim, bias=False)

    def query(self, target: torch.Tensor) -> torch.Tensor:
        """``W_bᵀ W_a e_t`` ``[B, behavior_dim]``: ``r_i = e_i · query`` equals ``(W_b e_i) · (W_a e_t)`` without
        projecting the (up to 100K) behaviors."""
        return self.w_a(target) @ self.w_b.weight

    def relevance(self, target: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``r_i`` for every jagged behavior, ``[total_L]``, differentiable (the auxiliary CTR task)."""
        return self._relevance(self.query(target), behaviors, offsets)[0]

    @staticmethod
    def _relevance(
        q: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``r_i = e_i · q_b`` ``[total_L]``, each behavior's sample ``[total_L]``)."""
        sample = torch.repeat_interleave(
            torch.arange(q.shape[0], device=q.device), offsets[1:] - offsets[:-1], output_size=behaviors.shape[0]
        )
        return (behaviors * gather_rows(q, sample)).sum(-1), sample

    def pooled(
        self, target: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Σ_i r_i v_i`` per sample ``[B, Dv]`` over its jagged behaviors (``v`` = ``values``, default the
        behaviors), differentiable: the auxiliary CTR head's input (``ctr/models/sim.py``). The readable form is
        `relevance` then an ``index_add``; float32 CPU tensors run it natively in one pass each way
        (`ctr.native.dot_pool`, about ten passes over the [N, D] prefix eagerly)."""
        q = self.query(target)
        fused = native.dot_pool(behaviors, q, offsets, values)
        if fused is not None:
            return fused
        r, sample = self._relevance(q, behaviors, offsets)
        v = behaviors if values is None else values
        return v.new_zeros(target.shape[0], v.shape[-1]).index_add_(0, sample, r.unsqueeze(-1) * v)

    def forward(
        self, offsets: torch.Tensor, target: torch.Tensor, behaviors: torch.Tensor, k: int, max_len: int | None = None
    ) -> Selection:
        with torch.no_grad():
            q = self.query(target).float()
        positions, scores = gsu_topk(
            offsets,
            k,
            mode="dot",
            target=q,
            behavior_vectors=behaviors.detach().float(),
            max_len=max_len,
            backend=self.backend,
        )
        return Selection(positions, scores)


class CosineGSU(nn.Module):
    """MUSE's GSU: cosine of frozen multimodal vectors (``table [N, D]`` float32 or int8, row = item index).

    The table is a non-persistent buffer: it moves with ``.to(device)`` but is not saved in checkpoints (it is
    reloaded from ``items.parquet`` when the model is built).
    """

    def __init__(self, table: torch.Tensor, zero_vector_score: float | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.register_buffer("table", table, persistent=False)
        self.zero_vector_score = zero_vector_score
        self.backend = backend

    def vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 rows for ``ids`` (int8 is cast without rescaling: the cosine is scale-invariant)."""
        return self.table[ids.long()].float()

    def cosine(self, target_ids: torch.Tensor, behavior_ids: torch.Tensor) -> torch.Tensor:
        """``cos(v_target, v_behavior)``: target ids ``[B]``, behavior ids ``[B, ...]`` -> ``[B, ...]`` (0 for a zero
        vector)."""
        t = nn.functional.normalize(self.vectors(target_ids), dim=-1)
        v = nn.functional.normalize(self.vectors(behavior_ids), dim=-1)
        t = t.reshape(t.shape[0], *([1] * (v.dim() - 2)), t.shape[-1])
        return (v * t).sum(-1)

    def jagged_cosine(
        self, target_ids: torch.Tensor, behavior_ids: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """Cosine of every jagged behavior with its sample's target, ``[total_L]``."""
        t = nn.functional.normalize(self.vectors(target_ids), dim=-1)
        v = nn.functional.normalize(self.vectors(behavior_ids), dim=-1)
        sample = torch.repeat_interleave(
            torch.arange(t.shape[0], device=t.device), offsets[1:] - offsets[:-1], output_size=v.shape[0]
        )
        return (v * gather_rows(t, sample)).sum(-1)

    def forward(
        self,
        offsets: torch.Tensor,
        target_ids: torch.Tensor,
        behavior_ids: torch.Tensor,
        k: int,
        max_len: int | None = None,
    ) -> Selection:
        positions, scores = gsu_topk(
            offsets, k, mode="cosine", target=self.vectors(target_ids), behavior_ids=behavior_ids, table=self.table,
            zero_vector_score=self.zero_vector_score, max_len=max_len, backend=self.backend,
        )  # fmt: skip
        return Selection(positions, scores)


__all__ = [
    "CategoryGSU",
    "CosineGSU",
    "InnerProductGSU",
    "Selection",
    "gather_rows",  # ctr.native's, for the models (which reach the native operators through the modules)
    "gather_slots",
    "lengths_to_offsets",
]
