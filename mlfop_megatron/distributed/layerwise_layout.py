"""Megatron 0.19's layer-wise optimizer layout of whole params, modelled for the cost model.

Megatron-core 0.19's ``LayerWiseDistributedOptimizer`` (``--optimizer soap|muon`` with
``--use-distributed-optimizer``) gives each data-parallel rank whole params inside every DDP
bucket. Our reading of ``_compute_per_buffer_param_layout`` (core 0.19), re-derived here:
params are walked in backprop order (the reverse of the model's) and collected into a chunk
until its numel reaches max(bucket_size, int(0.9 x dp x its largest param)); each chunk is one
bucket, packed largest first (ties keep the chunk's order) onto the least-loaded shard (ties to
the lowest rank), every param starting on a 64-element boundary; all shards of a bucket are
padded to the largest, rounded up to lcm(64, lcm(dp, 128) / dp) elements (lcm(dp, 128, 2^16)
with ``pad_for_high_nccl_busbw``). Tied embeddings get a bucket of their own in Megatron; the
model here has none. ``tests/test_layerwise_layout.py`` checks this against Megatron's own
function where megatron-core 0.19 is installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PADDING_FLOOR = 0.9  # Megatron's cap on a dominated bucket's padding (about 11%)
PARAM_ALIGN = 64  # elements: every param starts on this boundary


@dataclass(frozen=True)
class LayerwiseLayout:
    """Whole-param buckets: their [start, end) in the buffer and each param's owner."""

    buckets: tuple[tuple[int, int], ...]  # padded [start, end) per bucket, backprop order
    owners: tuple[int, ...]  # per param (model order): the DP rank that owns it
    loads: tuple[int, ...]  # per DP rank: unpadded elements owned

    @property
    def padded_numel(self) -> int:
        """Elements of the whole buffer, padding included (what each collective moves)."""
        return self.buckets[-1][1] if self.buckets else 0


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def shard_divisor(dp: int, pad_for_high_nccl_busbw: bool = False) -> int:
    """Elements every shard of a bucket is rounded up to."""
    bucket_end = math.lcm(dp, 128, 2**16) if pad_for_high_nccl_busbw else math.lcm(dp, 128)
    return math.lcm(PARAM_ALIGN, bucket_end // dp)


def layerwise_layout(
    numels: Sequence[int],
    dp: int,
    bucket_size: int | None,
    pad_for_high_nccl_busbw: bool = False,
) -> LayerwiseLayout:
    """The layout of params with these ``numels`` (model order) at data-parallel size ``dp``."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    divisor = shard_divisor(dp, pad_for_high_nccl_busbw)
    owners = [0] * len(numels)
    loads = [0] * dp
    buckets: list[tuple[int, int]] = []

    def emit(chunk: list[int]) -> None:
        if not chunk:
            return
        cursors = [0] * dp
        for i in sorted(chunk, key=lambda j: -numels[j]):  # stable: ties keep chunk order
            rank = min(range(dp), key=cursors.__getitem__)
            cursors[rank] = _round_up(cursors[rank], PARAM_ALIGN) + numels[i]
            owners[i] = rank
            loads[rank] += numels[i]
        start = buckets[-1][1] if buckets else 0
        buckets.append((start, start + dp * _round_up(max(cursors), divisor)))

    chunk: list[int] = []
    total = largest = 0
    for i in reversed(range(len(numels))):
        chunk.append(i)
        total += numels[i]
        largest = max(largest, numels[i])
        if bucket_size is not None and total >= max(bucket_size, int(dp * largest * PADDING_FLOOR)):
            emit(chunk)
            chunk, total, largest = [], 0, 0
    emit(chunk)
    return LayerwiseLayout(tuple(buckets), tuple(owners), tuple(loads))
