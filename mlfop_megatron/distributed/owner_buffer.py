"""Owner-ordered flat buffers: one reduce-scatter per level, one all-gather of the parameters.

Every rank of a data-parallel group builds the same :class:`OwnerLayout` from the engines'
assignments: rank r's segment holds, in order, the blocks rank r owns in engine 0, then in
engine 1, ...; each segment is padded to the longest one, so that rank r's segment of the
buffer is exactly what ``reduce_scatter`` hands to rank r and what ``all_gather`` collects
from it. No Megatron here: tensors, blocks and torch.distributed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlfop_megatron.distributed.assignment import Assignment, Block
from mlfop_megatron.distributed.collective_device import group_backend
from mlfop_megatron.distributed.comm_config import level_bucket_count, segment_chunks


def block_view(full: torch.Tensor, block: Block) -> torch.Tensor:
    """The block's region of a tensor shaped like its param (a view, no copy)."""
    matrix = full.view(full.shape[0], -1) if full.dim() > 1 else full.view(1, -1)
    return matrix[
        block.row_offset : block.row_offset + block.rows,
        block.col_offset : block.col_offset + block.cols,
    ]


def reduce_scatter_flat(
    out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool
) -> dist.Work | None:
    """``torch.distributed.reduce_scatter_tensor`` (``reduce_scatter_single`` where newer)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, flat, group=group, async_op=async_op)


def all_gather_flat(
    out: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool
) -> dist.Work | None:
    """``torch.distributed.all_gather_into_tensor`` (``all_gather_single`` where newer)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, mine, group=group, async_op=async_op)


def reduce_scatter_uneven(
    out: torch.Tensor,
    flat: torch.Tensor,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None,
    async_op: bool,
) -> dist.Work | None:
    """Reduce-scatter of unpadded segments of ``sizes`` elements (``out``: this rank's one).

    ``torch.distributed.reduce_scatter`` with a list of unequal views: gloo reduce-scatters
    them directly; NCCL runs one reduce per rank, coalesced into one group.
    """
    return dist.reduce_scatter(out, list(flat.split(list(sizes))), group=group, async_op=async_op)


def all_gather_uneven(
    out: torch.Tensor,
    mine: torch.Tensor,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None,
    async_op: bool,
) -> dist.Work | None:
    """All-gather of unpadded segments of ``sizes`` elements into ``out`` (their concatenation).

    NCCL: ``all_gather`` of unequal views (coalesced broadcasts, no extra memory). Gloo, whose
    all-gather needs equal sizes: an uneven all-to-all of ``mine`` repeated once per rank.
    """
    if group_backend(group, out.device) == "nccl":
        return dist.all_gather(list(out.split(list(sizes))), mine, group=group, async_op=async_op)
    n = len(sizes)
    return dist.all_to_all_single(
        out,
        mine.repeat(n),
        output_split_sizes=list(sizes),
        input_split_sizes=[mine.numel()] * n,
        group=group,
        async_op=async_op,
    )


@dataclass(frozen=True)
class Slot:
    """One block in an owner segment: which engine, which block, where in the segment."""

    engine: int
    block: Block
    offset: int


SEGMENTS = ("padded", "exact")


class OwnerLayout:
    """Blocks of several engines laid out by owner rank.

    ``segments="padded"``: every segment padded to the longest one (equal-size collectives:
    reduce_scatter_tensor, all_gather_into_tensor). ``"exact"``: segments end to end, no
    padding (uneven collectives: see ``reduce_scatter_uneven`` and ``all_gather_uneven``).
    """

    def __init__(
        self,
        assignments: Sequence[Assignment],
        world_size: int,
        segments: str = "padded",
    ) -> None:
        if segments not in SEGMENTS:
            raise ValueError(f"segments must be one of {SEGMENTS} (got {segments!r})")
        self.exact = segments == "exact"
        self.world_size = world_size
        self.num_engines = len(assignments)
        self.segments: list[list[Slot]] = []
        for rank in range(world_size):  # rank r's blocks of engine 0, then engine 1, ...
            slots, offset = [], 0
            for e, a in enumerate(assignments):
                for block in a.blocks_of(rank):
                    slots.append(Slot(e, block, offset))
                    offset += block.numel
            self.segments.append(slots)
        self.used = [sum(s.block.numel for s in seg) for seg in self.segments]
        self.segment_size = max(self.used, default=0)
        sizes = self.used if self.exact else [self.segment_size] * world_size
        self.sizes = list(sizes)  # elements of each rank's segment in the buffer
        self.starts = [sum(sizes[:r]) for r in range(world_size)]

    def chunks(self, buckets: int) -> list[OwnerChunk]:
        """This layout cut into ``buckets`` chunks: chunk g holds run g of every segment.

        ``comm_config.segment_chunks``: runs of equal elements, cut anywhere (inside a block
        too), so a layout whose owners hold one or two large matrices still splits. Chunk g
        of rank r is elements ``[lo, hi)`` of its segment here, so the chunks' runs, laid end
        to end, are this layout's segment (padded: with its padding at the tail). Chunks
        empty on every rank are dropped.
        """
        return [
            OwnerChunk(self, bounds) for bounds in segment_chunks(self.used, buckets, self.exact)
        ]

    @property
    def numel(self) -> int:
        """Elements of the whole buffer (padded: world_size x segment_size)."""
        return sum(self.sizes)

    def padding_per_rank(self) -> list[int]:
        """Padding elements in each rank's segment (segment length minus its blocks)."""
        return [size - u for size, u in zip(self.sizes, self.used)]

    def padding_fraction(self) -> float:
        """Padding as a fraction of the whole buffer (0 when the owners are balanced)."""
        return sum(self.padding_per_rank()) / self.numel if self.numel else 0.0

    def pack(
        self,
        tensors: Sequence[Sequence[torch.Tensor]],
        dtype: torch.dtype,
        like: torch.Tensor,
        ranks: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Flat copy of the blocks of ``tensors[engine][param_index]`` in owner order.

        Zero padded, in ``dtype`` on ``like``'s device. ``ranks``: the segments to pack
        (default: all). Written in place: one ``_foreach_copy_`` of every block (one
        multi-tensor launch on CUDA, converting as it copies) into the one buffer, so the
        transient is the buffer itself, not a converted copy of every block and their cat.
        """
        ranks = range(self.world_size) if ranks is None else ranks
        flat = like.new_empty(sum(self.sizes[r] for r in ranks), dtype=dtype)
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        base = 0
        for rank in ranks:
            segment = flat[base : base + self.sizes[rank]]
            for slot, view in self._slot_views(segment, rank):
                srcs.append(block_view(tensors[slot.engine][slot.block.param_index], slot.block))
                dsts.append(view)
            segment[self.used[rank] :].zero_()
            base += self.sizes[rank]
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        return flat

    def unpack_into(
        self, flat: torch.Tensor, tensors: Sequence[Sequence[torch.Tensor]], skip: int
    ) -> None:
        """Copy every rank's blocks but ``skip``'s from the whole buffer into ``tensors``.

        One ``_foreach_copy_`` over the blocks (one multi-tensor launch on CUDA).
        """
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for rank in range(self.world_size):
            if rank == skip:
                continue
            segment = flat[self.starts[rank] : self.starts[rank] + self.sizes[rank]]
            for slot, view in self._slot_views(segment, rank):
                srcs.append(view)
                dsts.append(block_view(tensors[slot.engine][slot.block.param_index], slot.block))
        if dsts:
            torch._foreach_copy_(dsts, srcs)

    def _slot_views(self, segment: torch.Tensor, rank: int) -> list[tuple[Slot, torch.Tensor]]:
        """Rank ``rank``'s slots and their blocks inside its flat segment, as (rows, cols) views."""
        return [
            (
                slot,
                segment[slot.offset : slot.offset + slot.block.numel].view(
                    slot.block.rows, slot.block.cols
                ),
            )
            for slot in self.segments[rank]
        ]

    def segment_views(self, segment: torch.Tensor, rank: int) -> list[list[torch.Tensor]]:
        """Rank ``rank``'s blocks inside its flat segment, per engine, as (rows, cols) views."""
        out: list[list[torch.Tensor]] = [[] for _ in range(self.num_engines)]
        for slot, view in self._slot_views(segment, rank):
            out[slot.engine].append(view)
        return out


def row_pieces(matrix: torch.Tensor, lo: int, hi: int) -> list[torch.Tensor]:
    """Elements ``[lo, hi)`` of a 2-D view in row-major order, as at most three 2-D views."""
    cols = matrix.shape[1]
    r0, c0 = divmod(lo, cols)
    r1, c1 = divmod(hi, cols)
    if r0 == r1:
        return [matrix[r0 : r0 + 1, c0:c1]] if hi > lo else []
    out = []
    if c0:
        out.append(matrix[r0 : r0 + 1, c0:])
        r0 += 1
    if r1 > r0:
        out.append(matrix[r0:r1])
    if c1:
        out.append(matrix[r1 : r1 + 1, :c1])
    return out


def sum_rank_pieces(pieces: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = the rows of ``pieces`` ([n, k], one per sender) summed in rank order.

    The bf16 wire's receive side: each piece converted to ``out``'s dtype (fp32) as it is
    added, so the sum is the same on every replica and deterministic.
    """
    out.copy_(pieces[0])
    for piece in pieces[1:]:
        out.add_(piece.to(out.dtype))
    return out


def add_run_copies(
    part: torch.Tensor,
    views: Sequence[tuple[int, torch.Tensor]],
    lo: int,
    hi: int,
    dsts: list[torch.Tensor],
    srcs: list[torch.Tensor],
) -> None:
    """Queue the copies of elements ``[lo, hi)`` of a segment into ``part`` (its flat run).

    ``views``: the segment's 2-D views and their offsets in it, in order; a view cut by the
    run's ends contributes its row-major elements inside the run (``row_pieces``). The
    copies go to ``dsts``/``srcs`` for one ``_foreach_copy_`` (converting as it copies).
    """
    for offset, view in views:
        a = max(lo, offset)
        b = min(hi, offset + view.numel())
        if b <= a:
            continue
        at = a - lo
        for piece in row_pieces(view, a - offset, b - offset):
            n = piece.numel()
            dsts.append(part[at : at + n].view(piece.shape))
            srcs.append(piece)
            at += n


class OwnerChunk:
    """One bucket of an :class:`OwnerLayout`: elements ``[lo, hi)`` of every owner's segment.

    ``sizes[r]``: rank r's part of the bucket's buffer (``hi - lo``; padded: the same for
    every rank, padding where ``hi`` passes ``used[r]``).
    """

    def __init__(self, layout: OwnerLayout, bounds: Sequence[tuple[int, int]]) -> None:
        self.layout = layout
        self.bounds = list(bounds)
        self.exact = layout.exact
        self.sizes = [hi - lo for lo, hi in self.bounds]
        self.starts = [sum(self.sizes[:r]) for r in range(len(self.sizes))]

    @property
    def numel(self) -> int:
        """Elements of the bucket's buffer (every rank's part)."""
        return sum(self.sizes)

    @property
    def segment_size(self) -> int:
        """The longest rank's part (padded: every rank's)."""
        return max(self.sizes, default=0)

    def padding_per_rank(self) -> list[int]:
        """Padding elements in each rank's part (its elements past the rank's blocks)."""
        return [
            hi - max(lo, min(hi, used)) for (lo, hi), used in zip(self.bounds, self.layout.used)
        ]

    def pack(
        self, tensors: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype, like: torch.Tensor
    ) -> torch.Tensor:
        """Flat copy of every rank's run of blocks in this bucket, zero padded (one launch).

        A block cut by the run's ends contributes its row-major elements inside it, as up to
        three 2-D pieces (``row_pieces``), converted as they are copied.
        """
        flat = like.new_empty(self.numel, dtype=dtype)
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for rank, ((lo, hi), start) in enumerate(zip(self.bounds, self.starts)):
            part = flat[start : start + hi - lo]
            views = [
                (slot.offset, block_view(tensors[slot.engine][slot.block.param_index], slot.block))
                for slot in self.layout.segments[rank]
            ]
            add_run_copies(part, views, lo, hi, dsts, srcs)
            used = max(0, min(hi, self.layout.used[rank]) - lo)
            part[used:].zero_()
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        return flat


class LevelReducer:
    """Reduces the level sums of the SOAP blocks of engines sharing one data-parallel group.

    ``owner_world`` is the engines' owner group size: the data-parallel size (sharded:
    reduce-scatters, each owner receives only its blocks) or 1 (replicated: all-reduces,
    every rank receives every block). ``scaling`` multiplies the sums before the reduction
    (Megatron's gradient_scaling_factor: 1/DP for a mean). ``wire_dtype`` bfloat16 sends bf16
    and accumulates in fp32 on the receiver: an all-to-all (sharded) or all-gather
    (replicated) of bf16 pieces, summed in fp32 in rank order, so the result is the same on
    every replica and deterministic. ``launch`` is asynchronous; ``wait`` returns the views.

    ``buckets`` (``CommConfig.level_buckets``; None: auto, ``choose_level_buckets``) cuts
    the owner-ordered buffer into that many chunks (``OwnerLayout.chunks``: bucket g holds
    run g of every owner's segment, equal runs cut anywhere), one collective each, whose
    results land in one receive buffer of this owner's segment. ``launch`` packs
    bucket g only after bucket g - ``SEND_BUFFERS`` has been waited for and its send buffer
    dropped, so at most ``SEND_BUFFERS`` send buffers (and, bf16 wire, their receive buffers
    of every sender's pieces) are alive at once: the packed transient is about
    ``SEND_BUFFERS / buckets`` of the whole buffer. The price: on NCCL that wait makes the
    current (compute) stream wait for those buckets' collectives, so only the last
    ``SEND_BUFFERS`` buckets overlap the next micro-step; on gloo the host blocks. Replicated
    with the fp32 wire (an in-place all-reduce, the packed buffer is the result) there is
    nothing to save: always one bucket.

    Every element is reduced over the same ranks whatever the bucketing. The bf16 wire sums
    the pieces itself in rank order, so its results are bitwise one bucket's; the fp32
    collectives sum in the backend's order, which may depend on the element's position in
    the buffer (tests/test_level_buckets.py says where gloo's results are bitwise one
    bucket's and where they agree to fp32 round-off); NCCL may pick another algorithm for
    another message size.
    """

    SEND_BUFFERS = 2  # send buffers in flight: bucket g packs while g - 1 is on the wire

    def __init__(
        self,
        assignments: Sequence[Assignment],
        owner_world: int,
        group: dist.ProcessGroup | None,
        scaling: float,
        wire_dtype: torch.dtype = torch.float32,
        segments: str = "padded",
        buckets: int | None = 1,
    ) -> None:
        self.group_size = dist.get_world_size(group) if group is not None else 1
        if owner_world not in (1, self.group_size):
            raise ValueError(
                f"the engines' owner group has {owner_world} ranks, the reduction group "
                f"{self.group_size}: blocks must be owned over the data-parallel group or "
                "replicated"
            )
        self.layout = OwnerLayout(assignments, owner_world, segments)  # the whole buffer
        self.group = group
        self.rank = dist.get_rank(group) if owner_world > 1 else 0
        self.scaling = scaling
        self.wire_dtype = wire_dtype
        if self.group_size == 1 or (not self.sharded and wire_dtype == torch.float32):
            buckets = 1  # reduced in place: the packed buffer is the result (see auto_buckets)
        elif buckets is None:
            buckets = self.auto_buckets()
        self.chunks = self.layout.chunks(buckets)
        # Buckets launched and not retired: (work, send buffer, receive buffer, its start in
        # this owner's segment).
        self._in_flight: deque[tuple[dist.Work | None, torch.Tensor, torch.Tensor, int]]
        self._in_flight = deque()
        self._segment: torch.Tensor | None = None  # this owner's received segment
        self._dtype: torch.dtype | None = None  # the grads' dtype while a reduction is out

    def auto_buckets(self) -> int:
        """``comm_config.level_bucket_count`` (auto) of this buffer's owner segments.

        Replicated with the fp32 wire the packed buffer is reduced in place and is the
        result, alive to ``wait`` whatever the bucketing: one bucket. One rank: one bucket.
        """
        if self.group_size == 1 or (not self.sharded and self.wire_dtype == torch.float32):
            return 1
        return level_bucket_count(None, self.layout.used, self.layout.exact)

    @property
    def sharded(self) -> bool:
        """Whether the blocks are owned over the group (reduce-scatter), not replicated."""
        return self.layout.world_size > 1

    @property
    def num_buckets(self) -> int:
        """Collectives per level reduction (buckets with elements on some rank)."""
        return len(self.chunks)

    def launch(self, grads: Sequence[Sequence[torch.Tensor]]) -> None:
        """Pack ``grads[engine][param]``'s blocks, scale them and start the reduction.

        One collective per bucket, at most ``SEND_BUFFERS`` send buffers alive at once.
        """
        if self._dtype is not None:
            raise RuntimeError("a level reduction is still in flight: wait() for it first")
        ref = next(g for gs in grads for g in gs)
        self._dtype = ref.dtype  # main_grad: fp32 (fp64 in the tests)
        if len(self.chunks) > 1:  # every bucket's result lands in this owner's one segment
            mine = sum(chunk.sizes[self.rank] for chunk in self.chunks)
            self._segment = ref.new_empty(mine)
        start = 0
        for chunk in self.chunks:
            while len(self._in_flight) >= self.SEND_BUFFERS:
                self._retire()
            self._launch_bucket(chunk, grads, ref, start)
            start += chunk.sizes[self.rank]

    def _launch_bucket(
        self,
        chunk: OwnerChunk,
        grads: Sequence[Sequence[torch.Tensor]],
        ref: torch.Tensor,
        start: int,
    ) -> None:
        dtype = ref.dtype
        flat = chunk.pack(grads, dtype, ref)
        if self.scaling != 1.0:
            flat.mul_(self.scaling)
        n = self.group_size
        seg = chunk.sizes[self.rank]  # this rank's part of the bucket (padded, or exact)
        work: dist.Work | None = None
        if n == 1:
            out = flat
        elif self.wire_dtype in (torch.float32, dtype):
            if self.sharded:
                # into the bucket's run of this owner's segment (one bucket: its own buffer)
                segment = self._segment
                out = flat.new_empty(seg) if segment is None else segment[start : start + seg]
                if chunk.exact:
                    work = reduce_scatter_uneven(out, flat, chunk.sizes, self.group, True)
                else:
                    work = reduce_scatter_flat(out, flat, self.group, async_op=True)
            else:
                out = flat
                work = dist.all_reduce(out, group=self.group, async_op=True)
        else:
            wire = flat.to(self.wire_dtype)
            flat = wire  # the fp32 pack dies here: only the wire copy is sent (and kept alive)
            if self.sharded:  # piece r of every rank goes to owner r
                out = wire.new_empty(n * seg)
                work = dist.all_to_all_single(
                    out,
                    wire,
                    output_split_sizes=[seg] * n,
                    input_split_sizes=chunk.sizes,
                    group=self.group,
                    async_op=True,
                )
            else:
                out = wire.new_empty(n * wire.numel())
                work = all_gather_flat(out, wire, self.group, async_op=True)
        self._in_flight.append((work, flat, out, start))  # flat: the send buffer, to retire

    def _retire(self) -> None:
        """Wait for the oldest bucket in flight; keep its received sums, drop its buffers."""
        work, _, out, start = self._in_flight.popleft()
        if work is not None:
            work.wait()
        dtype = self._dtype
        assert dtype is not None
        if out.dtype != dtype:  # bf16 pieces of every sender: fp32 (grad dtype) sum, rank order
            pieces = out.view(self.group_size, -1)
            if self._segment is None:
                total = pieces.new_empty(pieces.shape[1], dtype=dtype)
            else:  # into the bucket's run of the segment
                total = self._segment[start : start + pieces.shape[1]]
            out = sum_rank_pieces(pieces, total)
        if self._segment is None:
            self._segment = out

    @property
    def in_flight(self) -> bool:
        """Whether a launched reduction has not been waited for yet."""
        return self._dtype is not None

    def wait(self) -> list[list[torch.Tensor]]:
        """Finish the reduction.

        Returns:
            This rank's owned blocks, per engine, as (rows, cols) views in the grads' dtype
            (views into this owner's received segment, whatever the bucketing).
        """
        if self._dtype is None:
            raise RuntimeError("no level reduction in flight")
        while self._in_flight:
            self._retire()
        self._dtype = None
        segment, self._segment = self._segment, None
        assert segment is not None
        return self.layout.segment_views(segment, self.rank)

    def padding_per_rank(self) -> list[int]:
        """Padding elements in each rank's segments, summed over the buckets."""
        pads = [chunk.padding_per_rank() for chunk in self.chunks]
        return [sum(column) for column in zip(*pads)]

    def bytes_per_reduction(self) -> int:
        """Bytes one rank sends per reduction with ring algorithms (padding included)."""
        return sum(self._bucket_bytes(chunk) for chunk in self.chunks)

    def _bucket_bytes(self, chunk: OwnerChunk) -> int:
        n = self.group_size
        if n == 1:
            return 0
        wire = torch.finfo(self.wire_dtype).bits // 8
        if self.sharded:  # reduce-scatter or all-to-all: every other owner's segment
            return (chunk.numel - chunk.sizes[self.rank]) * wire
        if self.wire_dtype == torch.float32:  # ring all-reduce
            return 2 * (n - 1) * chunk.segment_size * wire // n
        return (n - 1) * chunk.segment_size * wire  # all-gather of the bf16 pieces


class FlatAllReduce:
    """One asynchronous all-reduce of a list of same-dtype tensors packed into a flat copy.

    The copy is pre-scaled by ``scaling``; ``wait`` returns the reduced tensors (views of the
    copy).
    """

    def __init__(self, group: dist.ProcessGroup | None, scaling: float) -> None:
        self.group = group
        self.group_size = dist.get_world_size(group) if group is not None else 1
        self.scaling = scaling
        self._pending: tuple[dist.Work | None, torch.Tensor, list[torch.Size]] | None = None

    def launch(self, tensors: Sequence[torch.Tensor]) -> None:
        """Pack (one cat), scale and start the all-reduce."""
        if self._pending is not None:
            raise RuntimeError("an all-reduce is still in flight: wait() for it first")
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if self.scaling != 1.0:
            flat.mul_(self.scaling)
        work = None
        if self.group_size > 1:
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending = (work, flat, [t.shape for t in tensors])

    def wait(self) -> list[torch.Tensor]:
        """The reduced tensors, shaped like the launched ones (views of the flat copy)."""
        if self._pending is None:
            raise RuntimeError("no all-reduce in flight")
        work, flat, shapes = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        out, offset = [], 0
        for shape in shapes:
            n = shape.numel()
            out.append(flat[offset : offset + n].view(shape))
            offset += n
        return out

    def bytes_per_reduction(self, numel: int) -> int:
        """Bytes one rank sends for a ring all-reduce of ``numel`` fp32 elements."""
        n = self.group_size
        return 2 * (n - 1) * numel * 4 // n if n > 1 else 0
