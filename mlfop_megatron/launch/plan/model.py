"""The plan of an ML-FOP-SOAP Megatron job: its inputs (PlanConfig) and numbers (Plan).

For a model and a DP x TP x PP layout this reports, per rank of the busiest pipeline stage:
optimizer memory (SOAP state, Adam state, fold buffers with --folding), SOAP compute per
optimizer step and its balance over the owner ranks (with Megatron's whole-param ping-pong
assignment for comparison), and the bytes each rank moves per optimizer step. The SOAP
numbers come from the same pure owner assignment the optimizer builds at run time
(:mod:`mlfop_megatron.distributed.assignment`).

Model of the Megatron adapter (``mlfop_megatron.megatron``) used here:

* SOAP takes the transformer's linear weights; embeddings, output layer, norms and biases go
  to Adam (two fp32 moments), sharded over data parallelism (ZeRO-1, ``shard_adam=True``:
  ceil(P_adam / N) elements per rank).
* ``--tp-mode blockwise``: each TP rank preconditions its own shard; SOAP blocks are owned
  over the DP group. ``--tp-mode full``: shard gradients are all-gathered over TP at every
  level, SOAP blocks of the whole matrices are owned over the TP x DP group, and every rank
  keeps a whole-matrix copy.
* Communication per step (CommConfig defaults), bytes from
  :func:`mlfop_megatron.distributed.comm_model.mlfop_traffic` (the one source): every folding
  level boundary reduce-scatters the owner-ordered fp32 SOAP grad buffer over DP (each owner's
  segment padded to the most loaded owner); K micro-batches give len(dyadic boundaries)
  levels, e.g. K=8 -> boundaries 1, 2, 4, 8 -> 4 reduce-scatters. The Adam grads are
  all-reduced once; after the step one all-gather of the owner-ordered params and one of the
  ZeRO-1 Adam params. ``Plan.communication`` is comm_model's side-by-side table (this package,
  Megatron's DistributedOptimizer and layer-wise optimizer) for the busiest stage's shapes.
* Layers are split evenly over PP stages; the first stage also holds the embedding, the last
  the final norm and the output layer (with tied embeddings and PP > 1 the last stage holds a
  shared copy of the embedding as its output layer, as Megatron does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mlfop_megatron.config import TP_MODES, FoldingConfig, SOAPConfig
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.distributed.assignment import (
    BALANCE_METRICS,
    Assignment,
    BlockingConfig,
    CostModel,
    ParamSpec,
    choose_block_size,
    make_blocks,
    pingpong_assignment,
)
from mlfop_megatron.distributed.comm_model import LayoutCost, layout_costs, mlfop_traffic
from mlfop_megatron.distributed.model_shapes import TransformerDims, transformer_shapes
from mlfop_megatron.launch.plan.memory import RankMemory, rank_memory
from mlfop_megatron.policies import check_positive

GRAD_BYTES = 4  # Megatron DDP grad buffer (main_grad) is fp32
MASTER_PARAM_BYTES = 4  # the adapter trains fp32 params (bf16=False): full-mode copies are fp32


@dataclass(frozen=True)
class PlanConfig:
    """Everything a plan depends on; invalid values raise ValueError naming the CLI option.

    ``soap`` is the optimizer's own SOAP config (``max_precond_dim`` and
    ``precondition_frequency`` enter the plan); ``folding`` its folding config, whose
    ``accumulation_steps`` must be ``micro_batches`` (None: the defaults at that K, i.e. no
    folding: one level, as the optimizer's default).
    """

    dims: TransformerDims
    dp: int
    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    model_name: str = "custom"
    gated: bool = True
    fused: bool = True
    bias: bool = False
    tied_embeddings: bool = False
    vocab_divisible_by: int = 128
    block_size: int | None = None
    auto_block_size: bool = False
    target_balance: float = 1.05
    balance: str = "compute"  # what --auto-block-size balances: compute, memory or both
    tp_mode: str = "blockwise"
    param_bytes: int = 2
    state_bytes: int = 4
    world_size: int | None = None
    soap: SOAPConfig = field(default_factory=SOAPConfig)
    folding: FoldingConfig | None = None
    level_buckets: int | None = None  # CommConfig.level_buckets (None: auto)

    def __post_init__(self) -> None:
        d = self.dims
        for flag, value in (
            ("--hidden", d.hidden),
            ("--ffn", d.ffn),
            ("--layers", d.layers),
            ("--heads", d.heads),
            ("--kv-heads", d.kv_heads),
            ("--vocab", d.vocab),
            ("--dp", self.dp),
            ("--tp", self.tp),
            ("--pp", self.pp),
            ("--micro-batches", self.micro_batches),
            ("--vocab-divisible-by", self.vocab_divisible_by),
            ("--param-bytes", self.param_bytes),
            ("--state-bytes", self.state_bytes),
        ):
            check_positive(flag, value)
        if self.level_buckets is not None:
            check_positive("--level-buckets", self.level_buckets)
        if d.head_dim is not None:
            check_positive("--head-dim", d.head_dim)
        elif d.hidden % d.heads:
            raise ValueError(
                f"--hidden ({d.hidden}) must be divisible by --heads ({d.heads}), "
                "or give --head-dim"
            )
        if d.heads % d.kv_heads:
            raise ValueError(f"--heads ({d.heads}) must be divisible by --kv-heads ({d.kv_heads})")
        if d.heads % self.tp or d.kv_heads % self.tp:
            raise ValueError(
                f"--tp ({self.tp}) must divide --heads ({d.heads}) and --kv-heads ({d.kv_heads})"
            )
        if d.ffn % self.tp:
            raise ValueError(f"--tp ({self.tp}) must divide --ffn ({d.ffn})")
        if d.layers % self.pp:
            raise ValueError(f"--layers ({d.layers}) must be divisible by --pp ({self.pp})")
        world = self.dp * self.tp * self.pp
        if self.world_size is not None:
            check_positive("--world-size", self.world_size)
            if self.world_size != world:
                raise ValueError(
                    f"--world-size ({self.world_size}) must equal --dp x --tp x --pp "
                    f"({self.dp} x {self.tp} x {self.pp} = {world})"
                )
        if self.tp_mode not in TP_MODES:
            raise ValueError(f"--tp-mode must be one of {TP_MODES} (got {self.tp_mode!r})")
        if self.block_size is not None:
            check_positive("--block-size", self.block_size)
            if self.auto_block_size:
                raise ValueError("--block-size and --auto-block-size are mutually exclusive")
        if self.balance not in BALANCE_METRICS:
            raise ValueError(f"--balance must be one of {BALANCE_METRICS} (got {self.balance!r})")
        if not (self.target_balance >= 1.0):
            raise ValueError(f"--target-balance must be >= 1.0 (got {self.target_balance!r})")
        if not isinstance(self.soap, SOAPConfig):
            raise TypeError(f"soap must be a SOAPConfig, got {type(self.soap).__name__}")
        folding = self.folding
        if folding is None:
            folding = FoldingConfig(accumulation_steps=self.micro_batches)
        if not isinstance(folding, FoldingConfig):
            raise TypeError(f"folding must be a FoldingConfig, got {type(folding).__name__}")
        if folding.accumulation_steps != self.micro_batches:
            raise ValueError(
                f"folding.accumulation_steps ({folding.accumulation_steps}) must equal "
                f"--micro-batches ({self.micro_batches})"
            )
        if folding.boundaries is not None and not folding.enabled:
            raise ValueError("--boundaries needs --folding (folding is off by default)")
        object.__setattr__(self, "folding", folding)

    @property
    def schedule(self) -> LevelSchedule:
        """Level schedule of one accumulation window (the optimizer's own)."""
        assert self.folding is not None  # set in __post_init__
        return LevelSchedule.from_config(self.folding)

    @property
    def world(self) -> int:
        """Total number of ranks, DP x TP x PP."""
        return self.dp * self.tp * self.pp

    @property
    def full_mode(self) -> bool:
        """Whether whole matrices are preconditioned (tp_mode full with TP > 1)."""
        return self.tp_mode == "full" and self.tp > 1

    @property
    def owner_ranks(self) -> int:
        """Size of the group that shares SOAP block ownership (DP, or TP x DP in full mode)."""
        return self.dp * self.tp if self.full_mode else self.dp

    def shapes(self, tp: int) -> list[ParamSpec]:
        """Per-TP-rank ParamSpecs of the whole model at tensor-parallel size ``tp``."""
        d = self.dims
        return transformer_shapes(
            d.hidden,
            d.ffn,
            d.layers,
            d.heads,
            d.kv_heads,
            d.vocab,
            tp,
            head_dim=d.head_dim,
            gated=self.gated,
            fuse_qkv=self.fused,
            fuse_gate_up=self.fused,
            tied_embeddings=self.tied_embeddings,
            bias=self.bias,
            vocab_divisible_by=self.vocab_divisible_by,
        )


@dataclass(frozen=True)
class StagePlan:
    """Per-rank numbers of one pipeline stage (bytes, GFLOP per optimizer step)."""

    stage: int
    first_layer: int
    last_layer: int
    has_embedding: bool
    has_output_layer: bool
    params_per_rank: int  # this stage's params on one TP rank (= grad buffer entries)
    soap_params_per_rank: int
    adam_params_per_rank: int
    soap_matrices: int
    owner_ranks: int
    num_blocks: int
    idle_ranks: int
    soap_state_max_bytes: int
    soap_state_mean_bytes: float
    soap_state_total_bytes: int  # summed over the owner ranks
    adam_state_bytes: int
    fold_buffer_max_bytes: int
    fold_buffer_mean_bytes: float
    tp_full_buffer_bytes: int
    memory_max_bytes: int
    memory_mean_bytes: float
    soap_memory_balance: float
    compute_total_gflop: float
    compute_max_gflop: float
    compute_mean_gflop: float
    compute_balance: float
    pingpong_balance: float
    pingpong_max_gflop: float
    speedup_vs_pingpong: float
    grad_buffer_bytes: int
    level_reduce_bytes_per_step: float  # L reduce-scatters of the owner-ordered SOAP grads
    adam_sync_bytes_per_step: float  # Adam grads all-reduced once + ZeRO-1 param all-gather
    param_gather_bytes_per_step: float  # all-gather of the owner-ordered SOAP params
    tp_gather_bytes_per_step: int
    launches_per_step: int  # DP collectives per step (TP all-gathers of full mode not counted)
    comm_bytes_per_step: float
    # Peak memory by the tracker's categories (plan/memory.py), the owner rank with the
    # largest optimizer peak; and Megatron DistributedOptimizer-Adam's on the same params
    # (fp32 grad buffer + fp32 main weights and two moments sharded over DP).
    peak_memory: RankMemory | None = None
    distopt_adam_bytes: int = 0

    @property
    def label(self) -> str:
        """Human description of what the stage holds."""
        parts = []
        if self.has_embedding:
            parts.append("embedding")
        parts.append(f"layers {self.first_layer}-{self.last_layer}")
        if self.has_output_layer:
            parts.append("final norm, output layer")
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """A complete plan: inputs, resolved block size, all stages and the busiest one."""

    config: PlanConfig
    boundaries: tuple[int, ...]
    block_size: int | None
    block_size_source: str  # "whole params", "--block-size", "auto"
    target_met: bool | None  # auto block size: did every stage meet --target-balance
    stages: tuple[StagePlan, ...]
    busiest_stage: int
    notes: tuple[str, ...]
    communication: tuple[LayoutCost, ...]  # comm_model's layouts on the busiest stage

    @property
    def busiest(self) -> StagePlan:
        """The stage with the largest per-rank optimizer memory."""
        return self.stages[self.busiest_stage]

    @property
    def num_levels(self) -> int:
        """Number of folding levels (= grad all-reduces per optimizer step)."""
        return len(self.boundaries)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the plan."""
        return {
            "inputs": asdict(self.config),
            "world_size": self.config.world,
            "owner_ranks": self.config.owner_ranks,
            "levels": self.num_levels,
            "boundaries": list(self.boundaries),
            "block_size": self.block_size,
            "block_size_source": self.block_size_source,
            "target_balance_met": self.target_met,
            "busiest_stage": self.busiest_stage,
            "busiest": asdict(self.busiest),
            "stages": [asdict(s) for s in self.stages],
            "notes": list(self.notes),
            "communication": [asdict(c) for c in self.communication],
        }


def split_stages(
    specs: Sequence[ParamSpec], layers: int, pp: int, tied_embeddings: bool = False
) -> list[list[ParamSpec]]:
    """Params of each pipeline stage: layers split evenly, embedding first, output last."""
    if layers % pp:
        raise ValueError(f"--layers ({layers}) must be divisible by --pp ({pp})")
    per_stage = layers // pp
    stages: list[list[ParamSpec]] = [[] for _ in range(pp)]
    for spec in specs:
        if spec.name.startswith("decoder.layers."):
            stages[int(spec.name.split(".")[2]) // per_stage].append(spec)
        elif spec.kind == "embedding":
            stages[0].append(spec)
        else:  # final norm, output layer
            stages[-1].append(spec)
    if tied_embeddings and pp > 1:
        emb = next(s for s in specs if s.kind == "embedding")
        stages[-1].append(replace(emb, name="output_layer.weight", kind="output"))
    return stages


def _size_key(block_size: int | None) -> float:
    return float("inf") if block_size is None else float(block_size)


def make_plan(cfg: PlanConfig) -> Plan:
    """Compute the plan of every pipeline stage and pick the busiest one."""
    local = split_stages(cfg.shapes(cfg.tp), cfg.dims.layers, cfg.pp, cfg.tied_embeddings)
    soap_local = [[s for s in st if s.soap_matrix] for st in local]
    if cfg.full_mode:
        full = split_stages(cfg.shapes(1), cfg.dims.layers, cfg.pp, cfg.tied_embeddings)
        soap_owned = [[s for s in st if s.soap_matrix] for st in full]
    else:
        soap_owned = soap_local
    world = cfg.owner_ranks
    cost = CostModel(cfg.soap.precondition_frequency, state_bytes=cfg.state_bytes)
    schedule = cfg.schedule
    levels = schedule.num_levels
    notes: list[str] = [
        "memory is optimizer memory only: main params, main grads (the grad buffer) and "
        "activations are not included"
    ]

    # Assignments depend only on the matrix shapes: stages with equal shapes share them.
    cache: dict[tuple[tuple[tuple[int, ...], ...], int | None], Assignment] = {}

    def assign(mats: list[ParamSpec], bs: int | None) -> Assignment:
        key = (tuple(m.shape for m in mats), bs)
        if key not in cache:
            blocks = make_blocks(mats, BlockingConfig(bs, cfg.soap.max_precond_dim))
            cache[key] = Assignment.build(blocks, world, cost)
        return cache[key]

    target_met: bool | None = None
    if cfg.auto_block_size:
        # One block size for the whole job (it is one optimizer option): the smallest choice.
        chosen = [
            choose_block_size(
                mats,
                world,
                target_balance=cfg.target_balance,
                max_precond_dim=cfg.soap.max_precond_dim,
                cost_model=cost,
                balance=cfg.balance,
            )[0]
            for mats in soap_owned
        ]
        block_size, source = min(chosen, key=_size_key), "auto"
        target_met = all(
            assign(m, block_size).balance(cfg.balance) <= cfg.target_balance for m in soap_owned
        )
        notes.append(
            "the block size changes the optimizer's math: fix it for the largest DP you plan, "
            "not per run size"
        )
        if not target_met:
            notes.append(
                f"no candidate block size met --target-balance {cfg.target_balance:g} on every "
                "stage; using the smallest per-stage choice of choose_block_size"
            )
    else:
        block_size = cfg.block_size
        source = "whole params" if block_size is None else "--block-size"

    stages = []
    for i, (params, mats_local, mats) in enumerate(zip(local, soap_local, soap_owned)):
        stages.append(_stage_plan(cfg, i, params, mats_local, mats, assign(mats, block_size)))
    busiest = max(range(len(stages)), key=lambda i: (stages[i].memory_max_bytes, -i))

    b = stages[busiest]
    if b.idle_ranks:
        hint = "" if cfg.auto_block_size else ": use --block-size or --auto-block-size"
        notes.append(f"{b.idle_ranks} of {world} owner ranks own no SOAP block{hint}")
    if not cfg.auto_block_size and b.compute_balance > cfg.target_balance:
        notes.append(
            f"compute balance {b.compute_balance:.3f} > {cfg.target_balance:g}: try "
            "--auto-block-size (or a smaller --block-size) to split large matrices"
        )
    if cfg.tied_embeddings and cfg.pp > 1:
        notes.append(
            "tied embeddings: Megatron also all-reduces the embedding grad between the first "
            "and last stage (not counted above)"
        )
    if cfg.tp_mode == "full" and cfg.tp == 1:
        notes.append("--tp-mode full is the same as blockwise at --tp 1")
    if cfg.param_bytes != MASTER_PARAM_BYTES:
        notes.append(
            f"param all-gather at --param-bytes {cfg.param_bytes}: this release of the Megatron "
            f"adapter trains fp32 params, so it all-gathers {MASTER_PARAM_BYTES} B/param "
            f"(use --param-bytes {MASTER_PARAM_BYTES} to plan for it)"
        )
    if levels > 1:
        notes.append(
            f"folding reduces the SOAP grads {levels} times per step (one reduce-scatter per "
            "level), Megatron's DistributedOptimizer once"
        )
    if cfg.full_mode and cfg.tp > 1:
        notes.append(
            "tp-full: the level reduce-scatters are modelled over the DP group on each TP "
            "shard's SOAP elements (unpadded); the comparison table models blockwise owners"
        )
    communication = tuple(
        layout_costs(
            local[busiest],
            cfg.dp,
            levels,
            block_size,
            max_precond_dim=cfg.soap.max_precond_dim,
            level_buckets=cfg.level_buckets,
        )
    )
    return Plan(
        config=cfg,
        boundaries=schedule.boundaries,
        block_size=block_size,
        block_size_source=source,
        target_met=target_met,
        stages=tuple(stages),
        busiest_stage=busiest,
        notes=tuple(notes),
        communication=communication,
    )


def _stage_plan(
    cfg: PlanConfig,
    index: int,
    params: list[ParamSpec],
    mats_local: list[ParamSpec],
    mats: list[ParamSpec],
    asg: Assignment,
) -> StagePlan:
    """Numbers of one stage from its params and its SOAP assignment."""
    world = asg.world_size
    levels = cfg.schedule.num_levels
    stage_numel = sum(p.numel for p in params)
    soap_local = sum(p.numel for p in mats_local)
    adam_numel = stage_numel - soap_local
    # exp_avg + exp_avg_sq of this rank's ZeRO-1 slice (fp32 params are their own mains)
    adam_state = 2 * math.ceil(adam_numel / cfg.dp) * cfg.state_bytes
    soap_mem = asg.memory_loads
    # Fold buffers (the folded estimate and its rotation) exist only when the window folds;
    # folding off (or one level) steps on the one level's class stacks: plan/memory.py.
    folds = cfg.schedule.num_folds > 0
    fold = [2 * n * cfg.state_bytes if folds else 0 for n in asg.numel_loads]
    # Full mode: a whole-matrix fp32 copy of the params, plus one gathered level gradient.
    tp_full = 2 * sum(m.numel for m in mats) * MASTER_PARAM_BYTES if cfg.full_mode else 0
    totals = [m + f + adam_state + tp_full for m, f in zip(soap_mem, fold)]
    flops = asg.compute_loads
    pingpong = pingpong_assignment(mats, world, asg.cost_model, cfg.soap.max_precond_dim)
    pp_max = max(pingpong.compute_loads)
    grad_buffer = stage_numel * GRAD_BYTES
    # The owner segment over DP: the most loaded owner's elements (full mode: the TP shard's
    # SOAP elements split evenly over DP, see the note).
    segment = math.ceil(soap_local / cfg.dp) if cfg.full_mode else max(asg.numel_loads)
    peaks = [
        rank_memory(
            asg,
            r,
            params_numel=stage_numel,
            adam_numel=adam_numel,
            dp=cfg.dp,
            param_bytes=cfg.param_bytes,
            state_bytes=cfg.state_bytes,
            owner_segment=segment,
            folding=folds,
            # tp-full owners reduce through TPFullReducer: not bucketed
            level_buckets=1 if cfg.full_mode else cfg.level_buckets,
            refresh_wave=cfg.soap.refresh_wave,
        )
        for r in range(world)
    ]
    peak = max(peaks, key=lambda m: m.optimizer_peak)
    traffic = mlfop_traffic(
        segment,
        adam_numel,
        cfg.dp,
        levels,
        GRAD_BYTES,
        param_bytes=cfg.param_bytes,
        level_buckets=peak.level_buckets,
    )
    tp_gather = levels * (cfg.tp - 1) * soap_local * GRAD_BYTES if cfg.full_mode else 0
    per_stage = cfg.dims.layers // cfg.pp
    names = {p.name for p in params}
    distopt = stage_numel * GRAD_BYTES + math.ceil(stage_numel / cfg.dp) * 3 * cfg.state_bytes
    return StagePlan(
        stage=index,
        first_layer=index * per_stage,
        last_layer=(index + 1) * per_stage - 1,
        has_embedding="embedding.word_embeddings.weight" in names,
        has_output_layer="decoder.final_layernorm.weight" in names,
        params_per_rank=stage_numel,
        soap_params_per_rank=soap_local,
        adam_params_per_rank=adam_numel,
        soap_matrices=len(mats),
        owner_ranks=world,
        num_blocks=len(asg.blocks),
        idle_ranks=sum(1 for n in asg.numel_loads if n == 0),
        soap_state_max_bytes=max(soap_mem),
        soap_state_mean_bytes=sum(soap_mem) / world,
        soap_state_total_bytes=sum(soap_mem),
        adam_state_bytes=adam_state,
        fold_buffer_max_bytes=max(fold),
        fold_buffer_mean_bytes=sum(fold) / world,
        tp_full_buffer_bytes=tp_full,
        memory_max_bytes=max(totals),
        memory_mean_bytes=sum(totals) / world,
        soap_memory_balance=asg.memory_balance,
        compute_total_gflop=sum(flops) / 1e9,
        compute_max_gflop=max(flops) / 1e9,
        compute_mean_gflop=sum(flops) / world / 1e9,
        compute_balance=asg.compute_balance,
        pingpong_balance=pingpong.compute_balance,
        pingpong_max_gflop=pp_max / 1e9,
        speedup_vs_pingpong=pp_max / max(flops) if max(flops) > 0 else 1.0,
        grad_buffer_bytes=grad_buffer,
        level_reduce_bytes_per_step=traffic.level_reduce,
        adam_sync_bytes_per_step=traffic.adam_reduce + traffic.adam_gather,
        param_gather_bytes_per_step=traffic.soap_gather,
        tp_gather_bytes_per_step=tp_gather,
        launches_per_step=traffic.launches,
        comm_bytes_per_step=traffic.total + tp_gather,
        peak_memory=peak,
        distopt_adam_bytes=distopt,
    )
