"""``gsu_topk`` cases: top-K of each user's behaviors by cosine over a bf16 table and over an int8 table with row
scales (MUSE, the gather fused), by dot product with jagged behavior vectors (SIM soft), by category (SIM hard).
Forward only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kernels import gsu_topk
from kernels.reference import gsu_topk_reference

from .common import (
    BF16,
    F32,
    I32,
    I64,
    NUM_CATEGORIES,
    NUM_ITEMS,
    Case,
    Config,
    Inputs,
    Shape,
    case_seed,
    no_grad,
    offsets_of,
    shape_lengths,
)

VARIANTS = (
    "cosine, bf16 table",
    "cosine, int8 table + row scales",
    "dot, bf16 behavior vectors",
    f"category ({NUM_CATEGORIES} categories)",
)


def variants(shape: Shape) -> list[str]:
    """The variant names of a shape's cases, in order (forward only: the four scoring modes)."""
    return list(VARIANTS)


def input_bytes(shape: Shape, n: int) -> int:
    """Device memory of a shape's inputs (the bf16 and int8 tables, ids, vectors and categories, and the float32
    staging of the random vectors), for the memory cap."""
    items = min(NUM_ITEMS, max(n, 1))
    return items * (shape.dim * (BF16 + 1 + F32) + F32) + n * (2 * I32 + shape.dim * (BF16 + F32))


def _gsu_compare(got: Any, want: Any) -> dict[str, float]:
    # Positions can differ where two scores tie to within the float32 rounding of different summation orders.
    same = (got[0] == want[0]).float().mean().item() if got[0].numel() else 1.0
    return {"positions_equal_fraction": same, "max_abs_score_diff": float((got[1] - want[1]).abs().max())}


def gsu_cases(cfg: Config, shape: Shape, device: torch.device) -> list[Case]:
    """The four scoring modes of a shape (forward only)."""
    rnd = Inputs(case_seed(cfg.seed, shape), device)
    batch, dim, k, length = shape.batch, shape.dim, cfg.k, shape.length
    lengths = shape_lengths(shape, cfg.seed)
    n = int(lengths.sum())
    offsets = offsets_of(lengths).to(device)
    target = rnd.randn(batch, dim, dtype=torch.bfloat16)
    num_items = min(NUM_ITEMS, max(n, 1))
    ids = rnd.randint(0, num_items, (n,), torch.int32)
    out_bytes = batch * k * (I64 + F32)  # positions int64 + scores float32
    common = (batch + 1) * I64 + out_bytes
    shapes = {"B": batch, "L_max": length, "N_total": n, "D": dim, "K": k, "lengths": shape.dist}
    cases = []

    def add(variant, kwargs, ref_args, nbytes, flops, bytes_formula, flops_formula, extra_shapes):
        def kernel() -> Any:
            return gsu_topk(offsets, k, **kwargs, max_len=length, backend="triton")

        def with_reference(fn: Callable[..., Any]) -> Callable[[], Any]:
            return no_grad(lambda: fn(offsets, k, *ref_args))

        cases.append(
            Case(
                op="gsu_topk",
                variant=variant,
                length=length,
                shapes={**shapes, **extra_shapes},
                bytes=nbytes,
                flops=flops,
                bytes_formula=bytes_formula,
                flops_formula=flops_formula,
                kernel=no_grad(kernel),
                reference=with_reference(gsu_topk_reference),
                with_reference=with_reference,
                reference_fn=gsu_topk_reference,
                compare=_gsu_compare,
                shape=shape,
            )
        )

    # MUSE: cosine against rows of a bf16 multimodal table gathered by item id (the gather is fused).
    table = rnd.randn(num_items, dim, dtype=torch.bfloat16)
    add(
        VARIANTS[0],
        {"mode": "cosine", "target": target, "behavior_ids": ids, "table": table},
        ("cosine", target, ids, table, None, False, None, None, None),
        # ids + gathered rows + target + offsets + output
        n * (I32 + dim * BF16) + batch * dim * BF16 + common,
        4 * n * dim,  # dot product and squared norm: a multiply and an add each, per element
        "N*(4 + 2*D) + 2*B*D + 8*(B+1) + 12*B*K",
        "4*N*D",
        {"table": [num_items, dim], "table_dtype": "bfloat16", "ids_dtype": "int32"},
    )
    # The same over an int8 table with one float32 dequantization scale per row.
    table8 = rnd.randint(-127, 128, (num_items, dim), torch.int8)
    scale8 = rnd.rand(num_items) * 0.02 + 0.001
    add(
        VARIANTS[1],
        {"mode": "cosine", "target": target, "behavior_ids": ids, "table": table8, "scale": scale8},
        ("cosine", target, ids, table8, scale8, True, None, None, None),
        # ids + gathered int8 rows + gathered scales + target + offsets + output
        n * (I32 + dim + F32) + batch * dim * BF16 + common,
        5 * n * dim,  # dequantize (1) + dot (2) + squared norm (2) per element
        "N*(4 + D + 4) + 2*B*D + 8*(B+1) + 12*B*K",
        "5*N*D",
        {"table": [num_items, dim], "table_dtype": "int8", "scale": [num_items], "ids_dtype": "int32"},
    )
    # SIM soft: inner product with learned behavior embeddings, stored jagged.
    vectors = rnd.randn(n, dim, dtype=torch.bfloat16)
    add(
        VARIANTS[2],
        {"mode": "dot", "target": target, "behavior_vectors": vectors},
        ("dot", target, None, vectors, None, False, None, None, None),
        n * dim * BF16 + batch * dim * BF16 + common,
        2 * n * dim,
        "2*N*D + 2*B*D + 8*(B+1) + 12*B*K",
        "2*N*D",
        {"behavior_vectors": [n, dim], "dtype": "bfloat16"},
    )
    # SIM hard: the most recent behaviors of the target's category.
    bcat = rnd.randint(0, NUM_CATEGORIES, (n,), torch.int32)
    tcat = rnd.randint(0, NUM_CATEGORIES, (batch,), torch.int32)
    add(
        VARIANTS[3],
        {"mode": "category", "target_category": tcat, "behavior_category": bcat},
        ("category", None, None, None, None, False, None, tcat, bcat),
        n * I32 + batch * I32 + common,
        0,  # comparisons only
        "4*N + 4*B + 8*(B+1) + 12*B*K",
        "0 (comparisons only)",
        {"categories_dtype": "int32"},
    )
    return cases
