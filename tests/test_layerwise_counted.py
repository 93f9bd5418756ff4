"""comm_model's layer-wise baselines against the counted calls of Megatron's real optimizer.

Megatron 0.19's LayerWiseDistributedOptimizer (``--optimizer muon --use-distributed-optimizer
--bf16``, built as Megatron-LM builds it through the digits table, see
``examples/digits/optimizers.py``) trains the digits model on gloo at DP=2 and at DP=4, twice
in one world per DP size: on 0.19's default per-bucket layout (``megatron-muon+lw``) and forced
onto its ping-pong fallback (``megatron-muon+lw-pingpong``: ``--no-use-layer-wise-param-layout``,
no layout handed to DDP). The collectives on its grad buffer are counted at the
torch.distributed boundary (``benchmarks/peers_cost.py`` attributes them: the grad reduction by
the buffer's storage, the param all-gather by the optimizer's param-sync call). Per step:

* layout: one reduce-scatter of the fp32 grads and one all-gather of the bf16 params of the
  layer-wise buffer, on every rank the bytes of ``comm_model``'s ``layerwise`` row;
* fallback: one all-reduce of the whole fp32 DDP grad buffer (every param, the non-matrix ones
  too) and one all-gather of each rank's ping-pong-dealt bf16 params in unequal pieces, on
  every rank the bytes ``comm_model.layerwise_fallback_traffic`` gives that rank (the pieces
  are unequal, so the ranks differ), the busiest rank's sum the ``layerwise_pingpong`` row's
  bytes; and not the ``layerwise`` row's.

Exactly, not within a tolerance: both sides are byte counts of the same buffers (ring bytes,
``comm_counter``'s convention: (N-1)/N x padded elements x 4 B for a reduce-scatter of fp32
grads, 2(N-1)/N x elements x 4 B for an all-reduce, every other rank's piece for an all-gather
of unequal pieces); the model carries the rows as a float per element, so the product
recovers an integer up to float rounding (checked below to 1e-9 of one byte count), and any
layout difference moves whole params, thousands of bytes.

Needs emerging-optimizers (``make setup-peers``: ``.venv-peers``); skipped with the reason
elsewhere. About 70 s at DP=2 and 60 s at DP=4 on two shared CPU cores.
"""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("sklearn")
pytest.importorskip("torch")

from examples.digits.optimizers import entry  # noqa: E402


def _close_to_int(x: float) -> int:
    assert abs(x - round(x)) < 1e-9 * max(abs(x), 1.0), x
    return round(x)


@pytest.mark.distributed
@pytest.mark.parametrize("dp", [2, 4])
def test_counted_layer_wise_bytes_equal_the_comm_model(dp: int) -> None:
    reason = entry("megatron-muon").missing()
    if reason is not None:
        pytest.skip(reason)
    from benchmarks.peers_cost import (
        GRAD_SYNC,
        PARAM_SYNC,
        layerwise_predictions,
        make_spec,
        measure_world,
    )
    from mlfop_megatron.distributed.assignment import ParamSpec
    from mlfop_megatron.distributed.comm_model import layout_costs
    from mlfop_megatron.runtime.spawn import run_distributed

    args = argparse.Namespace(steps=2, layers=1, hidden=32, global_batch=8, micro_batch=2)
    labels = ("megatron-muon+lw", "megatron-muon+lw-pingpong")
    specs = [make_spec(label, args, dp) for label in labels]
    ranks = run_distributed(measure_world, dp, specs, None, False, timeout=300)
    parts = {"grads": GRAD_SYNC, "params": PARAM_SYNC}

    # 0.19's per-bucket layout: the `layerwise` row, the same on every rank
    predicted = layerwise_predictions(ranks[0][0]["specs"], dp)
    for key, kind in (("grads", "reduce_scatter"), ("params", "all_gather")):
        expected = _close_to_int(predicted["layerwise"][key])
        for layout_row, _ in ranks:
            for step in layout_row["steps"]:
                # one launch of one kind per step, the bytes the model predicts
                got = step["attributed"][parts[key]]
                assert got == {kind: expected}, (key, layout_row["rank"])

    # the ping-pong fallback: every rank's bytes as the model gives them for that rank
    busiest = 0
    for _, fallback_row in ranks:
        rank = fallback_row["rank"]
        mine = layerwise_predictions(fallback_row["specs"], dp, rank)["layerwise_pingpong"]
        for step in fallback_row["steps"]:
            for key, kind in (("grads", "all_reduce"), ("params", "all_gather")):
                got = step["attributed"][parts[key]]
                assert got == {kind: _close_to_int(mine[key])}, (key, rank)
            busiest = max(busiest, sum(sum(step["attributed"][p].values()) for p in parts.values()))
        # and not what the per-bucket layout moves on the same model
        for key in parts:
            assert round(mine[key]) != round(predicted["layerwise"][key]), (key, rank)
    # the row itself: the busiest rank's grad and param bytes, over every param
    params = [ParamSpec(n, s, preconditioned=m) for n, s, m in ranks[0][1]["specs"]]
    (row,) = (c for c in layout_costs(params, dp, 1, None) if c.layout == "layerwise_pingpong")
    p_soap = sum(p.numel for p in params if p.soap_matrix)
    p_adam = sum(p.numel for p in params) - p_soap
    row_bytes = row.bytes_per_soap_element * p_soap + row.bytes_per_adam_element * p_adam
    assert _close_to_int(row_bytes) == busiest
