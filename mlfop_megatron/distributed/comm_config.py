"""How the ML-FOP-SOAP gradient and parameter collectives run (a validated config)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlfop_megatron.config import check_int, option

LEVEL_REDUCE = ("reduce_scatter", "all_reduce")
GRAD_WIRE_DTYPES = ("fp32", "bf16")
PARAM_SYNC = ("all_gather", "broadcast")
SEGMENTS = ("padded", "exact")
ADAM_GRAD_REDUCE = ("reduce_scatter", "all_reduce")
# level_buckets=None (auto): each bucket's packed fp32 send buffer at most this many bytes,
# and at most half the owner's segment (two send buffers alive: the level reduction then holds
# at most about two segments, what the stacking after it holds anyway), but no smaller than
# LEVEL_BUCKET_MIN_BYTES (collectives large enough to run at bandwidth), and at most
# LEVEL_BUCKETS_MAX buckets per level.
LEVEL_BUCKET_BYTES = 1 << 30
LEVEL_BUCKET_MIN_BYTES = 16 << 20
LEVEL_BUCKETS_MAX = 32


def auto_level_buckets(packed_bytes: int, segment_bytes: int | None = None) -> int:
    """Buckets of the level reduction so that each packed send buffer fits the auto budget.

    ``packed_bytes``: the whole owner-ordered buffer (all owners' segments, padded) in fp32;
    ``segment_bytes``: one owner's segment (None: no segment bound). The budget per send
    buffer: ``LEVEL_BUCKET_BYTES`` (1 GiB), at most half the segment, at least
    ``LEVEL_BUCKET_MIN_BYTES`` (16 MiB); at most ``LEVEL_BUCKETS_MAX`` buckets. One bucket up
    to the budget: a small model launches one collective per level, as before the buckets.
    """
    budget = LEVEL_BUCKET_BYTES
    if segment_bytes is not None:
        budget = max(LEVEL_BUCKET_MIN_BYTES, min(budget, segment_bytes // 2))
    return max(1, min(LEVEL_BUCKETS_MAX, -(-packed_bytes // budget)))


def segment_chunks(
    used: Sequence[int], buckets: int, exact: bool = False
) -> list[list[tuple[int, int]]]:
    """Chunk g of every owner segment (``used[rank]``: its elements): ``[(lo, hi) per rank]``.

    The segments are cut into ``buckets`` runs of equal elements, anywhere (inside a block
    too): padded, every segment is padded to the longest, ``P``, and cut every ``ceil(P / G)``
    elements (the padding is the tail of the last chunks, as with one bucket); exact, rank
    r's segment is cut every ``ceil(used[r] / G)`` of its own elements. Chunk g of rank r is
    ``[lo, hi)`` of its segment (padded: ``hi`` may pass ``used[r]``, the rest is padding).
    Chunks empty on every rank are dropped, so fewer than ``buckets`` may come back.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1 (got {buckets})")
    longest = max(used, default=0)
    if buckets == 1 or longest <= 1:
        return [[(0, longest if not exact else u) for u in used]]
    if exact:
        widths = [-(-u // buckets) for u in used]
        chunks = [
            [(min(g * w, u), min((g + 1) * w, u)) for u, w in zip(used, widths)]
            for g in range(buckets)
        ]
        return [c for c in chunks if any(hi > lo for lo, hi in c)]
    width = -(-longest // buckets)
    count = -(-longest // width)  # chunks holding an element of the longest segment
    return [[(g * width, (g + 1) * width)] * len(used) for g in range(count)]


def bucket_sizes(used: Sequence[int], buckets: int, exact: bool = False) -> list[int]:
    """Elements of each bucket's buffer (``used[rank]``: each owner segment's elements).

    Padded: the chunk width x ranks (every bucket the same); exact: the chunks end to end.
    Exactly the buffers ``LevelReducer`` launches (``segment_chunks``).
    """
    return [sum(hi - lo for lo, hi in chunk) for chunk in segment_chunks(used, buckets, exact)]


@dataclass(frozen=True)
class CommConfig:
    """Collectives of the folding levels and of the parameter sync.

    ``level_reduce``: "reduce_scatter" (default) packs the SOAP blocks' level sums into an
    owner-ordered buffer and reduce-scatters it, so each owner receives only its own blocks,
    and the non-SOAP (Adam) gradients are all-reduced once per step; "all_reduce" is the first
    version, kept for comparison: Megatron's buckets all-reduce the whole gradient buffer at
    every level boundary. ``grad_wire_dtype``: "bf16" sends the level sums in bf16 and sums
    them in fp32 on the owner (an all-to-all, then a local fp32 sum in rank order); only with
    level_reduce="reduce_scatter". ``param_sync``: "all_gather" (one all-gather of the
    owner-ordered parameter buffer per engine) or "broadcast" (one broadcast per owner rank,
    the first version). ``segments``: "padded" (default) pads every owner's segment of the
    level reduce-scatters and of the parameter all-gather to the longest one (equal-size
    collectives); "exact" sends no padding (uneven collectives: a reduce-scatter of unequal
    pieces, which NCCL runs as one reduce per rank coalesced into one group, and an uneven
    all-gather). The math is the same; only the collectives differ. ``fold_stream``: fold
    each level on a side CUDA stream, overlapping the next micro-step (off by default: it
    changes the kernel order on GPU, not the math; a no-op on CPU). ``level_buckets``: the
    owner-ordered level buffer is reduced in that many buckets (``LevelReducer``), at most two
    send buffers alive at once; None (default, "auto", ``choose_level_buckets``): one
    bucket while the packed fp32 buffer fits the budget of one send buffer
    (``auto_level_buckets``: ``LEVEL_BUCKET_BYTES``, 1 GiB, and half an owner's segment, but
    at least 16 MiB), else up to enough buckets to keep each within it (at most 32; each
    bucket an equal run of every owner's segment, cut inside blocks where it falls:
    ``segment_chunks``), the count whose peak (two send buffers + received segment) is
    least, and only where it saves >= 10% of one bucket's (Llama-3-8B at DP=8: 26 buckets;
    Llama-3-70B at DP=64, TP=8, PP=4, whose owners hold one or two whole matrices each: 32),
    which is what keeps the level reduction inside the issue-21 memory budget. The price of
    a bucket count above 2: on NCCL the packing of bucket g waits for bucket g-2's
    collective on the compute stream, so that share of the level's communication no longer
    overlaps what follows: the next micro-step after an intermediate level (folding on);
    folding off the step waits for the one level anyway (set 1 for full overlap).
    ``adam_grad_reduce``: how the non-matrix (Adam) gradients are reduced
    once per step when their state is sharded (ZeRO-1) and the levels are owner-reduced:
    "reduce_scatter" (default) hands each rank exactly the slice it steps (4 B per fp32 grad
    element, as Megatron's DistributedOptimizer), "all_reduce" the whole gradient (8 B); with
    replicated Adam state or level_reduce="all_reduce" they are all-reduced (every rank needs
    them whole, or Megatron's buckets reduce everything). ``overlap_param_gather``: leave the
    step's parameter all-gathers (SOAP blocks and ZeRO-1 Adam slices) in flight and wait for
    each in the forward pre-hook of the first module that uses its params (Megatron's
    overlap_param_gather); checkpoint save/load and the next step wait too. Off by default: the
    gathers overlap only the host work between the step and the first forward (one gather per
    engine and per Adam buffer, whose first params the first layers need), and code that
    reads the params outside a forward (Megatron-LM's --log-params-norm, user code) would read
    them before the gather lands unless it calls ``optimizer.finish_param_sync()``.
    """

    level_reduce: str = option(
        "reduce_scatter",
        "folding level reductions: reduce_scatter (each owner receives the level sums of its "
        "SOAP blocks; Adam grads all-reduced once per step) or all_reduce (Megatron's buckets "
        "all-reduce every grad at every level: the first version, for comparison)",
        choices=LEVEL_REDUCE,
    )
    grad_wire_dtype: str = option(
        "fp32",
        "dtype of the level sums on the wire: bf16 halves the bytes (all-to-all, then fp32 "
        "sums on the owner; needs --mlfop-level-reduce reduce_scatter)",
        choices=GRAD_WIRE_DTYPES,
    )
    param_sync: str = option(
        "all_gather",
        "parameter sync after the step: one all_gather of the owner-ordered params, or one "
        "broadcast per owner rank (the first version)",
        choices=PARAM_SYNC,
    )
    adam_grad_reduce: str = option(
        "reduce_scatter",
        "once-per-step reduction of the non-matrix (Adam) grads with ZeRO-1 Adam state: "
        "reduce_scatter (each rank receives the slice it steps, as Megatron's distributed "
        "optimizer) or all_reduce (the whole gradient on every rank); replicated Adam "
        "(--mlfop-replicated-adam) and --mlfop-level-reduce all_reduce always all-reduce",
        choices=ADAM_GRAD_REDUCE,
    )
    overlap_param_gather: bool = option(
        False,
        "leave the parameter all-gathers of the step in flight and wait for them in the next "
        "forward's module pre-hooks (checkpointing and the next step wait too); code reading "
        "params between the step and the forward must call optimizer.finish_param_sync() "
        "(refused with Megatron-LM's --log-params-norm)",
    )

    segments: str = option(
        "padded",
        "owner segments of the level reduce-scatters and of the parameter all-gather: padded "
        "to the longest (equal-size collectives) or exact (no padding: uneven collectives)",
        choices=SEGMENTS,
    )

    level_buckets: int | None = option(
        None,
        "collectives per level reduction: the owner-ordered buffer is cut into this many "
        "buckets (each an equal run of every owner's segment), at most 2 send buffers alive at "
        "once (default: auto, each fp32 send buffer <= 1 GiB and <= half an owner's segment, "
        ">= 16 MiB, <= 32 buckets; 1: one buffer of the "
        "whole model, all of it overlapping the next micro-step)",
    )

    fold_stream: bool = option(
        False,
        "run each level's fold on a side CUDA stream so it overlaps the next micro-step "
        "(events make it safe; no effect on CPU; see distributed/fold_stream.py)",
    )

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("level_reduce", self.level_reduce, LEVEL_REDUCE),
            ("grad_wire_dtype", self.grad_wire_dtype, GRAD_WIRE_DTYPES),
            ("param_sync", self.param_sync, PARAM_SYNC),
            ("segments", self.segments, SEGMENTS),
            ("adam_grad_reduce", self.adam_grad_reduce, ADAM_GRAD_REDUCE),
        ):
            if value not in allowed:
                raise ValueError(f"CommConfig.{name} must be one of {allowed} (got {value!r})")
        if not isinstance(self.overlap_param_gather, bool):
            raise ValueError(
                "CommConfig.overlap_param_gather must be True or False "
                f"(got {self.overlap_param_gather!r})"
            )
        if self.level_buckets is not None:
            check_int("level_buckets", self.level_buckets, 1)
        if self.grad_wire_dtype == "bf16" and self.level_reduce != "reduce_scatter":
            raise ValueError(
                "CommConfig.grad_wire_dtype='bf16' needs level_reduce='reduce_scatter' (the "
                "all_reduce path reduces Megatron's fp32 buckets); set grad_wire_dtype='fp32'"
            )

    @property
    def owner_reduce(self) -> bool:
        """Whether the level sums go to their owners only (the folding glue reduces them)."""
        return self.level_reduce == "reduce_scatter"

    @property
    def adam_reduce_scatter(self) -> bool:
        """Whether ZeRO-1 Adam grads are reduce-scattered into the slices (see the class)."""
        return self.owner_reduce and self.adam_grad_reduce == "reduce_scatter"


def level_transient(sizes: Sequence[int], world: int) -> int:
    """Elements a level reduction in buckets of ``sizes`` keeps alive at its peak.

    Packing bucket g while g-1 is in flight (``LevelReducer.SEND_BUFFERS`` = 2): the largest
    two consecutive send buffers, plus this owner's received segments (about 1/world of
    every bucket).
    """
    pair = max((a + b for a, b in zip(sizes, [0, *sizes])), default=0)
    return pair + -(-sum(sizes) // world)


def choose_level_buckets(
    level_buckets: int | None,
    max_elements: int,
    sizes_of: Callable[[int], list[int]],
    world: int,
) -> int:
    """Bucket count of a sharded level reduction (``sizes_of(g)``: its g buckets' sizes).

    Asked (``level_buckets`` set): that many, at most one per element of the fullest owner
    segment (``max_elements``). Auto (None): ``auto_level_buckets`` of the one-bucket fp32
    buffer and its mean owner segment; when that asks for more than two, the count up to it
    whose ``level_transient`` is least, kept only if it saves at least 10% of one bucket's
    transient; otherwise one bucket (two buckets alive at once save nothing), no extra
    launches.
    """
    if level_buckets is not None:
        return max(1, min(level_buckets, max_elements))
    one = sizes_of(1)
    segment = -(-sum(one) // max(1, world))
    asked = min(auto_level_buckets(4 * sum(one), 4 * segment), max_elements)
    if asked <= 2:
        return 1
    best, best_cost = 1, level_transient(one, world)
    limit = 0.9 * best_cost
    for g in range(3, asked + 1):
        cost = level_transient(sizes_of(g), world)
        if cost < best_cost:
            best, best_cost = g, cost
    return best if best_cost <= limit else 1


def level_bucket_count(level_buckets: int | None, used: Sequence[int], exact: bool = False) -> int:
    """``choose_level_buckets`` for owner segments of ``used[rank]`` elements (one per owner).

    The one rule of ``LevelReducer``, ``TPFullReducer`` and the planner: the buckets'
    sizes are ``bucket_sizes`` of these segments.
    """

    def sizes_of(g: int) -> list[int]:
        return bucket_sizes(used, g, exact)

    return choose_level_buckets(level_buckets, max(used, default=1), sizes_of, len(used))


def level_bucket_sizes(level_buckets: int | None, segments: Sequence[Sequence[int]]) -> list[int]:
    """Padded buffer elements of each bucket of a sharded level reduction (the planner's).

    ``segments[rank]``: that owner's block sizes; ``level_buckets`` as
    ``CommConfig.level_buckets`` (None: auto, ``choose_level_buckets``). One bucket: the
    whole padded buffer.
    """
    used = [sum(s) for s in segments]
    return bucket_sizes(used, level_bucket_count(level_buckets, used))
