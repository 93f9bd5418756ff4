"""Where the ranks' step times part: each optimizer phase on the slowest and the fastest rank.

Reads the ``metrics.csv`` of timed runs (``python -m benchmarks.peers --timing N --out DIR``:
``DIR/runs/<row>|...|<seed>|<steps>/metrics.csv``) and prints, per row and phase, the median
over steps 3 on of the slowest rank's time (``time_<phase>_s``, max over ranks) and of the
fastest rank's (``time_<phase>_min_s``), with the median step time. A phase whose max and min
part is where one rank works longer than the other; communication's spread is the waiting.

    python -m benchmarks.phase_skew runs/t3
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

PHASES = ("update", "refresh", "communication", "fold")


def _column(rows: list[dict[str, str]], key: str) -> float | None:
    values = [float(r[key]) for r in rows[2:] if r.get(key) not in (None, "")]
    return 1e3 * statistics.median(values) if values else None


def run_table(runs_dir: Path) -> list[str]:
    """Markdown rows: run, step ms, then (max, min) ms of each phase, medians over steps 3+."""
    lines = [
        "| run | step | " + " | ".join(f"{p} max / min" for p in PHASES) + " |",
        "|---|---|" + "---|" * len(PHASES),
    ]
    for run in sorted(runs_dir.iterdir()):
        path = run / "metrics.csv"
        if not path.exists():
            continue
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if len(rows) < 3 or not rows[0].get("time_update_min_s"):
            continue  # Megatron's rows and runs logged before the min timers: no phases
        cells = [run.name, f"{_column(rows, 'step_time_s'):.0f}"]
        for phase in PHASES:
            hi, lo = _column(rows, f"time_{phase}_s"), _column(rows, f"time_{phase}_min_s")
            cells.append("-" if hi is None or lo is None else f"{hi:.1f} / {lo:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table for one ``--out`` folder of timed runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the --out folder of a benchmarks.peers --timing run")
    args = p.parse_args(argv)
    print("\n".join(run_table(args.out / "runs")))


if __name__ == "__main__":
    main()
