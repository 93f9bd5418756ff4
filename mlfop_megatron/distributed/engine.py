"""The interface of the objects that hold SOAP state (engines) and the factory choosing one.

The factory chooses an engine from the parallel layout, with its process groups passed in
explicitly.

Two engines implement it: :class:`~mlfop_megatron.distributed.sharded_soap.ShardedSOAP`
(replicated when its group is None, else DP-sharded by block; TP shards preconditioned
blockwise) and its subclass
:class:`~mlfop_megatron.distributed.tp_full.TensorParallelFullSOAP` (whole matrices
gathered over TP). Entry points by what they take:

* ``fold_reduced_level(level, level_grads, scale)``: per-param gradients reduced over DP whose
  product with ``scale`` is the level mean (the engine slices out its owned blocks);
* ``fold_owned_level(level, owned_grads, scale)``: only this rank's owned blocks, already
  reduced to their owner (the owner-ordered reduce-scatter's output);
* ``add_reduced_segment`` / ``add_owned_segment``: the same for a diagnostics segment that ends no
  level. Nothing here takes a single micro-step's gradient: micro-step gradients accumulate in
  Megatron's ``main_grad`` until a level boundary.
No Megatron here: groups come from the caller (``megatron/optimizer.py`` reads them once
from megatron.core.parallel_state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core.folding import LevelDiagnostics
from mlfop_megatron.core.linalg import LinalgCounters
from mlfop_megatron.distributed.assignment import Assignment

TP_MODES = ("blockwise", "full")


@runtime_checkable
class SOAPEngine(Protocol):
    """What the Megatron glue needs from an object that holds SOAP state (see module)."""

    world_size: int
    assignment: Assignment
    owned: list[Any]
    counters: LinalgCounters
    timings: dict[str, float]
    last_diagnostics: list[LevelDiagnostics]
    last_eta: torch.Tensor | None
    last_grad_rows: torch.Tensor | None
    last_grad_segments: int

    @property
    def grad_params(self) -> list[torch.Tensor]:
        """The model params whose ``main_grad`` feeds this engine."""
        ...

    def fold_reduced_level(
        self, level: int, level_grads: Sequence[torch.Tensor], scale: float = 1.0
    ) -> None:
        """Fold a level from per-param gradients reduced over DP (times ``scale``: the mean)."""

    def fold_owned_level(
        self, level: int, owned_grads: Sequence[torch.Tensor], scale: float = 1.0
    ) -> None:
        """Fold a level from this rank's owned blocks, already reduced to their owner."""

    def fold_reads(self) -> list[torch.Tensor]:
        """Tensors of earlier work the next fold reads and drops (record_stream them)."""
        ...

    def add_reduced_segment(
        self, level_grads: Sequence[torch.Tensor], end: int, scale: float
    ) -> None:
        """Add a DP-reduced diagnostics segment (one tensor per param) ending at ``end``."""

    def add_owned_segment(
        self, owned_grads: Sequence[torch.Tensor], end: int, scale: float
    ) -> None:
        """Add a diagnostics segment's owned, reduced blocks ending at micro-step ``end``."""

    def arm_grad_diagnostics(self, groups: Sequence[int]) -> None:
        """Compute grad-group diagnostics in the next window (``groups``: per micro-batch)."""

    def has_window(self) -> bool:
        """Whether a folded window is ready for a step."""

    def window_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The folded gradient per owned block and its rotated form (None where not computed)."""

    def local_grad_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squares, non-finite flag) of this rank's folded gradients."""

    def step(self, lr: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Apply one SOAP step to the owned blocks and sync the params."""

    def discard_window(self) -> None:
        """Drop the folded window (skipped step)."""

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's optimizer state."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()``."""

    def block_name(self, owned: Any) -> str:
        """A stable name of an owned block (checkpoint key)."""

    def communication_bytes_per_step(self) -> int:
        """Bytes this rank sends per step to share the updated params."""

    def param_padding_per_rank(self) -> list[int]:
        """Padding elements per rank of the parameter all-gather buffer."""


@dataclass(frozen=True)
class EngineGroups:
    """Process groups of one kind of params (dense or expert).

    In the style of Megatron's ProcessGroupCollection: ``dp`` the data-parallel group the
    grads are replicated over (dense: data x context parallel), ``tp`` the tensor-parallel
    group (None at TP=1), ``tp_dp`` the TP x DP group that owns whole matrices in
    tp_mode="full".
    """

    dp: dist.ProcessGroup | None
    dp_rank: int
    tp: dist.ProcessGroup | None
    tp_rank: int
    tp_dp: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class ParallelGroups:
    """The groups of both kinds of params: dense ones and expert (MoE) ones."""

    dense: EngineGroups
    expert: EngineGroups

    def of(self, expert: bool) -> EngineGroups:
        """The expert groups if ``expert``, else the dense ones."""
        return self.expert if expert else self.dense


def make_engine(
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    config: MLFOPConfig,
    groups: EngineGroups,
    *,
    tp_sharded: bool,
    sharded: bool,
    tp_mode: str = "blockwise",
    block_size: int | None = None,
    master_params: Sequence[int] = (),
    param_sync: str = "all_gather",
    segments: str = "padded",
) -> SOAPEngine:
    """The engine for params of one layout.

    TP-full when they are TP shards, tp_mode="full" and the groups have a TP x DP owner
    group; else ShardedSOAP (sharded over ``groups.dp`` when ``sharded``, TP shards
    preconditioned blockwise with FOP sums over ``groups.tp``).
    """
    from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
    from mlfop_megatron.distributed.tp_full import TensorParallelFullSOAP

    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode must be one of {TP_MODES} (got {tp_mode!r})")
    if tp_sharded and tp_mode == "full" and groups.tp is not None and groups.tp_dp is not None:
        return TensorParallelFullSOAP(
            params,
            names,
            [p.partition_dim for p in params],  # type: ignore[attr-defined]
            config,
            tp_group=groups.tp,
            owner_group=groups.tp_dp if sharded else None,
            block_size=block_size,
            param_sync=param_sync,
            segments=segments,
        )
    return ShardedSOAP(
        params,
        names,
        config,
        group=groups.dp if sharded else None,
        reduce_group=groups.tp if tp_sharded else None,
        block_size=block_size,
        master_params=master_params,
        param_sync=param_sync,
        segments=segments,
    )
