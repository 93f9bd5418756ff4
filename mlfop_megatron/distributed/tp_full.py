"""Tensor-parallel "full" mode: precondition the whole matrix behind TP-sharded weights.

Each TP rank holds a shard of a weight along its partition dim. In full mode the level
gradients of the shards are all-gathered over the TP group into full matrices, SOAP blocks of
the full matrices are owned across the combined TP x DP group, and after the step the updated
full matrices are broadcast and every rank copies back its own shard. The math is therefore the
TP=1 math; the price is a full-size copy of these matrices. With owner reduction (the default
``CommConfig.level_reduce``) and blocks owned over TP x DP, :class:`TPFullReducer` hands each
owner only its blocks' DP-reduced level sums (a DP reduce-scatter of shard pieces, then an
uneven TP all-to-all); otherwise (replicated engine, or ``level_reduce="all_reduce"``) the
level gradients of the shards are reduced over DP and all-gathered over TP into full matrices.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.distributed.assignment import Block
from mlfop_megatron.distributed.comm_config import level_bucket_count, segment_chunks
from mlfop_megatron.distributed.owner_buffer import (
    add_run_copies,
    all_gather_flat,
    reduce_scatter_flat,
    sum_rank_pieces,
)
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP


def gather_full(
    shard: torch.Tensor, partition_dim: int, tp_group: dist.ProcessGroup
) -> torch.Tensor:
    """Concatenate the TP shards of a tensor along its partition dim (on every TP rank)."""
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(pieces, shard.contiguous(), group=tp_group)
    return torch.cat(pieces, dim=partition_dim)


def shard_of(full: torch.Tensor, partition_dim: int, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """This TP rank's slice of a full tensor (a view)."""
    tp = dist.get_world_size(tp_group)
    return torch.chunk(full, tp, dim=partition_dim)[dist.get_rank(tp_group)]


class TensorParallelFullSOAP(ShardedSOAP):
    """ShardedSOAP over full matrices assembled from TP shards (see module docstring).

    Its ``params`` are the full matrices (the SOAP engine's view); ``grad_params`` the local
    shards whose ``main_grad`` the DDP fills and that ``step`` writes back.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        partition_dims: Sequence[int],
        config: MLFOPConfig,
        tp_group: dist.ProcessGroup,
        owner_group: dist.ProcessGroup | None,
        block_size: int | None = None,
        param_sync: str = "all_gather",
        segments: str = "padded",
    ) -> None:
        for p, name, dim in zip(params, names, partition_dims):
            if dim not in (0, 1) or p.dim() != 2:
                raise ValueError(
                    f"tp_mode='full' needs 2-D weights split along dim 0 or 1; {name!r} has "
                    f"shape {tuple(p.shape)} split along dim {dim}; use tp_mode='blockwise'"
                )
        self.shards = list(params)
        self.partition_dims = list(partition_dims)
        self.tp_group = tp_group
        with torch.no_grad():
            self.full = [
                gather_full(p.detach(), d, tp_group) for p, d in zip(self.shards, partition_dims)
            ]
        super().__init__(
            self.full,
            names,
            config,
            group=owner_group,
            block_size=block_size,
            param_sync=param_sync,
            segments=segments,
        )

    @property
    def grad_params(self) -> list[torch.Tensor]:
        """The local shards (whose main_grad the DDP fills)."""
        return self.shards

    def _gather(self, level_shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        fulls = [
            gather_full(g, d, self.tp_group) for g, d in zip(level_shards, self.partition_dims)
        ]
        self.timings["communication"] += time.perf_counter() - start
        return fulls

    def fold_reduced_level(
        self, level: int, level_grads: Sequence[torch.Tensor], scale: float = 1.0
    ) -> None:
        """All-gather the shards' level gradients (DP-reduced) and fold the full matrices."""
        super().fold_reduced_level(level, self._gather(level_grads), scale=scale)

    def add_reduced_segment(
        self, level_grads: Sequence[torch.Tensor], end: int, scale: float
    ) -> None:
        """All-gather a diagnostics segment's shard gradients (see add_reduced_segment)."""
        super().add_reduced_segment(self._gather(level_grads), end, scale)

    def step(self, lr: float, weight_decay: float, grad_scale: float = 1.0) -> None:
        """Step the full matrices, share them, and write each rank's shard back."""
        super().step(lr, weight_decay, grad_scale=grad_scale)
        with torch.no_grad():
            for shard, full, dim in zip(self.shards, self.full, self.partition_dims):
                shard.copy_(shard_of(full, dim, self.tp_group))


@dataclass(frozen=True)
class Piece:
    """The part of an owned block that lies in one TP shard, in shard coordinates."""

    row_offset: int
    col_offset: int
    rows: int
    cols: int

    @property
    def numel(self) -> int:
        """Elements of the piece (0 when the block misses the shard)."""
        return self.rows * self.cols


def block_piece(block: Block, full_shape: Sequence[int], dim: int, tp: int, t: int) -> Piece:
    """The piece of ``block`` (of the full matrix) held by TP rank ``t`` (split along ``dim``)."""
    size = full_shape[dim] // tp
    lo_b = block.row_offset if dim == 0 else block.col_offset
    len_b = block.rows if dim == 0 else block.cols
    lo, hi = max(lo_b, t * size), min(lo_b + len_b, (t + 1) * size)
    extent = max(hi - lo, 0)
    if dim == 0:
        return Piece(lo - t * size if extent else 0, block.col_offset, extent, block.cols)
    return Piece(block.row_offset, lo - t * size if extent else 0, block.rows, extent)


class TPFullReducer:
    """Level sums of a sharded TP-full engine, reduced to the owners of its full-matrix blocks.

    Owners are ranks of the TP x DP group, each a (TP rank t, DP rank d) pair. Step 1, on each
    TP rank: one reduce-scatter over the DP group of an owner-ordered buffer of this rank's
    shard pieces, DP segment d holding the pieces of the blocks owned by (t', d) for every t'
    (padded to the longest segment of this TP rank). Step 2, in each TP group: one uneven
    all-to-all sends every owner the pieces of its blocks held by the other TP ranks, which the
    owner concatenates along the partition dim. Each owner thus receives exactly its blocks'
    DP-reduced level sums, as the DP-sharded engines' ``LevelReducer`` does; the previous path
    all-reduced every shard over DP and all-gathered the full matrices over TP on every rank.
    ``wire_dtype`` bfloat16: step 1 is an all-to-all of bf16 pieces summed in fp32 in rank
    order (as in ``LevelReducer``); step 2 moves already-reduced sums in the grads' dtype.
    ``buckets`` (``CommConfig.level_buckets``; None: auto, ``choose_level_buckets``): step 1
    in that many collectives, bucket g = run g of every DP segment (``segment_chunks``: equal
    runs, cut inside pieces), at most ``SEND_BUFFERS`` send buffers alive at once, each
    bucket's result landing in its run of this rank's one received segment.
    """

    SEND_BUFFERS = 2  # as LevelReducer: bucket g packs while g - 1 is on the wire

    def __init__(
        self,
        engine: TensorParallelFullSOAP,
        dp_group: dist.ProcessGroup | None,
        scaling: float,
        wire_dtype: torch.dtype = torch.float32,
        buckets: int | None = 1,
    ) -> None:
        if engine.world_size == 1 or engine.group is None:
            raise ValueError("TPFullReducer needs a TP-full engine sharded over TP x DP")
        self.engine = engine
        self.dp_group = dp_group
        self.tp_group = engine.tp_group
        self.dp = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.tp = dist.get_world_size(self.tp_group)
        self.t = dist.get_rank(self.tp_group)
        self.d = dist.get_rank(dp_group) if dp_group is not None else 0
        if self.tp * self.dp != engine.world_size:
            raise ValueError(
                f"the TP-full engine's owner group has {engine.world_size} ranks, TP x DP = "
                f"{self.tp} x {self.dp}: it must be the tensor-and-data-parallel group"
            )
        self.scaling = scaling
        self.wire_dtype = wire_dtype
        self.coords = self._owner_coords()
        # owners[(t, d)] = owner rank in the TP x DP group
        self.owner_at = {c: o for o, c in enumerate(self.coords)}
        asg = engine.assignment
        shapes = [tuple(p.shape) for p in engine.params]
        dims = engine.partition_dims

        def pieces(owner: int, t: int) -> list[tuple[Block, Piece]]:
            return [
                (b, block_piece(b, shapes[b.param_index], dims[b.param_index], self.tp, t))
                for b in asg.blocks_of(owner)
            ]

        # Step 1 buffer of this TP rank: per DP rank d', per TP rank t', this shard's pieces.
        self.send: list[list[list[tuple[Block, Piece]]]] = [
            [pieces(self.owner_at[(t2, d2)], self.t) for t2 in range(self.tp)]
            for d2 in range(self.dp)
        ]
        used = [sum(p.numel for part in seg for _, p in part) for seg in self.send]
        self.segment_size = max(used, default=0)
        self.used = used
        # Step 2: what this rank sends to TP rank t' and receives from it.
        mine = self.send[self.d]
        self.send_splits = [sum(p.numel for _, p in part) for part in mine]
        me = self.owner_at[(self.t, self.d)]
        self.recv = [pieces(me, t2) for t2 in range(self.tp)]
        self.recv_splits = [sum(p.numel for _, p in part) for part in self.recv]
        self.owned_blocks = list(asg.blocks_of(me))
        # Each DP segment's pieces with their offsets in it: (offset, param index, piece).
        self._offsets: list[list[tuple[int, int, Piece]]] = []
        for seg in self.send:
            at, row = 0, []
            for part in seg:
                for b, p in part:
                    if p.numel:
                        row.append((at, b.param_index, p))
                        at += p.numel
            self._offsets.append(row)
        if self.dp == 1:
            buckets = 1
        elif buckets is None:
            buckets = level_bucket_count(None, self.used)
        self.runs = segment_chunks(self.used, max(1, buckets))  # per bucket: (lo, hi) per rank
        self._in_flight: deque[tuple[dist.Work | None, torch.Tensor, torch.Tensor, int]]
        self._in_flight = deque()
        self._segment: torch.Tensor | None = None  # this rank's DP-reduced segment
        self._dtype: torch.dtype | None = None  # the grads' dtype while a reduction is out

    @property
    def num_buckets(self) -> int:
        """Collectives of step 1 per level reduction."""
        return len(self.runs)

    def _owner_coords(self) -> list[tuple[int, int]]:
        """(TP rank, DP rank) of every rank of the owner group, gathered once at construction."""
        engine = self.engine
        device = engine.params[0].device
        mine = torch.tensor([self.t, self.d], dtype=torch.int64, device=device)
        out = torch.empty(2 * engine.world_size, dtype=torch.int64, device=device)
        all_gather_flat(out, mine, engine.group, async_op=False)
        coords = [(int(a), int(b)) for a, b in out.view(-1, 2).tolist()]
        if sorted(coords) != [(t, d) for t in range(self.tp) for d in range(self.dp)]:
            raise ValueError(
                f"the owner group's (TP rank, DP rank) pairs {coords} are not the TP x DP grid"
            )
        return coords

    def launch(self, shard_grads: Sequence[torch.Tensor]) -> None:
        """Pack this shard's pieces in owner order, scale them and start the DP reduction.

        One collective per bucket; bucket g is packed only after bucket g - ``SEND_BUFFERS``
        was waited for (its send buffer dropped).
        """
        if self._dtype is not None:
            raise RuntimeError("a level reduction is still in flight: wait() for it first")
        ref = shard_grads[0]
        self._dtype = ref.dtype
        if self.dp > 1:
            mine = sum(hi - lo for lo, hi in (run[self.d] for run in self.runs))
            self._segment = ref.new_empty(mine)
        start = 0
        for runs in self.runs:
            while len(self._in_flight) >= self.SEND_BUFFERS:
                self._retire()
            self._launch_bucket(runs, shard_grads, ref, start)
            start += runs[self.d][1] - runs[self.d][0]

    def _launch_bucket(
        self,
        runs: Sequence[tuple[int, int]],
        shard_grads: Sequence[torch.Tensor],
        ref: torch.Tensor,
        start: int,
    ) -> None:
        width = runs[0][1] - runs[0][0]  # padded: every DP segment's run is as long
        flat = ref.new_empty(self.dp * width)
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for d2, ((lo, hi), offsets, used) in enumerate(zip(runs, self._offsets, self.used)):
            part = flat[d2 * width : (d2 + 1) * width]
            views = [(at, _piece_view(shard_grads[i], p)) for at, i, p in offsets]
            add_run_copies(part, views, lo, hi, dsts, srcs)
            part[max(0, min(hi, used) - lo) :].zero_()
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        if self.scaling != 1.0:
            flat.mul_(self.scaling)
        work: dist.Work | None = None
        if self.dp == 1:
            out = flat
        elif self.wire_dtype in (torch.float32, ref.dtype):
            assert self._segment is not None  # allocated by launch when dp > 1
            out = self._segment[start : start + width]
            work = reduce_scatter_flat(out, flat, self.dp_group, async_op=True)
        else:
            flat = flat.to(self.wire_dtype)  # the fp32 pack dies here: only the wire copy
            out = torch.empty_like(flat)
            work = dist.all_to_all_single(out, flat, group=self.dp_group, async_op=True)
        self._in_flight.append((work, flat, out, start))

    def _retire(self) -> None:
        """Wait for the oldest bucket in flight; sum bf16 pieces into the segment's run."""
        work, _, out, start = self._in_flight.popleft()
        if work is not None:
            work.wait()
        dtype = self._dtype
        assert dtype is not None
        if self.dp == 1:
            self._segment = out
        elif out.dtype != dtype:  # bf16 pieces of every DP sender: fp32 sum in rank order
            assert self._segment is not None
            pieces = out.view(self.dp, -1)
            sum_rank_pieces(pieces, self._segment[start : start + pieces.shape[1]])

    @property
    def in_flight(self) -> bool:
        """Whether a launched reduction has not been waited for yet."""
        return self._dtype is not None

    def wait(self) -> list[torch.Tensor]:
        """Finish both steps; this rank's owned blocks, (rows, cols), in the grads' dtype."""
        if self._dtype is None:
            raise RuntimeError("no level reduction in flight")
        while self._in_flight:
            self._retire()
        self._dtype = None
        out, self._segment = self._segment, None
        assert out is not None
        send = out[: sum(self.send_splits)]
        recv = send.new_empty(sum(self.recv_splits))
        dist.all_to_all_single(
            recv,
            send,
            output_split_sizes=self.recv_splits,
            input_split_sizes=self.send_splits,
            group=self.tp_group,
        )
        # recv: for each TP rank t', the pieces of my blocks it holds, in block order.
        parts: list[list[torch.Tensor]] = [[] for _ in self.owned_blocks]
        base = 0
        for part in self.recv:
            offset = base
            for i, (_, p) in enumerate(part):
                if p.numel:
                    parts[i].append(recv[offset : offset + p.numel].view(p.rows, p.cols))
                    offset += p.numel
            base = offset
        dims = self.engine.partition_dims
        return [
            torch.cat(ps, dim=dims[b.param_index]) if len(ps) > 1 else ps[0]
            for b, ps in zip(self.owned_blocks, parts)
        ]

    def dp_bytes_per_reduction(self) -> int:
        """Bytes this rank sends in step 1 (reduce-scatter or all-to-all, padding included)."""
        wire = torch.finfo(self.wire_dtype).bits // 8
        padded = sum(hi - lo for lo, hi in (run[0] for run in self.runs))
        return (self.dp - 1) * padded * wire if self.dp > 1 else 0

    def tp_bytes_per_reduction(self, elem_bytes: int = 4) -> int:
        """Bytes this rank sends in step 2 (pieces for the other TP ranks' blocks)."""
        return (sum(self.send_splits) - self.send_splits[self.t]) * elem_bytes


def _piece_view(shard: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's region of a shard-shaped tensor (a view)."""
    return shard[
        piece.row_offset : piece.row_offset + piece.rows,
        piece.col_offset : piece.col_offset + piece.cols,
    ]
