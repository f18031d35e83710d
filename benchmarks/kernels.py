"""Kernel benchmark: the fused Triton kernels of `kernels/` against their PyTorch references, eager and
`torch.compile`d, and target_attention against FBGEMM's ``jagged_dense_flash_attention``, on one CUDA GPU, with the
machine's ceilings measured in the same run.

The grid (`kernel_bench/grid.py`): B in {1, 16, 64, 256}, lengths uniform in [L/2, L] or power-law (a Pareto law,
most samples short; `kernel_bench/common.py` defines both; the first sample is always exactly L), L (the longest) in
{1K, 10K, 100K}, Q in {1, 16} target queries (target_attention), D in {64, 128}; the default grid is a prioritized
part of the cross product (the goal shapes first), the axis flags ask for any cross product. For every case:

- median time over ``--iters`` runs, timed with CUDA events around one call (L2 flushed before each run, so that
  1K-long batches are not served from the cache);
- achieved GB/s and TFLOP/s: the bytes the op must move and the FLOPs it must do (formulas beside each case, the
  Triton kernel's own algorithm: e.g. DIN's first layer counts ``2·D·H1`` per behavior, not the reference's
  ``2·4D·H1``) over the measured time; their ratio to the ceilings measured in this run: a device-to-device copy
  (``dst.copy_(src)``, bytes = 2 x the buffer) and a bf16 matmul (FLOPs = 2·n³);
- the speed-up over the PyTorch reference in eager mode, over ``torch.compile(reference, dynamic=False)`` (default
  mode) and, for target_attention, over FBGEMM's kernel (`kernel_bench/fbgemm_peer.py`: how it is loaded and how
  our op maps onto its semantics);
- the first call of every implementation (Triton's, Inductor's compilation) timed on its own: ``first_call_s``;
- peak memory of one call above what was allocated before it (``torch.cuda.max_memory_allocated``);
- parity of the kernel and of FBGEMM's against the eager reference on the benchmark's own inputs;
- registers, spills, shared memory, warps and stages of every Triton specialization the case compiled
  (``kernels_compiled``; every one of the run in ``kernel_stats``; `kernels/triton/introspect.py`).

Cases (K = 256; embeddings bf16, biases/temperatures/MLP weights float32):

- ``gsu_topk`` cosine over a bf16 table [4M, D] gathered by int32 ids (MUSE), cosine over an int8 table with
  per-row float32 scales, dot product with jagged bf16 behavior vectors (SIM soft), category match (SIM hard,
  1000 categories); top-K = K; forward only.
- ``target_attention``: Q target queries, one head, Dk = Dv = D, a float32 per-behavior bias (time gap) shared by
  the queries and a per-sample temperature (LAIN); forward, and forward + backward (gradients for query, keys,
  values, bias, temperature).
- ``din_attention``: DIN's activation unit [4D -> 80 -> 40 -> 1], sigmoid, softmax with scale 1/sqrt(D) (the
  official code), pooling the keys; forward, and forward + backward (gradients for query, keys, weights, biases).

A measurement that fails (out of memory, a compile error, FBGEMM's kernel on this Triton) is written as null with
the error, and a shape whose inputs would exceed ``--memory-cap-gb`` as null with the reason; no figure is ever
written that this run did not measure. Without CUDA the script exits with status 2 and writes nothing.

    python benchmarks/kernels.py [--quick] [--ops ...] [--batch-sizes ...] [--dists ...] [--lengths ...]
        [--queries ...] [--dims ...] [--passes ...] [--max-seconds S] [--merge | --resume]
    python benchmarks/kernels.py --stage-fbgemm   # where fbgemm_gpu is installed: copies the peer's sources

Writes benchmarks/results/kernels-<gpu-name>.json (or --out) after every case ("complete": false until the end, or
when ``--max-seconds`` stopped the run) and prints Markdown tables. ``--merge`` keeps the file's results for the
cases not re-measured, ``--resume`` also skips the cases it already holds, so a run can be split into shorter ones;
every row records the ceilings of the run that measured it.

This file is the entry point; the benchmark lives in `benchmarks/kernel_bench/` (one module per op, plus the grid,
the shared inputs, the FBGEMM peer, the measurement, the goals, the report and the run).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `kernel_bench` sits beside this file; appended (not prepended) so that the `kernels` package of the repository root
# (put first on sys.path by `kernel_bench`) is never shadowed by this file.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from kernel_bench import ROOT  # noqa: E402
from kernel_bench.common import (  # noqa: E402
    DIN_HIDDEN,
    DISTS,
    NUM_CATEGORIES,
    NUM_ITEMS,
    OPS,
    POWERLAW_ALPHA,
    POWERLAW_SCALE,
    Case,
    Config,
    Inputs,
    Shape,
    jagged_lengths,
    offsets_of,
    result_key,
    shape_lengths,
)
from kernel_bench.din_attention import din_attention_cases  # noqa: E402
from kernel_bench.fbgemm_peer import Peer, load_peer, stage  # noqa: E402
from kernel_bench.goals import evaluate_goals, summarize_goals  # noqa: E402
from kernel_bench.grid import BATCH_SIZES, DIMS, LENGTHS, QUERIES, cross, default_grid, make_grid  # noqa: E402
from kernel_bench.gsu_topk import gsu_cases  # noqa: E402
from kernel_bench.measure import (  # noqa: E402
    Timer,
    measure_ceilings,
    null_result,
    peak_extra_bytes,
    run_case,
    run_impl,
)
from kernel_bench.report import gpu_slug, kept_rows, markdown_table, merge_previous  # noqa: E402
from kernel_bench.run import BUILDERS, build_cases, main, make_config, parse_args, run_benchmark  # noqa: E402
from kernel_bench.target_attention import target_attention_cases  # noqa: E402

__all__ = [
    "BATCH_SIZES",
    "BUILDERS",
    "DIMS",
    "DIN_HIDDEN",
    "DISTS",
    "LENGTHS",
    "NUM_CATEGORIES",
    "NUM_ITEMS",
    "OPS",
    "POWERLAW_ALPHA",
    "POWERLAW_SCALE",
    "QUERIES",
    "ROOT",
    "Case",
    "Config",
    "Inputs",
    "Peer",
    "Shape",
    "Timer",
    "build_cases",
    "cross",
    "default_grid",
    "din_attention_cases",
    "evaluate_goals",
    "gpu_slug",
    "gsu_cases",
    "jagged_lengths",
    "kept_rows",
    "load_peer",
    "main",
    "make_config",
    "make_grid",
    "markdown_table",
    "measure_ceilings",
    "merge_previous",
    "null_result",
    "offsets_of",
    "parse_args",
    "peak_extra_bytes",
    "result_key",
    "run_benchmark",
    "run_case",
    "run_impl",
    "shape_lengths",
    "stage",
    "summarize_goals",
    "target_attention_cases",
]

if __name__ == "__main__":
    sys.exit(main())
