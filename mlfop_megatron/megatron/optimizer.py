"""ML-FOP-SOAP as a Megatron-core optimizer, chained with Megatron's Adam for non-matrix params.

``MLFOPMegatronOptimizer`` owns the SOAP matrices of one pipeline stage; their state is sharded
over the data-parallel group by block (``ShardedSOAP``). It receives each level's reduced
gradient from ``FoldingDistributedDataParallel`` and folds it into the owner's fp32 buffer.
``MLFOPChainedOptimizer.step`` keeps Megatron's contract, (success, grad_norm, num_zeros), with
the inf/NaN check and the gradient norm reduced over every rank that holds a piece of the
model, so a skipped step is skipped everywhere and clipping uses the true global norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer, OptimizerConfig

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core.folding import summarize_level
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.distributed.sharded_soap import PHASES, ShardedSOAP
from mlfop_megatron.distributed.tp_full import TensorParallelFullSOAP
from mlfop_megatron.megatron import compat, fused_kernels
from mlfop_megatron.megatron.fp8 import QuantizedParamShadows


def _engine_groups(expert: bool) -> tuple[Any, int, Any, int]:
    """(data-parallel group, its rank, TP group or None when TP=1, TP rank) for an engine.

    Dense params are replicated over data x context parallel ranks (Megatron's DDP reduces
    over that group); expert params over the expert-data-parallel group, split over the
    expert-tensor-parallel group.
    """
    if expert:
        tp_size = parallel_state.get_expert_tensor_parallel_world_size()
        return (
            parallel_state.get_expert_data_parallel_group(),
            parallel_state.get_expert_data_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_group() if tp_size > 1 else None,
            parallel_state.get_expert_tensor_parallel_rank(),
        )
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return (
        parallel_state.get_data_parallel_group(with_context_parallel=True),
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
        parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None,
        parallel_state.get_tensor_model_parallel_rank(),
    )


class _ParamGroups(torch.optim.Optimizer):
    """Holds param_groups (lr, weight_decay) for Megatron's LR scheduler; state is elsewhere."""

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never called
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
    ) -> None:
        from mlfop_megatron.megatron.factory import megatron_group_fields

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
        # FP8 primary weights: the engines see high-precision shadows (fp32 main weights on the
        # owners), requantized into the model params after each step (see megatron/fp8.py).
        self.fp8 = QuantizedParamShadows(
            params, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        params = self.fp8.substitute(params)
        self.engines: list[Any] = []
        # Whether an engine's gradients count towards the global norm on this rank: every
        # gradient must be counted exactly once over DP x CP x TP x PP (expert params: once
        # over expert-DP x EP x expert-TP x PP).
        self._engine_counts: list[bool] = []
        for is_expert, tp_sharded in ((False, True), (False, False), (True, True), (True, False)):
            chosen = [
                (p, n)
                for p, n, s, e in zip(params, names, split, expert)
                if s == tp_sharded and e == is_expert
            ]
            if not chosen:
                continue
            ps, ns = [p for p, _ in chosen], [n for _, n in chosen]
            dp_group, dp_rank, tp_group, tp_rank = _engine_groups(is_expert)
            if tp_sharded and tp_mode == "full" and tp_group is not None and not is_expert:
                owners = parallel_state.get_tensor_and_data_parallel_group(
                    with_context_parallel=True
                )
                engine = TensorParallelFullSOAP(
                    ps,
                    ns,
                    [p.partition_dim for p in ps],
                    mlfop_config,
                    tp_group=tp_group,
                    owner_group=owners if sharded else None,
                    block_size=block_size,
                )
                counts = sharded or (dp_rank == 0 and tp_rank == 0)
            else:
                engine = ShardedSOAP(
                    ps,
                    ns,
                    mlfop_config,
                    group=dp_group if sharded else None,
                    reduce_group=tp_group if tp_sharded else None,
                    block_size=block_size,
                    master_params=[i for i, p in enumerate(ps) if self.fp8.is_shadow(p)],
                )
                counts = (sharded or dp_rank == 0) and (tp_sharded or tp_rank == 0)
            self.engines.append(engine)
            self._engine_counts.append(counts)
        self.fp8.release()  # shadows hold storage only during a step
        self._grad_scale = 1.0
        self.skipped_steps = 0
        # Megatron-LM multiplies the loss by this (on the loss's device) before backward.
        self._loss_scale = torch.ones(1, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------ folding hook
    @torch.no_grad()
    def on_level(self, level: int, level_size: int) -> None:
        """DDP callback after a level's reduction: fold it, then clear the folded grads."""
        scale = self.schedule.accumulation_steps / level_size
        for engine in self.engines:
            grads = [self.fp8.model_param(p).main_grad for p in engine.params]
            engine.fold_level(level, grads, scale=scale)
            # The next level accumulates onto zero: at its boundary main_grad is its own sum
            # (also with TE's fused wgrad accumulation into main_grad; see megatron/fp8.py).
            fused_kernels.zero_(grads)

    # --------------------------------------------------------------- grad stats
    def local_grad_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squares, non-finite flag) of this rank's share of the folded gradients."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for engine, counts in zip(self.engines, self._engine_counts):
            s, b = engine.local_grad_stats()
            bad = bad | b.to(self.device)
            if counts:
                sq = sq + s.to(self.device)
        return sq, bad

    def get_grad_stats_parallel_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def get_grad_norm(self) -> float:
        sq, _ = self.local_grad_stats()
        dist.all_reduce(sq)
        return math.sqrt(float(sq))

    def count_zeros(self) -> float:
        zeros = torch.zeros((), dtype=torch.float64, device=self.device)
        for engine, counts in zip(self.engines, self._engine_counts):
            if counts:
                grads, _ = engine.window_gradients()
                for g in grads:
                    zeros += (g == 0).sum().to(self.device)
        dist.all_reduce(zeros)
        return float(zeros)

    def set_grad_scale(self, scale: float) -> None:
        """Clipping factor applied to the folded gradients in the next step."""
        self._grad_scale = scale

    # ------------------------------------------------------------------ steps
    def prepare_grads(self) -> bool:
        for engine in self.engines:
            if not engine.has_window():
                raise RuntimeError(
                    "no folded gradients for this step: wrap the model with "
                    "FoldingDistributedDataParallel and run num_microbatches == "
                    f"accumulation_steps={self.schedule.accumulation_steps} micro-batches"
                )
        return False

    def step_with_ready_grads(self) -> bool:
        group = self.optimizer.param_groups[0]
        if len(self.fp8):
            self.fp8.materialize()
        for engine in self.engines:
            engine.step(group["lr"], group["weight_decay"], grad_scale=self._grad_scale)
        if len(self.fp8):
            self.fp8.commit()  # every DP rank requantizes from identical values
        self._grad_scale = 1.0
        return True

    def discard_step(self) -> None:
        for engine in self.engines:
            engine.discard_window()
        self.skipped_steps += 1

    def step(self):
        return MLFOPChainedOptimizer([self]).step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.get_parameters():
            p.grad = None

    def get_loss_scale(self) -> torch.Tensor:
        """1 (no loss scaling: fp32/bf16), on the params' device like the loss it scales."""
        return self._loss_scale

    def reload_model_params(self, state_dict: Any = None) -> None:
        """Model params are the fp32 master params here; nothing to copy."""

    # ------------------------------------------------------------ checkpoints
    def state_bytes(self) -> int:
        return sum(e.state_bytes() for e in self.engines)

    def state_dict(self) -> dict[str, Any]:
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

        if len(state_dict["engines"]) != len(self.engines):
            raise ValueError(
                f"checkpoint has {len(state_dict['engines'])} SOAP engines, this optimizer "
                f"{len(self.engines)}: the set of tensor-parallel matrices differs"
            )
        for engine, saved in zip(self.engines, state_dict["engines"]):
            blocks = {
                name: scalars_from_loaded(entry) if torch.is_tensor(entry["step"]) else entry
                for name, entry in saved["blocks"].items()
            }
            engine.load_state_dict(dict(saved, blocks=blocks))
        for group, saved in zip(self.optimizer.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.skipped_steps = state_dict["skipped_steps"]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        from mlfop_megatron.megatron.checkpointing import optimizer_sharded_state_dict

        return optimizer_sharded_state_dict(self, is_loading)

    def stats(self) -> dict[str, Any]:
        """Counters, folding diagnostics of the last window and phase timings since the last
        call (max over ranks), reduced over all ranks: a collective."""
        # Host counters go to the device in one copy; the diagnostics stay on the device.
        host = [0.0, 0.0, 0.0, float(self.skipped_steps)]
        for engine in self.engines:
            c = engine.counters
            host[:3] = [
                h + v for h, v in zip(host, (c.eigh_fp64_retries, c.eigh_failures, c.qr_failures))
            ]
        counters = torch.tensor(host, dtype=torch.float64, device=self.device)
        totals = []
        for fold in self.schedule.folds:
            total = torch.zeros(6, dtype=torch.float64, device=self.device)
            for engine, counts in zip(self.engines, self._engine_counts):
                for diag in engine.last_diagnostics:
                    if diag.fold == fold.index and counts:
                        total += diag.totals().to(self.device, torch.float64)
            totals.append(total)
        packed = torch.cat([counters, *totals]) if totals else counters
        dist.all_reduce(packed)
        # Phase timings since the previous stats() call: the slowest rank decides the step.
        host_timings = [0.0] * len(PHASES)
        for engine in self.engines:
            host_timings = [t + engine.timings[k] for t, k in zip(host_timings, PHASES)]
            for k in PHASES:  # reset in place (the TP-full wrapper shares its engine's dict)
                engine.timings[k] = 0.0
        timings = torch.tensor(host_timings, dtype=torch.float64, device=self.device)
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)
        packed, timings = packed.cpu(), timings.cpu()
        world = dist.get_world_size()
        out: dict[str, Any] = {
            "eigh_fp64_retries": int(packed[0]),
            "eigh_failures": int(packed[1]),
            "qr_failures": int(packed[2]),
            "skipped_steps": int(packed[3]) // world,
            "levels": [],
        }
        out.update({f"time_{k}_s": float(v) for k, v in zip(PHASES, timings)})
        for j, fold in enumerate(self.schedule.folds):
            chunk = packed[4 + 6 * j : 10 + 6 * j]
            if chunk[5] > 0:  # at least one block was folded in this fold
                out["levels"].append(
                    summarize_level(fold.level, chunk, fold.n_z, fold.n_h, fold.index)
                )
        return out


class MLFOPChainedOptimizer(ChainedOptimizer):
    """ChainedOptimizer whose step reduces inf checks and norms over every rank (see module)."""

    @property
    def mlfop(self) -> list[MLFOPMegatronOptimizer]:
        return [o for o in self.chained_optimizers if isinstance(o, MLFOPMegatronOptimizer)]

    @property
    def others(self) -> list[MegatronOptimizer]:
        return [o for o in self.chained_optimizers if not isinstance(o, MLFOPMegatronOptimizer)]

    def _device(self) -> torch.device:
        """Where the reduced scalars live: the params' device (NCCL needs CUDA tensors)."""
        if self.mlfop:
            return self.mlfop[0].device
        for opt in self.others:
            for p in opt.get_parameters():
                return p.device
        return torch.device("cpu")

    def _other_grads(self) -> list[torch.Tensor]:
        """Grads of the Adam-side params that this rank counts in the global norm.

        They are replicated over the data x context parallel group (expert params: over the
        expert-data-parallel group), so only that group's rank 0 counts them.
        """
        grads = []
        dense_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        for opt in self.others:
            if getattr(opt, "mlfop_expert_parallel", False):
                rank = parallel_state.get_expert_data_parallel_rank()
            else:
                rank = dense_rank
            if rank == 0:
                grads.extend(g for g in compat.optimizer_grads_for_norm(opt) if g is not None)
        return grads

    def _other_grads_all_ranks(self) -> list[torch.Tensor]:
        grads = []
        for opt in self.others:
            grads.extend(g for g in compat.optimizer_grads_for_norm(opt) if g is not None)
        return grads

    @torch.no_grad()
    def _global_stats(self) -> tuple[float, bool]:
        """Global gradient norm and whether any rank saw a non-finite gradient."""
        device = self._device()
        sq_ours = torch.zeros((), dtype=torch.float64, device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
        for opt in self.mlfop:
            s, b = opt.local_grad_stats()
            sq_ours, bad = sq_ours + s.to(device), bad | b.to(device)
        sq_other = torch.zeros((), dtype=torch.float64, device=device)
        for g in self._other_grads():
            sq_other += g.double().pow(2).sum().to(device)
        for g in self._other_grads_all_ranks():
            bad |= (~torch.isfinite(g).all()).to(device)
        packed = torch.stack([sq_ours + sq_other, bad.double()])
        dist.all_reduce(packed)  # every rank: DP x TP x PP
        return math.sqrt(float(packed[0])), bool(packed[1] > 0)

    @torch.no_grad()
    def step(self):
        self.prepare_grads()
        grad_norm, found_inf = self._global_stats()
        if found_inf:
            for opt in self.mlfop:
                opt.discard_step()
            return False, None, None
        clip = self.config.clip_grad
        if clip > 0.0 and grad_norm > clip:
            coeff = clip / (grad_norm + 1.0e-6)
            for opt in self.mlfop:
                opt.set_grad_scale(coeff)
            fused_kernels.scale_(self._clip_targets(), coeff)
        num_zeros = None
        if self.config.log_num_zeros_in_grad:
            num_zeros = sum(opt.count_zeros() for opt in self.mlfop)
        success = self.step_with_ready_grads()
        return success, grad_norm, num_zeros

    def _clip_targets(self) -> list[torch.Tensor]:
        """Every non-matrix grad once (shared params included), for in-place clipping."""
        seen, out = set(), []
        for opt in self.others:
            for p in opt.get_parameters():
                if p.grad is not None and id(p.grad) not in seen:
                    seen.add(id(p.grad))
                    out.append(p.grad)
        return out

    def stats(self) -> dict[str, Any]:
        """Global ML-FOP-SOAP stats (a collective: call on every rank)."""
        return self.mlfop[0].stats() if self.mlfop else {}
