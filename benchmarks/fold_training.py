"""Part (b) of the folding benchmark: training runs on the digits demo, both layouts, two batches.

Every row (AdamW, SOAP, PCGrad + AdamW, ML-FOP-SOAP variants, Megatron's own SOAP and Muon) in
every cell (micro-batch layout x base / large batch) gets its peak lr from the same grid, chosen
on the first seed by the lowest final train loss (balanced: mean of the image and text
token-mean losses), then runs the other seeds at that lr. The large batch is ``large_factor`` x
more accumulation micro-steps and ``large_factor`` x fewer steps: the same samples. Runs of one
phase share one spawned gloo world (no per-run start-up); each keeps its folder and result.json
under ``--out``.

Megatron's peers (``PEERS``: the entries of examples/digits/optimizers.py ``TABLE`` that are not
ours) are built by that table; a peer that cannot run in this Python (``entry(name).missing()``,
e.g. no emerging-optimizers) is dropped from the run, its reason logged, recorded under
``"skipped"`` and printed in the report.

Sample-efficiency ratio per seed: steps for AdamW to reach its own final train loss (trailing
mean over the last 10% of steps) / steps for the row to reach it (> 1: fewer samples). Where
peers ran, the same ratios against the best peer of each cell (lower final balanced loss).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.conflict import FOLD_VARIANTS, variant_run_spec
from examples.digits import rundir
from examples.digits.optimizers import TABLE
from examples.digits.spec import RunSpec, fold_levels, metric_columns
from mlfop_megatron.config import REFERENCE_SOAP

KEYS = ("image_loss", "text_loss", "loss")  # per modality, then overall (token mean)
KEY_NAMES = {"image_loss": "image", "text_loss": "text", "loss": "overall"}
NAMES = {
    "adamw": "AdamW",
    "soap": "SOAP (folding off)",
    "pcgrad": "PCGrad + AdamW",
    "megatron-soap": "Megatron SOAP",
    "megatron-muon": "Megatron Muon",
}
# Megatron's own optimizers: the table's entries that are not ours; a row each.
PEERS = tuple(name for name, e in TABLE.items() if not e.ours)
# Every row part (b) knows: --training-rows is checked against these.
KNOWN_ROWS = ("adamw", "soap", "pcgrad", *(v.label for v in FOLD_VARIANTS), *PEERS)


@dataclass(frozen=True)
class TrainingPlan:
    """Sizes of part (b)."""

    # 64 base steps and a 2-point grid: the size that ran in 46.6 min on 2 loaded cores
    # (benchmarks/RESULTS.md); the first plan (128 steps, grid 2.5e-3..1e-2) took ~2.5x longer.
    steps: int = 64
    global_batch: int = 32
    micro_batch: int = 2
    large_factor: int = 8
    layers: int = 2
    hidden: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    lr_grid: tuple[float, ...] = (5e-3, 1e-2)
    layouts: tuple[str, ...] = ("by-modality", "mixed")
    batches: tuple[str, ...] = ("base", "large")
    rows: tuple[str, ...] = (
        "adamw",
        "soap",
        "pcgrad",
        FOLD_VARIANTS[0].label,  # the default folding options
        FOLD_VARIANTS[-1].label,  # FOP as published
        *PEERS,
    )
    log_every: int = 0


SMOKE_TRAINING = TrainingPlan(
    steps=8,
    global_batch=8,
    large_factor=2,
    hidden=32,
    seeds=(0,),
    lr_grid=(1e-2,),
    layouts=("by-modality",),
    batches=("base",),
    rows=("adamw", "soap", "pcgrad", "fop-last-eta-mean", "megatron-soap"),
)


@dataclass(frozen=True)
class Job:
    """One training run: its cell, row label and spec."""

    layout: str
    batch: str
    label: str
    spec: RunSpec

    @property
    def cell(self) -> str:
        """Cell key: layout|batch."""
        return f"{self.layout}|{self.batch}"


def row_spec(base: RunSpec, label: str) -> RunSpec:
    """The spec of a row: AdamW (also under PCGrad), SOAP, an ML-FOP-SOAP variant or a peer."""
    if label in PEERS:  # Megatron's own defaults: our SOAP options do not apply
        return replace(base, optimizer=label, soap_options=())
    if label in ("adamw", "pcgrad", "soap"):
        return replace(base, optimizer="soap" if label == "soap" else "adamw")
    return variant_run_spec(base, label)


def missing_rows(rows: Sequence[str]) -> dict[str, str]:
    """{row: why it cannot run in this Python} for the peers among ``rows`` that cannot."""
    reasons = {label: TABLE[label].missing() for label in rows if label in PEERS}
    return {label: reason for label, reason in reasons.items() if reason is not None}


def make_job(
    plan: TrainingPlan,
    out: Path,
    layout: str,
    batch: str,
    label: str,
    lr: float,
    seed: int,
    threads: int,
) -> Job:
    """Job of one (cell, row, lr, seed) with its folder <out>/<layout>_<batch>/<label>_lr_s."""
    factor = plan.large_factor if batch == "large" else 1
    folder = out / f"{layout}_{batch}" / f"{label}_lr{lr:g}_s{seed}"
    base = RunSpec(
        optimizer="adamw",
        out=str(folder),
        steps=plan.steps // factor,
        global_batch=plan.global_batch * factor,
        micro_batch=plan.micro_batch,
        lr=lr,
        seed=seed,
        num_layers=plan.layers,
        hidden=plan.hidden,
        diag_every=0,
        threads=threads,
        log_every=plan.log_every,
        layout=layout,
        # The SOAP these results were measured with (RESULTS.md): the reference's choices.
        soap_options=tuple(REFERENCE_SOAP.items()),
    )
    return Job(layout, batch, label, row_spec(base, label))


def jobs_worker(jobs: list[Job]) -> list[dict[str, Any]] | None:
    """One rank: train every job in turn (one world); rank 0 returns their results."""
    import torch.distributed as dist

    from benchmarks.pcgrad_digits import pcgrad_worker
    from examples.digits.train import train_worker

    results = []
    for job in jobs:
        t0 = time.perf_counter()
        fn = pcgrad_worker if job.label == "pcgrad" else train_worker
        res = fn(job.spec)
        if res is not None:
            results.append({**res, "wall_s": time.perf_counter() - t0})
    return results if dist.get_rank() == 0 else None


def run_jobs(jobs: list[Job], nproc: int, resume: bool, log: Any) -> list[dict[str, Any]]:
    """Train the jobs without a saved result in one spawned world; all results in job order."""
    from mlfop_megatron.runtime.spawn import run_distributed

    todo = [j for j in jobs if not (resume and (Path(j.spec.out) / "result.json").exists())]
    if todo:
        for j in todo:
            rundir.start_metric_files(Path(j.spec.out), metric_columns(fold_levels(j.spec, nproc)))
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        threads = todo[0].spec.threads
        fresh = run_distributed(jobs_worker, nproc, todo, timeout=7200.0, threads=threads)[0]
        load = [load0, os.getloadavg()[0]]
        for job, res in zip(todo, fresh):
            keep = ("step", "loss", "image_loss", "text_loss", "step_time_s")
            result = {
                "cell": job.cell,
                "label": job.label,
                "spec": asdict(job.spec),
                "wall_s": res["wall_s"],
                "summary": res["summary"],
                "load": load,
                "rows": [{k: r[k] for k in keep} for r in res["rows"]],
            }
            (Path(job.spec.out) / "result.json").write_text(
                json.dumps(result, default=rundir.clean)
            )
        log(f"  {len(todo)} runs in {time.perf_counter() - t0:.0f} s")
    return [json.loads((Path(j.spec.out) / "result.json").read_text()) for j in jobs]


def balanced_final(result: dict[str, Any]) -> float:
    """Lr selection criterion: mean of the final image and text train losses (NaN: worst)."""
    s = result["summary"]
    v = 0.5 * (s["final_image_loss"] + s["final_text_loss"])
    return v if isinstance(v, float) and math.isfinite(v) else math.inf


def run_training(plan: TrainingPlan, out: Path, nproc: int, resume: bool, log: Any) -> dict:
    """Phase 1: the lr grid of every row and cell on the first seed; phase 2: other seeds.

    Rows that cannot run here (``missing_rows``) are left out, with their reason under
    ``"skipped"``.
    """
    threads = max(1, (os.cpu_count() or 1) // nproc)
    t0 = time.perf_counter()
    first = plan.seeds[0]
    skipped = missing_rows(plan.rows)
    for label, reason in skipped.items():
        log(f"training: skipping {label}: {reason}")
    rows = [label for label in plan.rows if label not in skipped]
    grid_jobs = [
        make_job(plan, out, layout, batch, label, lr, first, threads)
        for layout in plan.layouts
        for batch in plan.batches
        for label in rows
        for lr in plan.lr_grid
    ]
    log(f"training phase 1: {len(grid_jobs)} lr-grid runs (seed {first})")
    grid = run_jobs(grid_jobs, nproc, resume, log)
    chosen: dict[str, dict[str, float]] = {}
    for job, res in zip(grid_jobs, grid):
        best = chosen.setdefault(job.cell, {}).get(job.label)
        if best is None or balanced_final(res) < balanced_final(
            _find(grid, job.cell, job.label, best)
        ):
            chosen[job.cell][job.label] = job.spec.lr
    seed_jobs = [
        make_job(plan, out, layout, batch, label, chosen[f"{layout}|{batch}"][label], seed, threads)
        for layout in plan.layouts
        for batch in plan.batches
        for label in rows
        for seed in plan.seeds[1:]
    ]
    log(f"training phase 2: {len(seed_jobs)} runs (other seeds at the chosen lr)")
    seeded = run_jobs(seed_jobs, nproc, resume, log) if seed_jobs else []
    runs = [r for r in grid if r["spec"]["lr"] == chosen[r["cell"]][r["label"]]] + seeded
    return {
        "plan": asdict(plan),
        "chosen_lr": chosen,
        "grid": [_slim(r) for r in grid],
        "runs": runs,
        "skipped": skipped,
        "wall_s": time.perf_counter() - t0,
    }


def _find(results: list[dict[str, Any]], cell: str, label: str, lr: float) -> dict[str, Any]:
    return next(
        r for r in results if r["cell"] == cell and r["label"] == label and r["spec"]["lr"] == lr
    )


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "rows"}


def same_plan_but_rows(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether two part (b) results ran the same plan (sizes, seeds, grid, cells) but the rows."""

    def sizes(res: dict[str, Any]) -> Any:
        return json.loads(json.dumps({k: v for k, v in res["plan"].items() if k != "rows"}))

    return sizes(old) == sizes(new)


def merge_rows(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the rows of ``old`` that ``new`` did not run (same plan but the rows).

    Rows ``new`` ran come from ``new``; a row it skipped keeps ``old``'s runs. The plan lists
    ``old``'s rows, then the new ones. Walls add up; the command names both invocations.
    """
    skipped_now = new.get("skipped", {})
    ran = [label for label in new["plan"]["rows"] if label not in skipped_now]
    kept = [label for label in old["plan"]["rows"] if label not in ran]
    if not any(r["label"] in kept for r in old["runs"]):
        return new
    rows = [
        *old["plan"]["rows"],
        *(lb for lb in new["plan"]["rows"] if lb not in old["plan"]["rows"]),
    ]
    chosen = {
        cell: {
            **{lb: lr for lb, lr in old["chosen_lr"].get(cell, {}).items() if lb in kept},
            **new["chosen_lr"].get(cell, {}),
        }
        for cell in {**old["chosen_lr"], **new["chosen_lr"]}
    }
    merged = {
        **new,
        "plan": {**new["plan"], "rows": rows},
        "chosen_lr": chosen,
        "grid": [r for r in old["grid"] if r["label"] in kept] + new["grid"],
        "runs": [r for r in old["runs"] if r["label"] in kept] + new["runs"],
    }
    has_runs = {r["label"] for r in merged["runs"]}
    skipped = {**old.get("skipped", {}), **skipped_now}
    merged["skipped"] = {lb: why for lb, why in skipped.items() if lb not in has_runs}
    for key in ("wall_s", "part_wall_s"):
        if key in old and key in new:
            merged[key] = old[key] + new[key]
    if "command" in old and "command" in new:
        merged["command"] = f"{old['command']}, then {new['command']}"
    return merged


# ------------------------------------------------------------------------------- analysis
def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values up to and including each position."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def window_of(result: dict[str, Any]) -> int:
    """Smoothing window: the last 10% of steps (as the demo's final_* losses)."""
    return max(1, result["spec"]["steps"] // 10)


def reach(result: dict[str, Any], key: str, target: float) -> tuple[int, float] | None:
    """(steps, cumulative train-step seconds) at which the smoothed loss first hits target."""
    rows = result["rows"]
    smooth = trailing_mean([r[key] for r in rows], window_of(result))
    elapsed = 0.0
    for r, v in zip(rows, smooth):
        elapsed += r["step_time_s"]
        if v <= target * (1 + 1e-12):
            return r["step"], elapsed
    return None


def ratios(run: dict[str, Any], ref: dict[str, Any], key: str) -> dict[str, Any]:
    """Steps/time of run and of ref to reach ref's final ``key`` loss, and ref/run ratios."""
    target = ref["summary"][f"final_{key}"]
    mine, theirs = reach(run, key, target), reach(ref, key, target)
    assert theirs is not None  # the reference's trailing mean equals its final at the end
    steps = run["spec"]["steps"]
    total_time = sum(r["step_time_s"] for r in run["rows"])
    seed = run["spec"]["seed"]
    if mine is None:  # not reached: the ratios are upper bounds (as if reached at the end)
        return {
            "seed": seed,
            "reached": False,
            "steps": steps,
            "ref_steps": theirs[0],
            "step_ratio": theirs[0] / steps,
            "time_ratio": theirs[1] / total_time,
        }
    return {
        "seed": seed,
        "reached": True,
        "steps": mine[0],
        "ref_steps": theirs[0],
        "step_ratio": theirs[0] / mine[0],
        "time_ratio": theirs[1] / mine[1],
    }


def fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std' (just the value for one seed)."""
    m, s = mean_std(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_ratio(entries: Sequence[dict[str, Any]], field: str) -> str:
    """Ratio over seeds: 'mean ± std', '≤x (k/n reached)' when some seeds never reached it."""
    reached = sum(e["reached"] for e in entries)
    text = fmt_ms([e[field] for e in entries], 2)
    if reached < len(entries):
        return f"≤{text} ({reached}/{len(entries)} reached)"
    return text


def compare(rows: dict[int, dict[str, Any]], refs: dict[int, dict[str, Any]]) -> dict[str, list]:
    """Per key: the ratio entries of every seed that both groups ran (paired by seed)."""
    seeds = sorted(s for s in rows if s in refs)
    return {k: [ratios(rows[s], refs[s], k) for s in seeds] for k in KEYS}


def final_table(table: dict[str, Any], labels: Sequence[str]) -> list[str]:
    """Markdown: final train/val losses per modality (mean ± std over seeds), throughput."""
    lines = [
        "| optimizer | peak lr | seeds | train image | train text | train overall | "
        "val image | val text | step ms (median) | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        e = table[label]
        lines.append(
            f"| {name_of(label)} | {e['lr']:g} | {len(e['seeds'])} | "
            + " | ".join(fmt_ms(e["final"][k]) for k in KEYS)
            + " | "
            + " | ".join(fmt_ms(e["val"][k]) for k in ("image_loss", "text_loss"))
            + f" | {fmt_ms(e['step_ms'], 0)} | {e['skipped_steps']} |"
        )
    return lines


def ratio_table(table: dict[str, Any], labels: Sequence[str], ref: str = "vs_adamw") -> list[str]:
    """Markdown: steps to the reference's final loss and sample-efficiency / wall-clock ratios."""
    lines = [
        "| optimizer | steps to target (img / txt / all) | sample-eff. ratio image | "
        "text | overall | wall-clock ratio image | text | overall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        cmp = table[label].get(ref)
        if cmp is None:
            continue
        steps = " / ".join(fmt_steps(cmp[k]) for k in KEYS)
        lines.append(
            f"| {name_of(label)} | {steps} | "
            + " | ".join(fmt_ratio(cmp[k], "step_ratio") for k in KEYS)
            + " | "
            + " | ".join(fmt_ratio(cmp[k], "time_ratio") for k in KEYS)
            + " |"
        )
    return lines


def fmt_steps(entries: Sequence[dict[str, Any]]) -> str:
    """Mean steps to target over seeds ('>N' marks a seed that never reached it)."""
    if not entries:
        return "-"
    m = statistics.fmean(e["steps"] for e in entries)
    return f"{m:.0f}" + ("" if all(e["reached"] for e in entries) else "+")


def name_of(label: str) -> str:
    """Row name of a label."""
    return NAMES.get(label, f"ML-FOP-SOAP {label}")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def balanced_mean(entry: dict[str, Any]) -> float:
    """Mean over seeds of a row's final balanced train loss (``balanced_final``; NaN: worst)."""
    finals = entry["final"]
    values = [0.5 * (a + b) for a, b in zip(finals["image_loss"], finals["text_loss"])]
    m = statistics.fmean(values) if values else math.inf
    return m if math.isfinite(m) else math.inf


def best_peer(table: dict[str, Any]) -> str | None:
    """The Megatron peer of a cell with the lower final balanced train loss (None: no peer)."""
    peers = [label for label in PEERS if label in table]
    return min(peers, key=lambda label: balanced_mean(table[label])) if peers else None


def analyse_training(bench: dict[str, Any]) -> dict[str, Any]:
    """Per cell and row: final losses over seeds, ratios vs AdamW, SOAP and the best peer.

    Ratios are paired by seed; ``vs_peer`` (every row but the best peer itself) only in cells
    where a Megatron peer ran.
    """
    out: dict[str, Any] = {}
    for cell in sorted({r["cell"] for r in bench["runs"]}):
        groups: dict[str, dict[int, dict[str, Any]]] = {}
        for r in bench["runs"]:
            if r["cell"] == cell:
                groups.setdefault(r["label"], {})[r["spec"]["seed"]] = r
        table = {}
        for label, by_seed in groups.items():
            by_seed = dict(sorted(by_seed.items()))
            sums = [r["summary"] for r in by_seed.values()]
            entry: dict[str, Any] = {
                "seeds": list(by_seed),
                "lr": sums[0]["lr"],
                "steps": sums[0]["steps"],
                "global_batch": next(iter(by_seed.values()))["spec"]["global_batch"],
                "final": {k: [s[f"final_{k}"] for s in sums] for k in KEYS},
                "val": {k: [s[f"val_{k}"] for s in sums] for k in KEYS},
                "step_ms": [
                    1e3 * statistics.median(r["step_time_s"] for r in run["rows"][1:])
                    for run in by_seed.values()
                ],
                "skipped_steps": sum(s["skipped_steps"] for s in sums),
            }
            if "adamw" in groups:
                entry["vs_adamw"] = compare(by_seed, groups["adamw"])
            if "soap" in groups and label != "soap":
                entry["vs_soap"] = compare(by_seed, groups["soap"])
            table[label] = entry
        peer = best_peer(table)
        if peer is not None:
            for label in table:
                if label != peer:
                    table[label]["vs_peer"] = compare(groups[label], groups[peer])
        out[cell] = table
    return out


def skipped_lines(bench: dict[str, Any]) -> list[str]:
    """Markdown: one line per row left out because it cannot run here, with its reason."""
    skipped = bench.get("skipped", {})
    if not skipped:
        return []
    return ["", "Rows not run here:", ""] + [
        f"- {name_of(label)} (`{label}`): {reason}" for label, reason in skipped.items()
    ]


def training_section(bench: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """Markdown: skipped rows; per cell, final losses, ratios vs AdamW, the best peer, SOAP."""
    lines = skipped_lines(bench)
    rows = bench["plan"]["rows"]
    for cell, table in res.items():
        layout, batch = cell.split("|")
        present = [lb for lb in rows if lb in table]
        e = table[present[0]]
        lines += [
            "",
            f"#### {layout}, {batch} batch: global batch {e['global_batch']}, {e['steps']} steps",
            "",
        ]
        lines += final_table(table, present)
        lines += ["", "Ratios vs AdamW (AdamW steps / row steps to AdamW's final loss):", ""]
        lines += ratio_table(table, present)
        peer = best_peer(table)
        if peer is not None:
            lines += [
                "",
                f"Ratios vs the best Megatron peer of this cell, {name_of(peer)} (lower final "
                f"balanced train loss; {name_of(peer)} steps / row steps to its final loss):",
                "",
            ]
            lines += ratio_table(table, present, "vs_peer")
        folds = [lb for lb in present if lb.startswith("fop-") or lb == "pcgrad"]
        if folds and "soap" in table:
            lines += ["", "Against SOAP's final loss (SOAP steps / row steps):", ""]
            lines += ratio_table(table, folds, "vs_soap")
    return lines


def verdicts(res: dict[str, Any], label: str) -> list[str]:
    """Headline checks for one ML-FOP-SOAP row.

    >= 1.4x vs AdamW on both modalities; below SOAP's final loss by more than the seed spread
    at the large batch.
    """
    lines = []
    for cell, table in res.items():
        e = table.get(label)
        if e is None or "vs_adamw" not in e:
            continue
        for k in ("image_loss", "text_loss"):
            m, _ = mean_std([x["step_ratio"] for x in e["vs_adamw"][k]])
            ok = m >= 1.4 and all(x["reached"] for x in e["vs_adamw"][k])
            lines.append(
                f"- {cell}, {KEY_NAMES[k]}: {label} vs AdamW {m:.2f}x "
                f"(target >= 1.4: {'met' if ok else 'not met'})"
            )
        if cell.endswith("|large") and "soap" in table:
            for k in ("image_loss", "text_loss"):
                a, sa = mean_std(e["final"][k])
                b, sb = mean_std(table["soap"]["final"][k])
                spread = max(sa, sb)
                if spread == 0:
                    verdict = ("lower" if a < b else "not lower") + " (one seed: no spread)"
                elif a < b - spread:
                    verdict = "lower by more than the seed spread"
                elif a > b + spread:
                    verdict = "higher by more than the seed spread"
                else:
                    verdict = "within the seed spread"
                lines.append(
                    f"- {cell}, {KEY_NAMES[k]}: {label} final {a:.4f} vs SOAP {b:.4f} "
                    f"({verdict}; spread {spread:.4f})"
                )
    return lines
