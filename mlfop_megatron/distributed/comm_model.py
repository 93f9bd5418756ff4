"""Alpha-beta model of the optimizer's communication and memory per step, per layout.

Layouts compared on the same parameter shapes and data-parallel size N (r = (N-1)/N):

* ``mlfop`` (this package, CommConfig defaults, ``shard_adam=True``): per level the
  reduce-scatter of the owner-ordered SOAP buffer (fp32, or bf16 with ``bf16_wire``) in G
  launches (``CommConfig.level_buckets``, auto: each fp32 send buffer <= 1 GiB), the Adam
  params' fp32 grads reduce-scattered once into the ZeRO-1 slices (``ShardedMainParamAdamW``,
  its buffer padded to a multiple of N: 4r B per element), one all-gather of the
  owner-ordered bf16 SOAP params, one all-gather of the bf16 Adam params (2r B; one buffer per
  dtype: one here), one all-reduce of the fp64 [norm^2 per grad-norm group, found-inf] vector
  (one group; megatron-core 0.19 clips its MTP layers apart: two): L G + 4 launches. Segments are
  padded to the most loaded owner, from the real :class:`Assignment` of the SOAP blocks. Adam
  state (fp32 main weights + two moments, 12 B per element) is sharded: ceil(P_adam / N)
  elements per rank. ``shard_adam=False`` models the replicated Adam (its grads all-reduced,
  8r B, no Adam all-gather, 12 P_adam B per rank); ``adam_reduce_scatter=False`` the ZeRO-1
  Adam with all-reduced grads (``CommConfig(adam_grad_reduce="all_reduce")``, 8r + 2r B).
* ``mlfop_exact``: ``mlfop`` with ``CommConfig(segments="exact")``: no padding on the wire
  (uneven reduce-scatters and parameter all-gather, one coalesced launch each); NCCL runs them
  as one reduce (broadcast) per root, so their latency is modelled as N x ALPHA_S instead of
  ceil(log2 N) x ALPHA_S.
* ``mlfop_v1`` (the first version, ``CommConfig(level_reduce="all_reduce",
  param_sync="broadcast")``, replicated Adam): Megatron's buckets all-reduce every grad at
  every level, then one broadcast per owner rank.
* ``distopt`` (Megatron DistributedOptimizer, Adam): fp32 grad reduce-scatter + bf16 param
  all-gather per bucket, fp32 main weights and moments sharded 1/N.
* ``layerwise`` (Megatron LayerWiseDistributedOptimizer, 0.19): the same collectives on its
  whole-param layout, packed per DDP bucket largest first (``layerwise_layout``: the padding
  is that of every bucket's most loaded shard, one reduce-scatter and one all-gather per
  bucket); the non-matrix params through DistributedOptimizer.
* ``layerwise_pingpong``: its fallback without a per-bucket layout (megatron-core 0.19 with
  ``--no-use-layer-wise-param-layout``, or wherever no ``full_param_layout`` reaches the
  optimizer; core 0.16's only mode, the same calls: its ``shard_params`` / ``allgather_params``,
  muon only there), ``layerwise_fallback_traffic``. DDP keeps ``use_distributed_optimizer``
  off, so every param (matrices and the others alike: 0.19 keeps the Adam params inside the
  layer-wise optimizer on this path) sits unpadded in the DDP grad buffer, whose fp32 grads
  are all-reduced per bucket (8r B per element, ``max(40M, 1M x N)``-element buckets); the
  optimizer deals whole params ping-pong by numel ascending (``pingpong_owners``) and, after
  its step, all-gathers each rank's flattened bf16 params in one call of unequal pieces (NCCL
  runs it as N coalesced broadcasts: latency N x ALPHA_S); with ``comm_counter``'s counting a
  rank sends 2 B for every element the other ranks own; the row takes the busiest rank
  (the least loaded: 2 (P - min load) B). Its norm: one fp32 all-reduce (bf16, no found-inf).
  Optimizer state: 12 B per element of the most loaded rank's whole params.

Link figures (stated, not measured here): an H100 SXM node (DGX H100) has one ConnectX-7
400 Gb/s NDR InfiniBand port per GPU (NVIDIA DGX H100 User Guide, "Network ports"), i.e.
50 GB/s per GPU; we assume NCCL reaches 80% of it across nodes (``BETA_BYTES_PER_S`` = 40e9,
an assumption) and a latency of ``ALPHA_S`` = 10 us per log2(N) step of NCCL's tree / PAT
algorithms (an assumption of the order NCCL's tuning model uses for InfiniBand). Seconds per
step = sum over collectives of ALPHA_S x ceil(log2 N) + bytes sent / BETA_BYTES_PER_S.
The bytes are what one rank sends with ring algorithms (the counting of
``comm_counter.count_collectives``, which measures the same quantities on real runs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mlfop_megatron.distributed.assignment import (
    Assignment,
    Block,
    BlockingConfig,
    CostModel,
    ParamSpec,
    make_blocks,
    pingpong_owners,
)
from mlfop_megatron.distributed.comm_config import level_bucket_sizes
from mlfop_megatron.distributed.layerwise_layout import layerwise_layout
from mlfop_megatron.distributed.model_shapes import model_shapes

ALPHA_S = 10e-6
BETA_BYTES_PER_S = 40e9
BUCKET_ELEMENTS = 40_000_000  # Megatron's default bucket: max(40M, 1M x N) elements


@dataclass(frozen=True)
class LayoutCost:
    """One layout's per-rank, per-step communication and optimizer memory."""

    layout: str
    dp: int
    bytes_per_soap_element: float  # bytes sent per step per matrix element
    bytes_per_adam_element: float  # bytes sent per step per non-matrix element
    launches: int  # collective launches per step
    seconds: float  # modelled communication seconds per step
    optimizer_gib: float  # optimizer state per rank (fp32 main weights, moments, factors)
    optimizer_vs_dp1: float  # that per-rank state / the same layout's state at DP=1


def _buckets(numel: int, dp: int) -> int:
    return max(1, math.ceil(numel / max(BUCKET_ELEMENTS, 1_000_000 * dp)))


def _time(collectives: Sequence[tuple[int, float]], dp: int) -> float:
    """(launches, bytes sent) pairs -> seconds with the alpha-beta figures."""
    hops = math.ceil(math.log2(dp)) if dp > 1 else 0
    return sum(n * ALPHA_S * hops + b / BETA_BYTES_PER_S for n, b in collectives)


def _soap_block_bytes(block: Block) -> int:
    """fp32 SOAP state of one block: the cost model's floats plus fp32 main weights."""
    return 4 * (_STATE.memory_floats(block) + block.numel)


_STATE = CostModel()


@dataclass(frozen=True)
class MlfopTraffic:
    """Bytes one rank sends per step on this package's path (CommConfig defaults), by call.

    ``level_reduce``: L reduce-scatters of the owner-ordered SOAP buffer (N segments of the
    most loaded owner's elements); ``adam_reduce``: the Adam grads' fp32 reduction, once (a
    reduce-scatter into the ZeRO-1 slices, or an all-reduce);
    ``soap_gather``: the all-gather of the owner-ordered params; ``adam_gather``: the ZeRO-1
    Adam params' all-gather (0 with replicated Adam); ``norm``: the all-reduce of the fp64
    [norm^2 per grad-norm group, found-inf] vector.
    """

    levels: int
    dp: int
    level_reduce: float
    adam_reduce: float
    soap_gather: float
    adam_gather: float
    norm: float
    level_buckets: int = 1  # collectives per level reduction (CommConfig.level_buckets)

    @property
    def launches(self) -> int:
        """Collective launches per step: L G + 3, + 1 for the ZeRO-1 Adam all-gather."""
        return self.levels * self.level_buckets + 3 + (1 if self.adam_gather else 0)

    @property
    def total(self) -> float:
        """All bytes one rank sends per step."""
        return (
            self.level_reduce + self.adam_reduce + self.soap_gather + self.adam_gather + self.norm
        )

    def collectives(self) -> list[tuple[int, float]]:
        """(launches, bytes) per collective kind, for the alpha-beta time."""
        out = [(self.levels * self.level_buckets, self.level_reduce), (1, self.adam_reduce)]
        out += [(1, self.soap_gather), (1, self.norm)]
        return out + ([(1, self.adam_gather)] if self.adam_gather else [])


def mlfop_traffic(
    segment: int,
    adam_numel: int,
    dp: int,
    levels: int,
    wire_bytes: int = 4,
    param_bytes: int = 2,
    shard_adam: bool = True,
    soap_sent: float | None = None,
    adam_reduce_scatter: bool = True,
    grad_norm_groups: int = 1,
    level_buckets: int = 1,
) -> MlfopTraffic:
    """Per-rank bytes of each collective of a step, ring algorithms, r = (N-1)/N.

    ``segment``: the most loaded owner's SOAP elements (each owner's segment is padded to it).
    ``soap_sent``: SOAP elements one rank sends per level reduction and per parameter gather
    when the segments are exact (``CommConfig.segments="exact"``); default the padded r x N x
    segment.
    ``adam_reduce_scatter`` (with ``shard_adam``): the Adam grads are reduce-scattered into
    the ZeRO-1 slices (4r B per padded element) instead of all-reduced (8r B per element).
    ``grad_norm_groups``: norms in the step's norm all-reduce (1; 2 on megatron-core 0.19 with
    MTP layers, see ``megatron.optimizer.grad_norm_groups``). ``level_buckets``: collectives
    per level reduction (the same bytes, padding per bucket aside; one alpha each).
    """
    r = (dp - 1) / dp
    buffer = float(dp * segment)  # the padded owner-ordered buffer
    if soap_sent is not None:
        buffer = soap_sent / r if r else 0.0
    adam_padded = dp * math.ceil(adam_numel / dp)
    if shard_adam and adam_reduce_scatter:
        adam_reduce = 4 * r * adam_padded
    else:
        adam_reduce = 8 * r * adam_numel
    return MlfopTraffic(
        levels=levels,
        dp=dp,
        level_reduce=levels * wire_bytes * r * buffer,
        adam_reduce=adam_reduce,
        soap_gather=param_bytes * r * buffer,
        adam_gather=param_bytes * r * adam_padded if shard_adam and adam_numel else 0.0,
        norm=norm_all_reduce_bytes(dp, grad_norm_groups),
        level_buckets=level_buckets,
    )


def norm_all_reduce_bytes(dp: int, grad_norm_groups: int = 1) -> float:
    """Bytes one rank sends in the ring all-reduce of the fp64 [norm^2 per group, found-inf]."""
    return 2 * (dp - 1) / dp * 8 * (grad_norm_groups + 1)


def _whole_param_cost(
    layout: str, dp: int, buckets: int, padded: int, owned: int, p_soap: int, p_adam: int
) -> LayoutCost:
    """A layer-wise layout's cost: its matrix params as whole params, the rest by distopt.

    ``buckets`` buckets of the matrix params, ``padded`` elements with their padding (what
    each collective moves), ``owned`` elements on the most loaded rank; per bucket one fp32
    grad reduce-scatter and one bf16 param all-gather, the same for the non-matrix params in
    DistributedOptimizer's buckets, and Megatron's norm / found-inf reduction.
    """
    r = (dp - 1) / dp
    adam_buckets = _buckets(p_adam, dp)
    collectives = [
        (buckets, 4 * r * padded),
        (buckets, 2 * r * padded),
        (adam_buckets, 4 * r * p_adam),
        (adam_buckets, 2 * r * p_adam),
        (1, 16 * r),
    ]
    state = owned + math.ceil(p_adam / dp)
    return LayoutCost(
        layout,
        dp,
        6 * r * padded / p_soap,
        6 * r,
        2 * buckets + 2 * adam_buckets + 1,
        _time(collectives, dp),
        12 * state / 2.0**30,
        state / (p_soap + p_adam),
    )


@dataclass(frozen=True)
class LayerwiseFallbackTraffic:
    """Bytes each rank sends per step on Megatron's layer-wise fallback (module), by call.

    ``loads``: elements each rank owns (every param, dealt ping-pong); ``grad_all_reduce``: the
    all-reduces of the whole fp32 DDP grad buffer, ``grad_buckets`` launches, the same on every
    rank; ``param_all_gather``: per rank, the all-gather of unequal bf16 pieces as
    ``comm_counter`` counts it (every other rank's piece); ``norm``: one fp32 all-reduce.
    """

    dp: int
    grad_buckets: int
    loads: tuple[int, ...]
    grad_all_reduce: float
    param_all_gather: tuple[int, ...]
    norm: float


def layerwise_fallback_traffic(
    numels: Sequence[int], dp: int, grad_bytes: int = 4, param_bytes: int = 2
) -> LayerwiseFallbackTraffic:
    """Per-rank bytes of megatron-core's layer-wise fallback (0.19 without a layout, 0.16).

    ``numels``: every param the optimizer trains (its deal and DDP's buffer take them all).
    With P their sum, r = (N-1)/N and load_i the elements dealt to rank i
    (``pingpong_owners``, Megatron's ``_shard_params_ping_pong``): grads 2r x grad_bytes x P
    in ceil(P / max(40M, 1M x N)) launches (DDP's unpadded buckets), params
    param_bytes x (P - load_i) on rank i in one launch (none at N = 1), norm 2r x 4 B.
    """
    r = (dp - 1) / dp
    total = sum(numels)
    loads = [0] * dp
    for numel, owner in zip(numels, pingpong_owners(numels, dp)):
        loads[owner] += numel
    return LayerwiseFallbackTraffic(
        dp=dp,
        grad_buckets=_buckets(total, dp),
        loads=tuple(loads),
        grad_all_reduce=2 * r * grad_bytes * total,
        param_all_gather=tuple(param_bytes * (total - load) for load in loads),
        norm=2 * r * 4,
    )


def _fallback_cost(traffic: LayerwiseFallbackTraffic, p_soap: int, p_adam: int) -> LayoutCost:
    """The ``layerwise_pingpong`` row: the busiest rank's bytes, the most loaded rank's state."""
    dp = traffic.dp
    p_all = p_soap + p_adam
    gather = max(traffic.param_all_gather)
    seconds = _time([(traffic.grad_buckets, traffic.grad_all_reduce), (1, traffic.norm)], dp)
    if dp > 1:  # one uneven all-gather: N coalesced broadcasts
        seconds += dp * ALPHA_S + gather / BETA_BYTES_PER_S
    per_element = (traffic.grad_all_reduce + gather) / p_all
    return LayoutCost(
        "layerwise_pingpong",
        dp,
        per_element,
        per_element,
        traffic.grad_buckets + 1 + (1 if dp > 1 else 0),
        seconds,
        12 * max(traffic.loads) / 2.0**30,
        max(traffic.loads) / p_all,
    )


def layout_costs(
    specs: Sequence[ParamSpec],
    dp: int,
    levels: int,
    block_size: int | None = 1024,
    max_precond_dim: int = 10000,
    shard_adam: bool = True,
    level_buckets: int | None = None,
) -> list[LayoutCost]:
    """Modelled cost of every layout (see module) for these shapes at data-parallel size dp.

    ``level_buckets``: ``CommConfig.level_buckets`` of the mlfop rows (None: auto).
    """
    soap = [s for s in specs if s.soap_matrix]
    adam = [s for s in specs if not s.soap_matrix]
    p_soap = sum(s.numel for s in soap)
    p_adam = sum(s.numel for s in adam)
    p_all = p_soap + p_adam
    r = (dp - 1) / dp
    gib = 2.0**30
    blocks = make_blocks(soap, BlockingConfig(block_size, max_precond_dim))
    assignment = Assignment.build(blocks, dp)
    seg = max(assignment.numel_loads)  # owner segment: the most loaded owner's elements
    owned = [[b.numel for b in assignment.blocks_of(r)] for r in range(dp)]
    buckets_per_level = len(level_bucket_sizes(level_buckets, owned)) if dp > 1 else 1
    mem = [0] * dp
    for b, owner in zip(assignment.blocks, assignment.owners):
        mem[owner] += _soap_block_bytes(b)
    replicated_adam = 12 * p_adam  # fp32 main weights + two moments on every rank
    # ZeRO-1: the owned slice of the flat buffer padded to a multiple of N
    adam_bytes = 12 * math.ceil(p_adam / dp) if shard_adam else replicated_adam
    out = []
    # exact segments: a rank sends every other owner's elements, no padding
    exact_sent = float(p_soap - min(assignment.numel_loads))
    for name, wire in (("mlfop", 4), ("mlfop_bf16_wire", 2), ("mlfop_exact", 4)):
        exact = name == "mlfop_exact"
        sent = exact_sent if exact else None
        t = mlfop_traffic(
            seg,
            p_adam,
            dp,
            levels,
            wire,
            shard_adam=shard_adam,
            soap_sent=sent,
            level_buckets=buckets_per_level,
        )
        seconds = _time(t.collectives(), dp)
        if exact:  # NCCL runs uneven reduce-scatters / all-gathers as N coalesced root ops
            hops = math.ceil(math.log2(dp)) if dp > 1 else 0
            seconds += (levels * buckets_per_level + 1) * ALPHA_S * (dp - hops)
        out.append(
            LayoutCost(
                name,
                dp,
                (t.level_reduce + t.soap_gather) / p_soap,
                (t.adam_reduce + t.adam_gather) / p_adam if p_adam else 0.0,
                t.launches,
                seconds,
                (max(mem) + adam_bytes) / gib,
                (max(mem) + adam_bytes) / (sum(mem) + replicated_adam),
            )
        )
    buckets = _buckets(p_all, dp)
    v1 = [(levels * buckets, levels * 8 * r * p_all), (dp, 2 * r * p_soap)]
    v1.append((1, norm_all_reduce_bytes(dp)))
    out.append(
        LayoutCost(
            "mlfop_v1",
            dp,
            levels * 8 * r + 2 * r,
            levels * 8 * r,
            levels * buckets + dp + 1,
            _time(v1, dp),
            (max(mem) + replicated_adam) / gib,
            (max(mem) + replicated_adam) / (sum(mem) + replicated_adam),
        )
    )
    # Megatron's own norm and found-inf: one fp32 each (2r x 8 B; modelled as one launch)
    dist = [(buckets, 4 * r * p_all), (buckets, 2 * r * p_all), (1, 16 * r)]
    out.append(
        LayoutCost(
            "distopt",
            dp,
            6 * r,
            6 * r,
            2 * buckets + 1,
            _time(dist, dp),
            12 * math.ceil(p_all / dp) / gib,
            math.ceil(p_all / dp) / p_all,
        )
    )
    # Megatron 0.19's layer-wise layout: whole params packed per bucket (layerwise_layout).
    lw_layout = layerwise_layout([s.numel for s in soap], dp, max(BUCKET_ELEMENTS, 1_000_000 * dp))
    out.append(
        _whole_param_cost(
            "layerwise",
            dp,
            len(lw_layout.buckets),
            lw_layout.padded_numel,
            max(lw_layout.loads),
            p_soap,
            p_adam,
        )
    )
    # Its fallback without a per-bucket layout (0.16's only mode): every param dealt ping-pong,
    # grads all-reduced, params all-gathered in unequal pieces.
    fallback = layerwise_fallback_traffic([s.numel for s in specs], dp)
    out.append(_fallback_cost(fallback, p_soap, p_adam))
    return out


def communication_table(
    model: str = "llama3-8b",
    dp_sizes: Sequence[int] = (64, 256, 1024),
    levels: int = 4,
    block_size: int | None = 1024,
    tp: int = 1,
    shard_adam: bool = True,
    level_buckets: int | None = None,
) -> list[LayoutCost]:
    """The model's layouts at each DP size (what ``mlfop-plan`` prints)."""
    specs = model_shapes(model, tp)
    return [
        c
        for dp in dp_sizes
        for c in layout_costs(
            specs, dp, levels, block_size, shard_adam=shard_adam, level_buckets=level_buckets
        )
    ]


def format_table(rows: Sequence[LayoutCost]) -> str:
    """Markdown table of layout costs."""
    lines = [
        "| DP | layout | B/matrix elem | B/other elem | launches/step | modelled s/step | "
        "optimizer GiB/rank | optimizer state / DP=1 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in rows:
        lines.append(
            f"| {c.dp} | {c.layout} | {c.bytes_per_soap_element:.2f} | "
            f"{c.bytes_per_adam_element:.2f} | {c.launches} | {c.seconds:.3f} | "
            f"{c.optimizer_gib:.2f} | {c.optimizer_vs_dp1:.4f} |"
        )
    return "\n".join(lines)
