"""What a two-stage model's ESU and tower read (`StageInput`), and the GSU's kept behaviors as the rows they come
from (`LongRows`), laid out as fixed-K slots ``[B, K, ...]`` only when a model reads them so.

The slots of the long branch (embeddings, attention embeddings, item ids, time gaps) are each a pass through memory
over ``[B, K, D]`` forward and another backward. Where the GSU keeps every behavior of each prefix in order
(`TwoStageModel.fits_k`: TWIN and ETA at ``max_len <= k``), the kept behaviors are the looked-up prefix itself, and an
ESU that reads jagged rows (`ctr.native.attention_rows`) needs none of them: `LongRows.jagged` hands it the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from features.loader import Batch

from ..modules.gsu import Selection, gather_slots, to_slots
from .slots import ShortRows, fixed_slots

if TYPE_CHECKING:
    from .two_stage import LengthContext


@dataclass
class LongRows:
    """The GSU's kept behaviors of each sample, as rows, and their slots on first use.

    ``values [M, 2d]`` / ``values_att`` (DARE; else the same tensor): the rows the slots are made of, either the whole
    looked-up prefix (``compact=False``: slot ``(b, j)`` is prefix row ``rows[b, j]``) or the kept rows alone in slot
    order (``compact=True``: the selected rows looked up again); None where the ESU ran fused with the search.
    ``prefix_ids`` / ``prefix_gap`` ``[N]``: the prefix's item ids and seconds before the sample. ``rows`` / ``mask``
    ``[B, K]``: the selection's prefix rows and real slots. ``whole``: every prefix row kept, in order (then laying
    out and gathering by ``rows`` are the same, and the cheaper layout is used).
    """

    values: torch.Tensor | None
    values_att: torch.Tensor | None
    prefix_ids: torch.Tensor
    prefix_gap: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor
    compact: bool = False
    whole: bool = False
    _slots: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def _place(self, name: str, v: torch.Tensor, prefix: bool) -> torch.Tensor:
        if name not in self._slots:
            if prefix and not self.whole:
                self._slots[name] = gather_slots(v, self.rows, self.mask)
            else:
                self._slots[name] = to_slots(v, self.mask)
        return self._slots[name]

    def slots(self, att: bool = False) -> torch.Tensor | None:
        """``[B, K, 2d]``: the kept behaviors' embeddings (attention embeddings with ``att``), zeros in empty slots."""
        if self.values is None:
            return None
        if att and self.values_att is not self.values:
            assert self.values_att is not None
            return self._place("att", self.values_att, not self.compact)
        return self._place("values", self.values, not self.compact)

    def ids(self) -> torch.Tensor:
        """``[B, K]`` the kept behaviors' item ids (0 in empty slots)."""
        return self._place("ids", self.prefix_ids, True)

    def gap(self) -> torch.Tensor:
        """``[B, K]`` their seconds before the sample (0 in empty slots)."""
        return self._place("gap", self.prefix_gap, True)

    def jagged(self) -> torch.Tensor | None:
        """The kept behaviors' embeddings as the prefix's rows ``[N, 2d]``, where they are all of it, in order, and
        one tensor serves as attention and representation embeddings (no DARE); else None (read `slots`)."""
        if self.whole and self.values is not None and self.values_att is self.values and not self.compact:
            return self.values
        return None


@dataclass
class StageInput:
    """What the ESU and the tower see. Shapes: B samples, K GSU slots, S short slots, 2d = [item; cate]."""

    batch: Batch
    emb: dict[str, Any]  # feature -> JaggedTensor of embeddings (target, context, selected / whole long, short)
    target: torch.Tensor  # [B, 2d] representation of the target
    target_att: torch.Tensor  # [B, 2d] attention embedding of the target (== target without DARE)
    target_ids: torch.Tensor  # [B] item index
    selection: Selection
    long_rows: LongRows  # the kept behaviors (`long`, `long_att`, `long_ids`, `long_gap`: their slots)
    long_offsets: torch.Tensor  # [B + 1] of the whole searched prefix
    short_rows: ShortRows  # the last S behaviors as rows (`short`, `short_att`, `short_mask`: their slots)
    short_item: Any  # the short view's item ids (JaggedTensor; `short_ids`: their slots)
    short_len: int  # S
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # the search's inputs to `loss` (training)
    lc: LengthContext | None = None  # LAIN's length state (None without LAIN or when switched off)
    esu_out: torch.Tensor | None = None  # the ESU's output when it ran fused with the search (`search_attend`)
    _short_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def long(self) -> torch.Tensor | None:
        """``[B, K, 2d]`` selected behaviors (zeros in empty slots); None when `esu_out` is set."""
        return self.long_rows.slots()

    @property
    def long_att(self) -> torch.Tensor | None:
        """``[B, K, 2d]`` their attention embeddings (DARE; else `long`); None when `esu_out` is set."""
        return self.long_rows.slots(att=True)

    @property
    def long_ids(self) -> torch.Tensor:
        """``[B, K]`` item index (0 in empty slots)."""
        return self.long_rows.ids()

    @property
    def long_gap(self) -> torch.Tensor:
        """``[B, K]`` seconds from the behavior to the sample (0 in empty slots)."""
        return self.long_rows.gap()

    @property
    def long_mask(self) -> torch.Tensor:
        return self.selection.mask

    @property
    def short(self) -> torch.Tensor:
        """``[B, S, 2d]`` the last S behaviors, oldest first, right-padded with zeros (laid out on first use)."""
        return self.short_rows.slots()

    @property
    def short_att(self) -> torch.Tensor:
        """``[B, S, 2d]`` their attention embeddings (DARE; else `short`)."""
        return self.short_rows.slots(att=True)

    @property
    def short_ids(self) -> torch.Tensor:
        """``[B, S]`` item index of `short`'s slots (0 = padding), laid out on first use (MUSE's short route reads
        it; the other models do not, and laying it out cost ~0.3 ms of SDIM's 33 ms step)."""
        if self._short_ids is None:
            self._short_ids = fixed_slots(self.short_item, self.short_len)[0]
        return self._short_ids

    @property
    def short_mask(self) -> torch.Tensor:
        """``[B, S]`` True at the real behaviors of `short`."""
        return self.short_rows.mask


__all__ = ["LongRows", "StageInput"]
