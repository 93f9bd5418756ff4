"""The run folder: metrics.csv / metrics.jsonl rows and the per-rank atomic checkpoint."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
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


def save_checkpoint(
    out: Path,
    name: str,
    model: Any,
    optimizer: Any,
    step: int,
    spec: RunSpec,
) -> Path:
    """torch.save model + optimizer state of every rank into checkpoint/<name>/, atomically.

    Ranks write ``rank_XXXXX.pt`` into a temporary sibling folder, then rank 0 swaps it in with
    a rename, so a crash never leaves a half-written checkpoint/<name>/ behind. All ranks need
    the same filesystem (one node, or a shared one under Slurm). Optimizer state is sharded by
    block over DP, so every rank's file is needed to resume.
    """
    root = out / "checkpoint"
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    payload = {
        "step": step,
        "spec": asdict(spec),
        "model": model.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rank": rank,
        "world_size": dist.get_world_size(),
    }
    part = tmp / f"rank_{rank:05d}.pt.part"
    torch.save(payload, part)
    os.replace(part, tmp / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {
            "step": step,
            "optimizer": name,
            "world_size": dist.get_world_size(),
            "tp": spec.tp,
            "pp": spec.pp,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # else .old (if any) is the latest complete one: keep it until
            shutil.rmtree(old, ignore_errors=True)  # the new checkpoint is in place
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(out: Path, name: str, model: Any, optimizer: Any) -> int:
    """Load this rank's part of the latest complete checkpoint; returns its step, else 0.

    checkpoint/<name>/ is the latest; a save killed between its two renames leaves only the
    previous one, as .<name>.old/. A folder without meta.json (written last) is never used.
    """
    root = out / "checkpoint"
    complete = [d for d in (root / name, root / f".{name}.old") if (d / "meta.json").exists()]
    if not complete:
        return 0
    final = complete[0]
    meta = json.loads((final / "meta.json").read_text())
    if meta["world_size"] != dist.get_world_size():
        raise SystemExit(
            f"checkpoint {final} was written by {meta['world_size']} ranks; resume with the "
            f"same layout (this job has {dist.get_world_size()} ranks)"
        )
    payload = torch.load(final / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
    model.module.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["step"])
