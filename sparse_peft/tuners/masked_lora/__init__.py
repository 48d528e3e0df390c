from .config import MaskedLoraConfig
from .layer import Linear, MaskedLoraLayer
from .model import MaskedLoraModel

__all__ = ["Linear", "MaskedLoraConfig", "MaskedLoraLayer", "MaskedLoraModel"]
