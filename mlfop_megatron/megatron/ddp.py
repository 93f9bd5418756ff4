"""Megatron DistributedDataParallel whose level boundaries are gradient sync points.

Megatron's DDP reduces the gradient buckets once, after the last micro-batch. For multi-level
folding every level boundary L_j must be a sync point: at the end of the backward pass of
micro-step L_j the buckets are all-reduced (Megatron's own bucket machinery, with overlap when
``overlap_grad_reduce`` is on) and a callback hands the reduced level gradients to the
optimizer, which folds them and zeroes the folded params' slices of ``main_grad``.

Params that are not folded (those handled by Adam) keep accumulating in ``main_grad``: each
sync averages over the data-parallel group, and averaging a value that is already equal on all
ranks leaves it unchanged, so their final ``main_grad`` is the ordinary DP mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel

from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.megatron import compat

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
            "overlap_param_gather=False",
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
        """Also reduce the gradients after these micro-steps (cumulative counts inside the
        window that end no level) and call ``callback(micro_steps)`` there; the optimizer's
        grad-group diagnostics use them so that every reduced segment holds one group. Set
        before the window's first backward; ``points=()`` clears them.
        """
        if self._micro_step and not self._window_done:
            raise RuntimeError("extra sync points must be set before the window starts")
        points = frozenset(int(p) for p in points)
        if points and callback is None:
            raise ValueError("extra sync points need a callback for the reduced segments")
        self._extra_syncs = points
        self._segment_callback = callback if points else None

    @property
    def folding_attached(self) -> bool:
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
        if self._window_done:
            raise RuntimeError(
                "a backward pass ran after the accumulation window was complete: the schedule "
                f"ran more micro-batches than accumulation_steps={self._schedule.boundaries[-1]}"
                "; set FoldingConfig.accumulation_steps to the schedule's num_microbatches"
            )
        boundary = self._schedule.level_ending_at(self._micro_step + 1) is not None
        boundary = boundary or (self._micro_step + 1) in self._extra_syncs
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
        level = self._schedule.level_ending_at(self._micro_step)
        if level is None and self._micro_step not in self._extra_syncs:
            return
        super().finish_grad_sync()
        for group in compat.ddp_bucket_groups(self):
            group.reset()
        if level is None:
            self._segment_callback(self._micro_step)
            return
        self._level_callback(level, self._schedule.level_size(level))
        if level == self._schedule.num_levels - 1:
            self._window_done = True

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
            raise RuntimeError(
                f"gradient sync requested after {self._micro_step} micro-steps, but folding "
                f"expects accumulation_steps={self._schedule.boundaries[-1]}; set "
                "FoldingConfig.accumulation_steps to the schedule's num_microbatches"
            )

    def zero_grad_buffer(self) -> None:
        super().zero_grad_buffer()
        self._micro_step = 0
        self._in_backward = False
        self._window_done = False
        self._seen.clear()
