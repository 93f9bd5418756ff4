"""Rules several layers share, each defined once here (pure Python: no torch, no Megatron).

* which parameters SOAP preconditions (:func:`is_soap_matrix`): the optimizer factory applies
  it to live Megatron params, the planner and the benchmarks to model shapes;
* which block sides get an eigenbasis (:func:`rotates`): SOAP's ``max_precond_dim``;
* Megatron's padded vocabulary (:func:`padded_vocab_size`): model shapes, examples.
"""

from __future__ import annotations

# Matrices that stay with Adam: vocabulary-sized embeddings and the output projection.
ADAM_MATRIX_MARKERS = ("embedding", "output_layer")
# Learned absolute position embeddings: Adam's, or SOAP's as Megatron's SOAP and Muon take them.
POSITION_EMBEDDINGS = ("adam", "soap")
POSITION_EMBEDDING_MARKER = "position_embeddings"


def is_soap_matrix(name: str, ndim: int, position_embeddings: str = "adam") -> bool:
    """SOAP takes a parameter of >= 2 dims unless its name marks an embedding or output layer.

    ``position_embeddings="soap"`` gives learned position embeddings to SOAP too (Megatron's
    rule for its emerging optimizers: every 2-D param not tagged embedding or output layer).
    """
    if position_embeddings not in POSITION_EMBEDDINGS:
        raise ValueError(
            f"position_embeddings must be one of {POSITION_EMBEDDINGS}, got {position_embeddings!r}"
        )
    if ndim < 2:
        return False
    if position_embeddings == "soap" and POSITION_EMBEDDING_MARKER in name:
        return True
    return not any(marker in name for marker in ADAM_MATRIX_MARKERS)


def rotates(length: int, max_precond_dim: int) -> bool:
    """Whether a block side of ``length`` gets a Kronecker factor and eigenbasis (else identity)."""
    return length <= max_precond_dim


def check_positive(name: str, value: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def padded_vocab_size(vocab: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padded vocab: the next multiple of ``divisible_by * tp``."""
    check_positive("vocab", vocab)
    check_positive("tp", tp)
    check_positive("divisible_by", divisible_by)
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple
