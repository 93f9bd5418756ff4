"""Folds off the critical path: a level's fold on a side CUDA stream (``CommConfig.fold_stream``).

At a level boundary the optimizer waits for the previous level's reduction and folds it; by
default the fold's kernels go on the current stream, in front of the next micro-step's forward
and backward. With a side stream the fold overlaps them. What makes it safe:

1. the fold reads the reduction's output only once the collective is done: ``Work.wait()``
   makes the current stream wait for the collective, and the side stream waits for the current
   stream (``wait_stream``) before the fold is launched on it;
2. the buffers the fold reads (the reduce-scatter output and its views) are not handed to
   another tensor before the fold finished: ``record_stream`` tells the caching allocator they
   are in use on the side stream (the next level packs into a fresh buffer);
3. the step does not read the folded window before every fold finished: ``join`` makes the
   current stream wait for the side stream (prepare_grads, discard_step).

Folds of successive levels run in order on the one side stream, so the fold state (the
window folder) is never touched by two folds at once; nothing else touches it between the
boundaries. The host does not wait for anything (no synchronize): the per-micro-step path
stays free of host syncs.

On CPU (gloo, and the CPU emulation of megatron-core) there are no streams: every kernel runs
synchronously on the calling thread, so the fold runs inline and overlaps nothing on this
machine; the reductions themselves still overlap (gloo runs async collectives on its own
threads). Under the strict device emulation (tensors report cuda:0) the side stream is the
emulation's no-op stream, which exercises the code path, not the overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class FoldStream:
    """Runs folds on a side stream when ``enabled`` and the device is CUDA, else inline."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = bool(enabled) and device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.enabled else None
        self.device = device
        # The CPU emulation's streams have no caching allocator behind them: no record_stream.
        self._allocator_streams = self.enabled and torch.cuda.is_available()
        self._launched = False

    def run(self, fold: Callable[[], None], inputs: Callable[[], Sequence[torch.Tensor]]) -> None:
        """Launch ``fold`` (which reads ``inputs()``) after the current stream's work so far.

        ``inputs()``: every current-stream tensor the fold reads, also those it drops (an
        engine's ``fold_reads()``: earlier segments, diagnostics sums). Called only for a side
        stream, before the launch (``record_stream`` acts when a tensor is freed, so marking it
        first is the same), and not kept: inline, nothing here holds what the fold frees (the
        level's received segment, once the fold has copied it).
        """
        if self.stream is None:
            fold()
            return
        if self._allocator_streams:
            for t in inputs():  # 2: not reused before the fold finished
                t.record_stream(self.stream)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # 1: the reduction's output is complete
        with torch.cuda.stream(self.stream):
            fold()
        self._launched = True

    def join(self) -> None:
        """Make the current stream wait for every fold launched so far (3)."""
        if self.stream is not None and self._launched:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._launched = False

    @property
    def pending(self) -> bool:
        """Whether folds were launched on the side stream since the last join."""
        return self._launched
