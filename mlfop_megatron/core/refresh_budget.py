"""Which drifted bases a rank refreshes this step when the ranks balance their refresh work.

With the drift gate (``SOAPConfig.refresh_tolerance``) each owner rank refreshes the sides of
its own blocks that drifted, so the ranks' refresh work differs from step to step, and the
parameter all-gather after the step waits for the rank with the most. With ``world`` ranks
the expected wait grows with ``world`` (the maximum of ``world`` draws), so at data-parallel
sizes in the hundreds every step would pay for its unluckiest rank.

Balanced (``SOAPConfig.refresh_balance``), the ranks exchange two numbers per checked step:
the cost of the sides each one would refresh (its demand) and of its costliest such side.
The step's target is the larger of the mean demand and the costliest side anywhere (no rank
can finish sooner than that side). Each rank then refreshes its drifted sides by descending
drift while they fit in the target (its most drifted one always): a rank over the mean defers
its least-drifted sides to the next check, where their drift ranks them again. A rank under
the target spends the time it would wait on its most-drifted aligned sides, so the work the
heavy ranks defer is done ahead elsewhere. The gate, the refresh itself and what a refresh
computes are unchanged; only when each side's refresh happens differs.

Capped (``SOAPConfig.refresh_budget`` below 1), a rank refreshes at most that fraction of the
cost of refreshing all its gated sides at once: its drifted sides by descending drift while
they fit (its most drifted one always), the rest deferred to the next check. Balanced too,
each rank's demand is capped before the exchange and the target after it.

Pure host arithmetic on lists (the caller reads the drift shares in its one host read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

# (this rank's demand, its costliest drifted side) -> the step's target cost, the same on
# every rank of the group (a collective: every rank calls it at the same point).
BalanceFn = Callable[[float, float], float]
# An aligned side fills a rank's spare time only when its share is above this fraction of its
# tolerance: close to drifting, so the refresh is work the rank would soon owe anyway.
FILL_FRACTION = 0.25


def side_cost(n: int, k: int) -> float:
    """Relative cost of refreshing one n-sided basis of an n x k block (flop proxy).

    The power step F Q (n^3), the QR (about 4/3 n^3 for geqrf and as much for forming Q)
    and the moment's re-expression in the new basis (the cheaper of n^3 + n^2 k and 2 n^2 k).
    """
    return n**3 * (1.0 + 8.0 / 3.0) + min(n**3 + n * n * k, 2.0 * n * n * k)


def is_drifted(share: float, tolerance: float) -> bool:
    """A side is refreshed by the gate when its share exceeds ``tolerance`` (NaN: a fault)."""
    return not share <= tolerance


def demand(
    shares: Sequence[float], tolerances: Sequence[float], costs: Sequence[float]
) -> tuple[float, float]:
    """(total cost, costliest single cost) of the sides the gate alone would refresh."""
    drifted = [c for s, t, c in zip(shares, tolerances, costs) if is_drifted(s, t)]
    return float(sum(drifted)), float(max(drifted, default=0.0))


def balanced_refreshes(
    shares: Sequence[float],
    tolerances: Sequence[float],
    costs: Sequence[float],
    target: float,
    fill: bool = True,
) -> list[bool]:
    """Which sides to refresh now: drifted ones by drift up to ``target``, then aligned ones.

    ``shares``: each side's off-diagonal share of Q^T F Q (NaN for a non-finite factor);
    ``tolerances``: its gate's tolerance; ``costs``: its :func:`side_cost`. Non-finite shares
    come first and are always taken (their refresh counts the fault and keeps the basis). The
    most drifted side is always taken, so a rank makes progress whatever the target; further
    drifted sides while the total stays within ``target``; then aligned sides by descending
    share (only those with a positive share: an exactly aligned basis has nothing to gain)
    while the total stays within ``target`` (with ``fill``; without it, drifted ones only).
    """
    n = len(shares)
    if not (len(tolerances) == len(costs) == n):
        raise ValueError("balanced_refreshes needs one tolerance and one cost per share")

    def key(i: int) -> float:
        return math.inf if math.isnan(shares[i]) else shares[i]

    by_drift = sorted(range(n), key=key, reverse=True)  # stable: ties keep block order
    take = [False] * n
    spent = 0.0
    target = target * (1.0 + 1e-9)  # sums of equal costs may round past the same total
    drifted = [i for i in by_drift if is_drifted(shares[i], tolerances[i])]
    for i in drifted:
        if math.isnan(shares[i]) or spent == 0.0 or spent + costs[i] <= target:
            take[i] = True
            spent += costs[i]
    for i in by_drift if fill else ():
        if take[i] or is_drifted(shares[i], tolerances[i]):
            continue
        if not shares[i] > FILL_FRACTION * tolerances[i]:
            continue
        if spent + costs[i] <= target:
            take[i] = True
            spent += costs[i]
    return take


def mean_demand_target(demands: Sequence[float], largest: Sequence[float]) -> float:
    """The step's target from every rank's (demand, costliest side): see the module docstring."""
    if not demands:
        return 0.0
    return max(sum(demands) / len(demands), max(largest, default=0.0))


def budget_cap(costs: Sequence[float], budgets: Sequence[float]) -> float:
    """The most refresh cost a step may spend: each side's cost times its config's budget."""
    return float(sum(c * b for c, b in zip(costs, budgets)))
