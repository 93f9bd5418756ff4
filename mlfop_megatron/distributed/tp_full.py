"""Tensor-parallel "full" mode: precondition the whole matrix behind TP-sharded weights.

Each TP rank holds a shard of a weight along its partition dim. In full mode the level
gradients of the shards are all-gathered over the TP group into full matrices, SOAP blocks of
the full matrices are owned across the combined TP x DP group, and after the step the updated
full matrices are broadcast and every rank copies back its own shard. The math is therefore the
TP=1 math; the price is one all-gather per level and a full-size copy of these matrices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP


def gather_full(
    shard: torch.Tensor, partition_dim: int, tp_group: dist.ProcessGroup
) -> torch.Tensor:
    """Concatenate the TP shards of a tensor along its partition dim (on every TP rank)."""
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(pieces, shard.contiguous(), group=tp_group)
    return torch.cat(pieces, dim=partition_dim)


def shard_of(full: torch.Tensor, partition_dim: int, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """This TP rank's slice of a full tensor (a view)."""
    tp = dist.get_world_size(tp_group)
    return torch.chunk(full, tp, dim=partition_dim)[dist.get_rank(tp_group)]


class TensorParallelFullSOAP(ShardedSOAP):
    """ShardedSOAP over full matrices assembled from TP shards (see module docstring).

    Its ``params`` are the full matrices (the SOAP engine's view); ``grad_params`` the local
    shards whose ``main_grad`` the DDP fills and that ``step`` writes back.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        partition_dims: Sequence[int],
        config: MLFOPConfig,
        tp_group: dist.ProcessGroup,
        owner_group: dist.ProcessGroup | None,
        block_size: int | None = None,
        param_sync: str = "all_gather",
    ) -> None:
        for p, name, dim in zip(params, names, partition_dims):
            if dim not in (0, 1) or p.dim() != 2:
                raise ValueError(
                    f"tp_mode='full' needs 2-D weights split along dim 0 or 1; {name!r} has "
                    f"shape {tuple(p.shape)} split along dim {dim}; use tp_mode='blockwise'"
                )
        self.shards = list(params)
        self.partition_dims = list(partition_dims)
        self.tp_group = tp_group
        with torch.no_grad():
            self.full = [
                gather_full(p.detach(), d, tp_group) for p, d in zip(self.shards, partition_dims)
            ]
        super().__init__(
            self.full,
            names,
            config,
            group=owner_group,
            block_size=block_size,
            param_sync=param_sync,
        )

    @property
    def grad_params(self) -> list[torch.Tensor]:
        """The local shards (whose main_grad the DDP fills)."""
        return self.shards

    def _gather(self, level_shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        fulls = [
            gather_full(g, d, self.tp_group) for g, d in zip(level_shards, self.partition_dims)
        ]
        self.timings["communication"] += time.perf_counter() - start
        return fulls

    def fold_reduced_level(
        self, level: int, level_grads: Sequence[torch.Tensor], scale: float = 1.0
    ) -> None:
        """All-gather the shards' level gradients (DP-reduced) and fold the full matrices."""
        super().fold_reduced_level(level, self._gather(level_grads), scale=scale)

    def add_reduced_segment(
        self, level_grads: Sequence[torch.Tensor], end: int, scale: float
    ) -> None:
        """All-gather a diagnostics segment's shard gradients (see add_reduced_segment)."""
        super().add_reduced_segment(self._gather(level_grads), end, scale)

    def step(self, lr: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Step the full matrices, share them, and write each rank's shard back."""
        super().step(lr, weight_decay, grad_scale=grad_scale)
        with torch.no_grad():
            for shard, full, dim in zip(self.shards, self.full, self.partition_dims):
                shard.copy_(shard_of(full, dim, self.tp_group))
