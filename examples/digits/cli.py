"""Command line of the digits demo: flags, run specs, launch (spawned gloo ranks or torchrun)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlfop_megatron.config import FOLD_STRUCTURES, STATISTICS_SOURCES, STEP_SIZES
from mlfop_megatron.launch.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER

from .data import LAYOUTS, modality_tasks, num_micro_batches
from .devices import torchrun_env, use_cuda
from .optimizers import TABLE, available
from .rundir import clean, start_metric_files
from .spec import DEFAULT_LR, DEFAULTS, OPTIMIZERS, QUICK, RunSpec, fold_levels, metric_columns
from .train import train_worker


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn (CPU, no torchrun)")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (300; quick 30)")
    p.add_argument(
        "--global-batch", type=int, default=None, help="samples per optimizer step (32; quick 16)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="samples per micro-batch and DP rank (4; quick 2)",
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="mlfop",
        help="; ".join(f"{n}: {e.description}" for n, e in TABLE.items()),
    )
    p.add_argument(
        "--micro-batch-layout",
        choices=LAYOUTS,
        default="by-modality",
        help="by-modality (default: the layout in which grad.png's modality panels show "
        "something): one task per micro-batch, image first half of each step, text second "
        "half; mixed: micro-batches mix both tasks at random",
    )
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: per optimizer)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--compare",
        action="store_true",
        help="train every optimizer installed here in turn (peers without their requirement "
        "are skipped with the reason)",
    )
    p.add_argument("--quick", action="store_true", help="tiny run for CI (seconds)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (4; quick 2)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (128; quick 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument(
        "--diag-every",
        type=int,
        default=None,
        help="steps between inter-modality gradient cosines (10; quick 3; 0: never)",
    )
    p.add_argument(
        "--save-interval",
        type=int,
        default=0,
        help="also checkpoint every N steps (0: only at the end)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from checkpoint/<optimizer>/ when it exists (preemption-safe "
        "restarts; SIGTERM/SIGUSR1 save a checkpoint at the next step and exit "
        f"with code {REQUEUE_EXIT_CODE} for the batch script to requeue)",
    )
    p.add_argument(
        "--no-project",
        action="store_true",
        help="mlfop ablation: fold without the Fisher-orthogonal projection (s = 0)",
    )
    p.add_argument(
        "--fixed-beta",
        type=float,
        default=None,
        help="mlfop ablation: fixed fold weight beta instead of the adaptive one",
    )
    p.add_argument(
        "--fold-structure",
        choices=FOLD_STRUCTURES,
        default="chain",
        help="mlfop: which estimates are folded (FoldingConfig.structure): chain of levels, "
        "balanced tree, or last (one half-vs-half fold: FOP as published)",
    )
    p.add_argument(
        "--step-size",
        choices=STEP_SIZES,
        default="none",
        help="mlfop: FOP's per-block step size eta* (eta_star) or none (FoldingConfig.step_size)",
    )
    p.add_argument(
        "--statistics-from",
        choices=STATISTICS_SOURCES,
        default="folded",
        help="mlfop: SOAP's second moment and Kronecker factors from the folded gradient or "
        "from the plain mean (FoldingConfig.statistics_from)",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=0,
        help="print a plain progress line every N steps instead of the bar (0: bar)",
    )
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=0,
        help="behave as if preempted after this step (tests the requeue path)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="spawned-run timeout (s)")
    p.add_argument("--verbose", action="store_true", help="keep library warnings")
    return p.parse_args(argv)


# Flags that must be >= 1 / >= 0 (None: the preset's value).
POSITIVE_FLAGS = ("steps", "global_batch", "micro_batch", "layers", "hidden", "heads", "tp", "pp")
NON_NEGATIVE_FLAGS = ("diag_every", "save_interval", "log_every", "stop_at_step")


def flag(name: str) -> str:
    """``--global-batch`` for ``global_batch``."""
    return "--" + name.replace("_", "-")


def check_flags(args: argparse.Namespace, world_size: int) -> None:
    """Refuse impossible sizes with one line naming the option and the fix (SystemExit)."""
    if not torchrun_env() and args.nproc < 1:
        raise SystemExit(f"--nproc {args.nproc}: the number of ranks to spawn must be >= 1")
    for name in POSITIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"{flag(name)} {value}: must be >= 1")
    for name in NON_NEGATIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise SystemExit(f"{flag(name)} {value}: must be >= 0 (0: off)")
    if args.lr is not None and not args.lr > 0:
        raise SystemExit(f"--lr {args.lr}: must be > 0")
    if world_size % (args.tp * args.pp):
        raise SystemExit(
            f"world size {world_size} is not a multiple of --tp {args.tp} x --pp {args.pp}: "
            "change --nproc (or the launcher's ranks), --tp or --pp"
        )


def optimizer_names(args: argparse.Namespace) -> list[str]:
    """The optimizers to train: --optimizer, or every one installed here with --compare.

    A requested optimizer whose requirement is absent ends the run with the reason; --compare
    skips those with a printed reason. Megatron's peers save no checkpoints: --resume,
    --save-interval and --stop-at-step are refused for them (skipped with --compare).
    """
    wants_checkpoints = args.resume or args.save_interval or args.stop_at_step
    if not args.compare:
        entry = TABLE[args.optimizer]
        reason = entry.missing()
        if reason is not None:
            raise SystemExit(f"--optimizer {args.optimizer} cannot run here: {reason}")
        if wants_checkpoints and entry.checkpoint_refusal:
            raise SystemExit(
                f"--optimizer {args.optimizer} with --resume / --save-interval / "
                f"--stop-at-step: {entry.checkpoint_refusal}; drop those flags"
            )
        return [args.optimizer]
    names, skipped = available()
    if wants_checkpoints:
        for name in list(names):
            refusal = TABLE[name].checkpoint_refusal
            if refusal:
                names.remove(name)
                skipped[name] = refusal
    for name, reason in skipped.items():
        print(f"--compare: skipping {name}: {reason}", flush=True)
    return names


def specs_from_args(args: argparse.Namespace, world_size: int) -> list[RunSpec]:
    """One RunSpec per optimizer to train (every available one with --compare)."""
    check_flags(args, world_size)
    preset = QUICK if args.quick else DEFAULTS
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    dp = world_size // (args.tp * args.pp)
    try:
        k = num_micro_batches(size["global_batch"], size["micro_batch"], dp)
    except ValueError:
        raise SystemExit(
            f"--global-batch {size['global_batch']} is not a multiple of --micro-batch "
            f"{size['micro_batch']} x data-parallel size {dp}: choose a global batch divisible "
            f"by {size['micro_batch'] * dp}"
        ) from None
    if args.micro_batch_layout == "by-modality":
        try:
            modality_tasks(k)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    names = optimizer_names(args)
    threads = max(1, (os.cpu_count() or 1) // max(1, world_size))
    base = RunSpec(
        optimizer=names[0],
        out=str(args.out),
        steps=size["steps"],
        global_batch=size["global_batch"],
        micro_batch=size["micro_batch"],
        lr=0.0,
        seed=args.seed,
        tp=args.tp,
        pp=args.pp,
        num_layers=size["layers"],
        hidden=size["hidden"],
        heads=args.heads,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        diag_every=size["diag_every"],
        save_interval=args.save_interval,
        threads=threads,
        resume=args.resume,
        stop_at_step=args.stop_at_step,
        fold_project=not args.no_project,
        fold_fixed_beta=args.fixed_beta,
        log_every=args.log_every,
        layout=args.micro_batch_layout,
        fold_structure=args.fold_structure,
        step_size=args.step_size,
        statistics_from=args.statistics_from,
    )
    return [replace(base, optimizer=n, lr=args.lr or DEFAULT_LR[n]) for n in names]


# ------------------------------------------------------------------------------------ launch
def init_from_env() -> None:
    """torch.distributed from the launcher's env: NCCL on GPUs (gloo + emulation on CPU)."""
    if "LOCAL_RANK" not in os.environ and "SLURM_LOCALID" in os.environ:
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        from mlfop_megatron.runtime.cpu_emulation import install_cpu_emulation

        install_cpu_emulation()
        dist.init_process_group("gloo")


def run_all(specs: list[RunSpec], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train every spec in turn; returns rank 0's results (an empty list on other ranks)."""
    results = []
    if torchrun_env():
        init_from_env()
        for spec in specs:
            res = train_worker(spec)
            if res is not None:
                results.append(res)
        dist.destroy_process_group()
        return results
    if use_cuda():
        raise SystemExit(
            "on GPUs launch with torchrun/srun (e.g. torchrun --nproc-per-node 8 "
            "examples/train_digits.py ...); --nproc spawns CPU gloo ranks only"
        )
    from mlfop_megatron.runtime.spawn import run_distributed

    for spec in specs:
        res = run_distributed(
            train_worker, args.nproc, spec, timeout=args.timeout, threads=spec.threads
        )
        results.append(res[0])
    return results


SUMMARY_COLUMNS = (
    ("optimizer", "{}"),
    ("steps", "{}"),
    ("lr", "{:.0e}"),
    ("final_image_loss", "{:.4f}"),
    ("final_text_loss", "{:.4f}"),
    ("val_image_loss", "{:.4f}"),
    ("val_text_loss", "{:.4f}"),
    ("tokens_per_s", "{:,.0f}"),
    ("train_time_s", "{:.1f}"),
    ("skipped_steps", "{}"),
)


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """Fixed-width text table of the per-optimizer summaries."""
    header = [name for name, _ in SUMMARY_COLUMNS]
    body = [[fmt.format(s[name]) for name, fmt in SUMMARY_COLUMNS] for s in summaries]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def finish(out: Path, results: list[dict[str, Any]], wall: float) -> None:
    """Plots, summary.json and the printed summary table (rank 0 / the launcher)."""
    from .plots import make_plots

    rows = [r for res in results for r in res["rows"]]
    pngs = make_plots(rows, out)
    summaries = [res["summary"] for res in results]
    payload = {"wall_time_s": wall, "runs": summaries}
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=clean))
    print("\n" + summary_table(summaries))
    print(
        f"\nwall time {wall:.1f} s; run folder {out}: metrics.csv, metrics.jsonl, "
        f"checkpoint/, {', '.join(p.name for p in pngs)}, summary.json"
    )


def quiet_warnings() -> None:
    """Hide the library UserWarnings (no TE/apex on CPU, deprecations) here and in the ranks."""
    import warnings

    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, train, write the run folder."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    if not args.verbose:
        quiet_warnings()
    world = int(os.environ["WORLD_SIZE"]) if torchrun_env() else args.nproc
    specs = specs_from_args(args, world)
    out = Path(args.out)
    is_rank0 = not torchrun_env() or int(os.environ["RANK"]) == 0
    resuming = args.resume and (out / "metrics.csv").exists()
    if is_rank0 and not resuming:
        start_metric_files(out, metric_columns(fold_levels(specs[0], world // (args.tp * args.pp))))
    if is_rank0:
        (out / REQUEUE_MARKER).unlink(missing_ok=True)
    try:
        results = run_all(specs, args)
    except RuntimeError:
        if (out / REQUEUE_MARKER).exists():  # spawned ranks stopped for a "preemption"
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        raise
    if is_rank0:
        finish(out, results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
