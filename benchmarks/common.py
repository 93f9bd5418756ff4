"""Shared helpers of the benchmark scripts: machine facts, package versions, RESULTS.md sections.

The benchmarks are modules of the ``benchmarks`` package, run from the repository root:
``python -m benchmarks.step_time`` (the root on ``sys.path`` also makes ``tests.support`` and
``examples`` importable).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_T0 = time.perf_counter()  # when the first benchmark module imported this one


def elapsed() -> float:
    """Seconds since the benchmark process started (since this module was imported)."""
    return time.perf_counter() - _T0


def log(msg: str) -> None:
    """Progress line with the benchmark's elapsed time."""
    print(f"[{elapsed():7.1f} s] {msg}", flush=True)


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn`` (garbage collection paused)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def package_version(name: str) -> str:
    """Installed version of a distribution ('not installed' when missing)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the machine architecture where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1/5/15-minute load averages, 'a/b/c'."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_facts(*extras: str) -> str:
    """CPU, core count, torch and Python versions, ``extras``, and the load average now."""
    import torch

    parts = [
        cpu_model(),
        f"nproc={os.cpu_count()}",
        f"torch {torch.__version__}",
        f"Python {platform.python_version()}",
        *extras,
        f"load average {load_average()}",
    ]
    return ", ".join(parts)


def replace_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the section whose heading line is ``section``, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == section), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        after = "\n".join(lines[end:])
        new = "\n".join(lines[:start]) + ("\n" if start else "") + body.rstrip("\n") + "\n"
        if after:
            new += "\n" + after + "\n"
    path.write_text(new)
