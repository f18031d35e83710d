"""Test-time overrides of the Triton kernels' launch configuration (tiles, work items, grid, warps, stages).

On a GPU the tiles, warps and pipeline stages come from ``triton.autotune`` (`kernels.triton._tune`), the work items
from `kernels.triton.schedule`. Tests run the kernels in Triton's interpreter, where every program costs milliseconds,
and shrink everything with ``override(block_l=16, chunk_l=32, programs=3)`` so that the multi-tile, multi-item and
persistent-loop paths run on tiny inputs; a field left None keeps the shipped behavior (under the interpreter: the
first config of each kernel's autotuning list, i.e. the shipped tiles). Importing this module does not import Triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """None means "each op's own default"."""

    block_l: int | None = None  # behaviors per tile (a power of two); set: no autotuning
    chunk_l: int | None = None  # rows per work item (a multiple of block_l)
    programs: int | None = None  # persistent programs (grid size)
    num_warps: int | None = None
    num_stages: int | None = None
    use_dot: bool | None = None  # target_attention: tl.dot (tensor cores) instead of broadcast-multiply-reduce
    autotune: bool | None = None  # False: the shipped default config of each kernel, no benchmarking (CUDA tests)


_config = TritonConfig()


def get_config() -> TritonConfig:
    return _config


@contextlib.contextmanager
def override(**changes: object) -> Iterator[TritonConfig]:
    """Temporarily replace fields of the launch configuration (tests, tuning)."""
    global _config
    saved = _config
    _config = dataclasses.replace(_config, **changes)
    try:
        yield _config
    finally:
        _config = saved


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
