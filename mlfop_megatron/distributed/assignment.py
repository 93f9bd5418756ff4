"""Pure work assignment of SOAP blocks to data-parallel ranks (no torch.distributed here).

Every rank builds the identical :class:`Assignment` from the same parameter list, so owners
are agreed without communication. Owners run the SOAP/FOP update of their blocks; all ranks
then all-gather the updated parameter blocks.

Cost model (per block of shape m x n, per optimizer step; derivation in :class:`CostModel`):

* a rotated left side costs 6 m^2 n flops per step (rot 2m^2n, unrot 2m^2n, factor update
  G G^T 2m^2n) plus a refresh every ``precondition_frequency`` steps of
  ``refresh_coeff * m^3 + 4 m^2 n`` flops (power step L@Q 2m^3, Householder QR with explicit
  Q 8/3 m^3, exact re-expression of the first moment 4m^2n); the right side is symmetric;
* every block pays ``elementwise_flops * m * n`` for the Adam-in-eigenbasis update;
* memory is 2 m^2 (factor + basis) per rotated left side, 2 n^2 per rotated right side and
  2 m n for the two moments.

A side larger than ``max_precond_dim`` gets no rotation (identity) and drops its terms, so a
block with both sides identity costs exactly what AdamW costs.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from mlfop_megatron.policies import rotates

__all__ = [
    "BALANCE_METRICS",
    "Assignment",
    "Block",
    "BlockingConfig",
    "CostModel",
    "LoadStats",
    "ParamSpec",
    "choose_block_size",
    "lpt_partition",
    "make_blocks",
    "merged_2d_shape",
    "pingpong_assignment",
    "pingpong_owners",
    "whole_param_memory_bound",
]

GIB = float(1 << 30)
BALANCE_METRICS = ("compute", "memory", "both")


@dataclass(frozen=True)
class ParamSpec:
    """A parameter as the assignment sees it: name, shape and who optimizes it."""

    name: str
    shape: tuple[int, ...]
    preconditioned: bool = True  # SOAP matrix (True) or AdamW-handled (embeddings, norms, biases)
    partition_dim: int | None = None  # tensor-parallel split dim of the full weight, if any
    kind: str = "other"  # free-form role label: "attention", "mlp", "embedding", "norm", ...

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if len(shape) == 0 or any(d < 1 for d in shape):
            raise ValueError(
                f"shape of param {self.name!r} must be non-empty with every dim >= 1, got "
                f"{self.shape!r}"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def soap_matrix(self) -> bool:
        """Whether SOAP preconditions it: flagged ``preconditioned`` and at least 2-D."""
        return self.preconditioned and len(self.shape) >= 2


def merged_2d_shape(shape: Sequence[int]) -> tuple[int, int]:
    """2-D view used for blocking: 1-D -> (1, n); k-D -> (d0, d1*...*dk-1)."""
    if len(shape) == 0 or any(d < 1 for d in shape):
        raise ValueError(f"shape must be non-empty with every dim >= 1, got {tuple(shape)!r}")
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


@dataclass(frozen=True)
class BlockingConfig:
    """How parameters are cut into blocks and which block sides get a rotation."""

    block_size: int | None = None  # None: whole params; else each block side <= block_size
    max_precond_dim: int = 10000  # a side larger than this is identity (no factor, no basis)

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or int(self.block_size) < 1
        ):
            raise ValueError(f"block_size must be None or an int >= 1, got {self.block_size!r}")
        if int(self.max_precond_dim) < 1:
            raise ValueError(f"max_precond_dim must be an int >= 1, got {self.max_precond_dim!r}")


@dataclass(frozen=True)
class Block:
    """One preconditioned tile [row_offset:+rows, col_offset:+cols] of a merged 2-D param."""

    param_index: int
    param_name: str
    row_offset: int
    col_offset: int
    rows: int  # m: left side (factor L, basis QL)
    cols: int  # n: right side (factor R, basis QR)
    rotate_rows: bool
    rotate_cols: bool

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block rows and cols must be >= 1, got {self.rows}x{self.cols}")
        if self.row_offset < 0 or self.col_offset < 0 or self.param_index < 0:
            raise ValueError("block param_index and offsets must be >= 0")

    @property
    def key(self) -> tuple[int, int, int]:
        """Stable identity and deterministic tie-break: (param index, row offset, col offset)."""
        return (self.param_index, self.row_offset, self.col_offset)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the block."""
        return (self.rows, self.cols)

    @property
    def numel(self) -> int:
        """Number of elements of the block."""
        return self.rows * self.cols


def _split(dim: int, block_size: int | None) -> list[tuple[int, int]]:
    """(offset, length) pieces of size block_size; the last piece takes the remainder."""
    if block_size is None or dim <= block_size:
        return [(0, dim)]
    return [(off, min(block_size, dim - off)) for off in range(0, dim, block_size)]


def make_blocks(
    params: Sequence[ParamSpec], blocking: BlockingConfig | None = None
) -> tuple[Block, ...]:
    """Cut every param (merged to 2-D) into blocks that tile it exactly, row-major per param."""
    blocking = blocking or BlockingConfig()
    if len(params) == 0:
        raise ValueError("params must be a non-empty sequence of ParamSpec")
    blocks: list[Block] = []
    for index, spec in enumerate(params):
        m, n = merged_2d_shape(spec.shape)
        matrix = spec.soap_matrix
        for r0, rows in _split(m, blocking.block_size):
            for c0, cols in _split(n, blocking.block_size):
                blocks.append(
                    Block(
                        param_index=index,
                        param_name=spec.name,
                        row_offset=r0,
                        col_offset=c0,
                        rows=rows,
                        cols=cols,
                        rotate_rows=matrix and rotates(rows, blocking.max_precond_dim),
                        rotate_cols=matrix and rotates(cols, blocking.max_precond_dim),
                    )
                )
    return tuple(blocks)


@dataclass(frozen=True)
class CostModel:
    """Per-step flops and state memory of one block (see the module docstring)."""

    precondition_frequency: int = 10
    refresh_coeff: float = 14.0 / 3.0  # power step L@Q (2 d^3) + Householder QR, explicit Q
    elementwise_flops: float = 14.0  # moments, sqrt, divide, step and decoupled weight decay
    state_bytes: int = 4  # fp32 optimizer state

    def __post_init__(self) -> None:
        if int(self.precondition_frequency) < 1:
            raise ValueError(
                f"precondition_frequency must be an int >= 1, got {self.precondition_frequency!r}"
            )
        if self.refresh_coeff < 0 or self.elementwise_flops < 0:
            raise ValueError("refresh_coeff and elementwise_flops must be >= 0")
        if int(self.state_bytes) < 1:
            raise ValueError(f"state_bytes must be an int >= 1, got {self.state_bytes!r}")

    def _side_flops(self, d: int, other: int) -> float:
        """Per-step flops of one rotated side of size d (other side size ``other``)."""
        per_step = 6.0 * d * d * other  # rot + unrot + factor update, 2 d^2 other each
        refresh = self.refresh_coeff * d**3 + 4.0 * d * d * other  # new basis + re-express m
        return per_step + refresh / self.precondition_frequency

    def compute_flops(self, block: Block) -> float:
        """Amortized flops per optimizer step of this block's owner."""
        m, n = block.rows, block.cols
        flops = self.elementwise_flops * m * n
        if block.rotate_rows:
            flops += self._side_flops(m, n)
        if block.rotate_cols:
            flops += self._side_flops(n, m)
        return flops

    def memory_floats(self, block: Block) -> int:
        """Optimizer-state floats: factor + basis per rotated side, plus the two moments."""
        m, n = block.rows, block.cols
        return (
            2 * m * n
            + (2 * m * m if block.rotate_rows else 0)
            + (2 * n * n if block.rotate_cols else 0)
        )

    def memory_bytes(self, block: Block) -> int:
        """Optimizer-state bytes of this block at ``state_bytes`` per float."""
        return self.memory_floats(block) * self.state_bytes


def lpt_partition(weights: Sequence[float], world_size: int) -> tuple[int, ...]:
    """Longest-processing-time-first greedy: owner per item, deterministic tie-breaks.

    Items go in order of decreasing weight (ties: lower item index first) to the rank with
    the least load so far (ties: lower rank). Guarantees max <= mean + max item and
    max <= (4/3 - 1/(3W)) * optimum.
    """
    _check_world_size(world_size)
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError("weights must be finite and >= 0")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0.0, rank) for rank in range(world_size)]
    owners = [0] * len(weights)
    for i in order:
        load, rank = heap[0]
        owners[i] = rank
        heapq.heapreplace(heap, (load + weights[i], rank))
    return tuple(owners)


def pingpong_owners(
    numels: Sequence[int], world_size: int, descending: bool = False
) -> tuple[int, ...]:
    """Our re-implementation of Megatron's LayerWiseDistributedOptimizer.shard_params order.

    Megatron (core 0.16, and 0.19's fallback without a per-bucket layout:
    ``_shard_params_ping_pong``) stable-sorts params by numel ascending and deals them out in a
    snake 0, 1, ..., W-1, W-1, ..., 0, 0, 1, ...; ``descending=True`` deals largest first
    instead.
    """
    _check_world_size(world_size)
    loop = list(range(world_size)) + list(range(world_size))[::-1]
    sign = -1 if descending else 1  # equal sizes keep their original (stable) order
    order = sorted(range(len(numels)), key=lambda i: (sign * numels[i], i))
    owners = [0] * len(numels)
    for step, i in enumerate(order):
        owners[i] = loop[step % len(loop)]
    return tuple(owners)


def _check_world_size(world_size: int) -> None:
    if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")


@dataclass(frozen=True)
class LoadStats:
    """Balance summary of one assignment (compute in flops, memory in bytes)."""

    strategy: str
    world_size: int
    num_blocks: int
    total_flops: float
    max_flops: float
    mean_flops: float
    max_memory_bytes: int
    mean_memory_bytes: float
    allgather_bytes: int  # max bytes one rank receives in an uneven all-gather (all_gather_v)
    padded_allgather_bytes: int  # bytes one rank receives in an all-gather padded to max shard
    idle_ranks: int

    @property
    def compute_balance(self) -> float:
        """Max / mean compute load (1.0 is perfect)."""
        return self.max_flops / self.mean_flops if self.mean_flops > 0 else 1.0

    @property
    def memory_balance(self) -> float:
        """Max / mean optimizer-state memory (1.0 is perfect)."""
        return self.max_memory_bytes / self.mean_memory_bytes if self.mean_memory_bytes else 1.0

    @property
    def max_memory_gib(self) -> float:
        """Busiest rank's optimizer-state memory in GiB."""
        return self.max_memory_bytes / GIB


@dataclass(frozen=True)
class Assignment:
    """Owner rank of every block; identical on every rank because it is a pure function."""

    blocks: tuple[Block, ...]
    world_size: int
    owners: tuple[int, ...]
    cost_model: CostModel = field(default_factory=CostModel)
    strategy: str = "custom"

    def __post_init__(self) -> None:
        _check_world_size(self.world_size)
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "owners", tuple(int(o) for o in self.owners))
        if len(self.blocks) == 0:
            raise ValueError("blocks must be a non-empty sequence of Block")
        if len(self.owners) != len(self.blocks):
            raise ValueError(
                f"owners must have one entry per block ({len(self.blocks)}), got {len(self.owners)}"
            )
        bad = [o for o in self.owners if not 0 <= o < self.world_size]
        if bad:
            raise ValueError(f"owners must be in [0, {self.world_size - 1}], got {bad[0]}")
        if len({b.key for b in self.blocks}) != len(self.blocks):
            raise ValueError("blocks must be unique (duplicate (param_index, row, col) key)")

    @classmethod
    def build(
        cls,
        blocks: Iterable[Block],
        world_size: int,
        cost_model: CostModel | None = None,
        memory_weight: float = 0.0,
    ) -> Assignment:
        """LPT bin packing by compute cost, or by a mix with memory when memory_weight > 0.

        The packed weight is (1-w) * flops/total_flops + w * bytes/total_bytes.
        """
        cost_model = cost_model or CostModel()
        blocks = tuple(blocks)
        if not 0.0 <= memory_weight <= 1.0:
            raise ValueError(f"memory_weight must be in [0, 1], got {memory_weight!r}")
        if len(blocks) == 0:
            raise ValueError("blocks must be a non-empty sequence of Block")
        # Sort by key first so the result does not depend on the caller's block order.
        blocks = tuple(sorted(blocks, key=lambda b: b.key))
        flops = [cost_model.compute_flops(b) for b in blocks]
        if memory_weight > 0.0:
            mem = [float(cost_model.memory_floats(b)) for b in blocks]
            tf, tm = sum(flops), sum(mem)
            weights = [
                (1 - memory_weight) * f / tf + memory_weight * x / tm for f, x in zip(flops, mem)
            ]
            strategy = f"lpt(mem_w={memory_weight:g})"
        else:
            weights, strategy = flops, "lpt"
        owners = lpt_partition(weights, world_size)
        return cls(blocks, world_size, owners, cost_model, strategy)

    # ---- queries -------------------------------------------------------------------------
    @cached_property
    def _owner_by_key(self) -> dict[tuple[int, int, int], int]:
        return {b.key: o for b, o in zip(self.blocks, self.owners)}

    @cached_property
    def _blocks_by_rank(self) -> tuple[tuple[Block, ...], ...]:
        per: list[list[Block]] = [[] for _ in range(self.world_size)]
        for b, o in zip(self.blocks, self.owners):
            per[o].append(b)
        return tuple(tuple(p) for p in per)

    def owner_of(self, block: Block | tuple[int, int, int]) -> int:
        """Rank that updates this block (a Block or its (param_index, row, col) key)."""
        key = block.key if isinstance(block, Block) else (block[0], block[1], block[2])
        try:
            return self._owner_by_key[key]
        except KeyError:
            raise KeyError(f"block {key} is not part of this assignment") from None

    def blocks_of(self, rank: int) -> tuple[Block, ...]:
        """Blocks owned by ``rank``, ordered by (param_index, row, col)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size - 1}], got {rank!r}")
        return self._blocks_by_rank[rank]

    def _per_rank(self, cost: Callable[[Block], float]) -> list[float]:
        """Sum of ``cost(block)`` over the blocks each rank owns."""
        loads = [0.0] * self.world_size
        for b, o in zip(self.blocks, self.owners):
            loads[o] += cost(b)
        return loads

    @cached_property
    def compute_loads(self) -> tuple[float, ...]:
        """Per-rank amortized flops per step."""
        return tuple(self._per_rank(self.cost_model.compute_flops))

    @cached_property
    def memory_loads(self) -> tuple[int, ...]:
        """Per-rank optimizer-state bytes."""
        return tuple(int(x) for x in self._per_rank(self.cost_model.memory_bytes))

    @cached_property
    def numel_loads(self) -> tuple[int, ...]:
        """Per-rank number of parameter entries owned (what each rank contributes to gathers)."""
        return tuple(int(x) for x in self._per_rank(lambda b: b.numel))

    @property
    def compute_balance(self) -> float:
        """Max / mean compute load over all ranks (idle ranks count in the mean)."""
        mean = sum(self.compute_loads) / self.world_size
        return max(self.compute_loads) / mean if mean > 0 else 1.0

    @property
    def memory_balance(self) -> float:
        """Max / mean optimizer-state memory over all ranks."""
        mean = sum(self.memory_loads) / self.world_size
        return max(self.memory_loads) / mean if mean > 0 else 1.0

    def balance(self, metric: str = "compute") -> float:
        """Max / mean load by ``metric``: "compute", "memory" or "both" (the larger of the two)."""
        if metric == "compute":
            return self.compute_balance
        if metric == "memory":
            return self.memory_balance
        if metric == "both":
            return max(self.compute_balance, self.memory_balance)
        raise ValueError(f"balance metric must be one of {BALANCE_METRICS}, got {metric!r}")

    def comm_bytes_per_step(self, dtype_bytes: int = 2, padded: bool = False) -> int:
        """Max bytes one rank receives per step when all ranks all-gather the updated params.

        Uneven all-gather (all_gather_v): a rank receives every entry it does not own.
        Padded all-gather (equal-size collective): every other rank sends max-shard entries.
        """
        if isinstance(dtype_bytes, bool) or int(dtype_bytes) < 1:
            raise ValueError(f"dtype_bytes must be an int >= 1, got {dtype_bytes!r}")
        if self.world_size == 1:
            return 0
        loads = self.numel_loads
        if padded:
            return (self.world_size - 1) * max(loads) * dtype_bytes
        return (sum(loads) - min(loads)) * dtype_bytes

    def stats(self, dtype_bytes: int = 2) -> LoadStats:
        """Summary numbers for reports and benchmarks."""
        c, mem = self.compute_loads, self.memory_loads
        return LoadStats(
            strategy=self.strategy,
            world_size=self.world_size,
            num_blocks=len(self.blocks),
            total_flops=sum(c),
            max_flops=max(c),
            mean_flops=sum(c) / self.world_size,
            max_memory_bytes=max(mem),
            mean_memory_bytes=sum(mem) / self.world_size,
            allgather_bytes=self.comm_bytes_per_step(dtype_bytes),
            padded_allgather_bytes=self.comm_bytes_per_step(dtype_bytes, padded=True),
            idle_ranks=sum(1 for blocks in self._blocks_by_rank if not blocks),
        )


def pingpong_assignment(
    params: Sequence[ParamSpec],
    world_size: int,
    cost_model: CostModel | None = None,
    max_precond_dim: int = 10000,
    descending: bool = False,
) -> Assignment:
    """Baseline: Megatron LayerWiseDistributedOptimizer's whole-param ping-pong (our re-impl).

    Loads are computed with the same cost model as ours, on whole (unblocked) params.
    """
    blocks = make_blocks(params, BlockingConfig(block_size=None, max_precond_dim=max_precond_dim))
    owners = pingpong_owners([b.numel for b in blocks], world_size, descending=descending)
    return Assignment(blocks, world_size, owners, cost_model or CostModel(), "pingpong")


def choose_block_size(
    params: Sequence[ParamSpec],
    world_size: int,
    candidates: Sequence[int | None] = (None, 4096, 2048, 1024, 512, 256),
    target_balance: float = 1.05,
    max_precond_dim: int = 10000,
    cost_model: CostModel | None = None,
    balance: str = "compute",
) -> tuple[int | None, Assignment]:
    """Largest candidate block size (None = whole params) whose LPT balance meets the target.

    ``balance``: what must be balanced to ``target_balance`` (max / mean over ranks):
    "compute" (flops per step), "memory" (optimizer-state bytes: the per-rank state target of
    issue 13) or "both". Larger blocks precondition more of each matrix jointly, so we prefer
    them; if no candidate meets the target the best-balanced one is returned. The block size
    changes the optimizer's math (SOAP on blocks is a block-diagonal preconditioner): choose
    it once for the largest DP size planned, not per run size, so that runs of every DP size
    (and checkpoints resharded between them) share one preconditioner.
    """
    if not candidates:
        raise ValueError("candidates must be a non-empty sequence of block sizes")
    if target_balance < 1.0:
        raise ValueError(f"target_balance must be >= 1.0, got {target_balance!r}")
    if balance not in BALANCE_METRICS:
        raise ValueError(f"balance must be one of {BALANCE_METRICS}, got {balance!r}")

    def size_key(bs: int | None) -> float:
        return math.inf if bs is None else float(bs)

    best: tuple[float, int | None, Assignment] | None = None
    for bs in sorted(candidates, key=size_key, reverse=True):
        blocks = make_blocks(params, BlockingConfig(bs, max_precond_dim))
        asg = Assignment.build(blocks, world_size, cost_model)
        if asg.balance(balance) <= target_balance:
            return bs, asg
        if best is None or asg.balance(balance) < best[0]:
            best = (asg.balance(balance), bs, asg)
    assert best is not None
    return best[1], best[2]


def whole_param_memory_bound(
    params: Sequence[ParamSpec],
    world_size: int,
    max_precond_dim: int = 10000,
    cost_model: CostModel | None = None,
) -> float:
    """Lower bound of max / mean optimizer-state memory of any assignment of whole params.

    No assignment can beat max(mean, largest item, (W+1)-th largest + W-th largest, ...):
    we use the two classic bounds, the largest item and the pigeonhole pair bound (two of
    the W+1 largest items share a rank). Returned relative to the mean, so a value above a
    target proves the target unreachable without cutting params into smaller blocks.
    """
    cost_model = cost_model or CostModel()
    blocks = make_blocks(params, BlockingConfig(None, max_precond_dim))
    mem = sorted((cost_model.memory_bytes(b) for b in blocks), reverse=True)
    mean = sum(mem) / world_size
    bound = max(mean, float(mem[0]))
    if len(mem) > world_size:
        bound = max(bound, float(mem[world_size - 1] + mem[world_size]))
    return bound / mean if mean > 0 else 1.0
