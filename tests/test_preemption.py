"""A real signal sets the stop flag; the flag is agreed on by every rank."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

from mlfop_megatron.launch.preemption import PreemptionHandler
from mlfop_megatron.runtime.spawn import run_distributed


def test_signal_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler()
    try:
        assert not handler.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received == signal.SIGUSR1 and handler.stop_requested()
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def _one_rank_signalled():
    handler = PreemptionHandler()
    first = handler.stop_requested()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return first, handler.stop_requested()


def test_stop_is_agreed_across_ranks():
    results = run_distributed(_one_rank_signalled, 2, emulate_cuda=False)
    assert results == [(False, True), (False, True)]
