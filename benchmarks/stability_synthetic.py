"""The paper's large-batch stability claim on the synthetic problem of part (c).

For each optimizer, at the large batch of ``benchmarks/fold_synthetic.py`` (rotated curvature,
both layouts, the conflict angles), a geometric lr grid on three seeds: the largest lr at
which no seed diverges, and the final excess there. A run diverges when its excess is not
finite or does not end below where it started (W = 0). Every optimizer at its own defaults,
the same grid, samples and schedule.

    python -m benchmarks.stability_synthetic              # --write: the table into RESULTS.md
    python -m benchmarks.stability_synthetic --quick      # two lrs, one angle
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from benchmarks.common import RESULTS, log, machine_facts, replace_section
from benchmarks.fold_synthetic import SyntheticPlan, SynthRun, make_problem, muon_available, train

SECTION = "## Large-batch stability: the largest lr that trains (synthetic, CPU)"
GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
OPTIMIZERS = ("adamw", "soap-default", "mlfop-default", "soap") + (
    ("muon",) if muon_available() else ()
)
SEEDS = (0, 1, 2)


def diverged(excess: Sequence[float], start: float) -> bool:
    """Non-finite excess, or a final excess (mean of the last 10% of steps) not below the start."""
    tail = list(excess[-max(1, len(excess) // 10) :])
    if not all(math.isfinite(x) for x in excess):
        return True
    return sum(tail) / len(tail) >= start


def run(plan: SyntheticPlan, grid: Sequence[float], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every (angle, layout, optimizer, lr): diverged on any seed, and the mean final excess."""
    rows = []
    t0 = time.perf_counter()
    for angle in plan.angles:
        problem = make_problem(plan, angle)
        start = _start(problem, plan)
        for layout in plan.layouts:
            for name in OPTIMIZERS:
                for lr in grid:
                    finals, bad = [], False
                    for seed in seeds:
                        res = train(plan, SynthRun(name, angle, layout, "large", lr, seed), problem)
                        bad = bad or diverged(res["excess"], start)
                        tail = res["excess"][-max(1, len(res["excess"]) // 10) :]
                        finals.append(sum(tail) / len(tail))
                    rows.append(
                        dict(
                            angle=angle,
                            layout=layout,
                            optimizer=name,
                            lr=lr,
                            diverged=bad,
                            final=sum(finals) / len(finals),
                        )
                    )
            log(f"angle {angle:g} {layout}: {time.perf_counter() - t0:.0f} s")
    return rows


def _start(problem: Any, plan: SyntheticPlan) -> float:
    """The excess at W = 0, where every run starts."""
    import torch

    return problem.excess(torch.zeros(plan.dim, plan.dim, dtype=torch.float64))


def table(rows: list[dict[str, Any]], grid: Sequence[float]) -> list[str]:
    """Per (angle, layout): each optimizer's excess at every lr, its largest stable lr."""
    head = " | ".join(f"lr {lr:g}" for lr in grid)
    out = [
        f"| angle | layout | optimizer | {head} | largest lr that trains | its final excess |",
        "|---|---|---|" + "---|" * (len(grid) + 2),
    ]
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["angle"], r["layout"], r["optimizer"]), []).append(r)
    for (angle, layout, name), rs in cells.items():
        by_lr = {r["lr"]: r for r in rs}
        shown, stable = [], None
        for lr in grid:
            r = by_lr.get(lr)
            if r is None:
                shown.append("")
                continue
            shown.append("diverged" if r["diverged"] else f"{r['final']:.3g}")
            if not r["diverged"]:
                stable = r
        best = "none" if stable is None else f"{stable['lr']:g}"
        loss = "" if stable is None else f"{stable['final']:.3g}"
        out.append(f"| {angle:g} | {layout} | {name} | {' | '.join(shown)} | {best} | {loss} |")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Run the grid; print (and with --write record) the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two lrs, one angle, one seed")
    ap.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    args = ap.parse_args(argv)
    plan = SyntheticPlan()
    grid, seeds = GRID, SEEDS
    if args.quick:
        plan = replace(plan, angles=(150.0,), layouts=("by-modality",))
        grid, seeds = (1e-2, 1e-1), (0,)
    rows = run(plan, grid, seeds)
    lines = table(rows, grid)
    print("\n".join(lines))
    if args.write:
        note = (
            f"`python -m benchmarks.stability_synthetic` on {machine_facts('one process')}. "
            f"Part (c)'s problem (dim {plan.dim}, rotated curvature, condition "
            f"{plan.condition:g}), its large batch ({plan.large_factor}x: global batch "
            f"{plan.global_batch * plan.large_factor}, {plan.micro_steps * plan.large_factor} "
            f"micro-steps, {plan.steps // plan.large_factor} steps), seeds {list(seeds)}. A cell "
            "is the mean final excess (last 10% of steps) over the seeds at that lr, or "
            "'diverged' when any seed's excess was not finite or did not end below its start "
            "(W = 0). soap-default / mlfop-default: the package's defaults (folding off / on); "
            "soap: the 2024 reference's SOAP that part (c) uses; muon: emerging-optimizers' "
            "Muon (Megatron's --optimizer muon per matrix), its defaults; adamw: betas "
            "0.9/0.95."
        )
        replace_section(RESULTS, SECTION, "\n".join([SECTION, "", note, "", *lines]) + "\n")


if __name__ == "__main__":
    main()
