"""A refresh budget (SOAPConfig.refresh_budget): the step's refresh work capped, most drifted first.

The selection rule on its own; the option's validation; one process against dense reference
SOAPs whose refreshes share the same budget (tests/support/reference_soap.budgeted_step):
the engine refreshes exactly the sides the reference chooses and the weights move by the
reference's updates; and two real gloo ranks, each capped over its own blocks, against the
references grouped by owner rank.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlfop_megatron.config import MLFOPConfig, SOAPConfig
from mlfop_megatron.core.refresh_budget import balanced_refreshes, budget_cap, side_cost
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
from mlfop_megatron.optim.mlfop_soap import MLFOPSOAP
from mlfop_megatron.runtime.spawn import run_distributed
from tests.support.reference_soap import ReferenceSOAP, budgeted_step

TOL = 0.03
LR = 0.01
# square: the first factors have full rank, so the first eigenbases have no arbitrary null space
SHAPES = [(16, 16), (16, 16), (20, 20), (12, 12)]


def test_capped_selection_takes_drifted_sides_by_drift_and_fills_nothing():
    shares = [0.1, 0.9, 0.02, 0.5, 0.3]
    costs = [1.0, 1.0, 1.0, 1.0, 1.0]
    cap = budget_cap(costs, [0.4] * 5)
    assert cap == pytest.approx(2.0)
    take = balanced_refreshes(shares, [TOL] * 5, costs, cap, fill=False)
    assert take == [False, True, False, True, False]
    # a side past the cap is skipped, a cheaper less-drifted one after it still fits
    take = balanced_refreshes(shares, [TOL] * 5, [1.0, 1.5, 1.0, 1.0, 0.5], 2.0, fill=False)
    assert take == [False, True, False, False, True]
    # the most drifted side is refreshed whatever the cap; an aligned one never fills
    assert balanced_refreshes([0.01, 0.2], [TOL] * 2, [9.0, 9.0], 1.0, fill=False) == [
        False,
        True,
    ]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan, math.inf, True])
def test_budget_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="refresh_budget"):
        SOAPConfig(refresh_budget=bad)  # type: ignore[arg-type]


def test_budget_needs_the_gate_and_the_batched_engine():
    with pytest.raises(ValueError, match="refresh_budget.*refresh_tolerance > 0"):
        SOAPConfig(refresh_budget=0.5, refresh_tolerance=0.0)
    with pytest.raises(ValueError, match="refresh_budget.*batched=True"):
        SOAPConfig(refresh_budget=0.5, batched=False)
    assert SOAPConfig(refresh_budget=1.0, refresh_tolerance=0.0).refresh_budget == 1.0


def _params(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(*s, dtype=torch.float64) for s in shapes]


def _grads(step: int, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Fresh full-rank gradients every step: every side drifts past the tolerance."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def _engine(
    budget: float, shapes=SHAPES, group: object = None, balance: bool = False
) -> ShardedSOAP:
    cfg = MLFOPConfig.from_kwargs(
        accumulation_steps=1,
        enabled=False,
        refresh_budget=budget,
        refresh_balance=balance,
        refresh_tolerance=TOL,
    )
    params = _params(shapes)
    return ShardedSOAP(params, [f"w{i}" for i in range(len(params))], cfg, group=group)


def _references(shapes=SHAPES) -> list[ReferenceSOAP]:
    params = _params(shapes)
    return [ReferenceSOAP(p, lr=LR, weight_decay=0.0, refresh_tolerance=TOL) for p in params]


def _refreshed(refs: list[ReferenceSOAP]) -> int:
    return sum(r.refreshed for r in refs)


def _run(engine: ShardedSOAP, refs: list[ReferenceSOAP], budget: float, groups, steps: int):
    """Step both; per step the engine's and the references' refresh counts."""
    counts = []
    shapes = [tuple(p.shape) for p in engine.params]
    for step in range(steps):
        grads = _grads(step, shapes)
        before, ref_before = engine.counters.refreshes_done, _refreshed(refs)
        engine.fold_reduced_level(0, [g.clone() for g in grads])
        engine.step(lr=LR, weight_decay=0.0)
        budgeted_step(refs, grads, budget, side_cost, groups)
        counts.append((engine.counters.refreshes_done - before, _refreshed(refs) - ref_before))
    return counts


@pytest.mark.parametrize("budget", [0.3, 0.5, 1.0])
def test_engine_refreshes_what_the_budgeted_reference_chooses(budget: float) -> None:
    """One process: the same sides refreshed per step, weights equal to the dense reference."""
    engine, refs = _engine(budget), _references()
    start = [p.clone() for p in engine.params]
    counts = _run(engine, refs, budget, None, 6)
    total = sum(len(r.sides()) for r in refs)
    for done, ref_done in counts[1:]:
        assert done == ref_done
        assert 1 <= done <= total
        if budget == 1.0:
            assert done == total  # uncapped, every side of these gradients drifts
    if budget < 1.0:
        assert max(d for d, _ in counts) < total  # the cap deferred work
    for p, p0, r in zip(engine.params, start, refs):
        assert not torch.equal(p, p0)  # trained
        # float64; the engine's gate reads tracked estimates, the reference forms Q^T F Q
        torch.testing.assert_close(p, r.w, rtol=1e-9, atol=1e-11)


def _dp_worker(budget: float, shapes: list, balance: bool) -> dict[str, object]:
    import torch.distributed as dist

    engine = _engine(budget, shapes, dist.group.WORLD, balance)
    assert (engine._balance is not None) == balance
    mine = sorted({o.block.param_index for o in engine.owned})
    owners: list[object] = [None] * 2
    dist.all_gather_object(owners, mine)
    refs = _references(shapes)
    counts = _run(engine, refs, budget, owners, 6)
    return {
        "counts": counts,
        "params": [p.clone() for p in engine.params],
        "ref": [r.w.clone() for r in refs],
    }


@pytest.mark.distributed
@pytest.mark.parametrize(
    "shapes,balance",
    [(SHAPES, False), ([(16, 16)] * 4, True)],
    ids=["mixed-shapes", "balanced-equal-shapes"],
)
def test_two_ranks_cap_their_own_blocks_as_the_grouped_reference(shapes, balance):
    """DP=2: each rank's refreshes capped over its own blocks, weights as the reference's.

    With a budget the refresh schedule depends on the owner layout (each rank caps its own
    work), so the comparison is with references grouped by owner rank, not with DP=1.
    Balanced, a rank over the ranks' mean capped demand defers to it; with equal shapes
    every rank's capped demand is the mean, so the grouped reference holds there too.
    """
    res = run_distributed(_dp_worker, 2, 0.5, shapes, balance)
    for r in res:
        for a, b in zip(r["params"], res[0]["params"]):
            assert torch.equal(a, b)  # every rank holds the same model
        for p, ref in zip(r["params"], r["ref"]):
            torch.testing.assert_close(p, ref, rtol=1e-9, atol=1e-11)
    per_rank = [sum(d for d, _ in r["counts"][1:]) for r in res]
    reference_total = sum(ref for _, ref in res[0]["counts"][1:])
    assert sum(per_rank) == reference_total
    assert all(n > 0 for n in per_rank)


def test_mlfopsoap_steps_as_the_budgeted_reference():
    """The torch.optim front end (MLFOPSOAP, batched engine) with a budget: the same weights."""
    params = [torch.nn.Parameter(p) for p in _params(SHAPES)]
    opt = MLFOPSOAP(params, lr=LR, weight_decay=0.0, refresh_budget=0.5, refresh_tolerance=TOL)
    refs = _references()
    for step in range(6):
        grads = _grads(step, SHAPES)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        budgeted_step(refs, grads, 0.5, side_cost)
    assert opt.counters.refreshes_done == sum(r.refreshed for r in refs)
    assert opt.counters.refreshes_skipped > 0  # the cap deferred sides
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach(), r.w, rtol=1e-9, atol=1e-11)


def test_mlfopsoap_refuses_a_group_budget_on_the_per_block_engine():
    params = [torch.nn.Parameter(p) for p in _params(SHAPES)]
    with pytest.raises(ValueError, match="refresh_budget.*batched=True"):
        MLFOPSOAP([{"params": params, "refresh_budget": 0.5}], batched=False)
