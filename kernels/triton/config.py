"""Launch configuration of the Triton kernels (tile sizes, split over L), with a test-time override.

The defaults are sized for an H100-class GPU. Tests run the kernels in Triton's interpreter, where every program
costs milliseconds, and shrink the tiles with ``override(block_l=16, max_splits=2)`` so that the multi-tile and
multi-split paths run on tiny inputs. Importing this module does not import Triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """None means "each op's own default"."""

    block_l: int | None = None  # behaviors per tile (a power of two)
    max_splits: int | None = None  # most programs per sample along L (split-L parallelism)
    num_warps: int | None = None
    use_dot: bool | None = None  # target_attention: tl.dot (tensor cores) instead of broadcast-multiply-reduce


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


def num_splits(max_len: int, block_l: int, programs_per_split: int, device: torch.device) -> int:
    """How many programs share one sample's L (flash-decoding split): enough programs to fill the GPU, each with at
    least four tiles of work so that the final reduction stays cheap."""
    tiles = max(1, -(-max_len // block_l))
    cfg = get_config()
    if cfg.max_splits is not None:
        return max(1, min(tiles, cfg.max_splits))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter: a few programs
    wanted = max(1, -(-4 * sms // max(1, programs_per_split)))
    return max(1, min(wanted, -(-tiles // 4)))
