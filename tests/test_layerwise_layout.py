"""Our model of Megatron 0.19's layer-wise layout against Megatron's own function."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.distributed.layerwise_layout import layerwise_layout

# A small Llama-like stack in model order: per layer q, k, v, o, gate, up, down (h=96, kv=24,
# ffn=336) and a norm, then a final norm and the output layer; plus an odd-sized param.
H, KV, FFN = 96, 24, 336
LAYER = [H * H, KV * H, KV * H, H * H, FFN * H, FFN * H, H * FFN, H]
NUMELS = [1000 * H] + LAYER * 4 + [H, 1000 * H, 77]


def _megatron_layout(numels, dp, bucket_size, high_busbw):
    """Megatron's own layout: (bucket [start, end) list, owner rank per param)."""
    lw = pytest.importorskip("megatron.core.optimizer.layer_wise_optimizer")
    from megatron.core.distributed import DistributedDataParallelConfig

    compute = getattr(lw.LayerWiseDistributedOptimizer, "_compute_per_buffer_param_layout", None)
    if compute is None:
        pytest.skip("this megatron-core has no per-bucket layout (0.16 deals params ping-pong)")
    params = [torch.nn.Parameter(torch.empty(n)) for n in numels]
    cfg = DistributedDataParallelConfig(pad_buckets_for_high_nccl_busbw=high_busbw)
    layout = compute(params, bucket_size, dp, cfg)
    owners = []
    for p in params:
        start, _, bucket = layout.param_index_map[p]
        b_start, b_end = layout.bucket_indices[bucket]
        owners.append((start - b_start) // ((b_end - b_start) // dp))
    return [tuple(b) for b in layout.bucket_indices], owners


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("bucket_size", [None, 40_000, 200_000])
@pytest.mark.parametrize("high_busbw", [False, True])
def test_layout_equals_megatrons(dp, bucket_size, high_busbw):
    """Bucket boundaries (padding included) and every param's owner, exactly."""
    buckets, owners = _megatron_layout(NUMELS, dp, bucket_size, high_busbw)
    ours = layerwise_layout(NUMELS, dp, bucket_size, high_busbw)
    assert list(ours.buckets) == buckets
    assert list(ours.owners) == owners
    assert sum(ours.loads) == sum(NUMELS)
    assert ours.padded_numel == buckets[-1][1]
