"""The kernel benchmark behind `benchmarks/kernels.py` (its entry point, which documents what is measured).

- `common`: the configuration, a benchmark case, seeded jagged inputs and the parity comparisons;
- `gsu_topk`, `target_attention`, `din_attention`: each op's cases (inputs, bytes and FLOPs, kernel and reference);
- `measure`: CUDA-event timing, peak memory, the copy/matmul ceilings, one case measured, the goals;
- `report`: the Markdown table, ``--merge`` with an earlier results file, the GPU's file name;
- `run`: the command line, and the run that writes ``benchmarks/results/kernels-<gpu>.json``.

Only torch, Triton and `kernels` are imported (the GPU machines that run it have no TorchRec).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# `kernels` is imported from the repository root, which must come before benchmarks/ (where `python
# benchmarks/kernels.py` puts this entry point, itself named `kernels`), also when $PYTHONPATH already lists it.
if sys.path[:1] != [str(ROOT)]:
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if p != str(ROOT)]
