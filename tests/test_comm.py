"""Owner-ordered level reductions and parameter all-gather (issue 13), against dense references.

Reference: every rank regenerates every rank's gradients from seeds, so the expected level sum
of a block is computed densely in the test (sum over ranks of the pre-scaled gradients) and
compared with what the owner receives from one reduce-scatter. Tolerances: fp32 wire, the
reduction order of gloo's reduce-scatter may differ from the test's left-to-right sum, so
allclose at fp32 round-off (rtol 1e-6); bf16 wire, the owner sums the bf16-rounded pieces in
fp32 in rank order, which the test reproduces bitwise, and which differs from the fp32 sum by
at most n x 2^-9 x max|piece| (one bf16 rounding per piece).
"""

from __future__ import annotations

import gc

import pytest
import torch

from mlfop_megatron.distributed.assignment import Assignment, BlockingConfig, ParamSpec, make_blocks
from mlfop_megatron.distributed.owner_buffer import OwnerLayout, block_view
from mlfop_megatron.runtime.spawn import run_distributed

SHAPES = [(12, 8), (5, 7), (16, 16), (3, 9)]


def _assignment(world: int, block_size: int | None = 6) -> Assignment:
    specs = [ParamSpec(f"p{i}", s) for i, s in enumerate(SHAPES)]
    return Assignment.build(make_blocks(specs, BlockingConfig(block_size, 10000)), world)


def _grads(rank: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def test_owner_layout_segments_and_padding():
    world = 3
    assignments = [_assignment(world), _assignment(world, block_size=None)]
    layout = OwnerLayout(assignments, world)
    tensors = [_grads(0), _grads(1)]
    flat = layout.pack(tensors, torch.float32, tensors[0][0])
    assert flat.numel() == layout.numel == world * layout.segment_size
    total = sum(b.numel for a in assignments for b in a.blocks)
    assert sum(layout.padding_per_rank()) == layout.numel - total
    assert min(layout.padding_per_rank()) == 0  # the longest segment sets the length
    for rank in range(world):
        seg = flat[rank * layout.segment_size : (rank + 1) * layout.segment_size]
        views = layout.segment_views(seg, rank)
        for e, assignment in enumerate(assignments):
            blocks = assignment.blocks_of(rank)
            assert len(views[e]) == len(blocks)
            for v, b in zip(views[e], blocks):
                assert torch.equal(v, block_view(tensors[e][b.param_index], b))
        assert not seg[layout.used[rank] :].any()  # zero padding
    # unpack_into restores every block but the skipped rank's
    out = [[torch.zeros(s) for s in SHAPES] for _ in assignments]
    layout.unpack_into(flat, out, skip=1)
    for e, assignment in enumerate(assignments):
        for rank in range(world):
            for b in assignment.blocks_of(rank):
                got = block_view(out[e][b.param_index], b)
                want = block_view(tensors[e][b.param_index], b)
                assert torch.equal(got, want) if rank != 1 else not got.any()


def test_pack_and_unpack_are_one_foreach_copy_each():
    """pack/unpack copy every block in one ``_foreach_copy_`` each, converting on the way.

    No per-block copies, conversions or cat: one multi-tensor launch on CUDA and no transient
    beyond the buffer (bf16 blocks packed into fp32 here).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    world = 2
    assignments = [_assignment(world)]
    layout = OwnerLayout(assignments, world)
    tensors = [[g.to(torch.bfloat16) for g in _grads(0)]]
    with Ops() as ops:
        flat = layout.pack(tensors, torch.float32, tensors[0][0])
    copies = [n for n in ops.names if "copy" in n or n in ("cat", "_to_copy")]
    assert copies == ["_foreach_copy_"], ops.names
    for rank in range(world):
        seg = flat[rank * layout.segment_size : (rank + 1) * layout.segment_size]
        for v, b in zip(layout.segment_views(seg, rank)[0], assignments[0].blocks_of(rank)):
            assert torch.equal(v, block_view(tensors[0][b.param_index], b).float())
    out = [[torch.zeros(s) for s in SHAPES]]
    with Ops() as ops:
        layout.unpack_into(flat, out, skip=0)
    assert [n for n in ops.names if "copy" in n] == ["_foreach_copy_"], ops.names


def _reduce_worker(spec):
    import torch.distributed as dist

    from mlfop_megatron.distributed.comm_counter import count_collectives
    from mlfop_megatron.distributed.owner_buffer import LevelReducer

    rank, world = dist.get_rank(), dist.get_world_size()
    scaling = 1.0 / world
    owner_world = world if spec["sharded"] else 1
    assignment = _assignment(owner_world)
    wire = torch.bfloat16 if spec["wire"] == "bf16" else torch.float32
    reducer = LevelReducer(
        [assignment], owner_world, dist.group.WORLD, scaling, wire, spec.get("segments", "padded")
    )
    with count_collectives() as counts:
        reducer.launch([_grads(rank)])
        (owned,) = reducer.wait()

    def fp32_packs_alive() -> int:
        return sum(
            1
            for o in gc.get_objects()
            if torch.is_tensor(o) and o.dtype == torch.float32 and o.numel() == reducer.layout.numel
        )

    grads = [_grads(rank)]
    before = fp32_packs_alive()
    reducer.launch(grads)
    # What the reduction in flight keeps alive: fp32 buffers the size of the whole pack.
    fp32_packs = fp32_packs_alive() - before
    (owned,) = reducer.wait()
    me = rank if spec["sharded"] else 0
    blocks = assignment.blocks_of(me)
    exact, rounded = [], []
    for b, got in zip(blocks, owned):
        pieces = [block_view(_grads(r)[b.param_index], b) * scaling for r in range(world)]
        fp32 = sum(pieces[1:], pieces[0].clone())
        bf16 = torch.zeros_like(fp32)
        for p in pieces:  # the owner's sum: bf16 pieces accumulated in fp32, rank order
            bf16 += p.to(torch.bfloat16).float()
        exact.append(float((got - fp32).abs().max()))
        rounded.append((bool(torch.equal(got, bf16)), float(max(p.abs().max() for p in pieces))))
    return {
        "n": len(owned),
        "expected": len(blocks),
        "err": exact,
        "bf16": rounded,
        "bytes": reducer.bytes_per_reduction(),
        "counted": counts.total_bytes,
        "seg": reducer.layout.segment_size,
        "used": reducer.layout.used,
        "padding": reducer.layout.padding_per_rank(),
        "fp32_packs": fp32_packs,
    }


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "replicated"])
@pytest.mark.parametrize("wire", ["fp32", "bf16"])
@pytest.mark.parametrize("segments", ["padded", "exact"])
def test_level_reducer_gives_owners_the_dense_level_sum(world, sharded, wire, segments):
    spec = dict(sharded=sharded, wire=wire, segments=segments)
    runs = run_distributed(_reduce_worker, world, spec)
    for rank, r in enumerate(runs):
        assert r["bytes"] == r["counted"]  # the method == counted on the real call
        # bf16 wire: only the bf16 copy is kept in flight, the fp32 pack is gone; fp32: the
        # pack is the send buffer (sharded) or the all-reduce buffer (replicated).
        assert r["fp32_packs"] == (0 if wire == "bf16" else 1)
        if sharded and segments == "exact":  # no padding: every other owner's blocks only
            assert r["padding"] == [0] * world
            wire_bytes = 4 if wire == "fp32" else 2
            assert r["bytes"] == (sum(r["used"]) - r["used"][rank]) * wire_bytes
    if sharded:
        assert max(runs[0]["used"]) > min(runs[0]["used"])  # the shapes leave owners uneven
    for r in runs:
        assert r["n"] == r["expected"] > 0
        if wire == "fp32":
            assert max(r["err"]) <= 1e-6 * 8
        else:
            for (same, scale), err in zip(r["bf16"], r["err"]):
                assert same  # bitwise: bf16 pieces summed in fp32 in rank order
                assert err <= world * 2.0**-9 * scale
    if sharded and wire == "fp32" and segments == "padded":  # (n - 1) padded fp32 segments
        assert runs[0]["bytes"] == (world - 1) * runs[0]["seg"] * 4


def _param_sync_worker(spec):
    import torch.distributed as dist

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.distributed.comm_counter import count_collectives
    from mlfop_megatron.distributed.sharded_soap import ShardedSOAP

    rank = dist.get_rank()
    params = [torch.full(s, float(rank), dtype=spec["dtype"]) for s in SHAPES]
    engine = ShardedSOAP(
        params,
        [f"p{i}" for i in range(len(SHAPES))],
        MLFOPConfig(),
        group=dist.group.WORLD,
        block_size=6,
        param_sync=spec["mode"],
        segments=spec.get("segments", "padded"),
    )
    for o in engine.owned:  # each owner writes its id + 1 into its blocks
        o.view(o.param.data).fill_(10.0 + rank)
    with count_collectives() as counts:
        engine.sync_params()
    ok = all(
        bool((block_view(params[b.param_index], b) == 10.0 + r).all())
        for r in range(engine.world_size)
        for b in engine.assignment.blocks_of(r)
    )
    return {
        "ok": ok,
        "launches": dict(counts.launches),
        "bytes": counts.total_bytes,
        "model": engine.communication_bytes_per_step(),
        "padding": engine.param_padding_per_rank(),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["all_gather", "broadcast", "exact"])
def test_param_sync_shares_owned_blocks_in_one_all_gather(mode):
    world = 3
    spec = dict(mode=mode, dtype=torch.bfloat16)
    if mode == "exact":  # unpadded segments: gloo runs the uneven all-gather as an all-to-all
        spec.update(mode="all_gather", segments="exact")
    runs = run_distributed(_param_sync_worker, world, spec)
    for r in runs:
        assert r["ok"]
        if mode == "exact":
            assert r["launches"] == {"all_to_all": 1}
            assert r["bytes"] == r["model"] and r["padding"] == [0] * world
        elif mode == "all_gather":
            assert r["launches"] == {"all_gather": 1}
            assert r["bytes"] == r["model"]  # counted on the real call == the method
            assert len(r["padding"]) == world and min(r["padding"]) == 0
        else:
            assert r["launches"] == {"broadcast": world}


def test_comm_config_refuses_bad_options():
    from mlfop_megatron.distributed.comm_config import CommConfig

    with pytest.raises(ValueError, match="level_reduce"):
        CommConfig(level_reduce="ring")
    with pytest.raises(ValueError, match="grad_wire_dtype='bf16' needs"):
        CommConfig(level_reduce="all_reduce", grad_wire_dtype="bf16")
    with pytest.raises(ValueError, match="param_sync"):
        CommConfig(param_sync="scatter")
    with pytest.raises(ValueError, match="segments"):
        CommConfig(segments="trimmed")
