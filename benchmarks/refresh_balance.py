"""Refresh work on the busiest owner rank, with and without the gate's balancing (CPU, gloo).

The digits model's SOAP matrices (4 layers, hidden 128: qkv, proj, fc1, fc2), owner-sharded
over DP = 2, 4 and 8 gloo ranks (``ShardedSOAP``, the package's SOAP defaults but for
``refresh_balance``), slowly drifting gradients (the AR(1) walk of
``benchmarks/soap_step_digits.py``), 10 warm-up steps then 30 measured ones. What the step
pays for the refresh is the work of its busiest rank (the parameter all-gather waits for it),
so per step and rank the work of the sides refreshed is summed (``refresh_budget.side_cost``
of every basis that changed in the step, found by comparing the bases before and after) and
the table gives, over the measured steps, the busiest rank's and the mean rank's work, in
units of one 512-sided refresh. This counts work, not time, so it does not depend on the
machine's load (8 ranks share 2 cores here).

    python -m benchmarks.refresh_balance [--write]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import RESULTS, log, machine_facts, replace_section
from benchmarks.soap_step_digits import LAYER_SHAPES, drift

SECTION = "## Drift-gate balancing: refresh work on the busiest rank (CPU, gloo, work counted)"
SHAPES = LAYER_SHAPES * 4
WARMUP, STEPS = 10, 30


def _bases(engine: Any) -> list[tuple[int, str, torch.Tensor]]:
    out = []
    for i, owned in enumerate(engine.owned):
        for key in ("QL", "QR"):
            if key in owned.state:
                out.append((i, key, owned.state[key].clone()))
    return out


def _worker(balanced: bool) -> dict[str, Any]:
    import torch.distributed as dist

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.core.refresh_budget import side_cost
    from mlfop_megatron.distributed.sharded_soap import ShardedSOAP

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) * 0.02 for s in SHAPES]
    walk = [torch.randn(s, generator=gen) for s in SHAPES]
    cfg = MLFOPConfig.from_kwargs(accumulation_steps=1, enabled=False, refresh_balance=balanced)
    engine = ShardedSOAP(params, [f"w{i}" for i in range(len(params))], cfg, group=dist.group.WORLD)
    work = []
    for step in range(WARMUP + STEPS):
        drift(walk, gen)
        before = _bases(engine)
        engine.fold_reduced_level(0, [w.clone() for w in walk])
        engine.step(lr=3e-3, weight_decay=0.0)
        spent = 0.0
        for i, key, old in before:
            if not torch.equal(old, engine.owned[i].state[key]):
                rows, cols = engine.owned[i].block.rows, engine.owned[i].block.cols
                n, k = (rows, cols) if key == "QL" else (cols, rows)
                spent += side_cost(n, k)
        if step >= WARMUP:
            work.append(spent)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, work)
    return {"work": every, "refreshes": engine.counters.refreshes_done}


def measure(world: int, balanced: bool) -> dict[str, float]:
    """Busiest and mean rank's refresh work per step (512-sided units), refreshes done."""
    from mlfop_megatron.core.refresh_budget import side_cost
    from mlfop_megatron.runtime.spawn import run_distributed

    res = run_distributed(_worker, world, balanced)
    per_rank = res[0]["work"]
    unit = side_cost(512, 128)
    steps = [[per_rank[r][s] / unit for r in range(world)] for s in range(STEPS)]
    busiest = statistics.fmean(max(works) for works in steps)
    mean = statistics.fmean(statistics.fmean(works) for works in steps)
    return {
        "busiest": busiest,
        "mean": mean,
        "excess": busiest / mean - 1.0 if mean > 0 else 0.0,
        "refreshes": float(sum(r["refreshes"] for r in res)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Measure DP 2, 4, 8 with and without balancing; print (and with --write, record)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    lines = [
        "| DP | balancing | busiest rank's work per step (512-sided refreshes) | mean rank's "
        "work per step | busiest over mean (what the step waits for) | refreshes (all ranks, "
        "40 steps) |",
        "|---|---|---|---|---|---|",
    ]
    for world in (int(w) for w in args.worlds.split(",")):
        for balanced in (False, True):
            m = measure(world, balanced)
            log(f"DP {world} balanced={balanced}: {m}")
            lines.append(
                f"| {world} | {'on' if balanced else 'off'} | {m['busiest']:.3f} | "
                f"{m['mean']:.3f} | +{100 * m['excess']:.1f}% | {m['refreshes']:.0f} |"
            )
    print("\n".join(lines))
    if args.write:
        note = (
            "`python -m benchmarks.refresh_balance --write` on "
            + machine_facts("gloo ranks, one thread each")
            + ". See the script's docstring for the method."
        )
        replace_section(RESULTS, SECTION, f"{SECTION}\n\n{note}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
