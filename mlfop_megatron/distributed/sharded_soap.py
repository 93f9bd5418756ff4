"""Owner-computes ML-FOP-SOAP over parameter blocks shared by a data-parallel group.

Every rank builds the same :class:`Assignment`; a block's owner keeps its SOAP state, folds
its level gradients, runs its update, and the group shares the updated blocks with one
all-gather of the owner-ordered parameter buffer (see ``owner_buffer.py``). Non-owners hold no
state for it, so per-rank optimizer memory and compute fall as 1/N.
This layer uses torch.distributed but knows nothing about Megatron.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core.batched import BatchedBlocks, ClassWindow
from mlfop_megatron.core.batched_folding import BatchedWindowFolder
from mlfop_megatron.core.diagnostics import GroupSums, group_block_rows
from mlfop_megatron.core.folding import (
    LevelDiagnostics,
    WindowFolder,
    WindowMetric,
    WindowOutput,
)
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.core.linalg import LinalgCounters
from mlfop_megatron.core.norms import sum_of_squares
from mlfop_megatron.core.refresh_budget import BalanceFn, mean_demand_target
from mlfop_megatron.core.soap import (
    BlockLayout,
    init_state,
    needs_master,
    rotate,
    soap_step,
    state_dtype,
)
from mlfop_megatron.distributed.assignment import (
    Assignment,
    Block,
    BlockingConfig,
    ParamSpec,
    make_blocks,
)
from mlfop_megatron.distributed.collective_device import collective_device, group_backend
from mlfop_megatron.distributed.comm_config import PARAM_SYNC
from mlfop_megatron.distributed.owner_buffer import (
    OwnerLayout,
    all_gather_flat,
    all_gather_uneven,
    block_view,
)

# Optimizer phases timed per engine: folding levels, the SOAP update (incl. the factor update),
# the basis refresh inside it, the parameter broadcast, and the grad-group diagnostics (segment
# bookkeeping and the per-block rows of an armed window; zero when none is armed).
PHASES = ("fold", "update", "refresh", "communication", "diagnostics")


@dataclass
class OwnedBlock:
    """A block this rank owns: where it lives in its param, and its SOAP state."""

    block: Block
    param: torch.Tensor
    state: dict[str, Any]

    def view(self, full: torch.Tensor) -> torch.Tensor:
        """This block's region of a tensor shaped like the param (a view, no copy)."""
        return block_view(full, self.block)


def _release(grads: Sequence[torch.Tensor]) -> None:
    """Empty a list of copied gradients (its views would keep their buffer alive)."""
    if isinstance(grads, list):
        grads.clear()


class ShardedSOAP:
    """SOAP + folding over blocks of ``params``, with block ownership spread over ``group``.

    ``group=None`` (or a group of one) keeps every block on this rank (replicated mode).
    ``reduce_group`` sums the FOP inner products of blocks that are shards of one tensor
    (tensor parallelism, blockwise mode): its ranks must hold the same block structure.
    ``master_params``: indices of params whose owned blocks always keep fp32 main weights,
    whatever their dtype: their tensors are scratch buffers refilled before each step (FP8
    primary weights, see ``mlfop_megatron.megatron.fp8``), never the source of truth.
    ``param_sync``: "all_gather" (one all-gather of the owner-ordered parameter buffer) or
    "broadcast" (one broadcast per owner rank; the first version, kept for comparison).
    ``segments``: "padded" (owner segments of the all-gather padded to the longest) or "exact"
    (unpadded, an uneven all-gather; see ``owner_buffer.all_gather_uneven``).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        config: MLFOPConfig,
        group: dist.ProcessGroup | None = None,
        reduce_group: dist.ProcessGroup | None = None,
        block_size: int | None = None,
        master_params: Sequence[int] = (),
        param_sync: str = "all_gather",
        segments: str = "padded",
    ) -> None:
        if param_sync not in PARAM_SYNC:
            raise ValueError(f"param_sync must be one of {PARAM_SYNC} (got {param_sync!r})")
        if not params:
            raise ValueError("ShardedSOAP needs at least one parameter")
        for p, name in zip(params, names):
            if p.dim() < 2:
                raise ValueError(f"param {name!r} is {p.dim()}-D; SOAP blocks are matrices")
        self.params = list(params)
        self.names = list(names)
        self.config = config
        self.schedule = LevelSchedule.from_config(config.folding)
        self.group = group
        self.reduce_group = reduce_group
        self.master_params = frozenset(master_params)
        self.world_size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        specs = [ParamSpec(n, tuple(p.shape)) for p, n in zip(self.params, self.names)]
        blocking = BlockingConfig(block_size, config.soap.max_precond_dim)
        self.assignment = Assignment.build(make_blocks(specs, blocking), self.world_size)
        self.owned = [self._own(b) for b in self.assignment.blocks_of(self.rank)]
        self.param_sync = param_sync
        self.param_layout = OwnerLayout([self.assignment], self.world_size, segments)
        dtypes = {p.dtype for p in self.params}
        # One wire dtype for the parameter all-gather: the params' own (fp32 if they mix).
        self.param_wire_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.counters = LinalgCounters()
        # Wall seconds per optimizer phase since the last reset (telemetry; host clock).
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._folder: WindowFolder | BatchedWindowFolder | None = None
        self._engine: BatchedBlocks | None = None  # shape classes (config.soap.batched)
        self.last_diagnostics: list[LevelDiagnostics] = []
        self.last_eta: torch.Tensor | None = None  # eta* per owned block (step_size=eta_star)
        # Grad-group diagnostics (off unless armed for a window, see arm_grad_diagnostics).
        self._groups: GroupSums | None = None
        self._pending: list[torch.Tensor] | None = None  # earlier segments of the open level
        self._segment_start = 0
        self.last_grad_rows: torch.Tensor | None = None  # per owned block, last armed window
        self.last_grad_segments = 0  # reduced segments the last armed window had
        # overlap_param_gather: step() leaves the all-gather in flight in pending_param_sync.
        self.defer_param_sync = False
        self.pending_param_sync: Callable[[], None] | None = None
        self._balance = self._refresh_balance()
        self._build_engine()

    @property
    def grad_params(self) -> list[torch.Tensor]:
        """The params whose ``main_grad`` feeds this engine (its own params)."""
        return self.params

    def _own(self, block: Block) -> OwnedBlock:
        param = self.params[block.param_index]
        layout = BlockLayout(block.rows, block.cols, block.rotate_rows, block.rotate_cols)
        owned = OwnedBlock(block, param, {})
        keep_master = needs_master(param.dtype) or block.param_index in self.master_params
        master = owned.view(param.detach()) if keep_master else None
        owned.state.update(init_state(layout, state_dtype(param.dtype), param.device, master))
        return owned

    # ----------------------------------------------------------------- folding
    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(sums, group=self.reduce_group)
        return sums

    @property
    def batched(self) -> bool:
        """Whether the owned blocks are updated per shape class (``config.soap.batched``)."""
        return self.config.soap.batched

    def _build_engine(self) -> None:
        """Stack the owned blocks into shape classes (``config.soap.batched``), eagerly.

        Built at construction and after a state load, never inside a backward hook: building
        copies small index tensors host-to-device, which must stay out of the micro-step path.
        """
        self._engine = None
        if self.batched:
            self._engine = BatchedBlocks(
                [o.state for o in self.owned],
                [o.view(o.param.data) for o in self.owned],
                [self.config.soap] * len(self.owned),
            )

    def _refresh_balance(self) -> BalanceFn | None:
        """The drift gate's balancing over the owner ranks, where it applies (else None).

        ``config.soap.refresh_balance`` with the batched engine, the gate on, the refresh
        before the update, and blocks owned by every rank of a group of two or more: then
        every rank's engine checks its bases on the same steps (one config, one step count),
        so every rank reaches the balancing collective on the same steps.
        """
        soap = self.config.soap
        if not (
            soap.refresh_balance
            and self.batched
            and soap.refresh_first
            and soap.refresh_tolerance > 0.0
            and self.world_size > 1
        ):
            return None
        if any(not self.assignment.blocks_of(r) for r in range(self.world_size)):
            return None
        return self._balance_target

    def _balance_target(self, demand: float, largest: float) -> float:
        """Every rank's (refresh demand, costliest side) gathered, and the step's target."""
        device = collective_device(self.group)
        mine = torch.tensor([demand, largest], dtype=torch.float64, device=device)
        every = torch.empty(2 * self.world_size, dtype=torch.float64, device=device)
        all_gather_flat(every, mine, self.group, async_op=False)
        pairs = every.view(self.world_size, 2).tolist()  # the balancing's host read
        return mean_demand_target([p[0] for p in pairs], [p[1] for p in pairs])

    def batched_engine(self) -> BatchedBlocks:
        """The shape classes of the owned blocks (built eagerly, see ``_build_engine``)."""
        if self._engine is None or not self._engine.matches([o.state for o in self.owned]):
            raise RuntimeError(
                "the owned blocks' SOAP states were replaced behind the batched engine's back; "
                "load states through load_state_dict (it rebuilds the engine)"
            )
        return self._engine

    def _class_stacks(
        self, owned_grads: Sequence[torch.Tensor], scale: float
    ) -> list[torch.Tensor]:
        """Owned block gradients (``self.owned`` order) stacked per shape class.

        In state precision, times ``scale``: one stack (and cast) per class.
        """
        assert self._engine is not None  # built with the batched folder (_new_folder)
        out = []
        for cls in self._engine.classes:
            stacked = torch.stack([owned_grads[i] for i in cls.positions]).to(cls.dtype)
            if scale != 1.0:
                stacked.mul_(scale)
            out.append(stacked)
        return out

    def _owned_copies(self, owned: Sequence[torch.Tensor], scale: float) -> list[torch.Tensor]:
        """Copies of this rank's owned block gradients in state precision, times ``scale``."""
        if len(owned) != len(self.owned):
            raise ValueError(f"expected {len(self.owned)} owned blocks, got {len(owned)}")
        slices = [g.to(state_dtype(o.param.dtype), copy=True) for o, g in zip(self.owned, owned)]
        if scale != 1.0:
            for s in slices:
                s.mul_(scale)
        return slices

    def arm_grad_diagnostics(self, groups: Sequence[int]) -> None:
        """Keep per-group gradient sums in the next window.

        ``groups``: the group id of every micro-step (see core/diagnostics.py). Costs
        len(set(groups)) gradient-sized buffers per owned block until the window's step.
        """
        if self._folder is not None or self._pending is not None:
            raise RuntimeError("arm grad diagnostics before the window's first micro-step")
        self._groups = GroupSums(tuple(groups), len(self.owned))
        self._segment_start = 0

    def add_reduced_segment(
        self, level_grads: Sequence[torch.Tensor], end: int, scale: float
    ) -> None:
        """Add a DP-reduced part of the open level that ends at micro-step ``end``.

        ``end`` is cumulative; the segment ends no level (a diagnostics sync point).
        ``level_grads`` (one tensor per param) times ``scale`` is the sum of its micro-step
        gradients.
        """
        self.add_owned_segment(
            [o.view(level_grads[o.block.param_index]) for o in self.owned], end, scale
        )

    def add_owned_segment(
        self, owned_grads: Sequence[torch.Tensor], end: int, scale: float
    ) -> None:
        """``add_reduced_segment`` with this rank's owned blocks only (reduced to their owner)."""
        start = time.perf_counter()
        slices = self._owned_copies(owned_grads, scale)
        if self._groups is not None:
            self._groups.add_segment(self._segment_start, end - self._segment_start, slices)
        if self._pending is None:
            self._pending = slices
        else:
            for acc, x in zip(self._pending, slices):
                acc.add_(x)
        self._segment_start = end
        self.timings["diagnostics"] += time.perf_counter() - start

    def _new_folder(self) -> WindowFolder | BatchedWindowFolder:
        reduce_fn = self._reduce if self.reduce_group is not None else None
        if self.batched:
            return BatchedWindowFolder(
                self.schedule, self.config.folding, self.batched_engine(), reduce_fn
            )
        return WindowFolder(
            self.schedule,
            self.config.folding,
            rotate_fns=[partial(rotate, state=o.state) for o in self.owned],
            # computed at the first fold or diagnostics read, before the step (WindowMetric)
            metric_diags=WindowMetric.of_states(
                [o.state for o in self.owned], [self.config.soap] * len(self.owned)
            ),
            reduce_fn=reduce_fn,
        )

    def fold_reduced_level(
        self, level: int, level_grads: Sequence[torch.Tensor], scale: float = 1.0
    ) -> None:
        """Fold one level's DP-reduced gradient (one tensor per param, times ``scale``).

        After ``add_reduced_segment`` calls in this level, ``level_grads`` times ``scale`` times the
        level size is the sum of the level's last segment, and the earlier ones are added.
        """
        self.fold_owned_level(
            level, [o.view(level_grads[o.block.param_index]) for o in self.owned], scale
        )

    def fold_reads(self) -> list[torch.Tensor]:
        """Tensors of earlier work that the next fold reads and then drops.

        The open level's earlier segments and the diagnostics' sums of squares, made on the
        current stream: a fold on a side stream must ``record_stream`` them, or the caching
        allocator may hand their memory out while the side stream still reads it.
        """
        out = list(self._pending or ())
        if self._groups is not None:
            out += list(self._groups.sq or ())
        return out

    def fold_owned_level(
        self, level: int, owned_grads: Sequence[torch.Tensor], scale: float = 1.0
    ) -> None:
        """``fold_reduced_level`` with this rank's owned blocks only.

        Each is a (rows, cols) tensor in ``self.owned`` order, DP-reduced to this owner; times
        ``scale`` they are the level mean. The blocks are copied: the caller may reuse their
        storage. A list given is emptied once copied, so that the buffer they view (the level's
        received segment) is freed before the fold when the caller holds nothing else of it.
        """
        if level == 0 or self._folder is None:
            if level != 0:
                raise RuntimeError(f"level {level} folded before level 0 in this window")
            self._folder = self._new_folder()
        if self.batched and self._groups is None and self._pending is None:
            stacks = self._class_stacks(owned_grads, scale)
            _release(owned_grads)
            start = time.perf_counter()
            assert isinstance(self._folder, BatchedWindowFolder)  # self.batched: see _new_folder
            self._folder.fold_level_stacked(level, stacks)
            self.timings["fold"] += time.perf_counter() - start
            return
        slices = self._owned_copies(owned_grads, scale)
        _release(owned_grads)
        if self._groups is not None or self._pending is not None:
            start = time.perf_counter()
            size = self.schedule.level_size(level)
            end = self.schedule.boundaries[level]
            if self._groups is not None:
                self._groups.add_segment(
                    self._segment_start, end - self._segment_start, slices, weight=size
                )
            for x, pending in zip(slices, self._pending or ()):
                x.add_(pending, alpha=1.0 / size)
            self._pending = None
            self._segment_start = end
            self.timings["diagnostics"] += time.perf_counter() - start
        start = time.perf_counter()
        self._folder.fold_level(level, slices)
        self.timings["fold"] += time.perf_counter() - start

    def has_window(self) -> bool:
        """Whether the window's levels are all folded (ready for a step)."""
        return self._folder is not None and self._folder.complete

    def window_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The folded gradient per owned block and its rotated form (None where not computed)."""
        if self._folder is None:
            raise RuntimeError("no folded gradients: the backward passes did not reach the DDP")
        return self._folder.result()

    def local_grad_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squares, non-finite flag) over this rank's owned folded gradients."""
        device = self.params[0].device  # a rank that owns no block still reduces these
        if isinstance(self._folder, BatchedWindowFolder):
            return self._folder.grad_stats(device)
        grads, _ = self.window_gradients()
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for g in grads:
            bad = bad | ~torch.isfinite(g).all()
        return sum_of_squares(grads, device), bad

    # -------------------------------------------------------------------- step
    def step(self, lr: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Update owned blocks with the folded gradients (times ``grad_scale``), then share."""
        if self._folder is None:
            raise RuntimeError("no folded gradients: the backward passes did not reach the DDP")
        window: ClassWindow | WindowOutput
        if isinstance(self._folder, BatchedWindowFolder):
            window = self._folder.class_output()
        else:
            window = self._folder.output()
        self.last_diagnostics = self._folder.diagnostics
        self.last_eta = self._folder.eta
        start = time.perf_counter()
        self.last_grad_rows = None
        if self._groups is not None:  # before the step: the window's bases and metric
            self.last_grad_rows = group_block_rows(
                self._groups,
                self._folder.rotate_fns,
                self._folder.metric_diags,
                self._folder.estimate_rot if self._folder.schedule.num_folds else None,
                self._folder.eta,
                [lr] * len(self.owned),
                self._reduce if self.reduce_group is not None else None,
            ).to(self.params[0].device)
            self.last_grad_segments = self._groups.segments
            self._groups = None
            self.timings["diagnostics"] += time.perf_counter() - start
            start = time.perf_counter()
        if grad_scale != 1.0:
            window.scale_(grad_scale)
        if isinstance(window, ClassWindow):  # the batched folder's output
            assert self._engine is not None  # built with the batched folder (_new_folder)
            n = len(self.owned)
            # The params' storage as of now: FP8 shadows get new storage at every step.
            views = [o.view(o.param.data) for o in self.owned]
            self._engine.step(
                window,
                [lr] * n,
                [weight_decay] * n,
                self.counters,
                self.timings,
                params=views,
                balance=self._balance,
            )
        else:
            for i, (owned, g) in enumerate(zip(self.owned, window.grads)):
                soap_step(
                    owned.view(owned.param.data),
                    g,
                    owned.state,
                    self.config.soap,
                    self.counters,
                    lr=lr,
                    weight_decay=weight_decay,
                    timings=self.timings,
                    **window.block(i),
                )
        self.timings["update"] += time.perf_counter() - start
        self._folder = None
        start = time.perf_counter()
        if self.defer_param_sync:  # left in flight: the caller waits (overlap_param_gather)
            self.pending_param_sync = self.start_param_sync()
        else:
            self.sync_params()
        self.timings["communication"] += time.perf_counter() - start

    def discard_window(self) -> None:
        """Drop the folded gradients of a skipped step (state is untouched)."""
        self._folder = None
        self._groups = None
        self._pending = None
        self._segment_start = 0
        self.last_grad_rows = None

    def sync_params(self) -> None:
        """Share the owners' updated blocks with the whole group (``param_sync``)."""
        finish = self.start_param_sync()
        if finish is not None:
            finish()

    def start_param_sync(self) -> Callable[[], None] | None:
        """Launch the parameter all-gather; returns the function that waits and unpacks it.

        None when nothing is left in flight (one rank, or ``param_sync="broadcast"``, which
        runs synchronously here).
        """
        if self.world_size == 1:
            return None
        if self.param_sync == "broadcast":
            self.broadcast_params()
            return None
        layout, data = self.param_layout, [[p.data for p in self.params]]
        mine = layout.pack(data, self.param_wire_dtype, self.params[0], ranks=[self.rank])
        flat = mine.new_empty(layout.numel)
        if layout.exact:
            work = all_gather_uneven(flat, mine, layout.sizes, self.group, async_op=True)
        else:
            work = all_gather_flat(flat, mine, self.group, async_op=True)

        def finish() -> None:
            if work is not None:
                work.wait()
            layout.unpack_into(flat, data, skip=self.rank)

        return finish

    def broadcast_params(self) -> None:
        """Every owner sends its updated blocks to the rest of the group (one message each)."""
        if self.world_size == 1:
            return
        assert self.group is not None  # world_size > 1 needs a group
        for rank in range(self.world_size):
            blocks = self.assignment.blocks_of(rank)
            if not blocks:
                continue
            views = [block_view(self.params[b.param_index].data, b) for b in blocks]
            flat = torch.cat([v.reshape(-1) for v in views])
            dist.broadcast(flat, src=dist.get_global_rank(self.group, rank), group=self.group)
            if rank != self.rank:
                offset = 0
                for v in views:
                    v.copy_(flat[offset : offset + v.numel()].view_as(v))
                    offset += v.numel()

    def param_padding_per_rank(self) -> list[int]:
        """Padding elements of each rank's segment of the parameter all-gather buffer."""
        return self.param_layout.padding_per_rank()

    def communication_bytes_per_step(self) -> int:
        """Bytes this rank sends per step to share the updated params (ring algorithms).

        The level reductions run in the Megatron glue (``LevelReducer``), which counts them:
        see ``MLFOPMegatronOptimizer.communication_bytes_per_step`` for the whole step.
        """
        if self.world_size == 1:
            return 0
        if self.param_sync == "broadcast":  # N broadcasts: every rank relays every block
            elem = self.params[0].element_size()
            return sum(b.numel for b in self.assignment.blocks) * elem
        wire = torch.finfo(self.param_wire_dtype).bits // 8
        layout = self.param_layout
        device = self.params[0].device
        if layout.exact and group_backend(self.group, device) != "nccl":  # all-to-all, see sync
            return (self.world_size - 1) * layout.sizes[self.rank] * wire
        return (layout.numel - layout.sizes[self.rank]) * wire

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        return sum(
            v.numel() * v.element_size()
            for o in self.owned
            for v in o.state.values()
            if torch.is_tensor(v)
        )

    def block_name(self, owned: OwnedBlock) -> str:
        """The block's checkpoint key: ``<param name>@<row offset>,<col offset>``."""
        b = owned.block
        return f"{b.param_name}@{b.row_offset},{b.col_offset}"

    def state_dict(self) -> dict[str, Any]:
        """The owned blocks' SOAP states (by ``block_name``) and the linalg counters."""
        return {
            "blocks": {self.block_name(o): dict(o.state) for o in self.owned},
            "counters": self.counters.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a ``state_dict()`` with the same owned blocks (states moved to their device)."""
        blocks = state["blocks"]
        for o in self.owned:
            saved = blocks[self.block_name(o)]
            o.state.clear()
            o.state.update(
                {k: v.to(o.param.device) if torch.is_tensor(v) else v for k, v in saved.items()}
            )
        self.counters = LinalgCounters(**state["counters"])
        self._folder = None
        self._build_engine()
