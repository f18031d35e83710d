"""Kernel benchmark: the fused Triton kernels of `kernels/` against their PyTorch references, eager and
`torch.compile`d, on one CUDA GPU, with the machine's ceilings measured in the same run.

For every op and every L in {1K, 10K, 100K} (L = the longest sample; a batch of B samples whose lengths are drawn
uniformly from [L/2, L], the first one exactly L):

- median time over ``--iters`` runs, timed with CUDA events around one call (L2 flushed before each run, so that
  1K-long batches are not served from the cache);
- achieved GB/s and TFLOP/s: the bytes the op must move and the FLOPs it must do (formulas beside each case below,
  the Triton kernel's own algorithm: e.g. DIN's first layer counts ``2·D·H1`` per behavior, not the reference's
  ``2·4D·H1``) over the measured time; their ratio to the ceilings measured in this run: a device-to-device copy
  (``dst.copy_(src)``, bytes = 2 x the buffer) and a bf16 matmul (FLOPs = 2·n³);
- the speed-up over the PyTorch reference in eager mode and over ``torch.compile(reference, dynamic=False)``
  (default mode; the first call of every implementation, which compiles, is not timed: its wall time is recorded
  as ``first_call_s``);
- peak memory of one call above what was allocated before it (``torch.cuda.max_memory_allocated``);
- a parity check of the kernel against the eager reference on the benchmark's own inputs.

Cases (default B = 256, D = 64, K = 256; embeddings bf16, biases/temperatures/MLP weights float32):

- ``gsu_topk`` cosine over a bf16 table [4M, D] gathered by int32 ids (MUSE), cosine over an int8 table with
  per-row float32 scales, dot product with jagged bf16 behavior vectors (SIM soft), category match (SIM hard,
  1000 categories); top-K = K; forward only.
- ``target_attention``: one target query, one head, Dk = Dv = D, a float32 per-behavior bias (time gap) and a
  per-sample temperature (LAIN); forward, and forward + backward (gradients for query, keys, values, bias,
  temperature).
- ``din_attention``: DIN's activation unit [4D -> 80 -> 40 -> 1], sigmoid, softmax with scale 1/sqrt(D) (the
  official code), pooling the keys; forward, and forward + backward (gradients for query, keys, weights, biases).

A measurement that fails (out of memory, a compile error) is written as null with the error; no figure is ever
written that this run did not measure. Without CUDA the script exits with status 2 and writes nothing.

    python benchmarks/kernels.py [--quick] [--ops gsu_topk target_attention din_attention] [--lengths 1000 ...]
    python benchmarks/kernels.py --ops gsu_topk && python benchmarks/kernels.py --ops target_attention --merge ...

Writes benchmarks/results/kernels-<gpu-name>.json (or --out) after every case ("complete": false until the end)
and prints a Markdown table. ``--merge`` keeps the file's results for the (op, L) pairs not re-measured, so a full
run can be split into shorter ones; every row records the ceilings of the run that measured it.

This file is the entry point; the benchmark lives in `benchmarks/kernel_bench/` (one module per op, plus the
shared inputs, the measurement, the report and the run).
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
    GOAL_BANDWIDTH_FRACTION,
    GOAL_LENGTH,
    LENGTHS,
    NUM_CATEGORIES,
    NUM_ITEMS,
    OPS,
    Case,
    Config,
    Inputs,
    jagged_lengths,
    offsets_of,
)
from kernel_bench.din_attention import din_attention_cases  # noqa: E402
from kernel_bench.gsu_topk import gsu_cases  # noqa: E402
from kernel_bench.measure import (  # noqa: E402
    Timer,
    evaluate_goals,
    measure_ceilings,
    peak_extra_bytes,
    run_case,
    run_impl,
)
from kernel_bench.report import gpu_slug, markdown_table, merge_previous  # noqa: E402
from kernel_bench.run import BUILDERS, build_cases, main, make_config, parse_args, run_benchmark  # noqa: E402
from kernel_bench.target_attention import target_attention_cases  # noqa: E402

__all__ = [
    "BUILDERS",
    "DIN_HIDDEN",
    "GOAL_BANDWIDTH_FRACTION",
    "GOAL_LENGTH",
    "LENGTHS",
    "NUM_CATEGORIES",
    "NUM_ITEMS",
    "OPS",
    "ROOT",
    "Case",
    "Config",
    "Inputs",
    "Timer",
    "build_cases",
    "din_attention_cases",
    "evaluate_goals",
    "gpu_slug",
    "gsu_cases",
    "jagged_lengths",
    "main",
    "make_config",
    "markdown_table",
    "measure_ceilings",
    "merge_previous",
    "offsets_of",
    "parse_args",
    "peak_extra_bytes",
    "run_benchmark",
    "run_case",
    "run_impl",
    "target_attention_cases",
]

if __name__ == "__main__":
    sys.exit(main())
