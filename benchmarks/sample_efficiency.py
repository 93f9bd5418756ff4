"""When does the folding help? ML-FOP-SOAP vs SOAP vs AdamW vs PCGrad, in three parts (CPU).

(a) ``lookahead`` (benchmarks/fold_lookahead.py): paired one-step lookahead on saved checkpoints
    of the digits demo: from the same state on the same samples, the plain mean vs each fold
    variant; per-modality loss change on a fixed probe set; paired sign test.
(b) ``training`` (benchmarks/fold_training.py): training runs of the digits demo, both
    micro-batch layouts, base and 8x batch, AdamW / SOAP / PCGrad + AdamW / ML-FOP-SOAP
    variants / Megatron's own SOAP and Muon (skipped, with the reason, where they cannot run),
    every row's lr chosen on the same grid per cell, several seeds.
(c) ``synthetic`` (benchmarks/fold_synthetic.py): two regression tasks whose gradients meet at
    a controlled angle, the same optimizers.

Run from the repository root (the demo and the benchmark are imported as packages)::

    python -m benchmarks.sample_efficiency                      # all three parts
    python -m benchmarks.sample_efficiency --parts lookahead,synthetic
    python -m benchmarks.sample_efficiency --smoke              # < 2 min, no RESULTS.md
    python -m benchmarks.sample_efficiency --report-only        # tables from <out>/results.json

Results: ``<out>/results.json`` and, unless --smoke / --no-write, the section below in
benchmarks/RESULTS.md (the parts run in this invocation replace theirs; others are kept). With
--resume, part (b) adds its rows to the saved part (b) of the same plan: a run of some rows
(``--training-rows megatron-soap,megatron-muon --resume``) keeps the saved runs of the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import fold_lookahead, fold_synthetic, fold_training
from benchmarks.common import RESULTS, elapsed, log, machine_facts, package_version, replace_section
from examples.digits import rundir

SECTION = "## Sample efficiency: when does the folding help (digits image+text and synthetic, CPU)"
PARTS = ("lookahead", "training", "synthetic")


def machine_line(nproc: int) -> str:
    """CPU, core count, gloo ranks, torch / megatron-core / Python versions, load average now."""
    return machine_facts(f"{nproc} gloo ranks", f"megatron-core {package_version('megatron-core')}")


def plans(args: argparse.Namespace) -> dict[str, Any]:
    """The plan of every part: full, smoke, or with the command-line reductions."""
    if args.smoke:
        return {
            "lookahead": fold_lookahead.SMOKE_LOOKAHEAD,
            "training": fold_training.SMOKE_TRAINING,
            "synthetic": fold_synthetic.SMOKE_SYNTHETIC,
        }
    training = fold_training.TrainingPlan()
    if args.training_seeds is not None:
        training = replace(training, seeds=tuple(range(args.training_seeds)))
    if args.training_steps is not None:
        training = replace(training, steps=args.training_steps)
    if args.training_grid is not None:
        training = replace(training, lr_grid=tuple(float(x) for x in args.training_grid.split(",")))
    if args.training_layouts is not None:
        training = replace(training, layouts=tuple(args.training_layouts.split(",")))
    if args.training_rows is not None:
        rows = tuple(args.training_rows.split(","))
        known = fold_training.KNOWN_ROWS
        if set(rows) - set(known):
            raise SystemExit(
                f"--training-rows: unknown {sorted(set(rows) - set(known))}; known {list(known)}"
            )
        training = replace(training, rows=rows)
    return {
        "lookahead": fold_lookahead.LookaheadPlan(),
        "training": training,
        "synthetic": fold_synthetic.SyntheticPlan(curvature=args.synthetic_curvature),
    }


def run_parts(args: argparse.Namespace, parts: Sequence[str]) -> dict[str, Any]:
    """Run the requested parts; returns {part: result}."""
    out, chosen, results = Path(args.out), plans(args), {}
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    for part in parts:
        t0 = time.perf_counter()
        log(f"part {part}: {chosen[part]}")
        if part == "lookahead":
            results[part] = fold_lookahead.run_lookahead(
                chosen[part], out / "lookahead", args.nproc, threads, 3600.0, log
            )
        elif part == "training":
            results[part] = fold_training.run_training(
                chosen[part], out / "training", args.nproc, args.resume, log
            )
        else:
            results[part] = fold_synthetic.run_synthetic(chosen[part], log)
        results[part]["part_wall_s"] = time.perf_counter() - t0
        log(f"part {part} done in {results[part]['part_wall_s']:.0f} s")
    return results


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The RESULTS.md section (also printed)."""
    lines = [SECTION, "", f"Last command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min).", ""]
    lines += [f"Machine: {meta['machine']}", ""]
    for part in PARTS:
        if part in results:
            lines += PART_REPORTS[part](results[part])
            command = results[part].get("command", meta["command"])
            lines += [f"Command of this part: `{command}`", ""]
    return "\n".join(lines) + "\n"


def lookahead_report(res: dict[str, Any]) -> list[str]:
    """Markdown of part (a)."""
    plan = res["plan"]
    return [
        "### (a) Paired one-step lookahead on saved checkpoints",
        "",
        f"A plain-SOAP run of the demo model ({plan['layers']} layers, hidden {plan['hidden']}, "
        f"2 gloo ranks, micro-batch {plan['micro_batch']}, lr {plan['lr']:g}, "
        f"{plan['steps']} base steps of global batch {plan['global_batch']}; the large batch "
        f"{plan['large_factor']}x the micro-steps for 1/{plan['large_factor']} of the steps) "
        f"saves checkpoints at fractions {list(plan['checkpoints'])} of its steps. From each, "
        f"for the samples of each of the next {plan['probe_batches']} steps, every rule takes "
        "one step from the same state on the same samples at the schedule's lr; the probe is "
        "the held-out split (every image under both tasks). 'variant better / worse' counts "
        "pairs where the variant's probe-loss change is below / above the plain mean's; p is "
        f"the exact two-sided sign test. Took {res['part_wall_s'] / 60:.1f} min.",
        "",
        *fold_lookahead.lookahead_table(res),
        "",
    ]


def training_report(res: dict[str, Any]) -> list[str]:
    """Markdown of part (b)."""
    plan = res["plan"]
    analysis = fold_training.analyse_training(res)
    lines = [
        "### (b) Training runs",
        "",
        f"Demo model ({plan['layers']} layers, hidden {plan['hidden']}), 2 gloo ranks, "
        f"micro-batch {plan['micro_batch']}; base: global batch {plan['global_batch']} for "
        f"{plan['steps']} steps, large: {plan['large_factor']}x the batch for "
        f"1/{plan['large_factor']} of the steps (the same samples). Seeds {list(plan['seeds'])}; "
        f"every row's peak lr from the grid {list(plan['lr_grid'])} on seed {plan['seeds'][0]} "
        "per cell (lowest final balanced train loss). Warmup 10% + cosine to 0.1x, weight "
        "decay 0.01, clip 1.0 for all. Train losses: per-step losses of the step's global batch "
        "before the update, 'final' = mean of the last 10% of steps; val = held-out split. "
        f"Took {res['part_wall_s'] / 60:.1f} min.",
        "",
        "Chosen lr per cell: "
        + "; ".join(
            f"{cell}: " + ", ".join(f"{k} {v:g}" for k, v in lrs.items())
            for cell, lrs in res["chosen_lr"].items()
        ),
    ]
    lines += fold_training.training_section(res, analysis)
    lines += ["", "Headline checks (computed):", ""]
    for label in plan["rows"]:
        if label.startswith("fop-"):
            lines += fold_training.verdicts(analysis, label)
    return lines + [""]


def synthetic_report(res: dict[str, Any]) -> list[str]:
    """Markdown of part (c)."""
    plan = res["plan"]
    cos = ", ".join(f"{a}°: {c:+.3f}" for a, c in res["init_cosines"].items())
    return [
        "### (c) Synthetic two-task regression with a controlled conflict angle",
        "",
        f"W {plan['dim']}x{plan['dim']}, input covariance condition {plan['condition']:g}, "
        f"label noise {plan['noise']:g}, target scale {plan['scale']:g}; base: global batch "
        f"{plan['global_batch']} in {plan['micro_steps']} micro-steps for {plan['steps']} steps, "
        f"large: {plan['large_factor']}x the micro-steps for 1/{plan['large_factor']} of the "
        f"steps. lr grid {list(plan['lr_grid'])} per (angle, layout, batch, optimizer) on seed "
        f"{plan['seeds'][0]}, then seeds {list(plan['seeds'])}. Measured cosine of the two "
        f"tasks' expected gradients at W = 0: {cos}. 'final excess' = L(W) - L(W*) (exact), "
        f"mean of the last 10% of steps; task losses exact. {res['runs']} runs, "
        f"{res['part_wall_s'] / 60:.1f} min.",
        "",
        *fold_synthetic.synthetic_table(res, plan["optimizers"]),
        "",
    ]


PART_REPORTS = {
    "lookahead": lookahead_report,
    "training": training_report,
    "synthetic": synthetic_report,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sample_efficiency", help="folder of all runs")
    ap.add_argument("--nproc", type=int, default=2, help="gloo ranks per digits run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--smoke", action="store_true", help="tiny check (< 2 min), no RESULTS.md")
    ap.add_argument("--training-seeds", type=int, default=None, help="(b) seeds (3)")
    ap.add_argument("--training-steps", type=int, default=None, help="(b) base steps (64)")
    ap.add_argument("--training-grid", default=None, help="(b) lr grid, comma list")
    ap.add_argument("--training-layouts", default=None, help="(b) layouts, comma list (both)")
    ap.add_argument(
        "--training-rows",
        default=None,
        help="(b) rows, comma list of adamw, soap, pcgrad, fold-variant labels "
        "(benchmarks/conflict.py FOLD_VARIANTS) and Megatron's peers (megatron-soap, "
        "megatron-muon)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="(b) reuse runs with a result.json, and keep the saved part (b) rows this run "
        "does not run (same plan otherwise)",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="no runs: tables from <out>/results.json"
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="RESULTS.md to update")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument(
        "--synthetic-curvature",
        choices=fold_synthetic.CURVATURES,
        default="rotated",
        help="part (c): rotated curvature x = Q S^(1/2) z (default) or the axis-aligned control",
    )
    ap.add_argument("--verbose", action="store_true", help="keep library warnings")
    args = ap.parse_args(argv)
    bad = set(args.parts.split(",")) - set(PARTS)
    if bad:
        ap.error(f"--parts: unknown {sorted(bad)}; choose from {PARTS}")
    return args


def keep_training_rows(previous: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """``fresh`` with part (b) merged into the saved part (b) of the same plan (other rows kept)."""
    old, new = previous.get("training"), fresh.get("training")
    if old is None or new is None:
        return fresh
    if not fold_training.same_plan_but_rows(old, new):
        log("part training: the saved results have another plan; replaced, not merged")
        return fresh
    merged = fold_training.merge_rows(old, new)
    log(f"part training: rows {merged['plan']['rows']} (saved rows kept, this run's added)")
    return {**fresh, "training": merged}


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or reload) the parts, print the report, update RESULTS.md."""
    from examples.digits.cli import quiet_warnings

    args = parse_args(argv)
    if not args.verbose:
        quiet_warnings()
    out = Path(args.out)
    saved = out / "results.json"
    previous = json.loads(saved.read_text()) if saved.exists() else {"results": {}, "meta": {}}
    if args.report_only:
        results, meta = previous["results"], previous["meta"]
    else:
        parts = [p for p in PARTS if p in args.parts.split(",")]
        log(f"machine: {machine_line(args.nproc)}")
        fresh = run_parts(args, parts)
        command = "python -m benchmarks.sample_efficiency " + " ".join(
            sys.argv[1:] if argv is None else list(argv)
        )
        for part in fresh.values():
            part["command"] = command.strip()
        if args.resume and not args.smoke:
            fresh = keep_training_rows(previous["results"], fresh)
        results = {**(previous["results"] if not args.smoke else {}), **fresh}
        meta = {
            "command": command.strip(),
            "wall_s": elapsed(),
            "machine": machine_line(args.nproc),
            "parts": parts,
        }
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"results": results, "meta": meta}, default=rundir.clean))
    body = report(results, meta)
    print("\n" + body)
    if not (args.smoke or args.no_write):
        replace_section(args.results, SECTION, body)
        log(f"wrote section '{SECTION}' to {args.results}")
    log(f"done in {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
