"""Tests of the pure owner assignment, its cost model, model shapes and the sharding sim."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlfop_megatron.distributed.assignment import (
    Assignment,
    Block,
    BlockingConfig,
    CostModel,
    ParamSpec,
    choose_block_size,
    lpt_partition,
    make_blocks,
    merged_2d_shape,
    pingpong_assignment,
    pingpong_owners,
)
from mlfop_megatron.distributed.model_shapes import (
    llama3_8b_shapes,
    llama3_70b_shapes,
    model_shapes,
    transformer_shapes,
)
from mlfop_megatron.policies import padded_vocab_size


def _soap_params(specs: list[ParamSpec]) -> list[ParamSpec]:
    return [s for s in specs if s.preconditioned]


def _block(m: int, n: int, rot_rows: bool = True, rot_cols: bool = True) -> Block:
    return Block(0, "w", 0, 0, m, n, rot_rows, rot_cols)


# ---- blocking ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 70),
    block_size=st.one_of(st.none(), st.integers(1, 40)),
    max_precond_dim=st.integers(1, 80),
    preconditioned=st.booleans(),
)
def test_blocks_tile_matrix_exactly(m, n, block_size, max_precond_dim, preconditioned):
    spec = ParamSpec("w", (m, n), preconditioned=preconditioned)
    blocks = make_blocks([spec], BlockingConfig(block_size, max_precond_dim))
    cover = np.zeros((m, n), dtype=np.int64)
    for b in blocks:
        assert b.param_index == 0 and b.param_name == "w"
        if block_size is not None:
            assert b.rows <= block_size and b.cols <= block_size
        assert b.rotate_rows == (preconditioned and b.rows <= max_precond_dim)
        assert b.rotate_cols == (preconditioned and b.cols <= max_precond_dim)
        cover[b.row_offset : b.row_offset + b.rows, b.col_offset : b.col_offset + b.cols] += 1
    assert (cover == 1).all()
    assert len({b.key for b in blocks}) == len(blocks)
    if block_size is None:
        assert len(blocks) == 1
    else:  # full-size blocks, the last one in each direction takes the remainder
        assert len(blocks) == -(-m // block_size) * -(-n // block_size)


def test_block_remainder_and_merged_shapes():
    blocks = make_blocks([ParamSpec("w", (10, 7))], BlockingConfig(block_size=4))
    assert sorted({b.rows for b in blocks}) == [2, 4]
    assert sorted({b.cols for b in blocks}) == [3, 4]
    assert merged_2d_shape((5,)) == (1, 5)
    assert merged_2d_shape((4, 3, 2)) == (4, 6)
    (b,) = make_blocks([ParamSpec("conv", (4, 3, 2))])
    assert (b.rows, b.cols, b.rotate_rows, b.rotate_cols) == (4, 6, True, True)


def test_identity_sides_beyond_max_precond_dim():
    specs = [
        ParamSpec("tall", (20000, 512)),
        ParamSpec("wide", (512, 12000)),
        ParamSpec("huge", (12000, 11000)),
        ParamSpec("norm", (4096,), preconditioned=False),
        ParamSpec("emb", (1000, 64), preconditioned=False),
        ParamSpec("vec", (64,), preconditioned=True),  # 1-D: AdamW even if flagged
    ]
    blocks = make_blocks(specs, BlockingConfig(None, max_precond_dim=10000))
    flags = [(b.param_name, b.rotate_rows, b.rotate_cols) for b in blocks]
    assert flags == [
        ("tall", False, True),
        ("wide", True, False),
        ("huge", False, False),
        ("norm", False, False),
        ("emb", False, False),
        ("vec", False, False),
    ]
    cm = CostModel()
    tall = blocks[0]
    assert cm.memory_floats(tall) == 2 * 512 * 512 + 2 * 20000 * 512
    assert cm.memory_floats(blocks[2]) == 2 * 12000 * 11000  # moments only, like AdamW
    assert cm.compute_flops(blocks[2]) == pytest.approx(14.0 * 12000 * 11000)
    # Blocking a tall side below max_precond_dim turns it into rotated blocks.
    blocked = make_blocks([specs[0]], BlockingConfig(4096, max_precond_dim=10000))
    assert all(b.rotate_rows and b.rotate_cols for b in blocked)


# ---- cost model ----------------------------------------------------------------------------


def test_cost_model_hand_computed_2x3():
    cm = CostModel()  # f=10, refresh_coeff=14/3, elementwise 14, fp32
    b = _block(2, 3)
    per_step = 6 * 2 * 3 * (2 + 3)  # 180: rot + unrot + factor update on both sides
    elementwise = 14 * 6  # 84
    refresh_left = (14 / 3 * 2**3 + 4 * 2 * 2 * 3) / 10  # 8.5333...
    refresh_right = (14 / 3 * 3**3 + 4 * 3 * 3 * 2) / 10  # 19.8
    assert cm.compute_flops(b) == pytest.approx(
        per_step + elementwise + refresh_left + refresh_right
    )
    assert cm.compute_flops(b) == pytest.approx(292.0 + 1.0 / 3.0)
    assert cm.memory_floats(b) == 2 * (4 + 9) + 2 * 6 == 38
    assert cm.memory_bytes(b) == 152


def test_cost_model_hand_computed_4x4():
    cm = CostModel()
    assert cm.compute_flops(_block(4, 4)) == pytest.approx(768 + 224 + 2 * (298 + 2 / 3 + 256) / 10)
    assert cm.compute_flops(_block(4, 4)) == pytest.approx(1102.9333333333333)
    assert cm.memory_floats(_block(4, 4)) == 2 * 32 + 32 == 96
    # Left side only: 6 m^2 n + refresh (14/3 m^3 + 4 m^2 n)/f + elementwise.
    assert cm.compute_flops(_block(4, 4, rot_cols=False)) == pytest.approx(
        384 + (14 / 3 * 64 + 256) / 10 + 224
    )
    assert cm.memory_floats(_block(4, 4, rot_cols=False)) == 64
    # Both sides identity is AdamW: elementwise work, two moments.
    assert cm.compute_flops(_block(4, 4, False, False)) == 224
    assert cm.memory_floats(_block(4, 4, False, False)) == 32
    slow = CostModel(precondition_frequency=1, refresh_coeff=0.0, elementwise_flops=0.0)
    assert slow.compute_flops(_block(4, 4)) == 768 + 2 * 256


# ---- LPT -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=60),
    world_size=st.integers(1, 16),
)
def test_lpt_bound_mean_plus_max_item(weights, world_size):
    owners = lpt_partition(weights, world_size)
    loads = [0.0] * world_size
    for w, o in zip(weights, owners):
        loads[o] += w
    assert max(loads) <= sum(weights) / world_size + max(weights) + 1e-6 * (1 + max(weights))
    assert lpt_partition(weights, world_size) == owners


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(1, 100), min_size=1, max_size=8),
    world_size=st.integers(2, 3),
)
def test_lpt_within_four_thirds_of_optimum(weights, world_size):
    owners = lpt_partition(weights, world_size)
    lpt_max = max(sum(w for w, o in zip(weights, owners) if o == r) for r in range(world_size))
    opt = min(
        max(sum(w for w, o in zip(weights, assign) if o == r) for r in range(world_size))
        for assign in itertools.product(range(world_size), repeat=len(weights))
    )
    assert lpt_max <= (4 / 3 - 1 / (3 * world_size)) * opt + 1e-9


# ---- Assignment ----------------------------------------------------------------------------


def _llama8b_blocks(block_size, tp=1):
    return make_blocks(_soap_params(llama3_8b_shapes(tp)), BlockingConfig(block_size))


def test_every_block_has_exactly_one_owner():
    blocks = _llama8b_blocks(2048, tp=8)
    asg = Assignment.build(blocks, 7)
    seen = [b for r in range(7) for b in asg.blocks_of(r)]
    assert len(seen) == len(blocks) and {b.key for b in seen} == {b.key for b in blocks}
    for r in range(7):
        assert all(asg.owner_of(b) == r for b in asg.blocks_of(r))
    assert asg.owner_of(blocks[0].key) == asg.owner_of(blocks[0])
    assert sum(asg.numel_loads) == sum(b.numel for b in blocks)
    with pytest.raises(KeyError):
        asg.owner_of((999, 0, 0))


def test_assignment_is_deterministic_and_order_independent():
    blocks = list(_llama8b_blocks(1024, tp=8))
    a = Assignment.build(blocks, 33)
    b = Assignment.build(blocks, 33)
    shuffled = blocks[:]
    random.Random(0).shuffle(shuffled)
    c = Assignment.build(shuffled, 33)
    owners = {blk.key: a.owner_of(blk) for blk in blocks}
    assert a.owners == b.owners
    assert all(c.owner_of(blk) == owners[blk.key] for blk in blocks)


def test_lpt_assignment_bound_on_real_blocks():
    blocks = _llama8b_blocks(None, tp=8)
    cm = CostModel()
    for world in (3, 16, 64):
        asg = Assignment.build(blocks, world, cm)
        mean = sum(asg.compute_loads) / world
        biggest = max(cm.compute_flops(b) for b in blocks)
        assert max(asg.compute_loads) <= mean + biggest * (1 + 1e-12)


def test_balance_llama3_8b_dp1024_with_blocking():
    params = _soap_params(llama3_8b_shapes(1))
    ours = Assignment.build(make_blocks(params, BlockingConfig(512)), 1024)
    assert ours.compute_balance <= 1.05
    assert ours.memory_balance <= 1.05
    baseline = pingpong_assignment(params, 1024)
    assert baseline.compute_balance > 5.0  # whole params: at most 128 busy ranks
    chosen, asg = choose_block_size(params, 1024, candidates=(2048, 1024, 512))
    assert chosen == 512 and asg.compute_balance <= 1.05


def test_world_size_larger_than_number_of_blocks():
    specs = [ParamSpec("a", (8, 8)), ParamSpec("b", (4, 4)), ParamSpec("c", (2, 6))]
    asg = Assignment.build(make_blocks(specs), 10)
    busy = [r for r in range(10) if asg.blocks_of(r)]
    assert busy == [0, 1, 2] and all(len(asg.blocks_of(r)) == 1 for r in busy)
    assert asg.stats().idle_ranks == 7
    assert all(asg.blocks_of(r) == () and asg.compute_loads[r] == 0.0 for r in range(3, 10))
    assert asg.compute_balance == pytest.approx(
        max(asg.compute_loads) * 10 / sum(asg.compute_loads)
    )
    # Biggest block first, to rank 0 (ties go to the lowest rank).
    assert asg.owner_of((0, 0, 0)) == 0


def test_single_rank_owns_everything_and_communicates_nothing():
    blocks = _llama8b_blocks(2048, tp=8)
    asg = Assignment.build(blocks, 1)
    assert asg.blocks_of(0) == tuple(sorted(blocks, key=lambda b: b.key))
    assert asg.compute_balance == 1.0 and asg.comm_bytes_per_step() == 0


def test_comm_bytes_hand_computed():
    specs = [ParamSpec("a", (4, 4)), ParamSpec("b", (2, 2)), ParamSpec("c", (2, 3))]
    blocks = make_blocks(specs)
    asg = Assignment(blocks, 3, owners=(0, 1, 1))  # numel per rank: 16, 10, 0
    assert asg.numel_loads == (16, 10, 0)
    assert asg.comm_bytes_per_step(dtype_bytes=2) == (26 - 0) * 2  # idle rank receives all
    assert asg.comm_bytes_per_step(dtype_bytes=4, padded=True) == 2 * 16 * 4
    st_ = asg.stats(dtype_bytes=2)
    assert st_.allgather_bytes == 52 and st_.padded_allgather_bytes == 64
    assert st_.idle_ranks == 1


def test_memory_aware_variant_trades_compute_for_memory():
    blocks = make_blocks(_soap_params(llama3_70b_shapes(8)))
    compute_only = Assignment.build(blocks, 64)
    memory_only = Assignment.build(blocks, 64, memory_weight=1.0)
    assert memory_only.memory_balance < compute_only.memory_balance
    assert compute_only.compute_balance <= memory_only.compute_balance
    assert memory_only.strategy.startswith("lpt(mem_w=")


# ---- Megatron ping-pong baseline -----------------------------------------------------------


def test_pingpong_matches_megatron_docstring_example():
    # megatron/core/optimizer/layer_wise_optimizer.py: 4 ranks, p0..p9 sorted by numel give
    # [[p0, p7, p8], [p1, p6, p9], [p2, p5], [p3, p4]].
    owners = pingpong_owners(list(range(1, 11)), 4)
    groups = [[i for i, o in enumerate(owners) if o == r] for r in range(4)]
    assert groups == [[0, 7, 8], [1, 6, 9], [2, 5], [3, 4]]
    # Megatron sorts ascending and stably: equal sizes keep their order.
    assert pingpong_owners([5, 1, 5, 1], 2) == (1, 0, 0, 1)
    assert pingpong_owners([5, 1, 5, 1], 2, descending=True) == (0, 1, 1, 0)


def test_pingpong_uses_whole_params_and_same_cost_model():
    params = _soap_params(llama3_8b_shapes(1))
    asg = pingpong_assignment(params, 256)
    assert len(asg.blocks) == len(params) == 128
    cm = CostModel()
    assert max(asg.compute_loads) == pytest.approx(max(cm.compute_flops(b) for b in asg.blocks))
    assert asg.compute_balance > 2.0


# ---- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Assignment.build(_llama8b_blocks(None, 8), 0), r"world_size must be an int >= 1"),
        (lambda: lpt_partition([1.0], -1), r"world_size must be an int >= 1"),
        (lambda: pingpong_owners([1], 0), r"world_size must be an int >= 1"),
        (lambda: lpt_partition([1.0, -2.0], 2), r"weights must be finite and >= 0"),
        (lambda: BlockingConfig(block_size=0), r"block_size must be None or an int >= 1"),
        (lambda: BlockingConfig(max_precond_dim=0), r"max_precond_dim must be an int >= 1"),
        (lambda: ParamSpec("w", ()), r"shape of param 'w' must be non-empty with every dim >= 1"),
        (lambda: ParamSpec("w", (3, 0)), r"shape of param 'w' must be non-empty"),
        (lambda: merged_2d_shape(()), r"shape must be non-empty"),
        (lambda: make_blocks([]), r"params must be a non-empty sequence"),
        (lambda: Assignment.build([], 4), r"blocks must be a non-empty sequence"),
        (lambda: CostModel(precondition_frequency=0), r"precondition_frequency must be an int"),
        (lambda: CostModel(state_bytes=0), r"state_bytes must be an int >= 1"),
        (
            lambda: Assignment.build(_llama8b_blocks(None, 8), 2, memory_weight=1.5),
            r"memory_weight must be in \[0, 1\]",
        ),
        (
            lambda: Assignment.build(_llama8b_blocks(None, 8), 2).comm_bytes_per_step(0),
            r"dtype_bytes must be an int >= 1",
        ),
        (
            lambda: Assignment.build(_llama8b_blocks(None, 8), 2).blocks_of(2),
            r"rank must be in \[0, 1\]",
        ),
        (
            lambda: Assignment(_llama8b_blocks(None, 8)[:2], 2, (0, 2)),
            r"owners must be in \[0, 1\]",
        ),
        (lambda: Assignment(_llama8b_blocks(None, 8)[:2], 2, (0,)), r"owners must have one entry"),
        (lambda: transformer_shapes(4096, 14336, 32, 32, 8, 128256, tp=3), r"tp \(3\) must divide"),
        (lambda: transformer_shapes(4096, 14336, 0, 32, 8, 128256), r"layers must be an int >= 1"),
        (lambda: model_shapes("gpt-5"), r"model must be one of"),
        (lambda: choose_block_size([ParamSpec("w", (4, 4))], 2, ()), r"candidates must be"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- model shapes --------------------------------------------------------------------------


def test_llama_parameter_counts_match_published_sizes():
    assert sum(s.numel for s in llama3_8b_shapes(1)) == 8_030_261_248
    assert sum(s.numel for s in llama3_70b_shapes(1)) == 70_553_706_496


def test_llama3_8b_tp8_shapes_and_roles():
    specs = {s.name: s for s in llama3_8b_shapes(8)}
    layer = "decoder.layers.0."
    assert specs[layer + "self_attention.linear_qkv.weight"].shape == (768, 4096)
    assert specs[layer + "self_attention.linear_proj.weight"].shape == (4096, 512)
    assert specs[layer + "mlp.linear_fc1.weight"].shape == (3584, 4096)
    assert specs[layer + "mlp.linear_fc2.weight"].shape == (4096, 1792)
    assert padded_vocab_size(128256, 8) == 129024
    assert specs["embedding.word_embeddings.weight"].shape == (129024 // 8, 4096)
    assert specs[layer + "mlp.linear_fc2.weight"].partition_dim == 1
    assert specs[layer + "self_attention.linear_qkv.weight"].partition_dim == 0
    soap = {s.kind for s in specs.values() if s.preconditioned}
    adam = {s.kind for s in specs.values() if not s.preconditioned}
    assert soap == {"attention", "mlp"}
    assert adam == {"embedding", "output", "norm"}
    assert len(_soap_params(list(specs.values()))) == 4 * 32


def test_tp_shards_add_up_to_full_matrices():
    full = {s.name: s for s in llama3_70b_shapes(1) if s.preconditioned}
    for s in _soap_params(llama3_70b_shapes(8)):
        dim = s.partition_dim
        expected = list(full[s.name].shape)
        expected[dim] //= 8
        assert list(s.shape) == expected


def test_unfused_layout_and_options():
    specs = transformer_shapes(
        64,
        128,
        2,
        4,
        2,
        1000,
        tp=2,
        fuse_qkv=False,
        fuse_gate_up=False,
        bias=True,
        tied_embeddings=True,
        precondition_embeddings=True,
    )
    names = [s.name for s in specs]
    assert "decoder.layers.0.self_attention.linear_k.weight" in names
    assert "decoder.layers.1.mlp.linear_up.weight" in names
    assert "output_layer.weight" not in names
    assert specs[0].preconditioned and specs[0].shape == (512, 64)
    assert all(not s.preconditioned for s in specs if s.kind == "bias")


# ---- benchmark simulation ------------------------------------------------------------------


def test_sharding_simulation_beats_pingpong_at_scale():
    from benchmarks import sharding

    rows = {r.strategy: r for r in sharding.simulate("llama3-8b", 1, 1024, block_sizes=(1024,))}
    assert rows["pingpong"].stats.compute_balance > 5.0
    auto = next(r for name, r in rows.items() if name.startswith("auto"))
    assert auto.stats.compute_balance <= 1.05
    assert rows["lpt-b1024"].stats.max_flops < rows["pingpong"].stats.max_flops
    assert sharding.main(["--models", "llama3-8b", "--tp", "8", "--dp", "1", "64"]) == 0
