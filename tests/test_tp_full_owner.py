"""TP-full engines receive owner-reduced level sums (issue 13, TPFullReducer).

Pure part: the pieces of a full-matrix block held by the TP shards tile the block exactly.
Distributed part (megatron-core tiny GPT, gloo, TP=2 x DP=2, tp_mode="full"): the owner path
(DP reduce-scatter of shard pieces, TP all-to-all to the owners) against the first version
(Megatron's buckets all-reduced over DP, full matrices all-gathered over TP on every rank, one
broadcast per owner). At DP=2 a sum of two addends does not depend on the order and both paths
pre-scale by 1/DP, and the TP step only moves already-reduced values, so the SOAP params'
level means, hence their updates, are bitwise equal after one step; the Adam params differ by
fp32 round-off only (the first version averages their partial sums at every level; see
tests/test_comm_megatron.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mlfop_megatron.distributed.assignment import BlockingConfig, ParamSpec, make_blocks
from mlfop_megatron.distributed.owner_buffer import block_view
from mlfop_megatron.distributed.tp_full import _piece_view, block_piece


@pytest.mark.parametrize(
    "shape,dim,tp,block",
    [
        ((12, 8), 0, 2, 5),
        ((12, 8), 1, 2, 3),
        ((12, 9), 0, 4, 4),
        ((6, 16), 1, 4, 16),
        ((6, 16), 1, 4, None),
    ],
)
def test_block_pieces_tile_every_block(shape, dim, tp, block):
    full = torch.arange(shape[0] * shape[1], dtype=torch.float64).view(shape)
    shards = torch.chunk(full, tp, dim=dim)
    for b in make_blocks([ParamSpec("w", shape)], BlockingConfig(block)):
        pieces = [block_piece(b, shape, dim, tp, t) for t in range(tp)]
        parts = [_piece_view(s, p) for s, p in zip(shards, pieces) if p.numel]
        assert torch.equal(torch.cat(parts, dim=dim), block_view(full, b))
        assert sum(p.numel for p in pieces) == b.numel


pytest.importorskip("megatron.core")

from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402

OLD = {"level_reduce": "all_reduce", "param_sync": "broadcast"}


def _is_adam(name, param):
    return param.dim() < 2 or "embedding" in name or "output_layer" in name


@pytest.mark.distributed
@pytest.mark.parametrize("grad_groups", [None, (0, 0, 1, 1)], ids=["levels", "segments"])
def test_tp2_dp2_full_owner_reduction_equals_first_version(grad_groups):
    spec = dict(
        iters=1,
        microbatches=4,
        global_micro=2,
        tp=2,
        tp_mode="full",
        count_comm=True,
        grad_groups=grad_groups,
    )
    # Adam grads all-reduced: every reduce-scatter counted below is a SOAP level's
    new = run_distributed(
        run_tiny_gpt, 4, dict(spec, comm={"adam_grad_reduce": "all_reduce"}), timeout=600
    )
    old = run_distributed(run_tiny_gpt, 4, dict(spec, comm=OLD), timeout=600)
    assert "TensorParallelFullSOAP" in new[0]["engines"]
    for r in range(4):
        for name, p in new[r]["params"].items():
            q = old[r]["params"][name]
            if _is_adam(name, p):
                assert torch.allclose(p, q, rtol=1e-6, atol=1e-8), name
            else:
                assert torch.equal(p, q), name
    if grad_groups is not None:
        return
    launches, sent = new[0]["comm_counts"][-1]
    levels = 3  # K=4 dyadic: boundaries 1, 2, 4
    # one DP reduce-scatter and one TP all-to-all per level for the TP-full engine
    assert launches["reduce_scatter"] == levels and launches["all_to_all"] == levels
    model = new[0]["comm_bytes"][0]
    assert model["soap_grads"] == sent["reduce_scatter"]
    assert model["tp_full"] == sent["all_to_all"]
    # the first version moved every shard's level sum over DP and every full matrix over TP
    old_model = old[0]["comm_bytes"][0]
    assert model["soap_grads"] + model["tp_full"] < old_model["soap_grads"] + old_model["tp_full"]


def test_pieces_cover_each_full_matrix_once_over_owners():
    # every element of every full matrix lands in exactly one (owner block, TP piece)
    shape, dim, tp = (12, 8), 1, 2
    count = torch.zeros(shape, dtype=torch.int64)
    shards = torch.chunk(count, tp, dim=dim)
    for b, t in itertools.product(make_blocks([ParamSpec("w", shape)], BlockingConfig(5)), [0, 1]):
        p = block_piece(b, shape, dim, tp, t)
        if p.numel:
            _piece_view(shards[t], p).add_(1)
    assert torch.equal(count, torch.ones_like(count))


def _bucket_runs(specs):
    out = []
    for spec in specs:
        r = run_tiny_gpt(spec)
        out.append({k: r[k] for k in ("params", "comm_counts", "tp_level_buckets", "losses")})
    return out


@pytest.mark.distributed
def test_tp2_dp2_full_owner_reduction_in_buckets_equals_one_bucket():
    """Step 1 (the DP reduce-scatter) in 5 buckets, runs cut inside pieces: bitwise 1 bucket.

    Each element is summed over the same 2 DP ranks (a + b = b + a; the bf16 wire sums the
    pieces itself in rank order), and step 2 moves the same reduced values: the params after
    two steps of three levels are bitwise equal, and each level launches 5 reduce-scatters
    (or all-to-alls) instead of 1 for the TP-full engine.
    """
    base = dict(iters=2, microbatches=4, global_micro=2, tp=2, tp_mode="full", count_comm=True)
    specs = []
    for wire in ("fp32", "bf16"):
        for buckets in (1, 5):
            comm = {"adam_grad_reduce": "all_reduce", "grad_wire_dtype": wire}
            specs.append(dict(base, comm={**comm, "level_buckets": buckets}))
    runs = run_distributed(_bucket_runs, 4, specs, timeout=900)
    levels = 3  # K=4 dyadic: boundaries 1, 2, 4
    for rank in range(4):
        for w, kind in enumerate(("reduce_scatter", "all_to_all")):
            one, many = runs[rank][2 * w], runs[rank][2 * w + 1]
            assert one["tp_level_buckets"] == [1] and many["tp_level_buckets"] == [5]
            assert one["losses"] == many["losses"]
            for name, p in one["params"].items():
                assert torch.equal(p, many["params"][name]), (rank, kind, name)
            (c1, _), (c5, _) = one["comm_counts"][-1], many["comm_counts"][-1]
            # step 1 per level: 1 or 5 collectives of its kind (bf16: plus step 2's all-to-all)
            extra = levels if kind == "all_to_all" else 0
            assert c1[kind] == levels + extra and c5[kind] == 5 * levels + extra, (c1, c5)
