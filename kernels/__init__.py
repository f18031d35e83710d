"""Fused kernels for lifelong user modeling, each a public dispatch function over a PyTorch reference and a Triton
kernel: Triton on CUDA tensors, the reference elsewhere; ``backend=`` or ``$KERNELS_BACKEND`` (``triton`` |
``reference`` | ``auto``) overrides. Inputs are jagged: values ``[total_L, ...]`` plus int64 offsets ``[B + 1]``.

- ``gsu_topk``: top-K behaviors of a lifelong prefix by cosine / dot product / category match (GSU).
- ``target_attention``: softmax attention of target queries over jagged keys/values, with bias and temperature.
- ``din_attention``: DIN's activation-unit MLP, weighting and pooling, without the ``[B, L, 4D]`` input.
- ``search_attend``: ``gsu_topk`` then ``target_attention`` over the selected behaviors, without the ``[B, K, D]``
  gather (the two-stage models' GSU -> ESU).

This package imports only torch (and Triton, lazily, on the first Triton call); see ``_backend`` for the rules.
"""

from ._backend import requested_backend, resolve_backend, triton_available
from .din_attention import din_attention
from .gsu_topk import gsu_topk
from .search_attend import SearchAttendResult, search_attend
from .target_attention import target_attention

__all__ = [
    "SearchAttendResult",
    "din_attention",
    "gsu_topk",
    "requested_backend",
    "resolve_backend",
    "search_attend",
    "target_attention",
    "triton_available",
]
