"""Which parameters ML-FOP-SOAP preconditions: the one rule the optimizer and the planner share.

Pure Python (no torch): :func:`mlfop_megatron.megatron.factory.is_soap_param` applies it to
live Megatron parameters, :mod:`mlfop_megatron.distributed.model_shapes` to the shapes the
planner and the benchmarks size.
"""

from __future__ import annotations

# Matrices that stay with Adam: vocabulary-sized embeddings and the output projection.
ADAM_MATRIX_MARKERS = ("embedding", "output_layer")


def is_soap_matrix(name: str, ndim: int) -> bool:
    """SOAP takes a parameter of >= 2 dims unless its name marks an embedding or output layer."""
    return ndim >= 2 and not any(marker in name for marker in ADAM_MATRIX_MARKERS)
