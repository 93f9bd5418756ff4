"""Slurm end to end: sbatch the CPU-mode job, preempt it mid-run, check the requeued job resumes
and ends with exactly the parameters of an uninterrupted run.

Needs a running Slurm (CI starts one with slurm/start_local_slurm.sh); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 150


def _slurm_ready() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "alloc"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _slurm_ready(),
        reason="no running Slurm here (start one with: sudo slurm/start_local_slurm.sh; CI does)",
    ),
]


def _submit(run_dir: Path) -> str:
    env = dict(os.environ, RUN_DIR=str(run_dir), MLFOP_MODE="cpu", PYTHON=sys.executable,
               TRAIN_ARGS=f"--quick --steps {STEPS}")
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
           "--cpus-per-task=1", f"--output={run_dir}.out", "slurm/pretrain.sbatch"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                          text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(job: str, until, timeout: float = 400.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(job)
        if until(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            raise AssertionError(f"job {job} ended {info.get('JobState')}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} timed out in state {_job(job).get('JobState')}")


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def _final_model(run_dir: Path, rank: int) -> dict:
    payload = torch.load(run_dir / "checkpoint" / "mlfop" / f"rank_{rank:05d}.pt",
                         weights_only=False)
    assert payload["step"] == STEPS
    return payload["model"]


def test_preempted_job_requeues_resumes_and_matches_uninterrupted(tmp_path):
    clean_dir, preempted_dir = tmp_path / "clean", tmp_path / "preempted"
    clean = _submit(clean_dir)
    job = _submit(preempted_dir)
    deadline = time.monotonic() + 300
    while _rows(preempted_dir) < 20:  # mid-run: some steps done, most still to go
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    subprocess.run(["scancel", "--full", "--signal=USR1", job], check=True)

    def completed_after_requeue(info: dict[str, str]) -> bool:
        # Slurm holds a requeued job (BeginTime) before it is eligible again; start it now.
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=False)
        return info.get("JobState") == "COMPLETED" and info.get("Restarts", "0") != "0"

    _wait(job, completed_after_requeue)
    _wait(clean, lambda i: i.get("JobState") == "COMPLETED")

    log = Path(f"{preempted_dir}.out").read_text()
    match = re.search(r"preempted: checkpoint at step (\d+)", log)
    assert match and 0 < int(match.group(1)) < STEPS, log[-3000:]
    assert "restart 1" in log and "asked for a requeue" in log
    assert _rows(preempted_dir) == STEPS  # metrics continue, no step lost or repeated
    for rank in (0, 1):
        a, b = _final_model(clean_dir, rank), _final_model(preempted_dir, rank)
        assert a.keys() == b.keys()
        for key, value in a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[key]), key
