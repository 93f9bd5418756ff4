"""The shared rules of mlfop_megatron.policies, and that the planner's shapes follow them."""

from __future__ import annotations

import pytest

from mlfop_megatron.config import ShardingConfig
from mlfop_megatron.distributed.assignment import BlockingConfig, ParamSpec, make_blocks
from mlfop_megatron.distributed.model_shapes import transformer_shapes
from mlfop_megatron.policies import is_soap_matrix, padded_vocab_size, rotates


@pytest.mark.parametrize(
    "name, ndim, expected",
    [
        ("decoder.layers.0.self_attention.linear_qkv.weight", 2, True),
        ("decoder.layers.3.mlp.experts.linear_fc1.weight0", 2, True),
        ("decoder.layers.0.mlp.linear_fc2.weight", 3, True),
        ("decoder.layers.0.mlp.linear_fc2.bias", 1, False),
        ("decoder.layers.0.input_layernorm.weight", 1, False),
        ("embedding.word_embeddings.weight", 2, False),
        ("embedding.position_embeddings.weight", 2, False),
        ("output_layer.weight", 2, False),
    ],
)
def test_which_params_soap_takes(name, ndim, expected):
    assert is_soap_matrix(name, ndim) is expected
    # Megatron's rule moves the learned position embeddings, and only them, to SOAP.
    positions = "position_embeddings" in name
    assert is_soap_matrix(name, ndim, "soap") is (expected or positions)


def test_position_embeddings_option_is_checked():
    with pytest.raises(ValueError, match="position_embeddings must be one of"):
        is_soap_matrix("embedding.position_embeddings.weight", 2, "muon")
    with pytest.raises(ValueError, match="position_embeddings"):
        ShardingConfig(position_embeddings="muon")


def test_planner_shapes_follow_the_soap_rule():
    specs = transformer_shapes(64, 256, 2, 4, 2, 1000, tp=2, bias=True, gated=True)
    assert {s.kind for s in specs} >= {"embedding", "output", "norm", "bias", "attention", "mlp"}
    for spec in specs:
        assert spec.preconditioned == is_soap_matrix(spec.name, len(spec.shape)), spec.name
        assert spec.soap_matrix == spec.preconditioned


def test_block_sides_rotate_up_to_max_precond_dim():
    assert rotates(8, 8) and not rotates(9, 8)
    (block,) = make_blocks([ParamSpec("w", (8, 9))], BlockingConfig(None, max_precond_dim=8))
    assert (block.rotate_rows, block.rotate_cols) == (True, False)


def test_padded_vocab_is_a_multiple_of_divisible_by_times_tp():
    assert padded_vocab_size(1000) == 1024
    assert padded_vocab_size(1000, tp=8) == 1024
    assert padded_vocab_size(1025, tp=2, divisible_by=64) == 1152
    with pytest.raises(ValueError, match="divisible_by must be an int >= 1"):
        padded_vocab_size(1000, divisible_by=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sharded=1), "'sharded' must be True or False"),
        (dict(block_size=0), "'block_size' must be an integer >= 1"),
        (dict(tp_mode="rows"), "'tp_mode' must be one of ('blockwise', 'full')"),
    ],
)
def test_sharding_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ShardingConfig(**kwargs)
