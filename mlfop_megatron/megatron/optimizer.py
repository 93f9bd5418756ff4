"""ML-FOP-SOAP as a Megatron-core optimizer, chained with Megatron's Adam for non-matrix params.

``MLFOPMegatronOptimizer`` owns the SOAP matrices of one pipeline stage; their state is sharded
over the data-parallel group by block (``ShardedSOAP``). At each level boundary
``FoldingDistributedDataParallel`` calls ``reduce_and_fold_level``; with ``CommConfig.level_reduce=
"reduce_scatter"`` (default) this packs the SOAP params' level sums into one owner-ordered
buffer per data-parallel group and starts its asynchronous reduce-scatter (``LevelReducer``; in
``CommConfig.level_buckets`` buckets, at most two send buffers alive at once), then zeroes
their ``main_grad`` so the next micro-step can start. The reduction (with more than two
buckets, its last two) overlaps the next micro-steps' forward and backward; it is waited and
folded at the next level boundary
(before that level's reduction starts) or, for the last level, in ``prepare_grads``.
``MLFOPChainedOptimizer.step`` keeps Megatron's contract, (success, grad_norm, num_zeros), with
the inf/NaN check and the gradient norm reduced over every rank that holds a piece of the
model, so a skipped step is skipped everywhere and clipping uses the true global norm. Each
rank adds the squares of what it holds once over the group: its owned SOAP blocks' folded
gradients and, with ZeRO-1 Adam grads reduce-scattered, its own Adam slices (without the
padding); replicated Adam grads are counted by DP rank 0. With
``CommConfig.overlap_param_gather`` the step leaves its parameter all-gathers in flight (see
``megatron/param_gather.py``); ``finish_param_sync`` waits for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer, OptimizerConfig

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core.diagnostics import (
    DiagLayout,
    check_groups,
    segment_ends,
    summarize_grad_diagnostics,
)
from mlfop_megatron.core.folding import (
    EXTREMES_WIDTH,
    TOTALS_WIDTH,
    empty_extremes,
    empty_totals,
    folded_blocks,
    summarize_fold,
)
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.core.linalg import LinalgCounters
from mlfop_megatron.core.norms import sum_of_squares
from mlfop_megatron.core.precision import fp32_matmuls
from mlfop_megatron.distributed.comm_config import CommConfig
from mlfop_megatron.distributed.engine import (
    EngineGroups,
    ParallelGroups,
    SOAPEngine,
    make_engine,
)
from mlfop_megatron.distributed.fold_stream import FoldStream
from mlfop_megatron.distributed.owner_buffer import FlatAllReduce, LevelReducer
from mlfop_megatron.distributed.sharded_soap import PHASES, ShardedSOAP
from mlfop_megatron.distributed.tp_full import TensorParallelFullSOAP, TPFullReducer
from mlfop_megatron.megatron import compat, fused_kernels
from mlfop_megatron.megatron.fp8 import QuantizedParamShadows


def megatron_parallel_groups() -> ParallelGroups:
    """The engines' process groups, read once from megatron.core.parallel_state.

    Dense params are replicated over data x context parallel ranks (Megatron's DDP reduces
    over that group) and owned over TP x DP x CP in tp_mode="full"; expert params over the
    expert-data-parallel group, split over the expert-tensor-parallel group (no full mode).
    """
    ps = parallel_state
    expert_tp = ps.get_expert_tensor_parallel_world_size() > 1
    dense_tp = ps.get_tensor_model_parallel_world_size() > 1
    return ParallelGroups(
        dense=EngineGroups(
            dp=ps.get_data_parallel_group(with_context_parallel=True),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            tp=ps.get_tensor_model_parallel_group() if dense_tp else None,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_dp=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        ),
        expert=EngineGroups(
            dp=ps.get_expert_data_parallel_group(),
            dp_rank=ps.get_expert_data_parallel_rank(),
            tp=ps.get_expert_tensor_parallel_group() if expert_tp else None,
            tp_rank=ps.get_expert_tensor_parallel_rank(),
        ),
    )


def grad_norm_groups() -> tuple[str | None, ...]:
    """The step's grad-norm groups: None (the main norm), then each clipped apart."""
    return (None, *compat.separate_grad_norm_groups())


def grad_stats_bytes() -> int:
    """Bytes of the step's all-reduced fp64 vector: norm^2 per grad-norm group, then found-inf."""
    return 8 * (len(grad_norm_groups()) + 1)


def _fold_inputs(blocks: Sequence[torch.Tensor], engine: SOAPEngine) -> list[torch.Tensor]:
    """What a level's fold on a side stream reads: its blocks and the engine's earlier tensors."""
    return [*blocks, *engine.fold_reads()]


class _ParamGroups(torch.optim.Optimizer):
    """Holds param_groups (lr, weight_decay) for Megatron's LR scheduler; state is elsewhere."""

    def step(self, closure: Any = None) -> NoReturn:  # pragma: no cover - never called
        raise RuntimeError("stepped through MLFOPMegatronOptimizer, not directly")


class MLFOPMegatronOptimizer(MegatronOptimizer):
    """SOAP + multi-level FOP folding for the matrix params of one pipeline stage."""

    def __init__(
        self,
        config: OptimizerConfig,
        mlfop_config: MLFOPConfig,
        model_chunks: list[Any],
        params: list[torch.nn.Parameter],
        names: list[str],
        sharded: bool = True,
        block_size: int | None = None,
        tp_mode: str = "blockwise",
        comm: CommConfig | None = None,
        groups: ParallelGroups | None = None,
    ) -> None:
        from mlfop_megatron.megatron.param_groups import megatron_group_fields

        self.soap_param_names = list(names)  # canonical names of the params SOAP steps
        self.comm = comm or CommConfig()
        groups = groups or megatron_parallel_groups()
        group = {"params": params, "lr": config.lr, "weight_decay": config.weight_decay}
        holder = _ParamGroups([dict(group, **megatron_group_fields(config, 1.0))], {})
        super().__init__(holder, config)
        self.is_stub_optimizer = False  # Megatron's param_groups property reads this
        self.model_chunks = model_chunks
        # Device of the reduced scalars: the params' (CUDA on GPU runs, where NCCL cannot
        # reduce CPU tensors; CPU with gloo).
        self.device = params[0].device
        self.mlfop_config = mlfop_config
        self.schedule = LevelSchedule.from_config(mlfop_config.folding)
        self.sharded = sharded
        split = [getattr(p, "tensor_model_parallel", False) for p in params]
        expert = [not getattr(p, "allreduce", True) for p in params]
        # Separately normed and clipped groups (0.19: MTP) get engines of their own.
        norm_group = [compat.grad_norm_group_of(p) for p in params]
        self.norm_groups: tuple[str | None, ...] = (
            None,
            *sorted({g for g in norm_group if g is not None}),
        )
        # FP8 primary weights: the engines see high-precision shadows (fp32 main weights on the
        # owners), requantized into the model params after each step (see megatron/fp8.py).
        self.fp8 = QuantizedParamShadows(params, group=groups.dense.dp)
        engine_params = self.fp8.substitute(params)
        self.engines: list[SOAPEngine] = []
        # Whether an engine's gradients count towards the global norm on this rank: every
        # gradient must be counted exactly once over DP x CP x TP x PP (expert params: once
        # over expert-DP x EP x expert-TP x PP).
        self._engine_counts: list[bool] = []
        self._engine_norm_groups: list[str | None] = []  # each engine's grad-norm group
        # Whether an engine's per-block diagnostic rows count on this rank: like the norm, but a
        # TP-sharded block in blockwise mode is one block whose rows are already summed over
        # its TP shards (every TP rank holds the same rows), so only TP rank 0 counts it.
        self._diag_counts: list[bool] = []
        layouts = ((False, True), (False, False), (True, True), (True, False))
        kinds = [(e, t, group) for e, t in layouts for group in self.norm_groups]
        for is_expert, tp_sharded, kind_group in kinds:
            chosen = [
                (p, n)
                for p, n, s, e, g in zip(engine_params, names, split, expert, norm_group)
                if s == tp_sharded and e == is_expert and g == kind_group
            ]
            if not chosen:
                continue
            ps, ns = [p for p, _ in chosen], [n for _, n in chosen]
            g = groups.of(is_expert)
            engine = make_engine(
                ps,
                ns,
                mlfop_config,
                g,
                tp_sharded=tp_sharded,
                sharded=sharded,
                tp_mode=tp_mode,
                block_size=block_size,
                master_params=[i for i, p in enumerate(ps) if self.fp8.is_shadow(p)],
                param_sync=self.comm.param_sync,
                segments=self.comm.segments,
            )
            if isinstance(engine, TensorParallelFullSOAP):
                counts = sharded or (g.dp_rank == 0 and g.tp_rank == 0)
            else:
                counts = (sharded or g.dp_rank == 0) and (tp_sharded or g.tp_rank == 0)
            self.engines.append(engine)
            self._engine_counts.append(counts)
            self._engine_norm_groups.append(kind_group)
            full = isinstance(engine, TensorParallelFullSOAP)
            self._diag_counts.append(counts and (full or g.tp_rank == 0))
        self.fp8.release()  # shadows hold storage only during a step
        self._build_reducers()
        self._folds = FoldStream(self.device, self.comm.fold_stream)
        self._param_gathers = None
        if self.comm.overlap_param_gather:
            chunk = model_chunks[0]
            self._param_gathers = chunk.param_gathers
            chunk.param_gathers.install(chunk.module)
            for engine in self.engines:
                # TP-full engines write TP shards back after their gather and FP8 params are
                # requantized from the gathered shadows: those gather within the step.
                full = isinstance(engine, TensorParallelFullSOAP)
                if not full and not len(self.fp8) and isinstance(engine, ShardedSOAP):
                    engine.defer_param_sync = True
        self._grad_scales: dict[str | None, float] = {}  # clipping factor per grad-norm group
        self.last_grad_scales: dict[str | None, float] = {}  # those the last step applied
        self.skipped_steps = 0
        # Megatron-LM multiplies the loss by this (on the loss's device) before backward.
        self._loss_scale = torch.ones(1, dtype=torch.float32, device=self.device)
        # Grad-group diagnostics: armed for the next window, and those of the last step.
        self._armed_groups: tuple[int, ...] | None = None
        self._armed_segments = 0
        self._diag_window: tuple[tuple[int, ...], int] | None = None

    # ------------------------------------------------------------ level reductions
    def _model_grads(self, engine: Any) -> list[torch.Tensor]:
        """main_grad of the model params behind an engine's params (FP8: the quantized ones)."""
        return [compat.main_grad(self.fp8.model_param(p)) for p in engine.grad_params]

    def _build_reducers(self) -> None:
        """Build one LevelReducer per data-parallel group over the ShardedSOAP engines.

        Their blocks go in one owner-ordered buffer; TP-full engines owned over TP x DP get a
        TPFullReducer each (DP reduce-scatter of shard pieces, TP all-to-all to the owners);
        replicated TP-full engines all-reduce their shards over DP and gather over TP.
        """
        chunk = self.model_chunks[0]
        self._reducers: list[tuple[LevelReducer, list[int]]] = []
        self._shard_reducers: list[tuple[FlatAllReduce, int]] = []
        self._tp_reducers: list[tuple[TPFullReducer, int]] = []
        self._pending: tuple[str, int, float] | None = None
        owner_reduce = self.comm.owner_reduce
        folded = [self.fp8.model_param(p) for e in self.engines for p in e.grad_params]
        chunk.configure_level_reduction(folded, owner_reduce)
        if not owner_reduce:
            return
        wire = torch.bfloat16 if self.comm.grad_wire_dtype == "bf16" else torch.float32
        by_group: dict[int, tuple[Any, float, list[int]]] = {}
        for i, engine in enumerate(self.engines):
            reductions = {chunk.grad_reduction(self.fp8.model_param(p)) for p in engine.grad_params}
            if len(reductions) != 1:
                raise ValueError(
                    "an ML-FOP-SOAP engine's params are reduced over different data-parallel "
                    "groups or scalings; keep expert and dense params in separate engines"
                )
            group, scaling = reductions.pop()
            if isinstance(engine, TensorParallelFullSOAP):
                if engine.world_size > 1:  # owned over TP x DP: each owner gets its blocks
                    tp_reducer = TPFullReducer(
                        engine, group, scaling, wire, buckets=self.comm.level_buckets
                    )
                    self._tp_reducers.append((tp_reducer, i))
                else:
                    self._shard_reducers.append((FlatAllReduce(group, scaling), i))
                continue
            key = id(group)
            if key in by_group and by_group[key][1] != scaling:
                raise ValueError("params of one data-parallel group have different scalings")
            by_group.setdefault(key, (group, scaling, []))[2].append(i)
        for group, scaling, members in by_group.values():
            engines = [self.engines[i] for i in members]
            owner_world = engines[0].world_size
            if any(e.world_size != owner_world for e in engines):
                raise ValueError("engines of one data-parallel group mix sharded and replicated")
            reducer = LevelReducer(
                [e.assignment for e in engines],
                owner_world,
                group,
                scaling,
                wire_dtype=wire,
                segments=self.comm.segments,
                buckets=self.comm.level_buckets,
            )
            self._reducers.append((reducer, members))

    def _launch_reductions(self, kind: str, index: int, scale: float) -> None:
        """Pack and start the reductions of the level (or segment) that just ended.

        Then zero the folded params' main_grad: the next micro-step accumulates onto zero.
        """
        for reducer, members in self._reducers:
            reducer.launch([self._model_grads(self.engines[i]) for i in members])
        for shard_reducer, i in self._shard_reducers:
            shard_reducer.launch(self._model_grads(self.engines[i]))
        for tp_reducer, i in self._tp_reducers:
            tp_reducer.launch(self._model_grads(self.engines[i]))
        for engine in self.engines:
            fused_kernels.zero_(self._model_grads(engine))
        self._pending = (kind, index, scale)

    def _complete_reductions(self) -> None:
        """Wait for the reductions in flight and fold (or add) them on their owners."""
        if self._pending is None:
            return
        kind, index, scale = self._pending
        self._pending = None
        if kind != "level":  # a diagnostics segment shares state with the folds: in order
            self._folds.join()
        for reducer, members in self._reducers:
            start = time.perf_counter()
            owned = reducer.wait()
            self.engines[members[0]].timings["communication"] += time.perf_counter() - start
            for i, blocks in zip(members, owned):
                if kind == "level":
                    # the engine empties ``blocks`` once copied: the segment is freed then
                    fold = partial(self.engines[i].fold_owned_level, index, blocks, scale=scale)
                    self._folds.run(fold, partial(_fold_inputs, blocks, self.engines[i]))
                else:
                    self.engines[i].add_owned_segment(blocks, index, scale)
        for shard_reducer, i in self._shard_reducers:
            start = time.perf_counter()
            shards = shard_reducer.wait()
            self.engines[i].timings["communication"] += time.perf_counter() - start
            if kind == "level":
                self.engines[i].fold_reduced_level(index, shards, scale=scale)
            else:
                self.engines[i].add_reduced_segment(shards, index, scale)
        for tp_reducer, i in self._tp_reducers:
            start = time.perf_counter()
            blocks = tp_reducer.wait()
            self.engines[i].timings["communication"] += time.perf_counter() - start
            if kind == "level":
                fold = partial(self.engines[i].fold_owned_level, index, blocks, scale=scale)
                self._folds.run(fold, partial(_fold_inputs, blocks, self.engines[i]))
            else:
                self.engines[i].add_owned_segment(blocks, index, scale)

    def padding_per_rank(self) -> dict[str, list[int]]:
        """Padding elements per rank of the owner-ordered buffers.

        Each level reduce-scatter buffer ("grads/<n>") and each engine's parameter all-gather
        buffer ("params/<n>").
        """
        out = {f"grads/{n}": r.padding_per_rank() for n, (r, _) in enumerate(self._reducers)}
        for n, engine in enumerate(self.engines):
            out[f"params/{n}"] = engine.param_padding_per_rank()
        return out

    def communication_bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends per step (ring algorithms, padding included), by kind.

        Level reductions of the SOAP grads, the all-reduce of the Adam grads the DDP reduces
        (not the ZeRO-1 reduce-scatter: see ``MLFOPChainedOptimizer``), the parameter sync
        and the TP-full gathers; "total" sums them. Diagnostics segments are not counted.
        """
        levels = self.schedule.num_levels
        out = {"soap_grads": 0, "adam_grads": 0, "params": 0, "tp_full": 0}
        chunk = self.model_chunks[0]
        if self.comm.owner_reduce:
            out["soap_grads"] = levels * sum(r.bytes_per_reduction() for r, _ in self._reducers)
            for reducer, i in self._shard_reducers:
                numel = sum(p.numel() for p in self.engines[i].grad_params)
                out["soap_grads"] += levels * reducer.bytes_per_reduction(numel)
            for tp_reducer, _ in self._tp_reducers:
                out["soap_grads"] += levels * tp_reducer.dp_bytes_per_reduction()
                out["tp_full"] += levels * tp_reducer.tp_bytes_per_reduction()
            for params, group, _ in chunk._unfolded:
                n = group.size()
                numel = sum(p.numel() for p in params)
                out["adam_grads"] += 2 * (n - 1) * numel * 4 // n if n > 1 else 0
        else:  # Megatron's buckets: ring all-reduce of every buffer at every level
            for buffer in compat.ddp_buffers(chunk):
                n = buffer.data_parallel_group.size()
                size = buffer.grad_data.numel() * buffer.grad_data.element_size()
                out["soap_grads"] += levels * (2 * (n - 1) * size // n if n > 1 else 0)
        for engine in self.engines:
            out["params"] += engine.communication_bytes_per_step()
            owner_reduced = any(self.engines[i] is engine for _, i in self._tp_reducers)
            if isinstance(engine, TensorParallelFullSOAP) and not owner_reduced:
                tp = dist.get_world_size(engine.tp_group)
                numel = sum(p.numel() for p in engine.shards)
                out["tp_full"] += levels * (tp - 1) * numel * 4
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------ folding hook
    @torch.no_grad()
    @fp32_matmuls()
    def reduce_and_fold_level(self, level: int, level_size: int) -> None:
        """DDP callback at a level boundary: reduce the level's sums and fold the level mean.

        With owner reduction: start the reduce-scatter now, fold it at the next boundary or
        in prepare_grads. Then clear the folded grads.
        """
        scale = self.schedule.accumulation_steps / level_size
        if self.comm.owner_reduce:
            self._complete_reductions()
            self._launch_reductions("level", level, scale)
            return
        for engine in self.engines:
            grads = [compat.main_grad(self.fp8.model_param(p)) for p in engine.grad_params]
            engine.fold_reduced_level(level, grads, scale=scale)
            # The next level accumulates onto zero: at its boundary main_grad is its own sum
            # (also with TE's fused wgrad accumulation into main_grad; see megatron/fp8.py).
            fused_kernels.zero_(grads)

    @torch.no_grad()
    @fp32_matmuls()
    def reduce_segment(self, micro_steps: int) -> None:
        """DDP callback at an extra (diagnostics) sync point: hand the reduced segment over."""
        k = self.schedule.accumulation_steps
        if self.comm.owner_reduce:
            self._complete_reductions()
            self._launch_reductions("segment", micro_steps, float(k))
            return
        for engine in self.engines:
            grads = [compat.main_grad(self.fp8.model_param(p)) for p in engine.grad_params]
            engine.add_reduced_segment(grads, micro_steps, scale=k)  # main_grad is the sum / K
            fused_kernels.zero_(grads)

    def request_grad_diagnostics(self, groups: Sequence[int] | None = None) -> None:
        """Compute the grad-group diagnostics of the next window.

        Call on every rank with the same ``groups``, before its first backward; ``stats()``
        after the step reports them.

        ``groups``: the group id (0, 1, ...) of every micro-batch of the window in schedule
        order, e.g. 0 for image micro-batches and 1 for text ones; None: one group. A segment
        reduced over DP must hold one group, so the DDP also syncs where the group changes
        inside a level and in the middle of a group that would be a single segment (the noise
        scale needs two): one extra gradient all-reduce per group change inside a level plus
        at most one per group, only in armed windows (by-modality halves at K=4: tree 0,
        chain 1, last 2, folding off 3).
        """
        k = self.schedule.accumulation_steps
        groups = check_groups([0] * k if groups is None else list(groups), k)
        ends = segment_ends(self.schedule.boundaries, groups)
        extra = sorted(set(ends) - set(self.schedule.boundaries))
        for engine in self.engines:
            engine.arm_grad_diagnostics(groups)
        for chunk in self.model_chunks:
            chunk.set_extra_sync_points(extra, self.reduce_segment)
        self._armed_groups = groups
        self._armed_segments = len(ends)

    def _end_window(self, stepped: bool) -> None:
        """Window finished (stepped or skipped): diagnostics of the stepped one, sync points off."""
        if self._armed_groups is not None:
            for chunk in self.model_chunks:
                chunk.set_extra_sync_points(())
        groups = self._armed_groups
        self._diag_window = (
            (groups, self._armed_segments) if groups is not None and stepped else None
        )
        self._armed_groups = None

    # --------------------------------------------------------------- grad stats
    def local_grad_sums(self) -> tuple[dict[str | None, torch.Tensor], torch.Tensor]:
        """Sum of squares of this rank's share of the folded gradients per grad-norm group.

        Keys: None (the main norm) and each separately clipped group of these params; with the
        non-finite flag over all of them.
        """
        sums = {
            g: torch.zeros((), dtype=torch.float64, device=self.device) for g in self.norm_groups
        }
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for engine, counts, group in zip(
            self.engines, self._engine_counts, self._engine_norm_groups
        ):
            s, b = engine.local_grad_stats()
            bad = bad | b.to(self.device)
            if counts:
                sums[group] = sums[group] + s.to(self.device)
        return sums, bad

    def local_grad_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squares, non-finite flag) of this rank's share of the main-norm gradients."""
        sums, bad = self.local_grad_sums()
        return sums[None], bad

    def get_grad_stats_parallel_group(self) -> dist.ProcessGroup | None:
        """The group the grad stats are reduced over: every rank (WORLD)."""
        return dist.group.WORLD

    def get_grad_norm(self) -> float:
        """Global norm of the folded gradients (a collective)."""
        sq, _ = self.local_grad_stats()
        dist.all_reduce(sq)
        return math.sqrt(float(sq))

    def count_zeros(self) -> float:
        """Zero elements of the folded gradients over every rank (a collective)."""
        zeros = torch.zeros((), dtype=torch.float64, device=self.device)
        for engine, counts in zip(self.engines, self._engine_counts):
            if counts:
                grads, _ = engine.window_gradients()
                for g in grads:
                    zeros += (g == 0).sum().to(self.device)
        dist.all_reduce(zeros)
        return float(zeros)

    def set_grad_scale(self, scale: float, group: str | None = None) -> None:
        """Clipping factor of one grad-norm group's folded gradients in the next step."""
        self._grad_scales[group] = scale

    # ------------------------------------------------------------------ steps
    @fp32_matmuls()
    def prepare_grads(self) -> bool:
        """Finish the pending reductions and check the window is folded.

        Returns:
            False: the inf check is global, in ``MLFOPChainedOptimizer.step``.
        """
        self.finish_param_sync()  # a step without a forward since the last one
        self._complete_reductions()
        self._folds.join()  # the step reads the folded window
        for chunk in self.model_chunks:  # the Adam params' once-per-step all-reduce
            chunk.wait_unfolded_grad_sync()
        for engine in self.engines:
            if not engine.has_window():
                raise RuntimeError(
                    "no folded gradients for this step: wrap the model with "
                    "FoldingDistributedDataParallel and run num_microbatches == "
                    f"accumulation_steps={self.schedule.accumulation_steps} micro-batches"
                )
        return False

    @fp32_matmuls()
    def step_with_ready_grads(self) -> bool:
        """Step every engine with the folded gradients (and the clipping factor)."""
        group = self.optimizer.param_groups[0]  # earlier gathers: waited in prepare_grads
        if len(self.fp8):
            self.fp8.materialize()
        for engine, norm_group in zip(self.engines, self._engine_norm_groups):
            scale = self._grad_scales.get(norm_group, 1.0)
            engine.step(group["lr"], group["weight_decay"], grad_scale=scale)
            if isinstance(engine, ShardedSOAP) and engine.pending_param_sync is not None:
                assert self._param_gathers is not None  # deferred only with overlap on
                finish, engine.pending_param_sync = engine.pending_param_sync, None
                self._param_gathers.add([self.fp8.model_param(p) for p in engine.params], finish)
        if len(self.fp8):
            self.fp8.commit()  # every DP rank requantizes from identical values
        self.last_grad_scales, self._grad_scales = self._grad_scales, {}
        self._end_window(stepped=True)
        return True

    @fp32_matmuls()
    def discard_step(self) -> None:
        """Skip the step (non-finite gradients): drop the folded windows."""
        self._complete_reductions()
        self._folds.join()
        for engine in self.engines:
            engine.discard_window()
        self.skipped_steps += 1
        self._end_window(stepped=False)

    def step(self):
        """A full step through the chained optimizer's contract (norm, inf check, clipping)."""
        return MLFOPChainedOptimizer([self]).step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the params' ``.grad`` (the folded gradients come from ``main_grad``)."""
        for p in self.get_parameters():
            p.grad = None

    def get_loss_scale(self) -> torch.Tensor:
        """1 (no loss scaling: fp32/bf16), on the params' device like the loss it scales."""
        return self._loss_scale

    def reload_model_params(self, state_dict: Any = None) -> None:
        """Model params are the fp32 master params here; nothing to copy (gathers finish)."""
        self.finish_param_sync()

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers the last step left in flight (no-op if none)."""
        if self._param_gathers is not None:
            self._param_gathers.finish_all()

    # ------------------------------------------------------------ checkpoints
    def state_bytes(self) -> int:
        """Bytes of SOAP state held on this rank."""
        return sum(e.state_bytes() for e in self.engines)

    def state_dict(self) -> dict[str, Any]:
        """The engines' states, the param groups' hyperparameters and the skipped steps."""
        self.finish_param_sync()
        return {
            "engines": [e.state_dict() for e in self.engines],
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ],
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() or a dist_checkpointing-loaded sharded_state_dict()."""
        from mlfop_megatron.megatron.checkpointing import scalars_from_loaded

        self.finish_param_sync()
        engines = self._saved_engines_in_order(state_dict["engines"])
        # A dist_checkpointing load carries the world totals of the counters (common state):
        # rank 0's first engine takes them, so the stats' sum over ranks carries on.
        totals = state_dict.get("counters")
        for i, (engine, saved) in enumerate(zip(self.engines, engines)):
            blocks = {
                name: scalars_from_loaded(entry) if torch.is_tensor(entry["step"]) else entry
                for name, entry in saved["blocks"].items()
            }
            counters = saved.get("counters")
            if counters is None:
                first = i == 0 and dist.get_rank() == 0
                counters = dict(totals) if first and totals is not None else {}
            engine.load_state_dict(dict(saved, blocks=blocks, counters=counters))
        for group, saved in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.skipped_steps = state_dict["skipped_steps"]

    def _saved_engines_in_order(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The saved engine entries, one per engine of this optimizer, in its order.

        dist_checkpointing drops an engine's entry on a rank that owns none of its blocks
        (all of them ShardedTensors of other ranks: e.g. an engine of one replicated matrix at
        DP=2), so the loaded list can be shorter: each entry is matched to the engine whose
        owned blocks it holds, and an engine owning nothing here gets an empty one.
        """
        if len(saved) == len(self.engines):
            return saved
        rest = list(saved)
        ordered: list[dict[str, Any]] = []
        for engine in self.engines:
            names = {engine.block_name(o) for o in engine.owned}
            if not names:
                ordered.append({"blocks": {}})
                continue
            match = next((e for e in rest if set(e["blocks"]) == names), None)
            if match is None:
                break
            rest.remove(match)
            ordered.append(match)
        if len(ordered) != len(self.engines) or rest:
            raise ValueError(
                f"checkpoint has {len(saved)} SOAP engines, this optimizer "
                f"{len(self.engines)}: the set of tensor-parallel matrices differs"
            )
        return ordered

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        """The state for dist_checkpointing (see ``megatron/checkpointing.py``)."""
        from mlfop_megatron.megatron.checkpointing import optimizer_sharded_state_dict

        self.finish_param_sync()
        return optimizer_sharded_state_dict(self, is_loading)

    def stats(self) -> dict[str, Any]:
        """Counters, diagnostics and phase timings reduced over all ranks (a collective).

        Folding diagnostics of the last window, the grad-group diagnostics of the last step
        when it was armed (``request_grad_diagnostics``) and phase timings since the last call
        (``time_<phase>_s``: max over ranks; ``time_<phase>_min_s``: min over ranks, so the
        spread shows which phase the ranks' skew comes from).

        Two all-reduces whatever the model size: one SUM of the packed additive totals
        (counters, per-fold sums, eta* sums, grad-group rows) and one MAX of the timings and
        extremes (beta, s, eta* min/max); device tensors until the one copy to the host.
        """
        dev, f64 = self.device, torch.float64
        # Host counters go to the device in one copy; the diagnostics stay on the device.
        counter_keys = LinalgCounters.keys()
        host = [0.0] * len(counter_keys) + [float(self.skipped_steps)]
        for engine in self.engines:
            c = engine.counters.as_dict()
            for i, key in enumerate(counter_keys):
                host[i] += c[key]
        sums = [torch.tensor(host, dtype=f64, device=dev)]
        maxes = []
        for fold in self.schedule.folds:
            total, ext = empty_totals(dev), empty_extremes(dev)
            for engine, counts in zip(self.engines, self._engine_counts):
                for diag in engine.last_diagnostics:
                    if diag.fold == fold.index:
                        if counts:
                            total += diag.totals().to(dev, f64)
                        ext = torch.maximum(ext, diag.extremes().to(dev, f64))
            sums.append(total)
            maxes.append(ext)
        with_eta = self.mlfop_config.folding.step_size == "eta_star" and self.schedule.num_folds > 0
        if with_eta:  # [sum, count] and [max, -min] of eta* over blocks
            eta_sum = torch.zeros(2, dtype=f64, device=dev)
            eta_ext = torch.full((2,), -math.inf, dtype=f64, device=dev)
            for engine, counts in zip(self.engines, self._diag_counts):
                eta = engine.last_eta
                if eta is None or not eta.numel():
                    continue
                eta = eta.to(dev, f64)
                if counts:
                    eta_sum += torch.stack([eta.sum(), eta.new_tensor(float(eta.numel()))])
                eta_ext = torch.maximum(eta_ext, torch.stack([eta.max(), -eta.min()]))
            sums.append(eta_sum)
            maxes.append(eta_ext)
        window = self._diag_window
        if window is not None:
            rows = torch.zeros(DiagLayout(max(window[0]) + 1).width, dtype=f64, device=dev)
            for engine, counts in zip(self.engines, self._diag_counts):
                if counts and engine.last_grad_rows is not None:
                    rows += engine.last_grad_rows.to(dev, f64).sum(dim=0)
            sums.append(rows)
        packed = torch.cat(sums)
        dist.all_reduce(packed)
        # Phase timings since the previous stats() call: the slowest rank decides the step.
        host_timings = [0.0] * len(PHASES)
        for engine in self.engines:
            host_timings = [t + engine.timings[k] for t, k in zip(host_timings, PHASES)]
            for k in PHASES:  # reset in place
                engine.timings[k] = 0.0
        # ... and the fastest: the same MAX of the negated times (no second collective)
        own = torch.tensor(host_timings, dtype=f64, device=dev)
        timings = torch.cat([own, *maxes, -own])
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)
        packed, timings = packed.cpu(), timings.cpu()
        fastest = -timings[timings.numel() - len(PHASES) :]
        world = dist.get_world_size()
        # Counters are summed over ranks (a replicated engine counts its blocks on every rank).
        out: dict[str, Any] = {key: int(packed[i]) for i, key in enumerate(counter_keys)}
        at = len(counter_keys)
        out.update(skipped_steps=int(packed[at]) // world, levels=[])
        out.update({f"time_{k}_s": float(v) for k, v in zip(PHASES, timings)})
        out.update({f"time_{k}_min_s": float(v) for k, v in zip(PHASES, fastest)})
        at, at_max = at + 1, len(PHASES)
        for fold in self.schedule.folds:
            chunk = packed[at : at + TOTALS_WIDTH]
            extremes = timings[at_max : at_max + EXTREMES_WIDTH]
            at, at_max = at + TOTALS_WIDTH, at_max + EXTREMES_WIDTH
            if folded_blocks(chunk) > 0:  # at least one block was folded in this fold
                out["levels"].append(
                    summarize_fold(fold.level, chunk, extremes, fold.n_z, fold.n_h, fold.index)
                )
        if with_eta:
            total, count = packed[at : at + 2].tolist()
            high, low = timings[at_max : at_max + 2].tolist()
            at += 2
            if count > 0:
                out.update(eta_mean=total / count, eta_max=high, eta_min=-low)
        if window is not None:
            groups, segments = window
            for engine in self.engines:
                if engine.last_grad_segments != segments:
                    raise RuntimeError(
                        f"the DDP reduced {engine.last_grad_segments} gradient segments in the "
                        f"armed window, the diagnostics expected {segments}: was the model "
                        "wrapped in FoldingDistributedDataParallel and armed before its backward?"
                    )
            group_counts = [groups.count(m) for m in range(max(groups) + 1)]
            out["grad"] = summarize_grad_diagnostics(packed[at:], group_counts, segments)
        return out


class MLFOPChainedOptimizer(ChainedOptimizer):
    """ChainedOptimizer whose step reduces inf checks and norms over every rank (see module)."""

    @property
    def mlfop(self) -> list[MLFOPMegatronOptimizer]:
        """The chained ML-FOP-SOAP optimizers."""
        return [o for o in self.chained_optimizers if isinstance(o, MLFOPMegatronOptimizer)]

    @property
    def others(self) -> list[MegatronOptimizer]:
        """The chained Adam-side optimizers."""
        return [o for o in self.chained_optimizers if not isinstance(o, MLFOPMegatronOptimizer)]

    def _device(self) -> torch.device:
        """Where the reduced scalars live: the params' device (NCCL needs CUDA tensors)."""
        if self.mlfop:
            return self.mlfop[0].device
        for opt in self.others:
            for p in opt.get_parameters():
                return p.device
        return torch.device("cpu")

    def _other_grads(self, group: str | None = None) -> list[torch.Tensor]:
        """Grads of the Adam-side params that this rank counts in a grad-norm group's norm.

        ``group`` None: the main norm; else a separately clipped group (0.19: "mtp").

        Reduce-scattered ZeRO-1 grads: this rank's own slices (each element on one DP rank).
        Replicated ones are the same over the data x context parallel group (expert params:
        over the expert-data-parallel group), so only that group's rank 0 counts them.
        """
        grads: list[torch.Tensor] = []
        dense_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        for opt in self.others:
            if getattr(opt, "grads_sharded", False):
                rank = 0
            elif getattr(opt, "mlfop_expert_parallel", False):
                rank = parallel_state.get_expert_data_parallel_rank()
            else:
                rank = dense_rank
            if rank == 0:
                grads.extend(
                    g for g in compat.optimizer_grads_for_norm(opt, group) if g is not None
                )
        return grads

    def _other_grads_all_ranks(self) -> list[torch.Tensor]:
        """Every Adam-side grad of this rank, in every grad-norm group (for the inf check)."""
        grads: list[torch.Tensor] = []
        for opt in self.others:
            for group in grad_norm_groups():
                grads.extend(
                    g for g in compat.optimizer_grads_for_norm(opt, group) if g is not None
                )
        return grads

    @torch.no_grad()
    def _global_stats(self) -> tuple[dict[str | None, float], bool]:
        """Global gradient norm per grad-norm group, and whether any rank saw a non-finite one.

        None: the main norm; then every group this megatron-core clips separately (0.19:
        "mtp"), whether or not this rank holds any of its params (one fixed-length reduction
        on every rank: MTP params may live on one pipeline stage only).
        """
        device = self._device()
        groups = grad_norm_groups()
        sq_ours = {g: torch.zeros((), dtype=torch.float64, device=device) for g in groups}
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for opt in self.mlfop:
            sums, b = opt.local_grad_sums()
            bad = bad | b.to(device)
            for group, s in sums.items():
                sq_ours[group] = sq_ours[group] + s.to(device)
        totals = []
        for group in groups:
            sq_other = sum_of_squares(self._other_grads(group), device)
            totals.append(sq_ours[group] + sq_other)
        for grad in self._other_grads_all_ranks():
            bad |= (~torch.isfinite(grad).all()).to(device)
        packed = torch.stack([*totals, bad.double()])
        dist.all_reduce(packed)  # every rank: DP x TP x PP
        norms = {g: math.sqrt(float(packed[i])) for i, g in enumerate(groups)}
        return norms, bool(packed[-1] > 0)

    def finish_param_sync(self) -> None:
        """Wait for the parameter all-gathers the last step left in flight (no-op if none).

        Needed only with ``CommConfig.overlap_param_gather`` before reading the params outside
        a forward pass (the forward pre-hooks, checkpointing and the next step wait already).
        """
        for opt in self.chained_optimizers:
            finish = getattr(opt, "finish_param_sync", None)
            if finish is not None:
                finish()

    def communication_bytes_per_step(self) -> dict[str, int]:
        """Bytes this rank sends per step, by kind, for the whole chain (ring algorithms).

        The ML-FOP-SOAP optimizers' counts plus the ZeRO-1 Adam grads' reduce-scatter
        ("adam_grads") and params' all-gather ("adam_params"); "total" sums them (the step's
        norm/found-inf all-reduce, :func:`grad_stats_bytes`, is not counted).
        """
        out = {"soap_grads": 0, "adam_grads": 0, "params": 0, "tp_full": 0, "adam_params": 0}
        for opt in self.mlfop:
            for key, value in opt.communication_bytes_per_step().items():
                if key != "total":
                    out[key] += value
        for opt in self.others:
            if hasattr(opt, "grad_reduce_scatter_bytes_per_step"):
                out["adam_grads"] += opt.grad_reduce_scatter_bytes_per_step()
                out["adam_params"] += opt.all_gather_bytes_per_step()
        out["total"] = sum(out.values())
        return out

    @torch.no_grad()
    def step(self):
        """Megatron's step contract: (success, grad_norm, num_zeros), globally consistent."""
        self.prepare_grads()
        norms, found_inf = self._global_stats()
        grad_norm = norms[None]
        # As megatron-core 0.19: the separately clipped groups' norms, by group.
        self.grad_norms_by_group = {g: n for g, n in norms.items() if g is not None}
        if found_inf:
            for opt in self.mlfop:
                opt.discard_step()
            return False, None, None
        clip = self.config.clip_grad
        for group, norm in norms.items():  # each group clipped by its own norm
            if clip > 0.0 and norm > clip:
                coeff = clip / (norm + 1.0e-6)
                for opt in self.mlfop:
                    opt.set_grad_scale(coeff, group)
                fused_kernels.scale_(self._clip_targets(group), coeff)
        num_zeros = None
        if self.config.log_num_zeros_in_grad:
            num_zeros = sum(opt.count_zeros() for opt in self.mlfop)
        success = self.step_with_ready_grads()
        return success, grad_norm, num_zeros

    def _clip_targets(self, group: str | None = None) -> list[torch.Tensor]:
        """A grad-norm group's non-matrix grads, each once (shared params included)."""
        seen, out = set(), []
        for opt in self.others:
            for p in opt.get_parameters():
                if compat.grad_norm_group_of(p) != group:
                    continue
                if p.grad is not None and id(p.grad) not in seen:
                    seen.add(id(p.grad))
                    out.append(p.grad)
        return out

    def request_grad_diagnostics(self, groups: Sequence[int] | None = None) -> None:
        """Arm the grad-group diagnostics of the next window.

        See MLFOPMegatronOptimizer.request_grad_diagnostics; every rank, before its backward.
        """
        for opt in self.mlfop:
            opt.request_grad_diagnostics(groups)

    def stats(self) -> dict[str, Any]:
        """Global ML-FOP-SOAP stats (a collective: call on every rank)."""
        return self.mlfop[0].stats() if self.mlfop else {}
