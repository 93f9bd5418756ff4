"""ML-FOP-SOAP: SOAP + Fisher-Orthogonal Projection + multi-level gradient folding for Megatron-core."""

__version__ = "0.1.0"
