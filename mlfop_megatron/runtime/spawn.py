"""Run a function in N spawned gloo processes: the CPU launcher of the demo, benchmarks, tests.

``run_distributed(fn, world_size, *args)`` starts one fresh process per rank, initialises a
gloo world on a free 127.0.0.1 port, calls ``fn(*args)`` and returns every rank's return value
in rank order. A rank that raises, dies, or a run that
exceeds ``timeout`` stops all ranks and raises :class:`DistributedRunError` with the failing
rank's traceback.

Processes never fork the (possibly multi-threaded) caller: the default start method is
``forkserver`` with torch and megatron-core preloaded into the server, so each launch after
the first costs ~0.1 s instead of a ~4 s megatron import per rank; ``spawn`` is the fallback.
Either way ``fn`` and its arguments must be picklable (module-level functions) and scripts
need an ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlfop_megatron.runtime.megatron_parallel import destroy_megatron_parallel

# Imported once by the forkserver and inherited by every rank it forks (missing ones are
# skipped by multiprocessing). Fixed when the server starts: the first launch of a process.
FORKSERVER_PRELOAD: tuple[str, ...] = (
    "torch",
    "torch.distributed",
    "mlfop_megatron.runtime.spawn",
    "mlfop_megatron.runtime.cpu_emulation",
    # The slow import every Megatron run pays (~4 s); what the functions run here build on.
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
)


def default_start_method(real_cuda: bool = False) -> str:
    """$MLFOP_MP_START_METHOD, else 'spawn' for ranks on real GPUs, else 'forkserver'.

    ``real_cuda``: the ranks use the machine's GPUs (no CPU emulation). They must not be
    forked from a server that imported megatron's GPT model: that imports TransformerEngine,
    which initialises CUDA where flash-attn is installed (NGC images), and a process forked
    after CUDA initialised fails at its first CUDA call (``set_device``).
    """
    if os.environ.get("MLFOP_MP_START_METHOD"):
        return os.environ["MLFOP_MP_START_METHOD"]
    if real_cuda:
        return "spawn"
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def _context(start_method: str | None, real_cuda: bool = False) -> Any:
    """Multiprocessing context for ``start_method`` (forkserver gets the preload list)."""
    method = start_method or default_start_method(real_cuda)
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return ctx


class DistributedRunError(RuntimeError):
    """A spawned rank failed, died or timed out; the message carries its traceback."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    results: Any,
    threads: int,
    emulate_cuda: bool,
    pg_timeout_s: float,
    strict_device: bool = False,
) -> None:
    """Per-rank entry point: set up the gloo world, run fn, report result or traceback."""
    try:
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)
        if emulate_cuda:
            from mlfop_megatron.runtime.cpu_emulation import install_cpu_emulation

            install_cpu_emulation(strict=strict_device)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        # Plain pickle (not the queue's ForkingPickler) so tensors travel by value, not by
        # shared-memory handles that die with this process.
        message: tuple[int, bool, bytes | str] = (rank, True, pickle.dumps(fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        message = (rank, False, traceback.format_exc())
    results.put(message)
    with contextlib.suppress(Exception):
        destroy_megatron_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (inherited by processes started inside)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads: int = 1,
    emulate_cuda: bool = True,
    start_method: str | None = None,
    strict_device: bool | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the results in rank order.

    Inside ``fn`` use ``torch.distributed.get_rank()`` for the rank. ``emulate_cuda`` installs
    :mod:`mlfop_megatron.runtime.cpu_emulation` in every rank before the world is created.
    ``threads`` is each rank's torch/OpenMP thread count (keep ranks x threads <= cores).
    ``start_method``: 'forkserver' (default where available) or 'spawn' (default for ranks
    on real GPUs: ``emulate_cuda=False`` with CUDA available, see ``default_start_method``).
    ``strict_device``: emulate with strict device checking (see
    :mod:`mlfop_megatron.runtime.strict_device`); None reads $MLFOP_STRICT_DEVICE here.
    """
    if strict_device is None:
        from mlfop_megatron.runtime.strict_device import env_enabled

        strict_device = env_enabled()
    ctx = _context(start_method, real_cuda=not emulate_cuda and torch.cuda.is_available())
    results = ctx.Queue()
    port = find_free_port()
    procs = []
    with _env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)):
        for rank in range(world_size):
            p = ctx.Process(
                target=_child,
                args=(
                    fn,
                    rank,
                    world_size,
                    port,
                    args,
                    results,
                    threads,
                    emulate_cuda,
                    timeout,
                    strict_device,
                ),
                daemon=False,  # dist_checkpointing starts writer processes; cleanup below
            )
            p.start()
            procs.append(p)
    try:
        outputs = _collect(procs, results, timeout)
        for p in procs:
            p.join(timeout=5)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        results.close()
    return [outputs[r] for r in range(world_size)]


def _collect(procs: list[Any], results: Any, timeout: float) -> dict[int, Any]:
    """Gather every rank's result; on failure wait briefly for the others' reports, then raise.

    Ranks that died without a report (crash, os._exit, kill) are listed first: the errors of the
    survivors are usually just broken collectives caused by them.
    """
    n = len(procs)
    outputs: dict[int, Any] = {}
    died: dict[int, str] = {}
    failed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    grace_end: float | None = None
    while len(outputs) + len(died) + len(failed) < n:
        now = time.monotonic()
        if now > deadline or (grace_end is not None and now > grace_end):
            break
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            for rank, p in enumerate(procs):
                if rank in outputs or rank in failed or rank in died:
                    continue
                if p.exitcode not in (None, 0):
                    died[rank] = f"died with exit code {p.exitcode} without reporting"
            if died and grace_end is None:
                grace_end = time.monotonic() + 1.0
            continue
        if ok:
            outputs[rank] = pickle.loads(payload)
        else:
            failed[rank] = payload
            grace_end = grace_end or time.monotonic() + 1.0
    if len(outputs) == n:
        return outputs
    lines = [f"{n - len(outputs)} of {n} ranks did not succeed"]
    lines += [f"--- rank {r}: {msg}" for r, msg in died.items()]
    lines += [f"--- rank {r} raised:\n{tb}" for r, tb in failed.items()]
    missing = sorted(set(range(n)) - set(outputs) - set(died) - set(failed))
    if missing:
        lines.append(f"--- ranks {missing}: no report within the {timeout:.0f}s timeout")
    raise DistributedRunError("\n".join(lines))
