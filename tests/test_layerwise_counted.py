"""comm_model's layer-wise baseline against the counted calls of Megatron's real optimizer.

Megatron 0.19's LayerWiseDistributedOptimizer (``--optimizer muon --use-distributed-optimizer
--bf16``, built as Megatron-LM builds it through the digits table, see
``examples/digits/optimizers.py``) trains the digits model at DP=2 on gloo; the collectives on
its layer-wise buffer are counted at the torch.distributed boundary (``benchmarks/peers_cost.py``
attributes them: the grad reduce-scatter by the buffer's storage, the param all-gather by
the optimizer's param-sync call). Per step they must equal what ``comm_model``'s ``layerwise``
row predicts for the same params at DP=2, and differ from its ``layerwise_pingpong`` row.

Exactly, not within a tolerance: both sides are byte counts of the same padded buffer (ring
bytes (N-1)/N x padded elements x 4 B for fp32 grads, x 2 B for bf16 params); the model
carries them as a float per matrix element, so the product recovers an integer up to float
rounding (checked below to 1e-9 of one byte count), and any layout difference moves whole
64-element-aligned params, thousands of bytes.

Needs emerging-optimizers (``make setup-peers``: ``.venv-peers``); skipped with the reason
elsewhere.
"""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("sklearn")
pytest.importorskip("torch")

from examples.digits.optimizers import entry  # noqa: E402


@pytest.mark.distributed
def test_counted_layer_wise_bytes_equal_the_comm_model_at_dp2() -> None:
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
    from mlfop_megatron.runtime.spawn import run_distributed

    args = argparse.Namespace(steps=2, layers=1, hidden=32, global_batch=8, micro_batch=2)
    spec = make_spec("megatron-muon+lw", args, 2)
    ranks = run_distributed(measure_world, 2, [spec], None, False, timeout=300)
    predicted = layerwise_predictions(ranks[0][0]["specs"], 2)
    parts = ((GRAD_SYNC, "grads", "reduce_scatter"), (PARAM_SYNC, "params", "all_gather"))
    for part, key, kind in parts:
        expected = predicted["layerwise"][key]
        assert abs(expected - round(expected)) < 1e-9 * expected
        for (row,) in ranks:
            for step in row["steps"]:
                # one launch of one kind per step, the bytes the model predicts
                assert step["attributed"][part] == {kind: round(expected)}, (part, row["rank"])
        # the ping-pong fallback's layout would move other bytes on this model
        assert round(predicted["layerwise_pingpong"][key]) != round(expected), part
