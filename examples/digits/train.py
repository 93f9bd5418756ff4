"""The training loop of one rank: setup, steps, checkpoints, preemption and the summary."""

from __future__ import annotations

import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlfop_megatron.launch.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER, PreemptionHandler
from mlfop_megatron.launch.telemetry import GPUTelemetry

from .data import DigitsData, num_micro_batches
from .devices import on_accelerator, torchrun_env, use_cuda
from .diagnostics import (
    grad_columns,
    level_columns,
    modality_cosine,
    optimizer_stats,
    request_grad_diagnostics,
)
from .model import build_model, build_optimizer, set_lr
from .optimizers import entry
from .rundir import MetricsWriter, load_checkpoint, save_checkpoint
from .spec import RunSpec, fold_levels, lr_at, metric_columns
from .steps import (
    eval_microbatches,
    modality_losses,
    objective_weights,
    run_schedule,
    train_microbatches,
)


# ---------------------------------------------------------------------------------- training
def make_progress(spec: RunSpec, start: int = 0) -> Any:
    """Tqdm bar on global rank 0 (None elsewhere, and with plain lines: log_every > 0)."""
    if dist.get_rank() != 0 or spec.log_every > 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=spec.steps,
        initial=start,
        desc=f"{spec.optimizer:>5}",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
    )


def train_step(
    model: Any,
    optimizer: Any,
    data: DigitsData,
    spec: RunSpec,
    step: int,
    k: int,
) -> tuple[torch.Tensor, bool, float]:
    """One optimizer step over k micro-batches: (modality sums, success, grad norm)."""
    set_lr(optimizer, lr_at(step, spec))
    model.zero_grad_buffer()
    optimizer.zero_grad()
    from megatron.core import parallel_state as ps

    weights = objective_weights(data, spec, step, ps.get_data_parallel_world_size())
    batches = train_microbatches(data, spec, step)
    sums = run_schedule(model, batches, k, spec, data.seq_length, weights=weights)
    success, grad_norm, _ = optimizer.step()
    return sums, bool(success), float("nan") if grad_norm is None else float(grad_norm)


def evaluate(model: Any, data: DigitsData, spec: RunSpec) -> dict[str, float]:
    """Validation loss overall and per modality (both tasks on every val image)."""
    batches = eval_microbatches(data, spec.micro_batch)
    model.eval()
    with torch.no_grad():
        sums = run_schedule(model, batches, len(batches), spec, data.seq_length, True)
    model.train()
    return {f"val_{k}": v for k, v in modality_losses(sums).items()}


def setup_rank(spec: RunSpec) -> None:
    """Megatron parallel state for this rank, seeded (torch.distributed is already up)."""
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel

    torch.set_num_threads(spec.threads)
    init_megatron_parallel(tp=spec.tp, pp=spec.pp, seed=spec.seed)


@dataclass
class Run:
    """One rank's training state: data, model, optimizer and running counters."""

    spec: RunSpec
    data: DigitsData
    model: Any
    optimizer: Any
    accumulation_steps: int
    levels: list[int]
    start: float = 0.0
    skipped: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    telemetry: GPUTelemetry = field(default_factory=GPUTelemetry)


def setup_run(spec: RunSpec) -> Run:
    """Parallel state, data, model (in its DDP) and optimizer for this rank."""
    from megatron.core import parallel_state as ps

    setup_rank(spec)
    data = DigitsData()
    dp = ps.get_data_parallel_world_size()
    k = num_micro_batches(spec.global_batch, spec.micro_batch, dp)
    model = build_model(spec, data)
    optimizer = build_optimizer(spec, model, k)
    return Run(spec, data, model, optimizer, k, fold_levels(spec, dp), time.perf_counter())


def run_step(run: Run, step: int) -> dict[str, Any]:
    """Diagnostics (every diag_every steps), one optimizer step, and its metrics row."""
    spec, seq = run.spec, run.data.seq_length
    cosine = float("nan")
    ours = entry(spec.optimizer).ours  # grad diagnostics and stats: ours only
    if spec.diag_every > 0 and (step % spec.diag_every == 0 or step == spec.steps - 1):
        cosine = modality_cosine(run.model, train_microbatches(run.data, spec, step), seq)
        if ours:
            request_grad_diagnostics(run.optimizer, spec.layout, run.accumulation_steps)
    t0 = time.perf_counter()
    sums, success, grad_norm = train_step(
        run.model, run.optimizer, run.data, spec, step, run.accumulation_steps
    )
    dt = time.perf_counter() - t0
    run.skipped += int(not success)
    run.stats = optimizer_stats(run.optimizer) if ours else {}
    return {
        "step": step + 1,
        "optimizer": spec.optimizer,
        **modality_losses(sums),
        "tokens_per_s": spec.global_batch * seq / dt,
        "grad_norm": grad_norm,
        "lr": lr_at(step, spec),
        "step_time_s": dt,
        "elapsed_s": time.perf_counter() - run.start,
        "skipped_steps": run.skipped,
        "modality_cosine": cosine,
        **level_columns(run.stats, run.levels),
        **grad_columns(run.stats),
        **{k: v for k, v in run.stats.items() if k.startswith("time_")},
        **run.telemetry.sample(),
    }


def train_worker(spec: RunSpec) -> dict[str, Any] | None:
    """Train one optimizer on this rank; rank 0 returns rows and a summary, others None.

    A SIGTERM/SIGUSR1 on any rank makes every rank stop after the same step, save a checkpoint
    and exit with REQUEUE_EXIT_CODE; with --resume the next run continues from it.
    """
    run = setup_run(spec)
    out, rank0 = Path(spec.out), dist.get_rank() == 0
    if rank0 and on_accelerator() and not use_cuda():
        print("strict device emulation: model and batches on emulated cuda; mixing fails")
    resume = spec.resume and entry(spec.optimizer).checkpoint_refusal is None
    start = load_checkpoint(out, spec.optimizer, run.model, run.optimizer) if resume else 0
    if start and torchrun_env():  # one line per rank: which node resumed from what
        print(
            f"rank {dist.get_rank()} on {socket.gethostname()}: resumed from "
            f"{out / 'checkpoint'} at step {start}",
            flush=True,
        )
    writer = MetricsWriter(out, metric_columns(run.levels)) if rank0 else None
    bar, rows = make_progress(spec, start), []
    preemption = PreemptionHandler()
    for step in range(start, spec.steps):
        row = run_step(run, step)
        if writer is not None:
            writer.write(row)
            rows.append(row)
            update_progress(bar, row)
            log_progress(spec, row)
        if preemption.stop_requested() or step + 1 == spec.stop_at_step:
            save_or_skip(run, out, step + 1)
            if torchrun_env():  # one line per rank: did the stop signal reach it?
                got = preemption.received
                print(
                    f"rank {dist.get_rank()} on {socket.gethostname()}: stop signal "
                    f"{signal.Signals(got).name if got else 'not received here'}, "
                    f"checkpoint at step {step + 1} saved",
                    flush=True,
                )
            if rank0:
                # The batch script requeues when this marker exists, whatever exit codes srun
                # reports (it may kill the slower rank once the first one has exited).
                (out / REQUEUE_MARKER).write_text(f"{step + 1}\n")
                print(
                    f"\npreempted: checkpoint at step {step + 1}, exiting for requeue",
                    file=sys.stderr,
                    flush=True,
                )
            dist.barrier()
            raise SystemExit(REQUEUE_EXIT_CODE)
        if spec.save_interval and (step + 1) % spec.save_interval == 0:
            save_or_skip(run, out, step + 1)
    preemption.restore()
    train_time = time.perf_counter() - run.start
    if bar is not None:
        bar.close()
    final = evaluate(run.model, run.data, spec)
    if not (spec.save_interval and spec.steps % spec.save_interval == 0):  # else saved already
        save_or_skip(run, out, spec.steps)
    if not rank0:
        return None
    return {"rows": rows, "summary": summarize(spec, rows, final, train_time, run.stats)}


def save_or_skip(run: Run, out: Path, step: int) -> None:
    """Save the checkpoint of ``step``; for optimizers the demo cannot checkpoint, say why."""
    refusal = entry(run.spec.optimizer).checkpoint_refusal
    if refusal is None:
        save_checkpoint(out, run.spec.optimizer, run.model, run.optimizer, step, run.spec)
    elif dist.get_rank() == 0:
        print(f"{run.spec.optimizer}: no checkpoint saved at step {step}: {refusal}", flush=True)


def update_progress(bar: Any, row: dict[str, Any]) -> None:
    """Advance the rank-0 bar with step, per-modality loss and throughput."""
    if bar is None:
        return
    bar.set_postfix_str(
        f"img {row['image_loss']:.3f} txt {row['text_loss']:.3f} {row['tokens_per_s']:,.0f} tok/s",
        refresh=False,
    )
    bar.update(1)


def log_progress(spec: RunSpec, row: dict[str, Any]) -> None:
    """Plain progress line every spec.log_every steps (and at the last step); rank 0 only."""
    step = row["step"]
    if spec.log_every <= 0 or (step % spec.log_every and step != spec.steps):
        return
    print(
        f"  [{spec.optimizer} seed {spec.seed}] step {step}/{spec.steps} "
        f"loss {row['loss']:.4f} img {row['image_loss']:.4f} txt {row['text_loss']:.4f} "
        f"{row['tokens_per_s']:,.0f} tok/s {row['elapsed_s']:.0f} s",
        flush=True,
    )


def summarize(
    spec: RunSpec,
    rows: list[dict[str, Any]],
    final: dict[str, float],
    train_time: float,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Final numbers of one run: train losses (mean of the last 10% of steps), val, speed."""
    tail = rows[-max(1, len(rows) // 10) :]
    out = {
        "optimizer": spec.optimizer,
        "steps": spec.steps,
        "lr": spec.lr,
        "train_time_s": train_time,
        "tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:]) / max(1, len(rows) - 1),
        "skipped_steps": rows[-1]["skipped_steps"] if rows else 0,
        "eigh_failures": stats.get("eigh_failures", 0),
        "qr_failures": stats.get("qr_failures", 0),
        "refreshes_done": stats.get("refreshes_done", 0),
        "refreshes_skipped": stats.get("refreshes_skipped", 0),
    }
    for key in ("loss", "image_loss", "text_loss"):
        out[f"first_{key}"] = rows[0][key] if rows else float("nan")
        out[f"final_{key}"] = sum(r[key] for r in tail) / len(tail) if tail else float("nan")
    return {**out, **final}
