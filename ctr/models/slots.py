"""The two-stage models' fixed-width slots: a jagged view as right-padded ``[B, W, ...]`` (`fixed_slots`), the short
branch's input as rows of a jagged block (`ShortRows`: the short view's own rows, `window_rows`, or the tail of an
embedded long prefix, `tail_rows`), laid out as slots only when a model reads them so, and the ids with the short
view's look-up left out (`without_short`; `TwoStageModel.short_in_prefix` says when that holds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..modules.gsu import gather_rows, to_slots
from .base import ATT_SUFFIX, pair_values


def fixed_slots(jt: Any, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A jagged JaggedTensor (oldest first, at most ``width`` per row) -> right-padded ``[B, width, ...]`` and mask."""
    lengths = jt.lengths().long()
    mask = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    return to_slots(jt.values(), mask), mask


def without_short(ids: dict[str, Any]) -> dict[str, Any]:
    """``ids`` with the short view's features emptied (no row looked up for them; `TwoStageModel.short_in_prefix`)."""
    from torchrec.sparse.jagged_tensor import JaggedTensor

    out = dict(ids)
    for f in ("short_item", "short_cate"):
        jt = ids[f]
        out[f] = JaggedTensor(values=jt.values()[:0], lengths=torch.zeros_like(jt.lengths()))
    return out


@dataclass
class ShortRows:
    """The short window (the last S behaviors of each sample, oldest first) as the rows of a jagged block.

    ``values [N, 2d]`` (``[e(item); e(cate)]``, each sample's window in order), ``values_att`` their attention
    embeddings (DARE; else the same tensor), ``rows [N]`` their samples (nondecreasing) and ``mask [B, S]`` the padded
    layout's (each sample's first n_b slots). `slots` lays the window out right-padded ``[B, S, 2d]`` (as
    `fixed_slots` does), once, for the models that read slots; DIN's unit reads the rows as they are
    (`DinAttention.forward_rows`): no zero-filled copy, and no read-back of it in the backward.
    """

    values: torch.Tensor
    values_att: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor
    _slots: dict[bool, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def flat(self) -> torch.Tensor:
        """``[N]`` the rows' positions in ``values``: all of them, in order."""
        return torch.arange(self.values.shape[0], device=self.values.device)

    def slots(self, att: bool = False) -> torch.Tensor:
        """``[B, S, 2d]``: ``values`` (``values_att`` with ``att``) right-padded with zeros."""
        if att and self.values_att is self.values:
            att = False
        if att not in self._slots:
            self._slots[att] = to_slots(self.values_att if att else self.values, self.mask)
        return self._slots[att]


def _window(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's window size ``min(length, width)``, the slots' mask ``[B, width]`` and the window's samples."""
    n = lengths.clamp(max=width)
    mask = torch.arange(width, device=lengths.device).unsqueeze(0) < n.unsqueeze(1)
    b = lengths.shape[0]
    rows = torch.repeat_interleave(torch.arange(b, device=lengths.device), n, output_size=int(n.sum()))
    return n, mask, rows


def tail_rows(
    emb: dict[str, Any],
    offsets: torch.Tensor,
    width: int,
    dare: bool,
    prefix_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ShortRows:
    """The last ``width`` rows of each sample's embedded long prefix (``offsets [B + 1]``), the short view's
    behaviors where it is the prefix's tail (`TwoStageModel.short_in_prefix`), as `ShortRows`. ``prefix_pairs``: the
    prefix's ``[e(item); e(cate)]`` rows (and their attention rows) already built, read where the window is all of
    them (no second copy of the same rows)."""
    lengths = offsets[1:] - offsets[:-1]
    n, mask, rows = _window(lengths, width)
    tail = None
    if lengths.numel() and int(lengths.max()) > width:
        slots = torch.arange(width, device=offsets.device)
        tail = ((offsets[1:] - n).unsqueeze(1) + slots)[mask]  # each sample's window in order, row-major
    elif prefix_pairs is not None:  # every prefix is its own tail: the rows are all of them, in order
        return ShortRows(prefix_pairs[0], prefix_pairs[1], rows, mask)
    # else every prefix is its own tail: the rows are all of them, in order (no gather, and no scatter back in the
    # backward)

    def pair(suffix: str) -> torch.Tensor:
        values = pair_values(emb, f"long_item{suffix}", f"long_cate{suffix}")
        return values if tail is None else gather_rows(values, tail)

    values = pair("")
    return ShortRows(values, pair(ATT_SUFFIX) if dare else values, rows, mask)


def window_rows(emb: dict[str, Any], width: int, dare: bool) -> ShortRows:
    """The short view's own rows (``short_item`` / ``short_cate``, at most ``width`` per sample: the loader's
    window) as `ShortRows`."""
    lengths = emb["short_item"].lengths().long()
    _, mask, rows = _window(lengths, width)
    values = pair_values(emb, "short_item", "short_cate")
    if rows.numel() != values.shape[0]:
        raise ValueError(
            f"the short view holds {values.shape[0]} behaviors but its {width}-wide window {rows.numel()}: a sample "
            f"has more than short_len behaviors in it (the loader reads at most short_len; a batch built elsewhere "
            f"must do the same)"
        )
    att = pair_values(emb, f"short_item{ATT_SUFFIX}", f"short_cate{ATT_SUFFIX}") if dare else values
    return ShortRows(values, att, rows, mask)


__all__ = ["ShortRows", "fixed_slots", "tail_rows", "window_rows", "without_short"]
