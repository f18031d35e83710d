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
if str(ROOT) not in sys.path:  # `kernels` is imported from the repository root
    sys.path.insert(0, str(ROOT))
