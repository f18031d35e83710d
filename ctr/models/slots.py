"""The two-stage models' fixed-width slots: a jagged view as right-padded ``[B, W, 2d]`` (`fixed_slots`, the
short branch's input), the same laid out from the tail of an embedded long prefix (`prefix_tail`), and the ids with
the short view's look-up left out (`without_short`; `TwoStageModel.short_in_prefix` says when that holds)."""

from __future__ import annotations

from typing import Any

import torch

from ..modules.gsu import gather_rows, to_slots


def fixed_slots(jt: Any, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A jagged JaggedTensor (oldest first, at most ``width`` per row) -> right-padded ``[B, width, ...]`` and mask."""
    lengths = jt.lengths().long()
    mask = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return to_slots(jt.values(), mask), mask


class PairJT:
    """The minimal JaggedTensor interface `fixed_slots` needs, over ``[e(item); e(cate)]``."""

    def __init__(self, item: Any, cate: Any) -> None:
        self._values = torch.cat([item.values(), cate.values()], dim=-1)
        self._lengths = item.lengths()

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        return self._lengths


def without_short(ids: dict[str, Any]) -> dict[str, Any]:
    """``ids`` with the short view's features emptied (no row looked up for them; `TwoStageModel.short_in_prefix`)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    out = dict(ids)
    for f in ("short_item", "short_cate"):
        jt = ids[f]
        out[f] = JaggedTensor(values=jt.values()[:0], lengths=torch.zeros_like(jt.lengths()))
    return out


def prefix_tail(
    emb: dict[str, Any], offsets: torch.Tensor, width: int, suffix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``width`` rows of each sample's embedded long prefix (``offsets [B + 1]``) as `fixed_slots` lays out
    the short view: ``[e(item); e(cate)]`` oldest first, right-padded ``[B, width, 2d]``, and the mask."""
    lengths = offsets[1:] - offsets[:-1]
    n = lengths.clamp(max=width)
    slots = torch.arange(width, device=offsets.device)
    mask = slots.unsqueeze(0) < n.unsqueeze(1)
    item, cate = emb[f"long_item{suffix}"].values(), emb[f"long_cate{suffix}"].values()
    if lengths.numel() and int(lengths.max()) > width:
        rows = ((offsets[1:] - n).unsqueeze(1) + slots)[mask]  # each sample's slots in order, row-major
        item, cate = gather_rows(item, rows), gather_rows(cate, rows)
    # else every prefix is its own tail: the rows are all of them, in order (no gather, and no scatter back in the
    # backward)
    return to_slots(torch.cat([item, cate], dim=-1), mask), mask


def pair_jt(emb: dict[str, Any], prefix: str, suffix: str) -> PairJT:
    return PairJT(emb[f"{prefix}item{suffix}"], emb[f"{prefix}cate{suffix}"])


__all__ = ["PairJT", "fixed_slots", "pair_jt", "prefix_tail", "without_short"]
