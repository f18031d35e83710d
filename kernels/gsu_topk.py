"""GSU top-K retrieval over a lifelong jagged prefix (SIM hard / SIM soft / MUSE multimodal cosine).

Forward only: the result is a selection (positions) plus its scores, computed without autograd.
"""

from __future__ import annotations

import torch

from ._backend import requested_backend, resolve_backend
from ._jagged import check_offsets, check_rows, jagged_max_len
from .reference.gsu_topk import DotFn, Selector, gsu_topk_reference

MODES = ("cosine", "dot", "category")
TRITON_MAX_K = 256  # kernels/triton/gsu_topk.py keeps K (rounded up to a power of two) keys per program
VECTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8)
_OP = "gsu_topk"


def gsu_topk(
    offsets: torch.Tensor,
    k: int,
    *,
    mode: str = "cosine",
    target: torch.Tensor | None = None,
    behavior_ids: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    behavior_vectors: torch.Tensor | None = None,
    scale: torch.Tensor | float | None = None,
    zero_vector_score: float | None = None,
    target_category: torch.Tensor | None = None,
    behavior_category: torch.Tensor | None = None,
    max_len: int | None = None,
    backend: str | None = None,
    cpu_select: Selector | None = None,
    cpu_dot: DotFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K behaviors of each sample's jagged prefix by their score against the sample's target.

    Args:
        offsets: int64 ``[B + 1]``; sample b owns jagged rows ``offsets[b]:offsets[b + 1]`` (oldest first).
        k: how many to keep (>= 0; any K on the reference, K <= 256 on Triton, larger K falls back).
        mode: ``"cosine"`` (MUSE), ``"dot"`` (SIM soft) or ``"category"`` (SIM hard).
        target: ``[B, D]`` float target vector (cosine, dot).
        behavior_ids: ``[total_L]`` int32/int64 row of ``table`` for every behavior (the gather is fused).
        table: ``[N, D]`` float32/float16/bfloat16/float64/int8 vectors addressed by ``behavior_ids``.
        behavior_vectors: ``[total_L, D]`` jagged vectors, instead of ``behavior_ids`` + ``table``.
        scale: dequantization of int8 (or any) vectors: a float / 1-element tensor (global) or one per row of the
            vector source (``[N]`` with a table, ``[total_L]`` with behavior_vectors). Cosine ignores a positive
            global scale; the dot product does not.
        zero_vector_score: cosine only: the score of a behavior whose vector is all zero (MUSE's code: -1.1);
            default: its cosine, 0.
        target_category: ``[B]`` int (category mode).
        behavior_category: ``[total_L]`` int (category mode); other categories are excluded.
        max_len: the longest sample, if the caller knows it (skips a host sync and the checks of the offsets and
            of the ids' range).
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (default: ``$KERNELS_BACKEND``, else auto).
        cpu_select: on the CPU path (not the reference asked for by name), a faster implementation of the selection
            from the scores, ``cpu_select(scores [total_L], offsets, k)`` giving the same result or None to decline
            (`ctr.native.jagged_topk`: this package stays free of the project's native build).
        cpu_dot: on the same path, a fused gather-and-dot for float32 vectors (`ctr.native.gather_dot`; see
            `gsu_scores_cpu`), None to decline.

    Returns:
        ``(positions, scores)``: ``[B, K]`` int64 index of the behavior within its sample (-1 for an empty slot,
        when the sample has fewer than K candidates) and ``[B, K]`` float32 score (0 in empty slots), best first;
        equal scores are ordered by recency (larger position first). In category mode this is the K most recent
        behaviors of the target's category, newest first. NaN and -inf scores are never selected.
    """
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {MODES}, got {mode!r}")
    if zero_vector_score is not None and mode != "cosine":
        raise ValueError(f"{_OP}: zero_vector_score applies to cosine mode only")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"{_OP}: k must be a non-negative int, got {k!r}")
    batch = check_offsets(_OP, offsets)
    device = offsets.device

    vectors: torch.Tensor | None = None
    scale_tensor: torch.Tensor | None = None
    scale_per_row = False
    if mode == "category":
        if target_category is None or behavior_category is None:
            raise ValueError(f"{_OP}: category mode needs target_category and behavior_category")
        if target_category.dtype.is_floating_point or behavior_category.dtype.is_floating_point:
            raise ValueError(f"{_OP}: categories must be integer tensors")
        check_rows(_OP, "target_category", target_category, batch, 1)
        total = behavior_category.shape[0]
        check_rows(_OP, "behavior_category", behavior_category, total, 1)
        target_category, behavior_category = target_category.contiguous(), behavior_category.contiguous()
    else:
        if target is None:
            raise ValueError(f"{_OP}: {mode} mode needs target [B, D]")
        if (table is None) == (behavior_vectors is None):
            raise ValueError(f"{_OP}: give exactly one of table (with behavior_ids) or behavior_vectors")
        if table is not None:
            if behavior_ids is None:
                raise ValueError(f"{_OP}: table needs behavior_ids")
            if behavior_ids.dtype not in (torch.int32, torch.int64) or behavior_ids.dim() != 1:
                raise ValueError(f"{_OP}: behavior_ids must be 1-D int32/int64, got {behavior_ids.dtype}")
            vectors, total = table, behavior_ids.shape[0]
            behavior_ids = behavior_ids.contiguous()
        else:
            if behavior_ids is not None:
                raise ValueError(f"{_OP}: behavior_ids goes with table, not with behavior_vectors")
            vectors = behavior_vectors
            total = vectors.shape[0]
        if vectors.dim() != 2 or vectors.dtype not in VECTOR_DTYPES:
            got = f"{vectors.dtype} {tuple(vectors.shape)}"
            raise ValueError(f"{_OP}: vectors must be 2-D of {VECTOR_DTYPES}, got {got}")
        if vectors.stride(1) != 1:
            vectors = vectors.contiguous()
        dim = vectors.shape[1]
        if not target.dtype.is_floating_point:
            raise ValueError(f"{_OP}: target must be floating point, got {target.dtype}")
        check_rows(_OP, "target", target, batch, 2)
        if target.shape[1] != dim:
            raise ValueError(f"{_OP}: target has D={target.shape[1]} but the vectors have D={dim}")
        target = target.contiguous()
        if scale is not None:
            scale_tensor = torch.as_tensor(scale, device=device)
            if not scale_tensor.dtype.is_floating_point:
                scale_tensor = scale_tensor.float()
            scale_per_row = scale_tensor.dim() == 1 and scale_tensor.shape[0] == vectors.shape[0]
            if scale_tensor.numel() != 1 and not scale_per_row:
                raise ValueError(
                    f"{_OP}: scale must be one value or one per vector row ({vectors.shape[0]}), "
                    f"got shape {tuple(scale_tensor.shape)}"
                )
            scale_tensor = scale_tensor.reshape(-1).contiguous()
    longest = jagged_max_len(_OP, offsets, total, max_len)
    if max_len is None and table is not None and behavior_ids is not None and behavior_ids.numel() > 0:
        # The kernel gathers rows unchecked: validate the ids together with the offsets (skipped with max_len).
        low, high = torch.stack([behavior_ids.min(), behavior_ids.max()]).tolist()
        if low < 0 or high >= table.shape[0]:
            raise ValueError(f"{_OP}: behavior_ids must be in [0, {table.shape[0]}), got [{low}, {high}]")
    if longest >= 2**31:
        raise ValueError(f"{_OP}: samples longer than 2**31 - 1 behaviors are not supported")

    unsupported = f"k={k} > {TRITON_MAX_K}" if k > TRITON_MAX_K else None
    tensors = (offsets, target, behavior_ids, vectors, scale_tensor, target_category, behavior_category)
    impl = resolve_backend(_OP, tensors, backend, unsupported)
    args = (
        target,
        behavior_ids,
        vectors,
        scale_tensor,
        scale_per_row,
        zero_vector_score,
        target_category,
        behavior_category,
    )
    with torch.no_grad():
        if impl == "triton":
            from .triton.gsu_topk import gsu_topk_triton

            return gsu_topk_triton(offsets, k, mode, longest, *args)
        # on the CPU, the scores organized for it (`gsu_scores_cpu`), unless the readable reference is asked for by
        # name (the Triton tests compare against it bit for bit)
        cpu_scores = offsets.device.type == "cpu" and requested_backend(backend) != "reference"
        select = cpu_select if cpu_scores else None
        dot_fn = cpu_dot if cpu_scores else None
        return gsu_topk_reference(offsets, k, mode, *args, cpu_scores=cpu_scores, select=select, dot_fn=dot_fn)
