"""Balanced drift-gated refreshes (core/refresh_budget.py, SOAPConfig.refresh_balance).

The selection rule on its own; the engine taking exactly the selected sides (single process,
the balancing hook returning a chosen target); and two real gloo ranks whose drift is uneven:
with balancing no rank refreshes more than the agreed target (or its one most drifted side)
on any step, without it the drifting rank refreshes everything that drifted.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core.refresh_budget import (
    FILL_FRACTION,
    balanced_refreshes,
    demand,
    mean_demand_target,
    side_cost,
)
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
from mlfop_megatron.runtime.spawn import run_distributed

TOL = 0.03


def test_all_drifted_sides_fit_the_target_and_nothing_else_is_taken():
    shares = [0.5, 0.01, 0.2, 0.0]
    costs = [1.0, 1.0, 1.0, 1.0]
    tols = [TOL] * 4
    assert demand(shares, tols, costs) == (2.0, 1.0)
    assert balanced_refreshes(shares, tols, costs, target=2.0) == [True, False, True, False]


def test_over_the_target_the_least_drifted_sides_wait():
    shares = [0.1, 0.9, 0.5, 0.3]
    costs = [1.0, 1.0, 1.0, 1.0]
    take = balanced_refreshes(shares, [TOL] * 4, costs, target=2.0)
    assert take == [False, True, True, False]
    # the most drifted side is refreshed whatever the target: a rank always makes progress
    assert balanced_refreshes(shares, [TOL] * 4, [5.0] * 4, target=1.0) == [
        False,
        True,
        False,
        False,
    ]


def test_a_non_finite_factor_is_never_deferred():
    shares = [math.nan, 0.9, math.nan]
    take = balanced_refreshes(shares, [TOL] * 3, [1.0] * 3, target=0.0)
    assert take == [True, False, True]  # 0.9 waits: the two faults already spent the target


def test_spare_time_goes_to_nearly_drifted_sides_by_share():
    near = FILL_FRACTION * TOL
    shares = [0.02, near * 1.01, 0.025, near * 0.5]
    costs = [1.0, 1.0, 1.0, 1.0]
    assert balanced_refreshes(shares, [TOL] * 4, costs, target=2.0) == [True, False, True, False]
    assert balanced_refreshes(shares, [TOL] * 4, costs, target=9.0) == [True, True, True, False]


def test_target_is_the_mean_demand_or_the_costliest_side():
    assert mean_demand_target([4.0, 0.0], [1.0, 0.0]) == 2.0
    assert mean_demand_target([4.0, 0.0], [3.0, 0.0]) == 3.0
    assert side_cost(512, 128) > 40 * side_cost(128, 128)  # n^3 dominates


def _grads(gen: torch.Generator, count: int, drifting: set[int], step: int) -> list[torch.Tensor]:
    """Rank-3 gradients: ``drifting`` params get new directions each step, the others repeat."""
    out = []
    for i in range(count):
        seed = 1000 * i + (step if i in drifting else 0)
        g = torch.Generator().manual_seed(seed)
        out.append(torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g))
    del gen
    return out


def _engine(count: int, group: object = None, **soap: object) -> ShardedSOAP:
    cfg = MLFOPConfig.from_kwargs(accumulation_steps=1, enabled=False, **soap)
    torch.manual_seed(0)
    params = [torch.randn(16, 16, dtype=torch.float64) for _ in range(count)]
    return ShardedSOAP(params, [f"w{i}" for i in range(count)], cfg, group=group)


def _train(engine: ShardedSOAP, steps: int, drifting: set[int]) -> list[int]:
    """Refreshes done per step."""
    done = []
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        before = engine.counters.refreshes_done
        engine.fold_reduced_level(0, _grads(gen, len(engine.params), drifting, step))
        engine.step(lr=0.01, weight_decay=0.0)
        done.append(engine.counters.refreshes_done - before)
    return done


def test_engine_takes_what_the_target_allows():
    """Target = own demand: bitwise the unbalanced gate; target 0: one side per step."""
    drifting = {0, 1, 2, 3}
    plain = _engine(4)
    assert plain._balance is None  # one rank: nothing to balance
    plain_done = _train(plain, 6, drifting)
    assert max(plain_done) > 1  # several sides drift on some step

    calls: list[tuple[float, float]] = []

    def own_demand(d: float, largest: float) -> float:
        calls.append((d, largest))
        return d

    same = _engine(4)
    same._balance = own_demand
    assert _train(same, 6, drifting) == plain_done
    assert len(calls) == 5  # once per step after the statistics-only first one
    for a, b in zip(plain.params, same.params):
        assert torch.equal(a, b)

    tight = _engine(4)
    tight._balance = lambda d, largest: 0.0
    tight_done = _train(tight, 6, drifting)
    assert tight_done[0] == 0 and all(n == 1 for n, p in zip(tight_done[1:], plain_done[1:]) if p)


def _uneven_worker(balanced: bool) -> dict[str, object]:
    import torch.distributed as dist

    engine = _engine(8, dist.group.WORLD, refresh_balance=balanced)
    mine = {o.block.param_index for o in engine.owned}
    assert engine.world_size == 2 and mine
    assert (engine._balance is not None) == balanced
    # rank 0's blocks drift every step, rank 1's gradients repeat (their bases settle)
    owners = [None] * 2
    dist.all_gather_object(owners, sorted(mine))
    drifting = set(owners[0])
    targets: list[float] = []
    if balanced:
        inner = engine._balance
        assert inner is not None

        def record(d: float, largest: float) -> float:
            targets.append(inner(d, largest))
            return targets[-1]

        engine._balance = record
    done = _train(engine, 8, drifting)
    params = torch.cat([p.reshape(-1) for p in engine.params])
    gathered = [torch.empty_like(params) for _ in range(2)]
    dist.all_gather(gathered, params)
    return {
        "done": done,
        "targets": targets,
        "same_model": torch.equal(gathered[0], gathered[1]),
        "cost": side_cost(16, 16),
    }


@pytest.mark.distributed
def test_uneven_drift_is_spread_over_two_ranks():
    """Rank 0's 8 sides drift every step, rank 1's none: 8 against 0 refreshes per step.

    Balanced, the target is the mean (4 sides' cost) and rank 0 refreshes its 4 most drifted
    sides; the ranks agree on every target and hold the same model after every step.
    """
    unbalanced = run_distributed(_uneven_worker, 2, False)
    balanced = run_distributed(_uneven_worker, 2, True)
    for res in (unbalanced, balanced):
        assert all(r["same_model"] for r in res)
    assert unbalanced[0]["done"][1:] == [8] * 7 and unbalanced[1]["done"] == [0] * 8
    heavy, light = balanced[0]["done"], balanced[1]["done"]
    targets, cost = balanced[0]["targets"], balanced[0]["cost"]
    assert targets == balanced[1]["targets"] and len(targets) == 7
    for step, target in enumerate(targets, start=1):
        assert target == pytest.approx(4 * cost)
        assert heavy[step] == 4 and light[step] == 0, (step, heavy, light)
