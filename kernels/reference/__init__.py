"""PyTorch references: the readable definition of every op, used on CPU and as the oracle of the Triton tests."""

from .din_attention import din_attention_reference
from .gsu_topk import gsu_scores_reference, gsu_topk_reference
from .target_attention import target_attention_reference

__all__ = [
    "din_attention_reference",
    "gsu_scores_reference",
    "gsu_topk_reference",
    "target_attention_reference",
]
