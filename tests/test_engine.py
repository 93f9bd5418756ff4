"""The engine interface: both engines implement SOAPEngine, make_engine chooses by layout."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.distributed.engine import EngineGroups, SOAPEngine, make_engine
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
from mlfop_megatron.distributed.tp_full import TensorParallelFullSOAP
from mlfop_megatron.runtime.spawn import run_distributed

LOCAL = EngineGroups(dp=None, dp_rank=0, tp=None, tp_rank=0)


def test_replicated_engine_implements_the_interface():
    params = [torch.randn(6, 4), torch.randn(3, 5)]
    engine = make_engine(params, ["a", "b"], MLFOPConfig(), LOCAL, tp_sharded=False, sharded=True)
    assert type(engine) is ShardedSOAP and isinstance(engine, SOAPEngine)
    assert engine.grad_params == params and engine.world_size == 1
    # fold_reduced_level (per-param level sums) == fold_owned_level (owned blocks) bitwise
    other = make_engine(params, ["a", "b"], MLFOPConfig(), LOCAL, tp_sharded=False, sharded=True)
    grads = [torch.randn(6, 4), torch.randn(3, 5)]
    engine.fold_reduced_level(0, grads, scale=2.0)
    other.fold_owned_level(0, [o.view(grads[o.block.param_index]) for o in other.owned], 2.0)
    for a, b in zip(engine.window_gradients()[0], other.window_gradients()[0]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tp_mode must be one of"):
        make_engine(
            params, ["a", "b"], MLFOPConfig(), LOCAL, tp_sharded=True, sharded=True, tp_mode="ring"
        )


def _full_worker(_):
    import torch.distributed as dist

    shard = torch.full((4, 3), float(dist.get_rank()))
    shard.partition_dim = 0
    groups = EngineGroups(
        dp=None, dp_rank=0, tp=dist.group.WORLD, tp_rank=dist.get_rank(), tp_dp=dist.group.WORLD
    )
    full = make_engine(
        [shard], ["w"], MLFOPConfig(), groups, tp_sharded=True, sharded=True, tp_mode="full"
    )
    blockwise = make_engine(
        [shard], ["w"], MLFOPConfig(), groups, tp_sharded=True, sharded=True, tp_mode="blockwise"
    )
    return (
        type(full).__name__,
        isinstance(full, SOAPEngine),
        tuple(full.params[0].shape),
        full.grad_params[0] is shard,
        type(blockwise).__name__,
    )


@pytest.mark.distributed
def test_tp_full_engine_is_chosen_for_tp_shards_in_full_mode():
    for name, ok, shape, same, other in run_distributed(_full_worker, 2, None):
        assert name == TensorParallelFullSOAP.__name__ and ok
        assert shape == (8, 3) and same  # full matrices inside, shards as grad params
        assert other == ShardedSOAP.__name__
