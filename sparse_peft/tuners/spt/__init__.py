"""SPT: sparsity-aware prompt tuning (see docs/spt.md)."""

from .config import SPTConfig
from .layer import SPTAttention, SPTLayer
from .model import SPTModel, spt_prompt_lengths

__all__ = ["SPTAttention", "SPTConfig", "SPTLayer", "SPTModel", "spt_prompt_lengths"]
