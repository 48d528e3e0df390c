from .config import SPPConfig
from .functional import SPPDelta, spp_delta_reference, spp_delta_weight
from .layer import Linear, SPPLayer
from .model import SPPModel

__all__ = ["Linear", "SPPConfig", "SPPDelta", "SPPLayer", "SPPModel", "spp_delta_reference", "spp_delta_weight"]
