"""The run folder: metrics.csv / metrics.jsonl rows and the package's checkpoints."""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .spec import RunSpec


# ------------------------------------------------------------------------------- run folder
def clean(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one row per step to metrics.csv and metrics.jsonl (rank 0 only)."""

    def __init__(self, out: Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (missing columns are left empty / null)."""
        full = {c: clean(row.get(c)) for c in self.columns}
        with open(self.csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns).writerow(
                {k: "" if v is None else v for k, v in full.items()}
            )
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(full) + "\n")


def start_metric_files(out: Path, columns: Sequence[str]) -> None:
    """Create the run folder and fresh metric files with the CSV header."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as fh:
        csv.writer(fh).writerow(columns)
    (out / "metrics.jsonl").write_text("")


def checkpoint_dir(out: Path, name: str) -> Path:
    """The folder of one optimizer's checkpoints: ``<out>/checkpoint/<name>/``."""
    return out / "checkpoint" / name


def save_checkpoint(
    out: Path,
    name: str,
    model: Any,
    optimizer: Any,
    step: int,
    spec: RunSpec,
) -> Path:
    """Save model + optimizer with the package's dist_checkpointing save, then prune.

    ``mlfop_megatron.megatron.checkpointing.save_checkpoint`` writes ``iter_<step>`` through
    a temporary folder renamed when every rank is done and then moves the ``latest`` marker,
    so a crash never leaves a folder resume would trust; the checkpoint is reshardable (any DP
    size). Afterwards rank 0 removes every other entry (older checkpoints, temporary folders of
    killed saves), so one complete checkpoint is kept. ``spec`` goes to ``run.json`` beside it.
    """
    from mlfop_megatron.megatron.checkpointing import save_checkpoint as save

    root = checkpoint_dir(out, name)
    final = Path(save(str(root), model, optimizer, step))
    if dist.get_rank() == 0:
        (root / "run.json").write_text(json.dumps({"step": step, "spec": asdict(spec)}, indent=1))
        for entry in root.iterdir():
            if entry.name not in (final.name, "latest", "run.json"):
                shutil.rmtree(entry, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(out: Path, name: str, model: Any, optimizer: Any) -> int:
    """Load the latest complete checkpoint of ``name`` (any DP size); returns its step, else 0."""
    from mlfop_megatron.megatron.checkpointing import latest_checkpoint
    from mlfop_megatron.megatron.checkpointing import load_checkpoint as load

    path = latest_checkpoint(str(checkpoint_dir(out, name)))
    if path is None:
        return 0
    return load(path, model, optimizer)
