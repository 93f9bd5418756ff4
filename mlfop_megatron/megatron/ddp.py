"""Megatron DistributedDataParallel whose level boundaries are gradient sync points.

Megatron's DDP reduces the gradient buckets once, after the last micro-batch. For multi-level
folding every level boundary L_j must be a sync point: when the last param of micro-step L_j
has its gradient, a callback hands the level to the optimizer. Two ways to reduce it
(``CommConfig.level_reduce``, set by the optimizer through ``configure_level_reduction``):

* "reduce_scatter" (default): Megatron's buckets never reduce. The optimizer packs the folded
  (SOAP) params' level sums into an owner-ordered buffer and reduce-scatters it (each owner
  receives only its blocks), then zeroes their ``main_grad``. The other (Adam) params keep
  accumulating in ``main_grad`` over the whole window and this class all-reduces them once,
  one asynchronous all-reduce per Megatron buffer launched when the window's last micro-step
  has all its gradients, waited in ``finish_grad_sync`` (or by the optimizer before its step).
  Params whose optimizer reduces them itself (the ZeRO-1 Adam: a reduce-scatter into the
  slices each rank steps, ``take_over_grad_sync``) leave that all-reduce; their reduction is
  started and finished at the same two points.
* "all_reduce" (the first version, kept for comparison): at every level boundary Megatron's
  buckets all-reduce the whole buffer; averaging an already averaged value leaves it
  unchanged, so the Adam params' final ``main_grad`` is still the DP mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel

from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.megatron import compat
from mlfop_megatron.megatron.param_gather import PendingParamGathers

# (level index, number of micro-steps in that level) -> None
LevelCallback = Callable[[int, int], None]
# (micro-steps done in the window) -> None, at an extra sync point that ends no level
SegmentCallback = Callable[[int], None]


def check_supported_features(config: Any, ddp_config: Any) -> None:
    """Refuse Megatron features that would silently break folding, naming the field and fix.

    ``config`` is the model's TransformerConfig, ``ddp_config`` its
    DistributedDataParallelConfig. Fields missing in a megatron-core release read as off.
    """

    def on(obj: Any, field: str) -> bool:
        return obj is not None and bool(getattr(obj, field, False))

    checks = [
        (
            on(ddp_config, "use_distributed_optimizer"),
            "FoldingDistributedDataParallel needs DistributedDataParallelConfig("
            "use_distributed_optimizer=False): ML-FOP-SOAP shards its own state by block",
        ),
        (
            on(ddp_config, "overlap_param_gather"),
            "DistributedDataParallelConfig.overlap_param_gather=True is only meaningful with "
            "Megatron's distributed optimizer, which ML-FOP-SOAP replaces: set "
            "overlap_param_gather=False and use ML-FOP-SOAP's own overlap "
            "(CommConfig.overlap_param_gather, flag --mlfop-overlap-param-gather)",
        ),
        (
            on(ddp_config, "use_megatron_fsdp") or on(ddp_config, "use_custom_fsdp"),
            "Megatron FSDP (DistributedDataParallelConfig.use_megatron_fsdp) is not supported "
            "by ML-FOP-SOAP: use FoldingDistributedDataParallel with use_megatron_fsdp=False",
        ),
        (
            on(config, "calculate_per_token_loss"),
            "TransformerConfig.calculate_per_token_loss=True is not supported by ML-FOP-SOAP: "
            "its 1/num_tokens scaling runs in finalize_model_grads, after the folding levels "
            "have consumed the gradients; set calculate_per_token_loss=False (mean loss per "
            "micro-batch)",
        ),
        (
            on(config, "enable_cuda_graph")
            or on(config, "external_cuda_graph")
            or getattr(config, "cuda_graph_impl", "none") not in ("none", None),
            "CUDA graphs (TransformerConfig.enable_cuda_graph / cuda_graph_impl / "
            "external_cuda_graph) are not supported by ML-FOP-SOAP: captured backward passes "
            "skip the per-micro-step gradient hooks that end folding levels; set "
            "enable_cuda_graph=False, external_cuda_graph=False, cuda_graph_impl='none'",
        ),
        (
            (getattr(config, "virtual_pipeline_model_parallel_size", None) or 1) > 1,
            "virtual pipeline stages (TransformerConfig.virtual_pipeline_model_parallel_size="
            f"{getattr(config, 'virtual_pipeline_model_parallel_size', None)}) are not supported "
            "by ML-FOP-SOAP; use one model chunk per pipeline stage "
            "(virtual_pipeline_model_parallel_size=None)",
        ),
        (
            on(config, "defer_embedding_wgrad_compute"),
            "TransformerConfig.defer_embedding_wgrad_compute=True computes the output layer's "
            "weight gradient after the last backward pass, when the folding levels and the "
            "Adam reduction have consumed main_grad (its gradient would be lost); set "
            "defer_embedding_wgrad_compute=False",
        ),
        (
            on(config, "delay_wgrad_compute"),
            "TransformerConfig.delay_wgrad_compute=True computes weight gradients after the "
            "backward pass that ends a folding level; set delay_wgrad_compute=False",
        ),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(message)


class FoldingDistributedDataParallel(DistributedDataParallel):
    """Megatron DDP that syncs gradients at every folding level boundary."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._schedule: LevelSchedule | None = None
        self._level_callback: LevelCallback | None = None
        self._segment_callback: SegmentCallback | None = None
        self._extra_syncs: frozenset[int] = frozenset()
        self._micro_step = 0
        self._in_backward = False
        self._window_done = False
        self._seen: set[int] = set()
        self._owner_reduce = False
        self._unfolded: list[tuple[list[torch.nn.Parameter], Any, float]] = []
        self._unfolded_pending: list[tuple[Any, torch.Tensor, list[torch.nn.Parameter]]] = []
        self._folded_ids: set[int] = set()
        # (params, start, finish) of optimizers that reduce their params' grads themselves
        self._taken_over: list[tuple[frozenset[int], Callable[[], None], Callable[[], None]]] = []
        self._taken_over_pending: list[Callable[[], None]] = []
        # Parameter all-gathers in flight after a step (CommConfig.overlap_param_gather).
        self.param_gathers = PendingParamGathers()
        super().__init__(*args, **kwargs)
        check_supported_features(self.config, self.ddp_config)
        self._num_params_with_grad = len({id(p) for p in compat.ddp_params_with_grad(self)})

    # ------------------------------------------------------------- attachment
    def attach_folding(self, schedule: LevelSchedule, callback: LevelCallback) -> None:
        """Called by the ML-FOP-SOAP optimizer: level schedule and per-level fold callback."""
        self._schedule = schedule
        self._level_callback = callback

    def set_extra_sync_points(
        self, points: Iterable[int], callback: SegmentCallback | None = None
    ) -> None:
        """Also reduce the gradients after these micro-steps and call ``callback`` there.

        ``points``: cumulative micro-step counts inside the window that end no level;
        ``callback(micro_steps)`` receives each reduced segment. The optimizer's grad-group
        diagnostics use them so that every reduced segment holds one group. Set before the
        window's first backward; ``points=()`` clears them.
        """
        if self._micro_step and not self._window_done:
            raise RuntimeError("extra sync points must be set before the window starts")
        points = frozenset(int(p) for p in points)
        if points and callback is None:
            raise ValueError("extra sync points need a callback for the reduced segments")
        self._extra_syncs = points
        self._segment_callback = callback if points else None

    def configure_level_reduction(
        self, folded_params: Iterable[torch.nn.Parameter], owner_reduce: bool
    ) -> None:
        """Choose who reduces the gradients (called by the optimizer).

        ``owner_reduce`` True makes the optimizer reduce the ``folded_params``' level sums
        itself and this DDP all-reduce every other param's gradient once per window; False
        keeps Megatron's buckets reducing all at each level. A new optimizer configures the
        reduction afresh: earlier ``take_over_grad_sync`` registrations are dropped.
        """
        self.wait_unfolded_grad_sync()  # nothing of a previous optimizer left in flight
        self._folded_ids = {id(p) for p in folded_params}
        self._owner_reduce = owner_reduce
        self._taken_over = []
        self._build_unfolded()

    def take_over_grad_sync(
        self,
        params: Iterable[torch.nn.Parameter],
        start: Callable[[], None],
        finish: Callable[[], None],
    ) -> None:
        """Let an optimizer reduce these non-folded params' grads itself (ZeRO-1 reduce-scatter).

        They leave the once-per-window all-reduce; ``start()`` runs where it would be launched
        (the window's last micro-step has all its gradients), ``finish()`` where it would be
        waited. Only with owner reduction (Megatron's buckets reduce everything otherwise).
        """
        if not self._owner_reduce:
            raise RuntimeError(
                "take_over_grad_sync needs CommConfig(level_reduce='reduce_scatter'): with "
                "'all_reduce' Megatron's buckets reduce every gradient at every level"
            )
        self._taken_over.append((frozenset(id(p) for p in params), start, finish))
        self._build_unfolded()

    def _build_unfolded(self) -> None:
        """Per Megatron buffer, the params this DDP all-reduces once per window."""
        self._unfolded = []
        if not self._owner_reduce:
            return
        skip = set(self._folded_ids).union(*(ids for ids, _, _ in self._taken_over))
        order = {id(p): i for i, p in enumerate(self.module.parameters())}
        for buffer in compat.ddp_buffers(self):
            params = sorted(
                (p for p in buffer.params if id(p) not in skip), key=lambda p: order[id(p)]
            )
            if params:
                self._unfolded.append((params, *self._buffer_reduction(buffer)))

    def _buffer_reduction(self, buffer: Any) -> tuple[Any, float]:
        """(group, pre-scaling) that turn a Megatron buffer's grad sums into the DP mean."""
        group = buffer.data_parallel_group
        scaling = buffer.gradient_scaling_factor
        if getattr(self.ddp_config, "average_in_collective", False):
            scaling = scaling / group.size()  # SUM of pre-scaled grads = Megatron's AVG
        return group, scaling

    def grad_reduction(self, param: torch.nn.Parameter) -> tuple[Any, float]:
        """(data-parallel group, pre-scaling factor) Megatron would reduce ``param``'s grad with.

        A SUM over the group of the scaled sums is the mean Megatron produces.
        """
        for buffer in compat.ddp_buffers(self):
            if any(p is param for p in buffer.params):
                return self._buffer_reduction(buffer)
        raise ValueError("param is not registered with this DDP's gradient buffers")

    @property
    def owner_reduce(self) -> bool:
        """Whether the optimizer reduces the folded params' level sums (see module)."""
        return self._owner_reduce

    def _start_unfolded_sync(self) -> None:
        """One asynchronous all-reduce per Megatron buffer of the non-folded params' grads."""
        for params, group, scaling in self._unfolded:
            flat = torch.cat([compat.main_grad(p).reshape(-1) for p in params])
            if scaling != 1.0:
                flat.mul_(scaling)
            work = None
            if group.size() > 1:
                work = torch.distributed.all_reduce(flat, group=group, async_op=True)
            self._unfolded_pending.append((work, flat, params))
        for _, start, finish in self._taken_over:
            start()
            self._taken_over_pending.append(finish)

    def wait_unfolded_grad_sync(self) -> None:
        """Finish the non-folded params' reductions (all-reduce, or an optimizer's own)."""
        taken_over, self._taken_over_pending = self._taken_over_pending, []
        for finish in taken_over:
            finish()
        pending, self._unfolded_pending = self._unfolded_pending, []
        for work, flat, params in pending:
            if work is not None:
                work.wait()
            offset = 0
            for p in params:
                grad = compat.main_grad(p)
                n = grad.numel()
                grad.copy_(flat[offset : offset + n].view_as(grad))
                offset += n

    @property
    def folding_attached(self) -> bool:
        """Whether the optimizer attached its level schedule and fold callback."""
        return self._level_callback is not None

    # ---------------------------------------------------------------- hooks
    def _make_backward_post_hook(self, param: torch.nn.Parameter):  # noqa: D102
        megatron_hook = super()._make_backward_post_hook(param)

        def hook(*unused: Any) -> None:
            if self._level_callback is None:
                megatron_hook(*unused)
                return
            if not self._in_backward:
                self._begin_micro_step()
            if id(param) in self._seen:
                self._param_reported_twice(param)
            self._seen.add(id(param))
            megatron_hook(*unused)
            if len(self._seen) == self._num_params_with_grad:
                self._end_micro_step()

        return hook

    def _begin_micro_step(self) -> None:
        """First grad of a backward pass: mark whether this micro-step ends a level."""
        self._in_backward = True
        schedule = self._schedule
        assert schedule is not None  # set with the level callback (attach_folding)
        if self._window_done:
            raise RuntimeError(
                "a backward pass ran after the accumulation window was complete: the schedule "
                f"ran more micro-batches than accumulation_steps={schedule.boundaries[-1]}"
                "; set FoldingConfig.accumulation_steps to the schedule's num_microbatches"
            )
        boundary = schedule.level_ending_at(self._micro_step + 1) is not None
        boundary = boundary or (self._micro_step + 1) in self._extra_syncs
        boundary = boundary and not self._owner_reduce  # Megatron's buckets stay idle then
        for group in compat.ddp_bucket_groups(self):
            group.is_last_microbatch = boundary

    def _end_micro_step(self) -> None:
        """Every param got its gradient: at a level boundary, reduce and hand the level over.

        The micro-step ends when the last param reports, not when the backward pass that
        started it finishes: with activation recompute the first grad of a stage can arrive in
        a nested (recompute) backward, whose end is not the end of the micro-step.
        """
        self._in_backward = False
        self._micro_step += 1
        self._seen.clear()
        schedule, level_callback = self._schedule, self._level_callback
        assert schedule is not None and level_callback is not None  # see attach_folding
        level = schedule.level_ending_at(self._micro_step)
        if level is None and self._micro_step not in self._extra_syncs:
            return
        if not self._owner_reduce:
            super().finish_grad_sync()
            for group in compat.ddp_bucket_groups(self):
                group.reset()
        if level is None:
            assert self._segment_callback is not None  # set with the extra sync points
            self._segment_callback(self._micro_step)
            return
        level_callback(level, schedule.level_size(level))
        if level == schedule.num_levels - 1:
            self._window_done = True
            if self._owner_reduce:
                self._start_unfolded_sync()

    def _missing_params_error(self, micro_step: int) -> RuntimeError:
        """A param without a gradient would silently fold zeros into its level mean."""
        missing = [p for p in compat.ddp_params_with_grad(self) if id(p) not in self._seen]
        names = {id(p): n for n, p in self.module.named_parameters()}
        return RuntimeError(
            f"parameter {names.get(id(missing[0]), '?')} (and {len(missing) - 1} more) "
            f"received no gradient in micro-step {micro_step}; every trainable "
            "parameter must get a gradient each micro-step (set requires_grad=False to "
            "freeze it)"
        )

    def _param_reported_twice(self, param: torch.nn.Parameter) -> None:
        """A second grad for a param before all others reported: some param got none."""
        error = self._missing_params_error(self._micro_step + 1)
        self._seen.clear()
        raise error

    # ------------------------------------------------- schedule entry points
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Sync points are chosen per micro-step by the level schedule, not by the schedule."""
        if self._level_callback is None:
            with super().no_sync():
                yield
        else:
            yield

    def start_grad_sync(self, *unused: Any) -> None:
        """Megatron's sync without folding; a no-op with folding (levels sync themselves)."""
        if self._level_callback is None:
            super().start_grad_sync(*unused)

    def finish_grad_sync(self, force_all_reduce: bool | None = False) -> None:
        """With folding attached the reductions already happened at the level boundaries."""
        if self._level_callback is None:
            super().finish_grad_sync(force_all_reduce=force_all_reduce)
            return
        if self._seen:
            error = self._missing_params_error(self._micro_step + 1)
            self._seen.clear()
            raise error
        if not self._window_done:
            assert self._schedule is not None  # set with the level callback (attach_folding)
            raise RuntimeError(
                f"gradient sync requested after {self._micro_step} micro-steps, but folding "
                f"expects accumulation_steps={self._schedule.boundaries[-1]}; set "
                "FoldingConfig.accumulation_steps to the schedule's num_microbatches"
            )
        self.wait_unfolded_grad_sync()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The module's state dict, after any parameter all-gather in flight."""
        self.param_gathers.finish_all()
        return super().state_dict(*args, **kwargs)

    def state_dict_for_save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The module's checkpoint state dict, after any parameter all-gather in flight."""
        self.param_gathers.finish_all()
        return super().state_dict_for_save_checkpoint(*args, **kwargs)

    def sharded_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The module's sharded state dict, after any parameter all-gather in flight."""
        self.param_gathers.finish_all()
        return super().sharded_state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Load into the module once no parameter all-gather can overwrite it."""
        self.param_gathers.finish_all()
        return super().load_state_dict(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        """Finish any pending sync, zero Megatron's buffers and restart the window."""
        self.wait_unfolded_grad_sync()  # never leave a collective behind (e.g. skipped step)
        super().zero_grad_buffer()
        self._micro_step = 0
        self._in_backward = False
        self._window_done = False
        self._seen.clear()
