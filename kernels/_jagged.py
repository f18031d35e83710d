"""Jagged-tensor helpers: validation of offsets and the segment id of every row.

A jagged batch is ``values`` ``[total_L, ...]`` plus ``offsets`` (int64, ``[B + 1]``, non-decreasing, ``offsets[0] =
0``, ``offsets[B] = total_L``); sample ``b`` owns rows ``offsets[b]:offsets[b + 1]`` in time order (oldest first).
"""

from __future__ import annotations

import torch


def check_offsets(op: str, offsets: torch.Tensor) -> int:
    """Check the offsets' dtype and shape; return the batch size B."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1:
        got = f"{offsets.dtype} {tuple(offsets.shape)}" if isinstance(offsets, torch.Tensor) else type(offsets)
        raise ValueError(f"{op}: offsets must be a 1-D int64 tensor [B + 1], got {got}")
    if offsets.numel() < 1:
        raise ValueError(f"{op}: offsets must have B + 1 >= 1 entries")
    return offsets.numel() - 1


def check_rows(op: str, name: str, t: torch.Tensor, rows: int, dims: int) -> None:
    """Check that ``t`` has ``dims`` dimensions and ``rows`` rows (the jagged total or the batch size)."""
    if t.dim() != dims or t.shape[0] != rows:
        raise ValueError(f"{op}: {name} must have {dims} dims and {rows} rows, got shape {tuple(t.shape)}")


def jagged_max_len(op: str, offsets: torch.Tensor, total: int, max_len: int | None) -> int:
    """The longest sample's length; validates the offsets' contents (one host sync) when ``max_len`` is None.

    A caller that passes ``max_len`` skips the sync and vouches for the offsets; the kernels stay correct for any
    ``max_len`` (it only sizes the work plan, `kernels.triton.schedule`), the reference does not use it.
    """
    if max_len is not None:
        if max_len < 0:
            raise ValueError(f"{op}: max_len must be >= 0, got {max_len}")
        return int(max_len)
    if offsets.numel() == 1:
        first = last = int(offsets[0])
        longest, negative = 0, False
    else:
        lengths = offsets[1:] - offsets[:-1]
        first, last, longest, negative = torch.stack(
            [offsets[0], offsets[-1], lengths.max(), (lengths < 0).any().to(torch.int64)]
        ).tolist()
    if first != 0 or last != total or negative:
        raise ValueError(
            f"{op}: offsets must start at 0, be non-decreasing and end at the number of rows ({total}); "
            f"got first={first}, last={last}, decreasing={bool(negative)}"
        )
    return int(longest)


def segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """For every row of a jagged tensor, the index of its sample: ``[total_L]`` int64."""
    lengths = offsets[1:] - offsets[:-1]
    batch = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(batch, lengths, output_size=total)


def check_mask(op: str, mask: torch.Tensor, total: int) -> None:
    """A behavior mask is a bool ``[total_L]`` tensor (True = the behavior takes part)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1 or mask.shape[0] != total:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask)
        raise ValueError(f"{op}: mask must be a bool tensor [total_L] = [{total}], got {got}")


def compact(offsets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the masked-out rows of a jagged tensor: ``(kept row indices [M], new offsets [B + 1])``.

    The references define a masked behavior as one that is absent: they run on ``values[kept]`` jagged by the new
    offsets (one host sync, for the number of kept rows).
    """
    batch = offsets.numel() - 1
    sample = segment_ids(offsets, mask.shape[0])
    counts = torch.zeros(batch, dtype=torch.int64, device=offsets.device).index_add(0, sample, mask.to(torch.int64))
    new_offsets = torch.zeros_like(offsets)
    new_offsets[1:] = counts.cumsum(0)
    return mask.nonzero().squeeze(1), new_offsets
