"""Preemption-safe training: turn SIGTERM/SIGUSR1 into a checkpoint at the next step boundary.

Slurm sends a signal before killing a job (``--signal=B:USR1@120`` to the batch shell, which
forwards it, or SIGTERM at cancel/preemption). The handler only sets a flag; the training loop
asks ``stop_requested()`` at each step boundary, where the flag is max-reduced over all ranks so
every rank stops after the same step, saves, and exits for Slurm to requeue.

Saves run inside :func:`mlfop_megatron.launch.stop_signals.stop_signals_blocked`, so that a
signal Slurm sends to every process of the job cannot kill the save's helper processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable

import torch
import torch.distributed as dist

from mlfop_megatron.distributed.collective_device import collective_device
from mlfop_megatron.launch.stop_signals import STOP_SIGNALS

REQUEUE_EXIT_CODE = 3  # the trainer's exit code after a preemption checkpoint
REQUEUE_MARKER = "requeue.flag"  # written into the run dir after that checkpoint is complete


class PreemptionHandler:
    """Records that a stop signal arrived; never does work inside the signal handler."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = signum

    def stop_requested(self) -> bool:
        """True on every rank if any rank got a signal (a collective when distributed)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=collective_device())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def requeue_slurm_job() -> bool:
    """Ask Slurm to requeue this job (no-op outside Slurm); returns whether it was asked."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
