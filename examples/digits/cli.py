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
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="mlfop")
    p.add_argument(
        "--micro-batch-layout",
        choices=LAYOUTS,
        default="mixed",
        help="mixed: micro-batches mix both tasks at random; by-modality: one task per "
        "micro-batch, image first half of each step, text second half",
    )
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: per optimizer)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compare", action="store_true", help="train mlfop, soap and adamw in turn")
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


def specs_from_args(args: argparse.Namespace, world_size: int) -> list[RunSpec]:
    """One RunSpec per optimizer to train (three with --compare)."""
    preset = QUICK if args.quick else DEFAULTS
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    dp = world_size // (args.tp * args.pp)
    if dp < 1 or world_size % (args.tp * args.pp):
        raise SystemExit(f"world size {world_size} is not a multiple of tp*pp={args.tp * args.pp}")
    k = num_micro_batches(size["global_batch"], size["micro_batch"], dp)  # raises unless divides
    if args.micro_batch_layout == "by-modality":
        try:
            modality_tasks(k)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    names = OPTIMIZERS if args.compare else (args.optimizer,)
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
