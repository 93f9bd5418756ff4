"""The signals that stop a training run, and blocking them while a save starts helper processes.

Slurm signals every process of a job step, not only the ranks: preemption (SIGTERM),
``scancel --full``, the time-limit signal the batch shell forwards. A checkpoint save starts
helper processes (megatron-core's torch_dist writer spawns a multiprocessing Manager that it keeps
for later saves, and forks writers); they have no handler, so such a signal kills them and the
save, often the very preemption checkpoint, fails. Started inside :func:`stop_signals_blocked`
they inherit the signals blocked. A save that hangs is still ended by the SIGKILL Slurm sends
KillWait (or the preemption GraceTime) after the signal. Pure: no torch import (the Megatron-LM
entry imports it early).
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_signals_blocked(signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread inside the block; helpers started inside keep them blocked.

    Processes started inside inherit the block (the mask survives fork and exec), so a stop
    signal sent to every process of the job cannot kill a save's helper processes. This thread
    gets a signal that arrived meanwhile when the block ends. In this process another thread
    (gloo's, NCCL's) may still take it at once: with a Python handler installed (the ranks'
    stop handlers only set a flag) that is harmless; without one the process ends as before.
    """
    wanted = set(signals)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        # Every spawn makes sure multiprocessing's resource tracker runs; starting it, CPython
        # blocks SIGINT/SIGTERM around the spawn and then *unblocks* them (bpo-33613), which
        # would drop SIGTERM from this block for every later helper. Start (or check) it here,
        # inside the block, and block again: later spawns find it alive and leave the mask.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
