from .config import SPPConfig
from .functional import spp_delta_weight
from .layer import Linear, SPPLayer
from .model import SPPModel

__all__ = ["Linear", "SPPConfig", "SPPLayer", "SPPModel", "spp_delta_weight"]
