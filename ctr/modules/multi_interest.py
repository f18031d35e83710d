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
  where routed to c. Both go through `kernels.gsu_topk` (dot mode), one call per channel, on the jagged scores
  ``A_ic`` (a 1-d vector per behavior against a target of 1), set to -inf where a behavior is routed elsewhere
  (-inf is never selected), so no dense ``[B, L, C]`` tensor or sort is built. Ties go to the most recent
  behavior, as in every GSU of this library.
"""

from __future__ import annotations

from typing import Literal

import torch

import kernels
from kernels.reference.gsu_topk import SEGMENT_MIN_WORK

from .gsu import Selection


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
    (ties to the lower channel). With ``offsets`` and long samples on the CPU, each sample's rows take one matmul
    with its channels instead of a gathered ``[N, C, D]`` copy of them (`kernels.reference.gsu_topk`'s rule)."""
    b, n = channels.shape[0], behaviors.shape[0]
    if offsets is not None and not behaviors.is_cuda and b > 0 and n * behaviors.shape[1] >= SEGMENT_MIN_WORK * b:
        a = behaviors.new_empty(n, channels.shape[1])
        bounds = offsets.tolist()
        for i in range(b):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                torch.mm(behaviors[lo:hi], channels[i].t(), out=a[lo:hi])
    else:
        a = torch.einsum("nd,ncd->nc", behaviors, channels.index_select(0, sample))
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
    ones = torch.ones(b, 1, device=channels.device)
    positions, scores = [], []
    for ch in range(c):
        # the score is A_ic itself (a 1-d "vector" against a target of 1), -inf where not routed (paper)
        score_c = a[:, ch : ch + 1]
        if mode == "paper":
            score_c = score_c.masked_fill((routed != ch).unsqueeze(1), float("-inf"))
        pos, score = kernels.gsu_topk(
            offsets, cap, mode="dot", target=ones, behavior_vectors=score_c.contiguous(), backend=backend
        )
        if mode == "paper":  # the top ceil(p · n_c) of the routed
            keep = torch.arange(cap, device=pos.device).unsqueeze(0) < torch.ceil(p * n_routed[:, ch : ch + 1])
        else:  # the top cap over all, where routed to this channel
            rows = Selection(pos, score).rows(offsets)
            keep = routed[rows] == ch if behaviors.shape[0] else torch.zeros_like(pos, dtype=torch.bool)
        keep = keep & (pos >= 0)
        positions.append(torch.where(keep, pos, -1))
        scores.append(torch.where(keep, score, 0.0))
    return Selection(torch.cat(positions, 1), torch.cat(scores, 1)), n_routed


__all__ = ["orthonormal_rows", "orthonormal_rows_qr", "route", "select_per_channel"]
