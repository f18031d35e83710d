"""DiffuMIN's Orthogonal Multi-Interest Extractor (OMIE; Lai et al., RecSys '25; models-wave2.md A.3, A.9).

The target, projected to C vectors, is orthonormalized into C *interest channels* ``O [B, C, D]``; each behavior
``e_i`` of the searched prefix is routed to its best channel ``argmax_c e_i · o_c``; each channel keeps some of the
behaviors routed to it (its *selection*), and its interest is their relevance-weighted average::

    A_ic = e_i · o_c          route_i = argmax_c A_ic          r_c = Σ_{i ∈ S_c} A_ic e_i / |S_c|

* Orthonormalization: modified Gram–Schmidt over the C rows, which equals QR of ``Pᵀ`` with a positive diagonal of
  R, so the channels' signs are deterministic (the release's ``tf.qr`` leaves them to the kernel);
  `orthonormal_rows_qr` is the reference it is tested against.
* Selection, ``select: paper``: the top ``ceil(p · n_c)`` routed behaviors by ``A_ic`` (the README's top-p%; p is
  not published, 0.5 by default), at most ``cap`` per channel (ours: with 10K-long prefixes an uncapped p% would
  average thousands). ``select: code``: the release's top ``cap`` (100) by ``A_ic`` over every behavior, kept
  where routed to c. `select_by_channel` is the readable form of both: one `kernels.gsu_topk` (dot mode) per
  channel on the jagged scores ``A_ic`` (a 1-d "vector" per behavior against a target of 1), set to -inf where a
  behavior is routed elsewhere (-inf is never selected), so no dense ``[B, L, C]`` tensor or sort is built. On the
  CPU the paper's selection takes `select_routed_sorted` instead: the same positions and scores from one sort of
  the prefix rather than C. Ties go to the most recent behavior, as in every GSU of this library.
"""

from __future__ import annotations

from typing import Literal

import torch

from kernels.reference.gsu_topk import group_score_key

from .. import native
from .gsu import Selection, gsu_topk, per_sample_products


def orthonormal_rows(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[..., C, D]`` -> rows orthonormalized in order by modified Gram–Schmidt (C <= D)."""
    rows: list[torch.Tensor] = []
    for c in range(p.shape[-2]):
        v = p[..., c, :]
        for o in rows:
            v = v - (v * o).sum(-1, keepdim=True) * o
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=eps))
    return torch.stack(rows, dim=-2)


def orthonormal_rows_qr(p: torch.Tensor) -> torch.Tensor:
    """The reference: ``Q`` of ``QR(Pᵀ)`` with the signs fixed so that ``diag(R) > 0``, as rows."""
    q, r = torch.linalg.qr(p.transpose(-1, -2))
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign.unsqueeze(-2)).transpose(-1, -2)


def route(
    behaviors: torch.Tensor, channels: torch.Tensor, sample: torch.Tensor, offsets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [N, C], route [N])`` of jagged ``behaviors [N, D]`` of samples ``sample [N]`` against ``channels [B, C, D]``
    (ties to the lower channel). With ``offsets``, `per_sample_products` (one matmul per long sample on the CPU)."""
    if offsets is not None:
        a = per_sample_products(behaviors, channels, offsets, sample)
    else:
        a = torch.einsum("nd,ncd->nc", behaviors, native.gather_rows(channels, sample))
    return a, a.argmax(-1)


@torch.no_grad()
def select_per_channel(
    offsets: torch.Tensor,
    behaviors: torch.Tensor,
    channels: torch.Tensor,
    *,
    cap: int,
    p: float = 0.5,
    mode: Literal["paper", "code"] = "paper",
    backend: str | None = None,
) -> tuple[Selection, torch.Tensor]:
    """Each channel's selection over the jagged prefix (module docstring).

    ``offsets [B + 1]``, ``behaviors [N, D]``, ``channels [B, C, D]`` -> (a `Selection` ``[B, C·cap]``, channel c's
    slots at ``c·cap .. (c+1)·cap - 1``, best first, -1 where empty: left-aligned within each channel's block, not
    across them; ``n_routed [B, C]``)."""
    b, c, _ = channels.shape
    behaviors, channels = behaviors.detach().float(), channels.detach().float()
    lengths = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(b, device=offsets.device), lengths, output_size=behaviors.shape[0])
    a, routed = route(behaviors, channels, sample, offsets)
    n_routed = torch.bincount(sample * c + routed, minlength=b * c).view(b, c)
    if mode == "paper" and not behaviors.is_cuda:
        return select_routed_sorted(a, routed, sample, offsets, n_routed, cap, p), n_routed
    return select_by_channel(a, routed, offsets, n_routed, cap, p, mode, backend), n_routed


def select_by_channel(
    a: torch.Tensor,
    routed: torch.Tensor,
    offsets: torch.Tensor,
    n_routed: torch.Tensor,
    cap: int,
    p: float,
    mode: Literal["paper", "code"],
    backend: str | None = None,
) -> Selection:
    """The selection as the module docstring defines it: one `kernels.gsu_topk` per channel over the jagged scores
    ``A [N, C]`` (``routed [N]``: each behavior's channel; ``n_routed [B, C]``: how many each channel got). The
    readable form, and the one the ``code`` mode and CUDA take."""
    b, c = n_routed.shape
    ones = torch.ones(b, 1, device=a.device)
    positions, scores = [], []
    for ch in range(c):
        # the score is A_ic itself (a 1-d "vector" against a target of 1), -inf where not routed (paper)
        score_c = a[:, ch : ch + 1]
        if mode == "paper":
            score_c = score_c.masked_fill((routed != ch).unsqueeze(1), float("-inf"))
        pos, score = gsu_topk(
            offsets, cap, mode="dot", target=ones, behavior_vectors=score_c.contiguous(), backend=backend
        )
        if mode == "paper":  # the top ceil(p · n_c) of the routed
            keep = torch.arange(cap, device=pos.device).unsqueeze(0) < torch.ceil(p * n_routed[:, ch : ch + 1])
        else:  # the top cap over all, where routed to this channel
            rows = Selection(pos, score).rows(offsets)
            keep = routed[rows] == ch if a.shape[0] else torch.zeros_like(pos, dtype=torch.bool)
        keep = keep & (pos >= 0)
        positions.append(torch.where(keep, pos, -1))
        scores.append(torch.where(keep, score, 0.0))
    return Selection(torch.cat(positions, 1), torch.cat(scores, 1))


def select_routed_sorted(
    a: torch.Tensor,
    routed: torch.Tensor,
    sample: torch.Tensor,
    offsets: torch.Tensor,
    n_routed: torch.Tensor,
    cap: int,
    p: float,
) -> Selection:
    """``select: paper``'s selection by one stable sort of every behavior, the same positions and scores as
    `select_by_channel` (bit for bit; `tests/test_diffumin.py`).

    Routing is exclusive, so each behavior competes only in its own (sample, channel) group: sorting all of them once
    by (group ascending, ``A`` at the routed channel descending), read newest first so that ties keep the newer
    behavior first, puts every group's ranking in one run, and a group keeps its first ``min(cap, ceil(p · n_c))``.
    The per-channel form sorts (or top-Ks) the whole prefix once per channel with the other channels' behaviors at
    -inf: C passes instead of one (DiffuMIN's search on the demo world: 134 ms of a 906 ms step at one thread).
    NaN scores are never selected, as in `kernels.gsu_topk`."""
    b, c = n_routed.shape
    n = a.shape[0]
    positions = torch.full((b, c * cap), -1, dtype=torch.int64, device=a.device)
    scores = torch.zeros(b, c * cap, dtype=torch.float32, device=a.device)
    if n == 0 or cap == 0:
        return Selection(positions, scores)
    score = a.gather(1, routed.unsqueeze(1)).squeeze(1).float()
    # NaN is never a candidate; + 0.0 makes -0.0 into 0.0 (they tie), as gsu_topk's scores (1 · A, summed from 0)
    score = torch.where(torch.isnan(score), float("-inf"), score) + 0.0
    group = sample * c + routed
    key = group_score_key(group, score)  # group ascending, then score descending
    newest_first = torch.arange(n - 1, -1, -1, device=a.device)
    order = newest_first[torch.sort(key[newest_first], stable=True).indices]
    counts = n_routed.reshape(-1)
    starts = torch.cumsum(counts, 0) - counts  # each group's first index in the sorted order
    g = group[order]
    rank = torch.arange(n, device=a.device) - starts[g]
    quota = torch.ceil(p * counts.to(torch.float32)).clamp(max=cap).to(torch.int64)  # select_by_channel's rule
    take = (rank < quota[g]) & (score[order] > float("-inf"))
    kept = order[take]
    slot = routed[kept] * cap + rank[take]
    positions[sample[kept], slot] = kept - offsets[sample[kept]]
    scores[sample[kept], slot] = score[kept]
    return Selection(positions, scores)


def channel_pooling(e: torch.Tensor, o: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_k <e_k, o_c> e_k`` per (sample, channel): ``e [B, C, K, D]`` each channel's selected behaviors (zero
    vectors in empty slots, as `to_slots` leaves them), ``o [B, C, D]``, ``mask [B, C, K]`` -> ``[B, C, D]``.

    Natively in one pass each way (`ctr.native.dot_pool`, each channel's K slots a jagged row; an empty slot's zero
    vector adds nothing); eagerly elementwise with the mask, not einsum: its batched products with an inner size of
    1 (B·C matrix-vector products forward, outer products backward) and the strided gradients they leave were the
    slowest part of DiffuMIN's step on the CPU."""
    b, c, k, d = e.shape
    rows = torch.arange(0, b * c * k + 1, k, device=e.device)
    total = native.dot_pool(e.reshape(b * c * k, d), o.reshape(b * c, d), rows)
    if total is not None:
        return total.view(b, c, d)
    a = (e * o.unsqueeze(2)).sum(-1) * mask.to(e.dtype)
    return (a.unsqueeze(-1) * e).sum(2)


__all__ = [
    "channel_pooling",
    "orthonormal_rows", "orthonormal_rows_qr", "route", "select_by_channel", "select_per_channel",
    "select_routed_sorted",
]  # fmt: skip
