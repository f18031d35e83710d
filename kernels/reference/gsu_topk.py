"""GSU top-K, PyTorch reference: score every behavior of each sample's jagged prefix, keep the best K.

Scores (float32; computed in float64 when an input is float64, float32 otherwise):

- ``cosine``: ``<t, e_i> / (max(||t||, eps) * max(||e_i||, eps))``, eps = 1e-12 (F.normalize's convention), with
  ``e_i`` a dequantized table row (``table[id_i] * scale``) or a row of the jagged ``behavior_vectors``. A behavior
  whose vector is all zero scores ``zero_vector_score`` when given (MUSE's code uses -1.1), else 0.
- ``dot``: ``<t, e_i>`` (SIM soft search).
- ``category``: 1 where ``behavior_category == target_category``, else excluded (SIM hard search).

A behavior is a candidate when its score is neither -inf nor NaN. Order: score descending, then position descending
(the more recent behavior wins a tie). Slots beyond the number of candidates hold position -1 and score 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._jagged import segment_ids

EPS = 1e-12
# a top-K selection over jagged scores: (scores [total_L], offsets [B + 1], K) -> (positions, scores) [B, K], or None
Selector = Callable[[torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor] | None"]
DotFn = Callable[
    [torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, bool], "tuple[torch.Tensor, torch.Tensor] | None"
]


def gsu_scores_reference(
    offsets: torch.Tensor,
    mode: str,
    target: torch.Tensor | None = None,
    behavior_ids: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_per_row: bool = False,
    zero_vector_score: float | None = None,
    target_category: torch.Tensor | None = None,
    behavior_category: torch.Tensor | None = None,
) -> torch.Tensor:
    """The score of every behavior, ``[total_L]`` float32; -inf marks an excluded behavior.

    ``vectors`` is the table (rows picked by ``behavior_ids``) or, without ids, the jagged ``[total_L, D]`` vectors;
    ``scale`` (1 element, or one per row of ``vectors``) dequantizes them.
    """
    if mode == "category":
        assert behavior_category is not None and target_category is not None
        sample = segment_ids(offsets, behavior_category.shape[0])
        same = behavior_category.long() == target_category.long()[sample]
        return torch.where(same, 1.0, float("-inf")).to(torch.float32)

    assert target is not None and vectors is not None
    acc = torch.float64 if torch.float64 in (target.dtype, vectors.dtype) else torch.float32
    rows = behavior_ids.long() if behavior_ids is not None else torch.arange(vectors.shape[0], device=vectors.device)
    behavior = vectors[rows].to(acc)  # [total_L, D]
    if scale is not None:
        behavior = behavior * (scale[rows].to(acc)[:, None] if scale_per_row else scale.reshape(()).to(acc))
    query = target.to(acc)
    sample = segment_ids(offsets, behavior.shape[0])
    dot = (behavior * query[sample]).sum(-1)
    if mode == "dot":
        return dot.to(torch.float32)
    query_inv = 1.0 / torch.sqrt((query * query).sum(-1)).clamp_min(EPS)
    behavior_sq = (behavior * behavior).sum(-1)
    score = dot * query_inv[sample] * (1.0 / torch.sqrt(behavior_sq).clamp_min(EPS))
    if zero_vector_score is not None:
        score = torch.where(behavior_sq == 0, torch.as_tensor(zero_vector_score, dtype=acc), score)
    return score.to(torch.float32)


# `gsu_scores_cpu`: a sample's dot products run as one matrix-vector product over its contiguous rows when the
# batch's work per sample, total_L x D / B, is at least this (256 behaviors of width 32). A Python loop over B costs a
# few microseconds per sample; the vectorized form materializes [total_L, D] products, which at 10K behaviors of
# width 32 per sample costs ~15x more on 2 CPU cores, and at 50 costs ~10x less.
SEGMENT_MIN_WORK = 8192


def gsu_scores_cpu(
    offsets: torch.Tensor,
    mode: str,
    target: torch.Tensor | None = None,
    behavior_ids: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_per_row: bool = False,
    zero_vector_score: float | None = None,
    target_category: torch.Tensor | None = None,
    behavior_category: torch.Tensor | None = None,
    dot_fn: DotFn | None = None,
) -> torch.Tensor:
    """`gsu_scores_reference`'s scores, organized for the CPU (equal within float rounding; tests hold it so).

    ``dot_fn``: a fused gather-and-dot for float32 vectors without a scale, ``dot_fn(vectors, ids or None, query,
    offsets, with_norms)`` giving ``(<v_i, q_b> [total_L], |v_i|² [total_L] or empty)`` or None to decline
    (`ctr.native.gather_dot`: every behavior's row read once in place); the forms below otherwise.

    The reference gathers a [total_L, D] copy of the behavior vectors and of the targets; at long histories that
    copy is the whole cost. Here:

    * table + ids, when the table times the batch is no larger than that copy (``N·B <= total_L·D``): every item
      against every target once, ``table @ targetsᵀ`` [N, B], then one scalar gathered per behavior;
    * otherwise, long samples (`SEGMENT_MIN_WORK`): one ``mv`` per sample over its own rows;
      short ones: the reference's vectorized form.
    """
    if mode == "category":
        return gsu_scores_reference(offsets, mode, target_category=target_category, behavior_category=behavior_category)
    assert target is not None and vectors is not None
    acc = torch.float64 if torch.float64 in (target.dtype, vectors.dtype) else torch.float32
    batch = offsets.numel() - 1
    total = behavior_ids.shape[0] if behavior_ids is not None else vectors.shape[0]
    query = target.to(acc)
    if mode == "cosine":  # normalized once per target instead of once per behavior
        query = query * (1.0 / torch.sqrt((query * query).sum(-1)).clamp_min(EPS)).unsqueeze(-1)
    if scale is not None and not scale_per_row:
        query = query * scale.reshape(()).to(acc)  # a global scale: on the B targets, not the total_L behaviors
    row_sq: torch.Tensor | None = None
    fused = None
    if dot_fn is not None and acc == torch.float32 and scale is None and vectors.dtype == torch.float32:
        ids = behavior_ids.long().contiguous() if behavior_ids is not None else None
        fused = dot_fn(vectors.contiguous(), ids, query.contiguous(), offsets.long().contiguous(), mode == "cosine")
    if fused is not None:
        dot, row_sq = fused
    elif behavior_ids is not None and vectors.shape[0] * batch <= total * vectors.shape[1]:
        sample = segment_ids(offsets, total)
        table = vectors.to(acc)
        if scale is not None and scale_per_row:
            table = table * scale.to(acc)[:, None]
        ids = behavior_ids.long()
        dot = torch.mm(table, query.t()).reshape(-1).index_select(0, ids * batch + sample)
        if mode == "cosine":
            row_sq = (table * table).sum(-1).index_select(0, ids)
    else:
        if behavior_ids is not None:
            behavior = vectors.index_select(0, behavior_ids.long()).to(acc)
            row_scale = scale.index_select(0, behavior_ids.long()) if scale is not None and scale_per_row else None
        else:
            behavior = vectors.to(acc)
            row_scale = scale if scale is not None and scale_per_row else None
        if row_scale is not None:
            behavior = behavior * row_scale.to(acc)[:, None]
        if batch > 0 and total * behavior.shape[1] >= SEGMENT_MIN_WORK * batch:
            dot = behavior.new_empty(total)
            bounds = offsets.tolist()
            for b in range(batch):
                lo, hi = bounds[b], bounds[b + 1]
                if hi > lo:
                    torch.mv(behavior[lo:hi], query[b], out=dot[lo:hi])
        else:
            dot = (behavior * query.index_select(0, segment_ids(offsets, total))).sum(-1)
        if mode == "cosine":
            row_sq = torch.linalg.vecdot(behavior, behavior)
    if mode == "dot":
        return dot.to(torch.float32)
    assert row_sq is not None
    if scale is not None and not scale_per_row:  # the global scale s is in the dot (via the targets): |s·e|² too
        row_sq = row_sq * scale.reshape(()).to(acc) ** 2
    score = dot * (1.0 / torch.sqrt(row_sq).clamp_min(EPS))
    if zero_vector_score is not None:
        score = torch.where(row_sq == 0, torch.as_tensor(zero_vector_score, dtype=acc), score)
    return score.to(torch.float32)


def gsu_topk_reference(
    offsets: torch.Tensor,
    k: int,
    mode: str,
    target: torch.Tensor | None = None,
    behavior_ids: torch.Tensor | None = None,
    vectors: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_per_row: bool = False,
    zero_vector_score: float | None = None,
    target_category: torch.Tensor | None = None,
    behavior_category: torch.Tensor | None = None,
    *,
    cpu_scores: bool = False,
    select: Selector | None = None,
    dot_fn: DotFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K positions ``[B, K]`` int64 (index within the sample, -1 = empty) and scores ``[B, K]`` float32.

    ``cpu_scores``: score with `gsu_scores_cpu` (the dispatcher's CPU path, ``dot_fn`` its fused gather-and-dot)
    instead of the readable reference.
    ``select``: another implementation of the selection below, ``select(scores, offsets, k)`` on the scores with NaN
    made -inf, returning the same ``(positions, scores)`` or None to decline (`kernels.gsu_topk`'s ``cpu_select``)."""
    args = (offsets, mode, target, behavior_ids, vectors, scale, scale_per_row, zero_vector_score)
    if cpu_scores:
        scores = gsu_scores_cpu(*args, target_category, behavior_category, dot_fn=dot_fn)
    else:
        scores = gsu_scores_reference(*args, target_category, behavior_category)
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    if select is not None:
        chosen = select(scores, offsets, k)
        if chosen is not None:
            return chosen
    batch = offsets.numel() - 1
    total = scores.shape[0]
    width = max(int((offsets[1:] - offsets[:-1]).max()) if batch > 0 else 0, k, 1)
    if batch * width > JAGGED_WHEN * max(total, 1):  # one long history among short ones: do not pad to it
        return jagged_topk_newest_first(scores, offsets, k)
    sample = segment_ids(offsets, total)
    position = torch.arange(total, device=scores.device) - offsets[sample]
    padded = torch.full((batch, width), float("-inf"), dtype=torch.float32, device=scores.device)
    padded[sample, position] = scores
    return topk_newest_first(padded, k)


# the padded top-K costs B x (the longest sample); the jagged one a sort of the real behaviors: it wins when padding
# would more than quadruple the work (the same positions and scores either way; tests compare both to brute force)
JAGGED_WHEN = 4


def group_score_key(group: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """An int64 sort key per element: ``group [N]`` (non-negative int64) ascending, then ``scores [N]`` (float32, no
    NaN) descending; -0.0 ties with 0.0, as in torch.topk. The float's bits made into an int32 of the same order."""
    bits = (scores.float() + 0.0).view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() + 2**31  # in [0, 2^32), larger score = larger
    return group * 2**32 + (2**32 - 1 - ordered)


def jagged_topk_newest_first(scores: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_newest_first` on jagged ``scores [total_L]`` (``offsets [B + 1]``, -inf = not a candidate), without
    padding: one stable sort of all behaviors by (sample ascending, score descending), read from the newest, so that
    equal scores keep the newer behavior first; the first K of each sample's run are its top-K."""
    batch, total = offsets.numel() - 1, scores.shape[0]
    pos_out = torch.full((batch, k), -1, dtype=torch.int64, device=scores.device)
    score_out = torch.zeros(batch, k, dtype=torch.float32, device=scores.device)
    if batch == 0 or k == 0 or total == 0:
        return pos_out, score_out
    sample = segment_ids(offsets, total)
    position = torch.arange(total, device=scores.device) - offsets[sample]
    key = group_score_key(sample, scores)  # sample ascending, then score descending
    newest_first = torch.arange(total - 1, -1, -1, device=scores.device)
    order = newest_first[torch.sort(key[newest_first], stable=True).indices]
    rank = torch.arange(total, device=scores.device) - offsets[sample[order]]
    keep = (rank < k) & (scores[order] > float("-inf"))
    rows = order[keep]
    pos_out[sample[rows], rank[keep]] = position[rows]
    score_out[sample[rows], rank[keep]] = scores[rows].float()
    return pos_out, score_out


def topk_newest_first(padded: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of each row of ``padded [B, W]`` (-inf = not a candidate; W >= K): positions ``[B, K]`` (-1 = empty)
    and scores, by score descending, the larger position first among equal scores.

    Equal to a stable descending sort of the row read newest first, without sorting W elements (512 x 10K scores
    on 2 CPU cores: 0.06 s instead of 0.15 s): ``torch.topk`` finds the K-th score v; every score above v is kept,
    and of the scores equal to v the most recent ones, as many as the K slots still hold; only those K are sorted.
    """
    batch, width = padded.shape
    if batch == 0 or k == 0:
        return padded.new_full((batch, k), -1, dtype=torch.int64), padded.new_zeros(batch, k)
    kth = torch.topk(padded, k, dim=1).values[:, -1:]  # [B, 1], the K-th largest score
    # one integer top-K picks the K: every score above v (key W + position, they all fit), then the ties at v,
    # newest first (key = position); -1 marks the rest, which fills the slots of a row with fewer candidates
    pos = torch.arange(width, device=padded.device, dtype=torch.int32).expand(batch, width)
    tied = (padded == kth) & (kth > float("-inf"))
    key = torch.where(padded > kth, pos + width, torch.where(tied, pos, -1))
    top = torch.topk(key, k, dim=1).values.long()
    top_positions = torch.where(top >= width, top - width, top)
    empty = top_positions < 0
    top_scores = torch.where(empty, float("-inf"), padded.gather(1, top_positions.clamp_min(0)))
    # order the K by score; the stable sort keeps the newer of two equal scores first
    order = torch.sort(top_scores, dim=1, descending=True, stable=True).indices
    top_scores, top_positions = top_scores.gather(1, order), top_positions.gather(1, order)
    empty = top_scores == float("-inf")
    return torch.where(empty, -1, top_positions), torch.where(empty, 0.0, top_scores)
