"""The shapes a run measures: the axes of issue 15's grid, the default grid (ordered by priority, so that a run cut
short by ``--max-seconds`` has measured the goals first), and the grid the command-line flags ask for.

Axes: B in {1, 16, 64, 256}, lengths ``uniform`` or ``powerlaw`` (`common`), L (the longest) in {1K, 10K, 100K},
Q in {1, 16} (target_attention only), D in {64, 128}, and the passes (forward; forward + backward for
target_attention and din_attention).

The full cross product is 96 target_attention shapes (192 cases with the backward), 48 gsu_topk shapes (4 scoring
modes each) and 48 din_attention shapes: far more than one GPU command can measure, most of it spent in
``torch.compile`` (it compiles the reference again for every shape). `default_grid` keeps:

1. the goals: target_attention forward at L = 100K, D = 64, B in {16, 64, 256}, both distributions, Q in {1, 16};
   gsu_topk at L = 100K, D = 64, B in {16, 256}, both distributions;
2. the rest of target_attention forward at D = 64 (every B, distribution, L and Q), then D = 128 at L = 100K;
3. target_attention forward + backward at L = 100K, D = 64, B in {16, 256}, both distributions, Q in {1, 16};
   din_attention forward and forward + backward at B = 256, D = 64, L in {1K, 10K, 100K} uniform and 100K
   power-law; gsu_topk at L in {1K, 10K}, B = 256, uniform.

Any axis flag (``--batch-sizes``, ``--dists``, ``--lengths``, ``--queries``, ``--dims``, ``--passes``) replaces the
default grid by the full cross product of the axes: the flags given, every value of the others.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Sequence

from .common import DISTS, OPS, Shape

BATCH_SIZES = (1, 16, 64, 256)
LENGTHS = (1_000, 10_000, 100_000)
QUERIES = (1, 16)
DIMS = (64, 128)
PASSES = ("forward", "backward")
GOAL_LENGTH = 100_000
GOAL_DIM = 64
GOAL_BATCH_SIZES = (16, 64, 256)
AXIS_FLAGS = ("batch_sizes", "dists", "lengths", "queries", "dims", "passes")
# --quick: a smoke run of every op, both distributions, at one small shape
QUICK_AXES = {
    "batch_sizes": (8,),
    "dists": DISTS,
    "lengths": (1_000,),
    "queries": (1,),
    "dims": (64,),
    "passes": PASSES,
}


def cross(
    ops: Iterable[str],
    batch_sizes: Iterable[int],
    dists: Iterable[str],
    lengths: Iterable[int],
    queries: Iterable[int],
    dims: Iterable[int],
    passes: Sequence[str],
) -> list[Shape]:
    """Every combination of the axes, op by op (Q and the backward only where the op has them), in the order
    op, D, L, B, distribution, Q; without duplicates."""
    shapes: list[Shape] = []
    for op in ops:
        op_queries = tuple(queries) if op == "target_attention" else (1,)
        op_passes = tuple(p for p in PASSES if p in passes and (op != "gsu_topk" or p == "forward"))
        if not op_passes:
            continue
        for dim, length, batch, dist, q in itertools.product(dims, lengths, batch_sizes, dists, op_queries):
            shape = Shape(op, batch, dist, length, dim, q, op_passes)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def default_grid(ops: Sequence[str] = OPS) -> list[Shape]:
    """The default grid, by priority (the module docstring lists it)."""
    fwd, both = ("forward",), ("forward", "backward")
    ta = "target_attention" in ops
    gsu = "gsu_topk" in ops
    din = "din_attention" in ops

    def c(op: str, on: bool, batch, dists, lengths, queries, dims, passes) -> list[Shape]:  # noqa: ANN001
        return cross([op], batch, dists, lengths, queries, dims, passes) if on else []

    goal = (GOAL_LENGTH,)
    groups = [
        c("target_attention", ta, GOAL_BATCH_SIZES, DISTS, goal, QUERIES, (GOAL_DIM,), fwd),
        c("gsu_topk", gsu, (16, 256), DISTS, goal, (1,), (GOAL_DIM,), fwd),
        c("target_attention", ta, BATCH_SIZES, DISTS, LENGTHS[::-1], QUERIES, (GOAL_DIM,), fwd),
        c("target_attention", ta, BATCH_SIZES, DISTS, goal, QUERIES, (128,), fwd),
        c("target_attention", ta, (16, 256), DISTS, goal, QUERIES, (GOAL_DIM,), ("backward",)),
        c("din_attention", din, (256,), ("uniform",), LENGTHS, (1,), (GOAL_DIM,), both),
        c("din_attention", din, (256,), ("powerlaw",), goal, (1,), (GOAL_DIM,), both),
        c("gsu_topk", gsu, (256,), ("uniform",), LENGTHS[:2], (1,), (GOAL_DIM,), fwd),
    ]
    return _in_order(groups)


def _in_order(groups: list[list[Shape]]) -> list[Shape]:
    """The groups' shapes in order, each (shape, pass) once: a shape measured forward in an early group and
    forward + backward in a later one appears twice, with the backward alone the second time."""
    shapes: list[Shape] = []
    seen: dict[tuple, set[str]] = {}
    for shape in itertools.chain.from_iterable(groups):
        done = seen.setdefault(shape.key(), set())
        passes = tuple(p for p in shape.passes if p not in done)
        if passes:
            done.update(passes)
            shapes.append(Shape(*shape.key(), passes=passes))  # type: ignore[misc]
    return shapes


def make_grid(args: argparse.Namespace) -> list[Shape]:
    """The grid of a command line: `default_grid` (or ``--quick``'s), or the cross product of the axis flags."""
    given = {name: getattr(args, name) for name in AXIS_FLAGS if getattr(args, name, None)}
    if not given and not args.quick:
        return default_grid(tuple(args.ops))
    base = QUICK_AXES if args.quick else {
        "batch_sizes": BATCH_SIZES, "dists": DISTS, "lengths": LENGTHS, "queries": QUERIES, "dims": DIMS,
        "passes": PASSES,
    }  # fmt: skip
    axes = {**base, **given}
    return cross(tuple(args.ops), **axes)
