"""Part (a) of the folding benchmark: paired one-step lookahead on saved digits checkpoints.

A plain-SOAP run of the digits demo (Megatron path, 2 gloo ranks) saves checkpoints at a few
steps. From each checkpoint, and for each of a few global batches (the samples of steps
c, c+1, ...), every update rule takes exactly one step from the same state on the same samples
at the same lr: the plain mean of the micro-step gradients (SOAP, folding off) and each
ML-FOP-SOAP FOLD_VARIANT. The per-modality loss change on a fixed probe set (the held-out split,
both tasks on every image) is measured after the step. Paired over (checkpoint, batch):
difference = change(variant) - change(plain), a sign test on it (negative: the fold lowered that
modality's probe loss more than the plain mean did).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.conflict import (
    FOLD_VARIANTS,
    mean_std,
    sign_test,
    variant_run_spec,
)
from examples.digits.model import build_model, build_optimizer
from examples.digits.rundir import load_checkpoint, save_checkpoint
from examples.digits.spec import RunSpec
from examples.digits.train import evaluate, setup_run, train_step
from mlfop_megatron.config import REFERENCE_SOAP

PLAIN = "plain-mean"


@dataclass(frozen=True)
class LookaheadPlan:
    """Sizes of part (a)."""

    steps: int = 160  # base-batch steps of the SOAP run that writes the checkpoints
    checkpoints: tuple[float, ...] = (0.25, 0.5, 1.0)  # fractions of the run
    probe_batches: int = 3  # global batches looked ahead from each checkpoint
    global_batch: int = 32
    micro_batch: int = 2
    large_factor: int = 8
    layers: int = 2
    hidden: int = 64
    lr: float = 5e-3
    layouts: tuple[str, ...] = ("by-modality", "mixed")
    batches: tuple[str, ...] = ("base", "large")
    variants: tuple[str, ...] = tuple(v.label for v in FOLD_VARIANTS)


SMOKE_LOOKAHEAD = LookaheadPlan(
    steps=8,
    checkpoints=(1.0,),
    probe_batches=2,
    global_batch=16,
    large_factor=2,
    hidden=32,
    layouts=("by-modality",),
    batches=("base",),
    variants=("fop-chain-noeta-folded", "fop-last-eta-mean"),
)


@dataclass(frozen=True)
class Cell:
    """One lookahead cell: a layout and a batch size (its own SOAP run and checkpoints)."""

    plan: LookaheadPlan
    layout: str
    batch: str
    out: str
    threads: int = 1


def cell_spec(cell: Cell) -> RunSpec:
    """RunSpec of the cell's SOAP run (the large batch: more micro-steps, fewer steps)."""
    plan = cell.plan
    factor = plan.large_factor if cell.batch == "large" else 1
    return RunSpec(
        optimizer="soap",
        out=cell.out,
        steps=plan.steps // factor,
        global_batch=plan.global_batch * factor,
        micro_batch=plan.micro_batch,
        lr=plan.lr,
        seed=0,
        num_layers=plan.layers,
        hidden=plan.hidden,
        diag_every=0,
        threads=cell.threads,
        layout=cell.layout,
        # The SOAP these results were measured with (RESULTS.md): the reference's choices.
        soap_options=tuple(REFERENCE_SOAP.items()),
    )


def variant_spec(spec: RunSpec, label: str) -> RunSpec:
    """The spec of one update rule: plain mean (SOAP) or an ML-FOP-SOAP variant."""
    if label == PLAIN:
        return spec
    return variant_run_spec(spec, label)


def lookahead_worker(cell: Cell) -> dict[str, Any] | None:
    """One rank: the SOAP run with checkpoints, then every rule's step from each of them."""
    import torch.distributed as dist

    spec = cell_spec(cell)
    run = setup_run(spec)
    out, k = Path(spec.out), run.accumulation_steps
    marks = sorted({max(1, round(f * spec.steps)) for f in cell.plan.checkpoints})
    for step in range(spec.steps):
        train_step(run.model, run.optimizer, run.data, spec, step, k)
        if step + 1 in marks:
            save_checkpoint(out, f"soap_step{step + 1}", run.model, run.optimizer, step + 1, spec)
    rules = [PLAIN, *cell.plan.variants]
    built = {}
    for label in rules:
        vspec = variant_spec(spec, label)
        model = build_model(vspec, run.data)
        built[label] = (vspec, model, build_optimizer(vspec, model, k))
    records = []
    for mark in marks:
        for offset in range(cell.plan.probe_batches):
            step = min(mark + offset, spec.steps - 1)  # the samples of this step
            before = None
            for label in rules:
                vspec, model, optimizer = built[label]
                load_checkpoint(out, f"soap_step{mark}", model, optimizer)
                if before is None:
                    before = evaluate(model, run.data, vspec)
                train_step(model, optimizer, run.data, vspec, step, k)
                after = evaluate(model, run.data, vspec)
                records.append(
                    {
                        "checkpoint": mark,
                        "batch_step": step,
                        "rule": label,
                        **{f"d_{m}": after[f"val_{m}"] - before[f"val_{m}"] for m in MODALITIES},
                    }
                )
    if dist.get_rank() != 0:
        return None
    return {"layout": cell.layout, "batch": cell.batch, "k": k, "marks": marks, "records": records}


MODALITIES = ("image_loss", "text_loss")


def analyse_cell(result: dict[str, Any]) -> dict[str, Any]:
    """Per variant and modality: mean change, mean paired difference to plain, sign test."""
    records = result["records"]
    plain = {(r["checkpoint"], r["batch_step"]): r for r in records if r["rule"] == PLAIN}
    rules = sorted({r["rule"] for r in records}, key=lambda x: (x != PLAIN, x))
    out: dict[str, Any] = {}
    for rule in rules:
        mine = [r for r in records if r["rule"] == rule]
        entry: dict[str, Any] = {"pairs": len(mine)}
        for m in (*MODALITIES, "balanced"):
            change = [_delta(r, m) for r in mine]
            diff = [
                _delta(r, m) - _delta(plain[(r["checkpoint"], r["batch_step"])], m) for r in mine
            ]
            entry[m] = {
                "change": mean_std(change),
                "diff_vs_plain": mean_std(diff),
                "sign": sign_test(diff),
            }
        out[rule] = entry
    return out


def _delta(record: dict[str, Any], modality: str) -> float:
    if modality == "balanced":
        return 0.5 * (record["d_image_loss"] + record["d_text_loss"])
    return record[f"d_{modality}"]


def run_lookahead(
    plan: LookaheadPlan, out: Path, nproc: int, threads: int, timeout: float, log: Any = print
) -> dict[str, Any]:
    """Every cell of part (a), one spawned gloo world per cell."""
    from mlfop_megatron.runtime.spawn import run_distributed

    t0 = time.perf_counter()
    cells = {}
    for layout in plan.layouts:
        for batch in plan.batches:
            cell = Cell(plan, layout, batch, str(out / f"{layout}_{batch}"), threads)
            Path(cell.out).mkdir(parents=True, exist_ok=True)
            res = run_distributed(lookahead_worker, nproc, cell, timeout=timeout, threads=threads)[
                0
            ]
            res["analysis"] = analyse_cell(res)
            cells[f"{layout}|{batch}"] = res
            log(f"lookahead {layout} {batch}: {time.perf_counter() - t0:.0f} s")
    return {
        "plan": dict(plan.__dict__),
        "cells": cells,
        "wall_s": time.perf_counter() - t0,
    }


def lookahead_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows: per cell, rule and modality: mean change, paired diff, sign test."""
    lines = [
        "| layout | batch (K) | rule | modality | probe-loss change (mean ± std) "
        "| change - plain (mean ± std) | variant better / worse | sign-test p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, res in result["cells"].items():
        layout, batch = key.split("|")
        for rule, entry in res["analysis"].items():
            for m in (*MODALITIES, "balanced"):
                e = entry[m]
                ch, dv, sg = e["change"], e["diff_vs_plain"], e["sign"]
                verdict = "—" if rule == PLAIN else f"{sg['negative']} / {sg['positive']}"
                p = "—" if rule == PLAIN else f"{sg['p']:.3g}"
                lines.append(
                    f"| {layout} | {batch} ({res['k']}) | {rule} | {m.replace('_loss', '')} "
                    f"| {ch[0]:+.4g} ± {ch[1]:.2g} | {dv[0]:+.3g} ± {dv[1]:.2g} | {verdict} | {p} |"
                )
    return lines
