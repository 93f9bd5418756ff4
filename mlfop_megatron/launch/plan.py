"""Size an ML-FOP-SOAP Megatron job before submitting it (pure Python: no torch, no GPU).

For a model and a DP x TP x PP layout this reports, per rank of the busiest pipeline stage:
optimizer memory (SOAP state, Adam state, fold buffers), SOAP compute per optimizer step and
its balance over the owner ranks (with Megatron's whole-param ping-pong assignment for
comparison), and the bytes each rank moves per optimizer step. The SOAP numbers come from the
same pure owner assignment the optimizer builds at run time
(:mod:`mlfop_megatron.distributed.assignment`).

    mlfop-plan --model llama3-8b --dp 64 --tp 8 --pp 2 --micro-batches 8
    mlfop-plan --hidden 2048 --ffn 8192 --layers 16 --heads 16 --vocab 32000 \\
        --world-size 256 --tp 4 --micro-batches 16 --auto-block-size --json plan.json

Model of the Megatron adapter (``mlfop_megatron.megatron``) used here:

* SOAP takes the transformer's linear weights; embeddings, output layer, norms and biases go
  to Adam (two fp32 moments), replicated over data parallelism.
* ``--tp-mode blockwise``: each TP rank preconditions its own shard; SOAP blocks are owned
  over the DP group. ``--tp-mode full``: shard gradients are all-gathered over TP at every
  level, SOAP blocks of the whole matrices are owned over the TP x DP group, and every rank
  keeps a whole-matrix copy.
* Every folding level boundary all-reduces the stage's whole fp32 grad buffer over DP
  (ring: 2(N-1)/N x buffer bytes per rank); K micro-batches give len(dyadic boundaries)
  levels, e.g. K=8 -> boundaries 1, 2, 4, 8 -> 4 all-reduces.
* After the step owners broadcast their updated blocks (an uneven all-gather of the params).
* Layers are split evenly over PP stages; the first stage also holds the embedding, the last
  the final norm and the output layer (with tied embeddings and PP > 1 the last stage holds a
  shared copy of the embedding as its output layer, as Megatron does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from mlfop_megatron.config import TP_MODES, FoldingConfig
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.distributed.assignment import (
    Assignment,
    BlockingConfig,
    CostModel,
    ParamSpec,
    choose_block_size,
    make_blocks,
    pingpong_assignment,
)
from mlfop_megatron.distributed.model_shapes import MODELS, TransformerDims, transformer_shapes

__all__ = [
    "GRAD_BYTES",
    "MASTER_PARAM_BYTES",
    "Plan",
    "PlanConfig",
    "StagePlan",
    "build_parser",
    "config_from_args",
    "format_bytes",
    "format_count",
    "format_flops",
    "format_plan",
    "main",
    "make_plan",
    "split_stages",
]

KIB, MIB, GIB = 1024.0, float(1 << 20), float(1 << 30)
GRAD_BYTES = 4  # Megatron DDP grad buffer (main_grad) is fp32
MASTER_PARAM_BYTES = 4  # the adapter trains fp32 params (bf16=False): full-mode copies are fp32
PROG = "mlfop-plan"


def _positive(flag: str, value: Any) -> None:
    """Raise ValueError naming ``flag`` unless value is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{flag} must be an integer >= 1 (got {value!r})")


@dataclass(frozen=True)
class PlanConfig:
    """Everything a plan depends on; invalid values raise ValueError naming the CLI option."""

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
    max_precond_dim: int = 10000
    precondition_frequency: int = 10
    tp_mode: str = "blockwise"
    param_bytes: int = 2
    state_bytes: int = 4
    folding: bool = True
    boundaries: tuple[int, ...] | None = None
    world_size: int | None = None

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
            ("--max-precond-dim", self.max_precond_dim),
            ("--precondition-frequency", self.precondition_frequency),
            ("--param-bytes", self.param_bytes),
            ("--state-bytes", self.state_bytes),
        ):
            _positive(flag, value)
        if d.head_dim is not None:
            _positive("--head-dim", d.head_dim)
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
            _positive("--world-size", self.world_size)
            if self.world_size != world:
                raise ValueError(
                    f"--world-size ({self.world_size}) must equal --dp x --tp x --pp "
                    f"({self.dp} x {self.tp} x {self.pp} = {world})"
                )
        if self.tp_mode not in TP_MODES:
            raise ValueError(f"--tp-mode must be one of {TP_MODES} (got {self.tp_mode!r})")
        if self.block_size is not None:
            _positive("--block-size", self.block_size)
            if self.auto_block_size:
                raise ValueError("--block-size and --auto-block-size are mutually exclusive")
        if not (self.target_balance >= 1.0):
            raise ValueError(f"--target-balance must be >= 1.0 (got {self.target_balance!r})")
        if self.boundaries is not None:
            if not self.folding:
                raise ValueError("--boundaries cannot be combined with --no-folding")
            object.__setattr__(self, "boundaries", tuple(self.boundaries))
        try:
            _ = self.schedule  # validates the level boundaries
        except ValueError as exc:
            raise ValueError(f"--boundaries / --micro-batches: {exc}") from None

    @property
    def schedule(self) -> LevelSchedule:
        """Level schedule of one accumulation window (the optimizer's own)."""
        cfg = FoldingConfig(
            enabled=self.folding, accumulation_steps=self.micro_batches, boundaries=self.boundaries
        )
        return LevelSchedule.from_config(cfg)

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
    allreduce_bytes_per_level: float
    allreduce_bytes_per_step: float
    param_gather_bytes_per_step: int
    tp_gather_bytes_per_step: int
    comm_bytes_per_step: float

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
    cost = CostModel(cfg.precondition_frequency, state_bytes=cfg.state_bytes)
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
            blocks = make_blocks(mats, BlockingConfig(bs, cfg.max_precond_dim))
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
                max_precond_dim=cfg.max_precond_dim,
                cost_model=cost,
            )[0]
            for mats in soap_owned
        ]
        block_size, source = min(chosen, key=_size_key), "auto"
        target_met = all(
            assign(m, block_size).compute_balance <= cfg.target_balance for m in soap_owned
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
            f"adapter trains fp32 params, so it broadcasts {MASTER_PARAM_BYTES} B/param "
            f"(use --param-bytes {MASTER_PARAM_BYTES} to plan for it)"
        )
    if levels > 1:
        notes.append(
            f"folding costs {levels - 1} grad all-reduce(s) per step more than plain Megatron "
            "DDP (1 per step)"
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
    adam_state = 2 * adam_numel * cfg.state_bytes  # exp_avg + exp_avg_sq
    soap_mem = asg.memory_loads
    fold = [2 * n * cfg.state_bytes for n in asg.numel_loads]
    # Full mode: a whole-matrix fp32 copy of the params, plus one gathered level gradient.
    tp_full = 2 * sum(m.numel for m in mats) * MASTER_PARAM_BYTES if cfg.full_mode else 0
    totals = [m + f + adam_state + tp_full for m, f in zip(soap_mem, fold)]
    flops = asg.compute_loads
    pingpong = pingpong_assignment(mats, world, asg.cost_model, cfg.max_precond_dim)
    pp_max = max(pingpong.compute_loads)
    grad_buffer = stage_numel * GRAD_BYTES
    ring = 2.0 * (cfg.dp - 1) / cfg.dp
    allreduce_level = ring * grad_buffer
    param_gather = asg.comm_bytes_per_step(cfg.param_bytes)
    tp_gather = levels * (cfg.tp - 1) * soap_local * GRAD_BYTES if cfg.full_mode else 0
    per_stage = cfg.dims.layers // cfg.pp
    names = {p.name for p in params}
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
        allreduce_bytes_per_level=allreduce_level,
        allreduce_bytes_per_step=levels * allreduce_level,
        param_gather_bytes_per_step=param_gather,
        tp_gather_bytes_per_step=tp_gather,
        comm_bytes_per_step=levels * allreduce_level + param_gather + tp_gather,
    )


# --------------------------------------------------------------------------- output
def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
    """Count with a K/M/B suffix and one decimal."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_flops(gflop: float) -> str:
    """GFLOP amount in TFLOP/GFLOP/MFLOP/KFLOP, whichever keeps the number >= 1."""
    for unit, size in (("TFLOP", 1e3), ("GFLOP", 1.0), ("MFLOP", 1e-3), ("KFLOP", 1e-6)):
        if abs(gflop) >= size:
            return f"{gflop / size:.1f} {unit}"
    return f"{gflop * 1e9:.0f} FLOP"


def _row(label: str, *values: str, width: int = 72) -> str:
    return f"  {label:<{width}}" + "".join(f"{v:>12}" for v in values)


def format_plan(plan: Plan) -> str:
    """Readable multi-section report of a plan."""
    cfg, d, b = plan.config, plan.config.dims, plan.busiest
    fb = format_bytes
    head_dim = d.head_dim or d.hidden // d.heads
    owners = (
        f"whole matrices owned over the TP x DP group ({cfg.owner_ranks} ranks)"
        if cfg.full_mode
        else f"each TP shard's blocks owned over the DP group ({cfg.dp} ranks)"
    )
    bs = "whole params" if plan.block_size is None else str(plan.block_size)
    if plan.block_size_source == "auto":
        met = "met" if plan.target_met else "NOT met"
        bs += f" (auto, target balance {cfg.target_balance:g} {met})"
    lines = [
        f"ML-FOP-SOAP plan: {cfg.model_name} (hidden {d.hidden}, ffn {d.ffn}, {d.layers} layers, "
        f"{d.heads} heads / {d.kv_heads} kv heads x {head_dim}, vocab {d.vocab}"
        f"{'' if cfg.gated else ', not gated'}{'' if cfg.fused else ', unfused'}"
        f"{', bias' if cfg.bias else ''}{', tied embeddings' if cfg.tied_embeddings else ''})",
        f"layout: DP {cfg.dp} x TP {cfg.tp} x PP {cfg.pp} = {cfg.world} ranks; "
        f"K = {cfg.micro_batches} micro-batches -> {plan.num_levels} level(s) "
        f"(boundaries {' '.join(map(str, plan.boundaries))})",
        f"optimizer: tp_mode {cfg.tp_mode}, {owners}; block size {bs}; "
        f"max_precond_dim {cfg.max_precond_dim}; precondition_frequency "
        f"{cfg.precondition_frequency}; state {cfg.state_bytes} B/float; params in "
        f"communication {cfg.param_bytes} B",
    ]
    if len(plan.stages) > 1:
        lines += [
            "",
            "per pipeline stage (per rank):",
            f"  {'stage':>5}  {'holds':<42}{'params':>9}{'blocks':>8}{'idle':>6}"
            f"{'opt mem max':>13}{'balance':>9}{'max flop':>13}{'comm/step':>12}",
        ]
        for s in plan.stages:
            lines.append(
                f"  {s.stage:>5}  {s.label:<42}{format_count(s.params_per_rank):>9}"
                f"{s.num_blocks:>8}{s.idle_ranks:>6}{fb(s.memory_max_bytes):>13}"
                f"{s.compute_balance:>9.3f}{format_flops(s.compute_max_gflop):>13}"
                f"{fb(s.comm_bytes_per_step):>12}"
            )
    full = cfg.full_mode
    lines += [
        "",
        f"busiest stage {b.stage} ({b.label}): {format_count(b.params_per_rank)} params per "
        f"TP rank ({format_count(b.soap_params_per_rank)} in {b.soap_matrices} SOAP matrices, "
        f"{format_count(b.adam_params_per_rank)} Adam)",
        _row("memory (optimizer only; main params/grads NOT included)", "max", "mean"),
        _row(
            f"SOAP state: factors, bases, moments (over {b.owner_ranks} owner ranks)",
            fb(b.soap_state_max_bytes),
            fb(b.soap_state_mean_bytes),
        ),
        _row(
            "Adam state: embedding/output/norms/biases, replicated",
            fb(b.adam_state_bytes),
            fb(b.adam_state_bytes),
        ),
        _row(
            "fold buffers: estimate + rotated estimate of owned blocks",
            fb(b.fold_buffer_max_bytes),
            fb(b.fold_buffer_mean_bytes),
        ),
        _row(
            "tp-full: whole-matrix fp32 param copy + gathered level grad",
            fb(b.tp_full_buffer_bytes) if full else "-",
            fb(b.tp_full_buffer_bytes) if full else "-",
        ),
        _row("total (max: busiest rank)", fb(b.memory_max_bytes), fb(b.memory_mean_bytes)),
        f"  SOAP state summed over the {b.owner_ranks} owner ranks: "
        f"{fb(b.soap_state_total_bytes)} (memory max/mean {b.soap_memory_balance:.3f})",
        "compute per optimizer step (SOAP matmuls + basis refresh amortized over "
        f"{cfg.precondition_frequency} steps)",
        f"  busiest rank {format_flops(b.compute_max_gflop)}, mean "
        f"{format_flops(b.compute_mean_gflop)}, balance max/mean {b.compute_balance:.3f} "
        f"({b.num_blocks} blocks, {b.idle_ranks} idle ranks; "
        f"{format_flops(b.compute_total_gflop)} over the group)",
        f"  Megatron ping-pong (whole params, same ranks): balance {b.pingpong_balance:.3f}, "
        f"busiest rank {format_flops(b.pingpong_max_gflop)} -> ours "
        f"{b.speedup_vs_pingpong:.2f}x faster on the busiest rank",
        _row("communication per optimizer step, per rank (bytes sent/received)", "bytes"),
        _row(
            f"level all-reduces: {plan.num_levels} x 2(N-1)/N x {fb(b.grad_buffer_bytes)} "
            f"fp32 grad buffer (N = DP {cfg.dp})",
            fb(b.allreduce_bytes_per_step),
        ),
        _row(
            f"param all-gather: owners broadcast updated blocks ({cfg.param_bytes} B/param)",
            fb(b.param_gather_bytes_per_step),
        ),
        _row(
            f"TP all-gather of level grads (tp-full): {plan.num_levels} x (TP-1) x shard",
            fb(b.tp_gather_bytes_per_step) if full else "-",
        ),
        _row("total", fb(b.comm_bytes_per_step)),
        "",
        "notes:",
    ]
    lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """Command-line parser of ``mlfop-plan``."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = ap.add_argument_group("model (--model, optionally overridden by explicit dims)")
    m.add_argument("--model", choices=sorted(MODELS), default=None)
    for flag in ("--hidden", "--ffn", "--layers", "--heads", "--kv-heads", "--vocab"):
        m.add_argument(flag, type=int, default=None)
    m.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    m.add_argument("--no-gated", action="store_true", help="plain (not SwiGLU) MLP")
    m.add_argument("--unfused", action="store_true", help="separate q,k,v and gate,up matrices")
    m.add_argument("--bias", action="store_true", help="linear layers with biases")
    m.add_argument("--tied-embeddings", action="store_true")
    m.add_argument("--vocab-divisible-by", type=int, default=128)
    p = ap.add_argument_group("parallel layout")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size")
    p.add_argument("--world-size", type=int, default=None, help="total ranks (gives --dp)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batches", "-K", type=int, default=1, help="K per optimizer step")
    o = ap.add_argument_group("optimizer")
    o.add_argument("--block-size", type=int, default=None, help="default: whole params")
    o.add_argument("--auto-block-size", action="store_true", help="choose_block_size")
    o.add_argument("--target-balance", type=float, default=1.05, help="for --auto-block-size")
    o.add_argument("--max-precond-dim", type=int, default=10000)
    o.add_argument("--precondition-frequency", type=int, default=10)
    o.add_argument("--tp-mode", choices=TP_MODES, default="blockwise")
    o.add_argument("--param-bytes", type=int, default=2, help="bytes/param in the all-gather")
    o.add_argument("--state-bytes", type=int, default=4, help="bytes/float of optimizer state")
    o.add_argument("--no-folding", action="store_true", help="one level: plain SOAP")
    o.add_argument("--boundaries", type=int, nargs="+", default=None, help="default: dyadic")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the plan as JSON")
    return ap


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    """PlanConfig from parsed arguments (ValueError naming the option on bad input)."""
    explicit = {
        "hidden": args.hidden,
        "ffn": args.ffn,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        "head_dim": args.head_dim,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if args.model is not None:
        dims = replace(MODELS[args.model], **given)
        name = args.model + (" (modified)" if given else "")
    else:
        required = ("hidden", "ffn", "layers", "heads", "vocab")
        missing = [f"--{k}" for k in required if k not in given]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} required without --model (one of {sorted(MODELS)})"
            )
        given.setdefault("kv_heads", given["heads"])  # default: multi-head attention
        dims = TransformerDims(**given)
        name = "custom"
    _positive("--tp", args.tp)
    _positive("--pp", args.pp)
    dp = args.dp
    if dp is None:
        if args.world_size is None:
            raise ValueError("give --dp or --world-size")
        _positive("--world-size", args.world_size)
        if args.world_size % (args.tp * args.pp):
            raise ValueError(
                f"--world-size ({args.world_size}) must be divisible by --tp x --pp "
                f"({args.tp} x {args.pp})"
            )
        dp = args.world_size // (args.tp * args.pp)
    return PlanConfig(
        dims=dims,
        dp=dp,
        tp=args.tp,
        pp=args.pp,
        micro_batches=args.micro_batches,
        model_name=name,
        gated=not args.no_gated,
        fused=not args.unfused,
        bias=args.bias,
        tied_embeddings=args.tied_embeddings,
        vocab_divisible_by=args.vocab_divisible_by,
        block_size=args.block_size,
        auto_block_size=args.auto_block_size,
        target_balance=args.target_balance,
        max_precond_dim=args.max_precond_dim,
        precondition_frequency=args.precondition_frequency,
        tp_mode=args.tp_mode,
        param_bytes=args.param_bytes,
        state_bytes=args.state_bytes,
        folding=not args.no_folding,
        boundaries=tuple(args.boundaries) if args.boundaries is not None else None,
        world_size=args.world_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan (and write --json); 2 with an argparse-style message on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse errors (2) and --help (0): return, do not exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        plan = make_plan(config_from_args(args))
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
            f.write("\n")
    try:
        print(format_plan(plan), flush=True)
    except BrokenPipeError:  # output piped into head & co: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
