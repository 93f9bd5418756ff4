"""Shared helpers of the benchmark scripts: RESULTS.md sections and machine facts."""

from __future__ import annotations

import platform
from pathlib import Path


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


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (the machine architecture where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
