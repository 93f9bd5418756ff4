"""Sample efficiency on the digits image+text demo: ML-FOP-SOAP vs SOAP vs AdamW (CPU).

Trains the unified image+text GPT of ``examples/train_digits.py`` through the Megatron
integration (2 gloo ranks, data parallel) with the same model, data order, global batch and
LR schedule (linear warmup + cosine) for every optimizer:

* AdamW: Megatron's optimizer path of the demo; peak lr tuned on a small grid (seed 0, lowest
  final train loss), then trained on every seed at the chosen lr;
* SOAP: our optimizer with folding off (plain SOAP on the mean gradient);
* ML-FOP-SOAP: SOAP + multi-level FOP folding over the accumulation micro-steps.

SOAP and ML-FOP-SOAP run at the demo's default peak lr (not re-tuned here). Two settings with
the same number of samples: the base global batch, and an 8x larger global batch reached by 8x
more accumulation micro-steps (8x fewer optimizer steps, same lr). Ablations of the folding at
the large batch (one seed): projection off, beta fixed to 0 and to 1. A control (added after
the first full run, --no-lr-control skips it): the large batch again with SOAP and ML-FOP-SOAP
at AdamW's tuned lr.

Sample-efficiency ratio, per seed: target = AdamW's final train loss of that seed (mean of the
last 10% of steps, per modality and overall); an optimizer reaches it at the first step where
the trailing mean over the same window is <= target; ratio = AdamW steps / optimizer steps
(> 1: fewer samples than AdamW). The wall-clock ratio is the same with the cumulative
train-step time instead of steps.

    python -m benchmarks.sample_efficiency              # full: 31 runs, ~41 min on 2 shared cores
    python -m benchmarks.sample_efficiency --smoke      # < 2 min check, does not touch RESULTS.md
    python -m benchmarks.sample_efficiency --report-only  # tables from the saved runs

Every run keeps its folder (metrics.csv / metrics.jsonl, checkpoint) under ``--out``; the
aggregate goes to ``<out>/results.json`` and, for full runs, into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.results_md import cpu_model, replace_section
from examples.digits import cli, rundir, train
from examples.digits import spec as td

SECTION = "## Sample efficiency (digits image+text, CPU)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
KEYS = ("image_loss", "text_loss", "loss")  # per modality, then overall
KEY_NAMES = {"image_loss": "image", "text_loss": "text", "loss": "overall"}
OPTIMIZER_NAMES = {"adamw": "AdamW", "soap": "SOAP (ours, folding off)", "mlfop": "ML-FOP-SOAP"}
SETTINGS = {
    "base": "Base batch",
    "large": "Large batch (8x, accumulation)",
    "large-lr": "Control: large batch, SOAP and ML-FOP-SOAP at AdamW's lr",
}
_T0 = time.perf_counter()
_LOAD0 = "load average " + "/".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark: model, batch, steps, seeds, lr grid, what to run."""

    steps: int = 320
    global_batch: int = 32
    micro_batch: int = 4
    large_factor: int = 8
    layers: int = 4
    hidden: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    large_seeds: tuple[int, ...] = (0, 1, 2)
    adamw_grid: tuple[float, ...] = (2.5e-3, 5e-3, 1e-2, 2e-2)
    grid_extensions: int = 2  # while the best lr is at an edge: one more point (x2 or /2)
    lr_ours: float = td.DEFAULT_LR["mlfop"]
    ablations: bool = True
    lr_control: bool = True  # large batch again: SOAP / ML-FOP-SOAP at AdamW's lr
    log_every: int = 40
    layout: str = "mixed"  # micro-batch layout of every run (examples/digits_data.py LAYOUTS)


FULL = Plan()
SMOKE = Plan(
    steps=16,
    global_batch=16,
    micro_batch=2,
    layers=2,
    hidden=32,
    seeds=(0, 1),
    large_seeds=(0,),
    adamw_grid=(5e-3, 1e-2),
    log_every=8,
)


@dataclass(frozen=True)
class Job:
    """One training run of the benchmark."""

    setting: str  # "base" | "large"
    label: str  # row name: optimizer, or ablation variant
    spec: td.RunSpec

    @property
    def key(self) -> str:
        """Folder name of the run inside <out>/<setting>/."""
        return f"{self.label}_lr{self.spec.lr:g}_s{self.spec.seed}"


def log(msg: str) -> None:
    """Progress line with the benchmark's elapsed time."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------------------- the runs
def base_spec(plan: Plan, out: Path, nproc: int) -> td.RunSpec:
    """RunSpec of the base setting (optimizer, lr, seed filled in per job)."""
    return td.RunSpec(
        optimizer="adamw",
        out=str(out),
        steps=plan.steps,
        global_batch=plan.global_batch,
        micro_batch=plan.micro_batch,
        lr=0.0,
        seed=0,
        num_layers=plan.layers,
        hidden=plan.hidden,
        diag_every=0,
        threads=max(1, (os.cpu_count() or 1) // nproc),
        log_every=plan.log_every,
        layout=plan.layout,
    )


def large_spec(spec: td.RunSpec, plan: Plan) -> td.RunSpec:
    """Same samples, large_factor x global batch by accumulation, large_factor x fewer steps."""
    every = max(1, plan.log_every // plan.large_factor)
    return replace(
        spec,
        global_batch=spec.global_batch * plan.large_factor,
        steps=spec.steps // plan.large_factor,
        log_every=every,
    )


def make_job(setting: str, label: str, spec: td.RunSpec, out: Path) -> Job:
    """Job with its run folder <out>/<setting>/<label>_lr<lr>_s<seed>."""
    job = Job(setting, label, spec)
    return replace(job, spec=replace(spec, out=str(out / setting / job.key)))


def run_job(job: Job, nproc: int, resume: bool, index: str) -> dict[str, Any]:
    """Train one job on nproc gloo ranks (or reuse its saved result); returns rows + summary."""
    from mlfop_megatron.testing.distributed import run_distributed

    out = Path(job.spec.out)
    saved = out / "result.json"
    s = job.spec
    what = (
        f"{job.setting} {job.label} lr {s.lr:g} seed {s.seed}: {s.steps} steps x "
        f"global batch {s.global_batch} (micro {s.micro_batch} x {nproc} ranks)"
    )
    if resume and saved.exists():
        log(f"{index} reuse {what}")
        return json.loads(saved.read_text())
    log(f"{index} run {what}")
    rundir.start_metric_files(out, td.metric_columns(td.fold_levels(s, nproc)))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    res = run_distributed(train.train_worker, nproc, s, timeout=7200.0, threads=s.threads)[0]
    keep = ("step", "loss", "image_loss", "text_loss", "step_time_s", "tokens_per_s")
    result = {
        "setting": job.setting,
        "label": job.label,
        "spec": asdict(s),
        "wall_s": time.perf_counter() - t0,
        "summary": res["summary"],
        "load": [load0, os.getloadavg()[0]],
        "rows": [{k: r[k] for k in keep} for r in res["rows"]],
    }
    saved.write_text(json.dumps(result, default=rundir.clean))
    sm = result["summary"]
    log(
        f"{index} done in {result['wall_s']:.0f} s: final loss {sm['final_loss']:.4f} "
        f"(img {sm['final_image_loss']:.4f}, txt {sm['final_text_loss']:.4f}); val img "
        f"{sm['val_image_loss']:.4f}, txt {sm['val_text_loss']:.4f}"
    )
    return result


def final_loss(result: dict[str, Any]) -> float:
    """Selection criterion of the lr grid: final overall train loss (NaN/inf: worst)."""
    v = result["summary"].get("final_loss")
    return v if isinstance(v, float) and math.isfinite(v) else math.inf


def run_benchmark(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """All runs: AdamW lr grid, base setting x seeds, large batch x seeds, ablations."""
    out, n = Path(args.out), args.nproc
    base = base_spec(plan, out, n)
    total = (
        len(plan.adamw_grid)
        + (len(plan.seeds) - 1)
        + 2 * len(plan.seeds)
        + 3 * len(plan.large_seeds)
        + (3 if plan.ablations else 0)
        + (2 * len(plan.large_seeds) if plan.lr_control else 0)
    )
    count = iter(range(1, total + plan.grid_extensions + 1))

    def go(job: Job) -> dict[str, Any]:
        return run_job(job, n, args.resume, f"[{next(count)}/{total}]")

    seed0 = plan.seeds[0]

    def grid_run(lr: float) -> dict[str, Any]:
        return go(make_job("base", "adamw", replace(base, lr=lr, seed=seed0), out))

    grid = {lr: grid_run(lr) for lr in plan.adamw_grid}
    for _ in range(plan.grid_extensions):
        best = min(grid, key=lambda lr: final_loss(grid[lr]))
        if min(grid) < best < max(grid):
            break
        lr = best / 2 if best == min(grid) else best * 2
        log(f"AdamW best lr {best:g} is at the edge of the grid: adding {lr:g}")
        total += 1
        grid[lr] = grid_run(lr)
    grid = dict(sorted(grid.items()))
    lr_adamw = min(grid, key=lambda lr: final_loss(grid[lr]))
    log(f"AdamW lr grid {list(grid)} -> {lr_adamw:g} (lowest final train loss)")
    lrs = {"adamw": lr_adamw, "soap": plan.lr_ours, "mlfop": plan.lr_ours}
    runs: list[dict[str, Any]] = []
    for name in td.OPTIMIZERS[::-1]:  # adamw first: its finals are the targets
        for seed in plan.seeds:
            if name == "adamw" and seed == seed0:
                runs.append(grid[lr_adamw])
                continue
            spec = replace(base, optimizer=name, lr=lrs[name], seed=seed)
            runs.append(go(make_job("base", name, spec, out)))
    for name in td.OPTIMIZERS[::-1]:
        for seed in plan.large_seeds:
            spec = large_spec(replace(base, optimizer=name, lr=lrs[name], seed=seed), plan)
            runs.append(go(make_job("large", name, spec, out)))
    if plan.ablations:
        mlfop = large_spec(
            replace(base, optimizer="mlfop", lr=plan.lr_ours, seed=plan.large_seeds[0]), plan
        )
        variants = {
            "mlfop-noproject": {"fold_project": False},
            "mlfop-beta0": {"fold_fixed_beta": 0.0},
            "mlfop-beta1": {"fold_fixed_beta": 1.0},
        }
        for label, change in variants.items():
            runs.append(go(make_job("large", label, replace(mlfop, **change), out)))
    if plan.lr_control:  # is the large-batch result a matter of the (untuned) lr of ours?
        for name in ("soap", "mlfop"):
            for seed in plan.large_seeds:
                spec = large_spec(replace(base, optimizer=name, lr=lr_adamw, seed=seed), plan)
                runs.append(go(make_job("large-lr", name, spec, out)))
    return {"plan": asdict(plan), "lr": lrs, "grid": list(grid.values()), "runs": runs}


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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


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


def group(runs: list[dict[str, Any]], setting: str) -> dict[str, dict[int, dict[str, Any]]]:
    """{label: {seed: run}} of one setting."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        if r["setting"] == setting:
            out.setdefault(r["label"], {})[r["spec"]["seed"]] = r
    return out


def compare(rows: dict[int, dict[str, Any]], refs: dict[int, dict[str, Any]]) -> dict[str, list]:
    """Per key: the ratio entries of every seed that both groups ran (paired by seed)."""
    seeds = sorted(s for s in rows if s in refs)
    return {k: [ratios(rows[s], refs[s], k) for s in seeds] for k in KEYS}


def analyse(bench: dict[str, Any]) -> dict[str, Any]:
    """Final-loss statistics and ratios vs AdamW (and vs SOAP) per setting and row."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        groups = group(bench["runs"], setting)
        if setting == "large-lr" and groups:  # the control shares AdamW's large-batch runs
            groups = {"adamw": group(bench["runs"], "large").get("adamw", {}), **groups}
        if not groups.get("adamw"):
            continue
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
                "tokens_per_s": [s["tokens_per_s"] for s in sums],
                "step_ms": [
                    1e3 * statistics.median(r["step_time_s"] for r in run["rows"][1:])
                    for run in by_seed.values()
                ],
                "skipped_steps": sum(s["skipped_steps"] for s in sums),
                "vs_adamw": compare(by_seed, groups["adamw"]),
            }
            if "soap" in groups and label != "soap":
                entry["vs_soap"] = compare(by_seed, groups["soap"])
            table[label] = entry
        out[setting] = table
    return out


# -------------------------------------------------------------------------------- reporting
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
    ablations = {
        "mlfop-noproject": "ML-FOP-SOAP, projection off (s=0)",
        "mlfop-beta0": "ML-FOP-SOAP, beta fixed 0",
        "mlfop-beta1": "ML-FOP-SOAP, beta fixed 1",
    }
    return OPTIMIZER_NAMES.get(label, ablations.get(label, label))


def grid_table(bench: dict[str, Any]) -> list[str]:
    """Markdown: the AdamW lr grid (seed 0)."""
    lines = [
        "| AdamW peak lr | train image | train text | train overall | val image | val text |",
        "|---|---|---|---|---|---|",
    ]
    for r in bench["grid"]:
        s = r["summary"]
        mark = " (chosen)" if s["lr"] == bench["lr"]["adamw"] else ""
        lines.append(
            f"| {s['lr']:g}{mark} | "
            + " | ".join(f"{s[f'final_{k}']:.4f}" for k in KEYS)
            + f" | {s['val_image_loss']:.4f} | {s['val_text_loss']:.4f} |"
        )
    return lines


def verdicts(res: dict[str, Any]) -> list[str]:
    """The headline checks (target: >= 1.4x vs AdamW on both modalities; > SOAP at large)."""
    lines = []
    names = {
        "base": "base batch",
        "large": "large batch",
        "large-lr": "(control) large batch at AdamW's lr",
    }
    for setting in ("base", "large"):
        e = res.get(setting, {}).get("mlfop")
        if e is None:
            continue
        for k in ("image_loss", "text_loss"):
            m, _ = mean_std([x["step_ratio"] for x in e["vs_adamw"][k]])
            ok = m >= 1.4 and all(x["reached"] for x in e["vs_adamw"][k])
            lines.append(
                f"- {names[setting]}, {KEY_NAMES[k]}: ML-FOP-SOAP sample-efficiency "
                f"ratio vs AdamW {m:.2f} (target >= 1.4: {'met' if ok else 'not met'})"
            )
    for setting in ("large", "large-lr"):
        large = res.get(setting, {})
        if "mlfop" not in large or "soap" not in large:
            continue
        for k in KEYS:
            a, sa = mean_std(large["mlfop"]["final"][k])
            b, sb = mean_std(large["soap"]["final"][k])
            m, _ = mean_std([x["step_ratio"] for x in large["mlfop"]["vs_soap"][k]])
            spread = max(sa, sb)
            verdict = (
                ("lower" if a < b else "not lower") + " (one seed)"
                if spread == 0
                else (
                    "lower by more than the seed spread"
                    if a < b - spread
                    else "higher by more than the seed spread"
                    if a > b + spread
                    else "within the seed spread"
                )
            )
            lines.append(
                f"- {names[setting]}, {KEY_NAMES[k]}: ML-FOP-SOAP final train loss "
                f"{a:.4f} vs SOAP {b:.4f} ({verdict}, spread {spread:.4f}); "
                f"sample-efficiency ratio to SOAP's final {m:.2f}"
            )
    return lines


def report(bench: dict[str, Any], res: dict[str, Any], meta: dict[str, Any]) -> str:
    """The markdown section (also printed)."""
    plan = bench["plan"]
    lines = [SECTION, ""]
    train_s = sum(r["wall_s"] for r in bench["grid"] + bench["runs"] if r not in bench["runs"])
    train_s += sum(r["wall_s"] for r in bench["runs"])
    lines.append(
        f"Command: `{meta['command']}`: {meta['runs']} training runs taking "
        f"{train_s / 60:.1f} min in all (sum of run wall times; this invocation took "
        f"{meta['wall_s'] / 60:.1f} min, runs already done are reused with --resume)"
    )
    lines.append("")
    loads = [x for r in bench["runs"] + bench["grid"] for x in r.get("load", [])]
    lines.append(f"Machine: {meta['machine']}")
    if loads:
        lines.append(
            f"(1-min load average at run starts/ends: {min(loads):.1f} to "
            f"{max(loads):.1f}; the 2 cores are shared with other jobs)"
        )
    lines.append("")
    large_steps = plan["steps"] // plan["large_factor"]
    lines.append(
        f"Setup: `examples/train_digits.py` model (GPTModel, {plan['layers']} layers, hidden "
        f"{plan['hidden']}, 4 heads, fp32) on the digits image+text stream, 2 gloo ranks (DP=2), "
        f"micro-batch {plan['micro_batch']} per rank, micro-batch layout "
        f"{plan.get('layout', 'mixed')}. Base: global batch {plan['global_batch']} "
        f"({plan['global_batch'] // (2 * plan['micro_batch'])} accumulation micro-steps), "
        f"{plan['steps']} steps. Large: global batch "
        f"{plan['global_batch'] * plan['large_factor']} "
        f"({plan['global_batch'] * plan['large_factor'] // (2 * plan['micro_batch'])} "
        f"micro-steps), {large_steps} steps: the same {plan['steps'] * plan['global_batch']} "
        "samples. Same data order, warmup 10% + cosine to 0.1x, weight decay 0.01, clip 1.0 for "
        "all. Seeds are model-initialisation seeds. AdamW lr: grid below (seed "
        f"{plan['seeds'][0]}, lowest final train loss; the grid "
        f"{', '.join(f'{x:g}' for x in plan['adamw_grid'])} grows by a factor-2 step while its "
        f"best point is at an edge, at most {plan['grid_extensions']} times), then "
        f"{bench['lr']['adamw']:g} for all "
        f"seeds and both settings. SOAP and ML-FOP-SOAP: {plan['lr_ours']:g} (the demo default; "
        "not tuned here, the grid was run for AdamW only). SOAP betas (0.95, 0.95), "
        "precondition frequency 10; ML-FOP-SOAP dyadic levels, adaptive beta clipped to |beta| "
        "<= 1; SOAP = the same code with folding off."
    )
    lines.append("")
    lines.append(
        "Metrics: train losses are the per-step losses of the step's global batch before the "
        "update (the run's samples are several passes over the 1617 training images, each "
        "image drawn with a random task); 'final' = mean of the last 10% of steps; val = "
        "the held-out 10% split after training. Sample-efficiency ratio = AdamW steps / "
        "optimizer steps to reach AdamW's "
        "final train loss of the same seed (trailing mean over the same 10% window), per "
        "modality and overall, mean ± std over seeds (> 1: fewer samples than AdamW; AdamW "
        "itself can reach its own final before the last step). Wall-clock ratio: the same with "
        "cumulative train-step time (forward, backward, communication, optimizer step); "
        "'step ms' is the median train-step time of a run. The runs ran one after another on "
        "a 2-core machine shared with other jobs, so timings moved with the load (see the load "
        "range above): read wall-clock ratios as rough. '≤x (k/n reached)': some seeds never "
        "reached the target; their ratio is counted as if reached at the last step (an upper "
        "bound); '+' on the steps marks the same."
    )
    lines.append("")
    lines.append("AdamW learning-rate grid (base setting):")
    lines.append("")
    lines += grid_table(bench)
    for setting in ("base", "large"):
        lines += setting_section(res, setting)
    large = res.get("large", {})
    abl = [
        lb
        for lb in ("mlfop", "soap", "mlfop-noproject", "mlfop-beta0", "mlfop-beta1")
        if lb in large
    ]
    if any(lb.startswith("mlfop-") for lb in abl):
        seed = plan["large_seeds"][0]
        one = {lb: single_seed(large[lb], seed) for lb in abl}
        lines += ["", f"### Ablations of the folding (large batch, seed {seed} only)", ""]
        lines.append(
            "One seed per row (time budget), so differences below the base/large "
            "seed spread above are not significant. 'folding off' = SOAP. beta fixed 0 "
            "is the plain mean, i.e. SOAP up to rounding."
        )
        lines.append("")
        lines += final_table(one, abl)
        lines.append("")
        lines += ratio_table(one, abl)
    if res.get("large-lr"):
        lines += setting_section(res, "large-lr")
        lines += [
            "",
            "This control was added after the main runs had shown the large-batch "
            "result: the same large-batch runs for SOAP and ML-FOP-SOAP with AdamW's "
            f"peak lr {bench['lr']['adamw']:g} instead of {plan['lr_ours']:g} (no other "
            "change; the AdamW rows are the large-batch AdamW runs above). The headline "
            "checks below use the main rows, not this control.",
        ]
    lines += ["", "Headline checks (computed):", ""]
    lines += verdicts(res)
    return "\n".join(lines) + "\n"


def setting_section(res: dict[str, Any], setting: str) -> list[str]:
    """Markdown of one setting: final losses, ratios vs AdamW, ML-FOP-SOAP vs SOAP."""
    table = res.get(setting)
    if not table:
        return []
    present = [lb for lb in ("adamw", "soap", "mlfop") if lb in table]
    e = table[present[-1]]
    lines = [
        "",
        f"### {SETTINGS[setting]}: global batch {e['global_batch']}, {e['steps']} steps",
        "",
        "Final losses (mean ± std over seeds):",
        "",
    ]
    lines += final_table(table, present)
    lines += [
        "",
        "Steps and wall-clock to reach AdamW's final train loss (ratios: AdamW / optimizer):",
        "",
    ]
    lines += ratio_table(table, present)
    if "mlfop" in table and "vs_soap" in table["mlfop"]:
        lines += [
            "",
            "ML-FOP-SOAP against SOAP's final train loss (ratios: SOAP / ML-FOP-SOAP):",
            "",
        ]
        lines += ratio_table(table, ["mlfop"], "vs_soap")
    return lines


def single_seed(entry: dict[str, Any], seed: int) -> dict[str, Any]:
    """An analysis entry restricted to one seed."""
    i = entry["seeds"].index(seed)
    out = dict(
        entry, seeds=[seed], tokens_per_s=[entry["tokens_per_s"][i]], step_ms=[entry["step_ms"][i]]
    )
    for name in ("final", "val"):
        out[name] = {k: [v[i]] for k, v in entry[name].items()}
    for name in ("vs_adamw", "vs_soap"):
        if name in entry:
            out[name] = {k: [x for x in v if x["seed"] == seed] for k, v in entry[name].items()}
    return out


def side_by_side(res: dict[str, Any]) -> str:
    """Plain-text ratios of every row, per setting (the end-of-run printout)."""
    lines = [
        "",
        "sample-efficiency ratio vs AdamW (steps) | wall-clock ratio   [image / text / overall]",
    ]
    for setting, table in res.items():
        for label, e in table.items():
            steps = " / ".join(fmt_ratio(e["vs_adamw"][k], "step_ratio") for k in KEYS)
            wall = " / ".join(fmt_ratio(e["vs_adamw"][k], "time_ratio") for k in KEYS)
            lines.append(f"  {setting:5} {label:16} {steps:40} | {wall}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- plumbing
def version(name: str) -> str:
    """Installed version of a distribution ('-' when missing)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine_line(nproc: int) -> str:
    """nproc, CPU model, torch / megatron-core / Python versions, load average now."""
    import torch

    cpu = cpu_model()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    threads = max(1, (os.cpu_count() or 1) // nproc)
    return (
        f"nproc {os.cpu_count()} ({cpu}), {nproc} gloo ranks x {threads} "
        f"thread(s), torch {torch.__version__}, megatron-core {version('megatron-core')}, "
        f"Python {platform.python_version()}, load average {load}"
    )


def write_results(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, keeping the others."""
    replace_section(path, SECTION, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sample_efficiency", help="folder of all runs")
    ap.add_argument("--nproc", type=int, default=2, help="gloo ranks per run (data parallel)")
    ap.add_argument("--smoke", action="store_true", help="tiny check (< 2 min), no RESULTS.md")
    ap.add_argument("--steps", type=int, default=None, help="base-setting steps (400)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per optimizer (3)")
    ap.add_argument("--no-ablations", action="store_true", help="skip the folding ablations")
    ap.add_argument(
        "--no-lr-control",
        action="store_true",
        help="skip the large-batch control runs of ours at AdamW's lr",
    )
    ap.add_argument(
        "--micro-batch-layout",
        choices=("mixed", "by-modality"),
        default="mixed",
        help="mixed: micro-batches mix both tasks; by-modality: one task per micro-batch, "
        "image first half of each step (examples/digits_data.py)",
    )
    ap.add_argument("--resume", action="store_true", help="reuse runs whose result.json exists")
    ap.add_argument(
        "--report-only", action="store_true", help="no training: tables from <out>/results.json"
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="RESULTS.md to update")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--verbose", action="store_true", help="keep library warnings")
    return ap.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The preset (full or smoke) with the command-line overrides."""
    plan = SMOKE if args.smoke else FULL
    if args.steps is not None:
        plan = replace(plan, steps=args.steps)
    if args.seeds is not None:
        seeds = tuple(range(args.seeds))
        plan = replace(plan, seeds=seeds, large_seeds=seeds)
    if args.no_ablations:
        plan = replace(plan, ablations=False)
    if args.no_lr_control:
        plan = replace(plan, lr_control=False)
    plan = replace(plan, layout=args.micro_batch_layout)
    if plan.steps % plan.large_factor or plan.global_batch % (args.nproc * plan.micro_batch):
        raise SystemExit(
            f"steps must divide by {plan.large_factor} and the global batch by nproc x micro-batch"
        )
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or reload), analyse, print, and write the RESULTS.md section."""
    args = parse_args(argv)
    if not args.verbose:
        cli.quiet_warnings()
    out = Path(args.out)
    command = "python -m benchmarks.sample_efficiency " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    saved = out / "results.json"
    if args.report_only:
        payload = json.loads(saved.read_text())
        bench, meta = payload["bench"], payload["meta"]
    else:
        plan = plan_from_args(args)
        log(f"machine: {machine_line(args.nproc)}")
        log(f"plan: {plan}")
        bench = run_benchmark(plan, args)
        meta = {
            "command": command.strip(),
            "wall_s": time.perf_counter() - _T0,
            "runs": len(bench["runs"]) + len(bench["grid"]) - 1,
            "machine": f"{machine_line(args.nproc)} (at start: {_LOAD0})",
        }
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"bench": bench, "meta": meta}, default=rundir.clean))
    res = analyse(bench)
    body = report(bench, res, meta)
    print("\n" + body)
    print(side_by_side(res))
    if not (args.smoke or args.no_write):
        write_results(args.results, body)
        log(f"wrote section '{SECTION}' to {args.results}")
    log(f"done in {time.perf_counter() - _T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
