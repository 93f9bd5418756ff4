"""ML-FOP-SOAP: SOAP + Fisher-Orthogonal Projection + multi-level folding for Megatron-core."""

from mlfop_megatron.config import FoldingConfig, MLFOPConfig, SOAPConfig

__version__ = "0.1.0"

__all__ = ["FoldingConfig", "MLFOPConfig", "SOAPConfig", "__version__"]
