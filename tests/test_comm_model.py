"""The alpha-beta communication model against hand-computed bytes on toy shapes.

With 8 equal 64x64 blocks over N=4 or 8 ranks every owner gets the same number of elements, so
the owner-ordered buffers carry no padding and the model must give the design's formulas
exactly: (4L+2) r bytes per matrix element (fp32 wire), (2L+2) r (bf16 wire), 4 r + 2 r per
Adam element (fp32 grads reduce-scattered once into the ZeRO-1 slices + the bf16 param
all-gather; 8 r + 2 r with all-reduced grads, 8 r with replicated Adam),
first version 8L r + 2 r, DistributedOptimizer 6 r, r = (N-1)/N; launches L+4 (L+3 with
replicated Adam).
"""

from __future__ import annotations

import pytest

from mlfop_megatron.distributed.assignment import ParamSpec
from mlfop_megatron.distributed.comm_model import (
    communication_table,
    layerwise_fallback_traffic,
    layout_costs,
)
from mlfop_megatron.distributed.model_shapes import model_shapes

SPECS = [ParamSpec(f"w{i}", (64, 64)) for i in range(8)] + [
    ParamSpec("norm", (64,), preconditioned=False)
]


@pytest.mark.parametrize("dp", [4, 8])
@pytest.mark.parametrize("levels", [1, 4])
def test_model_matches_the_formulas_without_padding(dp, levels):
    r = (dp - 1) / dp
    costs = {c.layout: c for c in layout_costs(SPECS, dp, levels, block_size=None)}
    assert costs["mlfop"].bytes_per_soap_element == pytest.approx((4 * levels + 2) * r)
    assert costs["mlfop_bf16_wire"].bytes_per_soap_element == pytest.approx((2 * levels + 2) * r)
    assert costs["mlfop"].bytes_per_adam_element == pytest.approx(6 * r)
    assert costs["mlfop"].launches == levels + 4
    assert costs["mlfop_v1"].bytes_per_soap_element == pytest.approx(8 * levels * r + 2 * r)
    assert costs["distopt"].bytes_per_soap_element == pytest.approx(6 * r)
    assert costs["mlfop"].seconds < costs["mlfop_v1"].seconds
    # fp32 state per rank: each owner holds 1/N of the blocks' factors, bases, moments, master
    block = 4 * (2 * 64 * 64 * 2 + 3 * 64 * 64)
    adam = 12 * 64  # fp32 main weights + two moments of the 64 norm elements
    assert costs["mlfop"].optimizer_gib * 2**30 == pytest.approx(8 // dp * block + adam // dp)
    assert costs["mlfop"].optimizer_vs_dp1 == pytest.approx(
        (8 // dp * block + adam // dp) / (8 * block + adam)
    )
    assert costs["distopt"].optimizer_vs_dp1 == pytest.approx(1 / dp)
    replicated = {
        c.layout: c for c in layout_costs(SPECS, dp, levels, block_size=None, shard_adam=False)
    }
    assert replicated["mlfop"].bytes_per_adam_element == pytest.approx(8 * r)
    assert replicated["mlfop"].launches == levels + 3
    assert replicated["mlfop"].optimizer_gib * 2**30 == pytest.approx(8 // dp * block + adam)
    assert replicated["mlfop_v1"].optimizer_gib == costs["mlfop_v1"].optimizer_gib


def test_adam_shard_padding_rounds_up_to_whole_elements():
    """65 Adam elements over 4 ranks: each rank holds ceil(65/4) = 17 of them."""
    specs = SPECS[:4] + [ParamSpec("norm", (65,), preconditioned=False)]
    mlfop = next(c for c in layout_costs(specs, 4, 2, block_size=None) if c.layout == "mlfop")
    block = 4 * (2 * 64 * 64 * 2 + 3 * 64 * 64)
    assert mlfop.optimizer_gib * 2**30 == pytest.approx(block + 12 * 17)
    # the reduce-scatter and the all-gather both move the padded buffer (68 elements)
    assert mlfop.bytes_per_adam_element == pytest.approx((4 + 2) * 3 * 17 / 65)


def test_llama_table_meets_launch_target_and_reports_padding():
    rows = communication_table("llama3-8b", (256,), levels=4)
    mlfop = next(c for c in rows if c.layout == "mlfop")
    # L x G + 4: the level reductions in G buckets (CommConfig.level_buckets, auto: each fp32
    # send buffer <= 1 GiB and <= half an owner's segment, >= 16 MiB, at most 32 buckets: the
    # cap here, as many as DistributedOptimizer's reduce-scatters of max(40M, 1M x N)
    # elements per step, 32 here, but per level); one bucket: L + 4 whatever N
    assert mlfop.launches == 4 * 32 + 4
    distopt = next(c for c in rows if c.layout == "distopt")
    assert distopt.launches == 2 * 32 + 1
    specs = model_shapes("llama3-8b", 1)
    one = next(c for c in layout_costs(specs, 256, 4, 1024, level_buckets=1) if c.layout == "mlfop")
    assert one.launches == 4 + 4
    assert one.bytes_per_soap_element == mlfop.bytes_per_soap_element  # equal owners: no pad
    assert mlfop.optimizer_vs_dp1 <= 1.1 / 256  # issue 13: all params' state <= 1.1/N
    # 4L+2 = 18 B per element at r ~ 1, times the owner buffer's padding (a few percent)
    assert 17.0 < mlfop.bytes_per_soap_element < 18.0 * 1.1


def test_exact_segments_meet_4l_plus_2_where_padding_does_not():
    """Llama-3-8B, block 1024, DP=1024: 6656 equal blocks, 6 or 7 per owner.

    Padded segments carry 7 blocks for every owner (7 / 6.5 = 1.077 x the mean); exact
    segments carry what each owner holds, so the bytes per element fall to (4L+2) r.
    """
    levels, dp = 4, 1024
    table = communication_table("llama3-8b", (dp,), levels=levels, level_buckets=1)
    rows = {c.layout: c for c in table}
    assert rows["mlfop"].bytes_per_soap_element > (4 * levels + 2) * 1.05  # padded
    assert rows["mlfop_exact"].bytes_per_soap_element <= 4 * levels + 2  # (total - min u) / total
    assert rows["mlfop_exact"].launches == rows["mlfop"].launches
    assert rows["mlfop_exact"].seconds < rows["mlfop"].seconds  # despite N x alpha latency
    # In the auto level buckets (32 per level, the cap: a 28 MiB owner segment asks for
    # 16 MiB runs) the N x alpha latency of every exact launch costs more than the padding
    # it saves.
    auto = {c.layout: c for c in communication_table("llama3-8b", (dp,), levels=levels)}
    assert auto["mlfop"].launches == levels * 32 + 4
    assert auto["mlfop_exact"].seconds > auto["mlfop"].seconds
    low = {c.layout: c for c in communication_table("llama3-8b", (64,), levels=levels)}
    # no padding to remove at DP=64 (104 blocks per owner): only the N x alpha latency is left
    assert low["mlfop_exact"].bytes_per_soap_element == pytest.approx(
        low["mlfop"].bytes_per_soap_element, rel=1e-3
    )


def _digits_specs(layers: int = 2, h: int = 64, vocab: int = 64, seq: int = 72) -> list:
    """The digits demo's GPT (peers_cost's default sizes), Megatron's rule for the matrices."""
    specs = [ParamSpec("word", (vocab, h), False), ParamSpec("position", (seq, h))]
    for _ in range(layers):
        specs += [ParamSpec("ln", (h,), False)] * 2 + [ParamSpec("proj", (h, h))]
        specs += [ParamSpec("qkv", (3 * h, h))] + [ParamSpec("ln", (h,), False)] * 2
        specs += [ParamSpec("fc1", (4 * h, h)), ParamSpec("fc2", (h, 4 * h))]
    return specs + [ParamSpec("ln", (h,), False)] * 2 + [ParamSpec("output", (vocab, h), False)]


@pytest.mark.parametrize(
    ("dp", "grads", "gathers"),
    [(2, 446976, (91776, 131712)), (4, 670464, (173952, 181120, 174080, 141312))],
)
def test_layerwise_fallback_gives_the_counted_bytes(dp, grads, gathers):
    """Megatron's layer-wise fallback on the digits model (111744 params), per rank.

    Rank 0's figures are those counted on the real LayerWiseDistributedOptimizer forced onto
    it (benchmarks/RESULTS.md, "counted bytes against comm_model"; every rank is asserted on
    the real calls by tests/test_layerwise_counted.py on a smaller model): one all-reduce of
    all 111744 fp32 grads, 2r x 4 B each, and the all-gather of every other rank's
    ping-pong-dealt bf16 params, 2 B each. The row is the busiest rank's.
    """
    specs = _digits_specs()
    total = sum(p.numel for p in specs)
    assert total == 111744
    t = layerwise_fallback_traffic([p.numel for p in specs], dp)
    assert t.grad_all_reduce == grads == 2 * (dp - 1) / dp * 4 * total
    assert t.param_all_gather == gathers
    assert sum(t.loads) == total and t.param_all_gather == tuple(2 * (total - x) for x in t.loads)
    assert t.grad_buckets == 1 and t.norm == 2 * (dp - 1) / dp * 4
    (row,) = (c for c in layout_costs(specs, dp, 1, None) if c.layout == "layerwise_pingpong")
    assert row.bytes_per_soap_element == row.bytes_per_adam_element
    assert row.bytes_per_soap_element * total == pytest.approx(grads + max(gathers), rel=1e-12)
    assert row.launches == 3  # grad all-reduce, norm, the uneven all-gather
    assert row.optimizer_vs_dp1 == max(t.loads) / total


def test_layerwise_fallback_at_dp_1_sends_nothing():
    t = layerwise_fallback_traffic([p.numel for p in SPECS], 1)
    assert t.grad_all_reduce == 0 and t.param_all_gather == (0,) and t.norm == 0
    (row,) = (c for c in layout_costs(SPECS, 1, 1, None) if c.layout == "layerwise_pingpong")
    assert row.seconds == 0 and row.launches == 2 and row.optimizer_vs_dp1 == 1


def test_optimizer_state_of_all_params_per_rank_measured_at_dp_2_and_4():
    """Issue 13's memory target on real runs: all params' optimizer state per rank vs DP=1.

    Sharding neither duplicates nor loses state (the ranks' SOAP state sums to DP=1's; the
    Adam slices sum to DP=1's plus < N padding elements), so the most loaded rank holds 1/N
    plus the owner imbalance. At DP=2 that is within 1.1/2. At DP=4 the tiny GPT's 8 unequal
    matrices over 4 owners leave the busiest owner with 0.29 of the SOAP state (> 1.1/4, the
    target missed on this model with whole matrices: no assignment of them does better, see
    tests/test_assignment_balance.py); blocks of 128 meet it. The model at Llama-3
    shapes (thousands of blocks) is checked in
    test_llama_table_meets_launch_target_and_reports_padding.
    """
    import torch

    from mlfop_megatron.runtime.spawn import run_distributed
    from tests.support.mlfop_runs import run_tiny_gpt

    base = dict(iters=1, microbatches=4, global_micro=4, hidden=64, dtype=torch.float32)
    (dp1,) = run_distributed(run_tiny_gpt, 1, base)
    soap1, adam1 = dp1["state_bytes"], dp1["adam_state_bytes"]
    for dp in (2, 4):
        runs = run_distributed(run_tiny_gpt, dp, base)
        soap = [r["state_bytes"] for r in runs]
        adam = [r["adam_state_bytes"] for r in runs]
        assert sum(soap) == soap1, (dp, soap, soap1)  # every block's state on one owner
        # fp32 Adam: two fp32 moments per owned element (< N padding elements per rank) and
        # one step counter per owned piece
        assert adam1 <= sum(adam) <= adam1 + dp * (2 * 4 * dp + 8), (dp, adam, adam1)
        assert max(adam) <= 1.1 * adam1 / dp
        total = max(s + a for s, a in zip(soap, adam))
        if dp == 2:
            assert total <= 1.1 * (soap1 + adam1) / dp, (total, soap1 + adam1)
        else:  # bounded by the busiest SOAP owner's share, not by 1.1/N (see docstring)
            assert total / (soap1 + adam1) <= max(soap) / soap1 + 1.1 / dp * adam1 / soap1
    # Blocks of at most 128 x 128 (choose_block_size(balance="memory") at 4 owners, see
    # tests/test_assignment_balance.py): a block-diagonal preconditioner whose state splits
    # within the target at DP=4, measured against the same blocking at DP=1.
    blocked = dict(base, block_size=128)
    (b1,) = run_distributed(run_tiny_gpt, 1, blocked)
    b4 = run_distributed(run_tiny_gpt, 4, blocked)
    assert sum(r["state_bytes"] for r in b4) == b1["state_bytes"]
    total = max(r["state_bytes"] + r["adam_state_bytes"] for r in b4)
    assert total <= 1.1 * (b1["state_bytes"] + b1["adam_state_bytes"]) / 4
