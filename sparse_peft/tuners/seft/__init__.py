"""SEFT: sparse fine-tuning with drop-and-grow topology (see docs/seft.md)."""

from .config import SEFTConfig
from .functional import SparseDeltaLinear, effective_weight
from .layer import Linear, SEFTLayer
from .model import SEFTModel

__all__ = ["Linear", "SEFTConfig", "SEFTLayer", "SEFTModel", "SparseDeltaLinear", "effective_weight"]
