"""Slurm end to end: preempt a CPU-mode job and check its requeued run.

Submits the CPU-mode job with sbatch, preempts it mid-run, checks that the requeued job resumes
and ends with exactly the parameters of an uninterrupted run. Two ways to preempt: the stop
signal (``scancel --full --signal=USR1``: what ``--signal=B:USR1@180`` sends before the time
limit) and Slurm's own preemption (a job of the higher-tier ``urgent`` partition takes the node:
SIGTERM to the job's processes, SIGKILL after the partition's GraceTime, requeue by Slurm).

Needs a running Slurm (CI starts the two-node test cluster, slurm/start_test_cluster.sh; these
jobs use one node of it); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.digits_checkpoints import assert_same_tensors, complete_step
from tests.test_megatron_lm_entry import SKIP_REASON as MEGATRON_LM_SKIP_REASON

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
        reason="no running Slurm here (start one with: sudo slurm/start_test_cluster.sh; CI does)",
    ),
]


# Launcher variables of the calling process that must not leak into a job's environment.
_LAUNCHER_ENV = ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def sbatch_cpu_job(
    run_dir: Path,
    nodes: int,
    tasks_per_node: int,
    train_args: str,
    sbatch_args: tuple[str, ...] = (),
    **job_env: str,
) -> str:
    """Submit slurm/pretrain.sbatch in CPU mode; ``job_env`` overrides TRAIN_ARGS etc."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env.update(RUN_DIR=str(run_dir), MLFOP_MODE="cpu", PYTHON=sys.executable, TRAIN_ARGS=train_args)
    env.update(job_env)
    cmd = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={run_dir}.out",
        *sbatch_args,
        "slurm/pretrain.sbatch",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _submit(run_dir: Path, sbatch_args: tuple[str, ...] = (), **job_env: str) -> str:
    """Sbatch the CPU-mode job on one node (2 tasks)."""
    return sbatch_cpu_job(run_dir, 1, 2, f"--quick --steps {STEPS}", sbatch_args, **job_env)


def _job(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _wait(job: str, until, timeout: float = 400.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _job(job)
        if until(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            out = Path(info.get("StdOut", ""))
            tail = out.read_text()[-4000:] if out.is_file() else f"(no output file {out})"
            raise AssertionError(f"job {job} ended {info.get('JobState')}; its output:\n{tail}")
        time.sleep(0.5)
    raise AssertionError(f"job {job} timed out in state {_job(job).get('JobState')}")


def _wait_requeued_completion(job: str) -> None:
    """Wait until the requeued job ran again and completed.

    Slurm holds a requeued job (BeginTime) before it is eligible again; we start it early, but
    only a few seconds after it went back to PENDING: started at once, the new batch step can
    race the old one's cleanup on the same node ("Job credential revoked").
    """
    pending_since: list[float] = []

    def done(info: dict[str, str]) -> bool:
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
            pending_since.append(time.monotonic())
            if time.monotonic() - pending_since[0] > 3.0:
                subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=False)
        return info.get("JobState") == "COMPLETED" and info.get("Restarts", "0") != "0"

    _wait(job, done)


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def _preempt_and_compare(tmp_path: Path, preempt: Callable[[str], None]) -> str:
    """Run a clean job (node2) and one (node1) that ``preempt(job)`` stops after 20 steps.

    Waits for the requeued run to complete; checks the checkpoint, the metrics and the final
    checkpoints (bitwise equal to the clean run's); returns the preempted job's log.
    """
    clean_dir, preempted_dir = tmp_path / "clean", tmp_path / "preempted"
    clean = _submit(clean_dir, ("--nodelist=node2",))
    job = _submit(preempted_dir, ("--nodelist=node1",))
    deadline = time.monotonic() + 300
    while _rows(preempted_dir) < 20:  # mid-run: some steps done, most still to go
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    preempt(job)

    _wait_requeued_completion(job)
    _wait(clean, lambda i: i.get("JobState") == "COMPLETED")

    log = Path(f"{preempted_dir}.out").read_text()
    match = re.search(r"preempted: checkpoint at step (\d+)", log)
    assert match and 0 < int(match.group(1)) < STEPS, log[-3000:]
    assert "restart 1" in log, log[-3000:]
    assert _rows(preempted_dir) == STEPS  # metrics continue, no step lost or repeated
    # the final checkpoints (model and optimizer state, every rank's shards) are bitwise equal
    clean_ckpt = clean_dir / "checkpoint" / "mlfop"
    preempted_ckpt = preempted_dir / "checkpoint" / "mlfop"
    assert complete_step(clean_ckpt) == complete_step(preempted_ckpt) == STEPS
    assert_same_tensors(clean_ckpt, preempted_ckpt)
    return log


def test_preempted_job_requeues_resumes_and_matches_uninterrupted(tmp_path):
    """The stop signal to the batch shell and every step (scancel --full --signal=USR1)."""

    def signal_usr1(job: str) -> None:
        subprocess.run(["scancel", "--full", "--signal=USR1", job], check=True)

    log = _preempt_and_compare(tmp_path, signal_usr1)
    assert "asked for a requeue" in log


def _has_urgent_partition() -> bool:
    """Whether a running Slurm has the test cluster's preempting 'urgent' partition."""
    if not _slurm_ready():  # also: no sinfo to run on a machine without Slurm
        return False
    out = subprocess.run(
        ["sinfo", "-h", "-p", "urgent", "-o", "%P"], capture_output=True, text=True
    )
    return out.returncode == 0 and "urgent" in out.stdout


# Asked once per session (sinfo), for both Slurm-preemption tests.
needs_urgent_partition = pytest.mark.skipif(
    not _has_urgent_partition(),
    reason="this Slurm has no 'urgent' partition (restart slurm/start_test_cluster.sh)",
)


@needs_urgent_partition
def test_slurm_partition_preemption_requeues_resumes_and_matches_uninterrupted(tmp_path):
    """Slurm's own preemption: an exclusive job of a higher PriorityTier partition.

    The test cluster (slurm/start_test_cluster.sh) runs PreemptType=preempt/partition_prio,
    PreemptMode=REQUEUE, GraceTime=120 on ``debug``: Slurm sends SIGTERM to the job's
    processes, the ranks save at the next step and exit, Slurm requeues the job.
    """
    urgent_out = tmp_path / "urgent.out"
    log = _preempt_and_compare(tmp_path, lambda job: _preempt_node1(urgent_out))
    assert "stop signal SIGTERM, checkpoint at step" in log, log[-3000:]
    assert urgent_out.read_text().strip() == "urgent job ran on node1"


def _preempt_node1(output: Path) -> None:
    """Submit an exclusive job of the higher-tier 'urgent' partition to node1."""
    cmd = ["sbatch", "--parsable", "-p", "urgent", "--exclusive", "--nodelist=node1"]
    cmd += [f"--output={output}", "--wrap", "echo urgent job ran on $(hostname)"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)


MEGATRON_ITERS = 40


def preempt_megatron_lm_job(
    tmp_path: Path, submit: Callable[..., str], iters: int, signal_to: str | Callable[[str], None]
) -> tuple[str, Path, int]:
    """Preempt a LAUNCH=megatron-lm job and compare it with a clean one.

    Submit a clean and a to-be-preempted LAUNCH=megatron-lm job; USR1 the second after 5
    iterations (``signal_to``: scancel's --full or --batch, or a function that preempts the
    job), wait for the requeued run and the
    clean one; check the resumed iterations reproduce the clean losses. Returns (log of the
    preempted job, its run dir, the iteration it stopped at).
    """
    from tests.test_megatron_lm_entry import CPU_FLAGS, LOSS_TOL, MODEL, TRAIN, losses

    # The later --train-iters overrides TRAIN's (argparse keeps the last value).
    overrides = ["--train-iters", str(iters), "--save-interval", "1000"]
    args = " ".join([*MODEL, *CPU_FLAGS, *TRAIN, *overrides])
    clean_dir, preempted_dir = tmp_path / "clean", tmp_path / "preempted"
    env = dict(LAUNCH="megatron-lm", TRAIN_ARGS=args, OMP_NUM_THREADS="1")
    clean = submit(clean_dir, **env)
    job = submit(preempted_dir, **env)
    log_path = Path(f"{preempted_dir}.out")
    deadline = time.monotonic() + 300
    while len(losses(log_path.read_text() if log_path.exists() else "")) < 5:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    if callable(signal_to):
        signal_to(job)
    else:
        subprocess.run(["scancel", signal_to, "--signal=USR1", job], check=True)
    _wait_requeued_completion(job)
    _wait(clean, lambda i: i.get("JobState") == "COMPLETED")
    log = log_path.read_text()
    match = re.search(r"stopped at iteration (\d+): exiting for requeue", log)
    assert match and 0 < int(match.group(1)) < iters, log[-4000:]
    stopped = int(match.group(1))
    ref = losses(Path(f"{clean_dir}.out").read_text())
    assert sorted(ref) == list(range(1, iters + 1))
    # Second run of the preempted job: iterations after the checkpoint, as in the clean run.
    resumed = losses(log[log.index("restart 1") :])
    assert sorted(resumed) == list(range(stopped + 1, iters + 1)), resumed
    for it, value in resumed.items():
        assert value == pytest.approx(ref[it], abs=LOSS_TOL), (it, value, ref[it])
    return log, preempted_dir, stopped


@pytest.mark.skipif(MEGATRON_LM_SKIP_REASON is not None, reason=MEGATRON_LM_SKIP_REASON or "")
def test_megatron_lm_job_preempted_requeues_and_resumes_to_the_same_losses(tmp_path):
    """LAUNCH=megatron-lm survives a Slurm preemption with the same losses.

    LAUNCH=megatron-lm: Megatron-LM's pretrain under srun, stopped by the USR1 Slurm sends
    before the time limit, saves (torch_dist), requeues and resumes to the uninterrupted losses.
    """
    log, run_dir, _ = preempt_megatron_lm_job(tmp_path, _submit, MEGATRON_ITERS, "--full")
    assert "restart 1" in log and "asked for a requeue" in log
    assert f"successfully loaded checkpoint from {run_dir / 'checkpoints'}" in log


@pytest.mark.skipif(MEGATRON_LM_SKIP_REASON is not None, reason=MEGATRON_LM_SKIP_REASON or "")
@needs_urgent_partition
def test_megatron_lm_job_preempted_by_slurm_requeues_and_resumes_to_the_same_losses(tmp_path):
    """LAUNCH=megatron-lm under Slurm's own preemption (SIGTERM; the job exits on SIGUSR1).

    The runtime install routes SIGTERM to Megatron-LM's exit handler: the ranks save at the
    next iteration, Slurm requeues the job, the resumed iterations repeat the clean run's.
    """

    def submit(run_dir: Path, **env: str) -> str:  # preempted on node1, clean on node2
        node = "node1" if run_dir.name == "preempted" else "node2"
        return _submit(run_dir, (f"--nodelist={node}",), **env)

    urgent_out = tmp_path / "urgent.out"
    log, run_dir, _ = preempt_megatron_lm_job(
        tmp_path, submit, MEGATRON_ITERS, lambda job: _preempt_node1(urgent_out)
    )
    assert f"successfully loaded checkpoint from {run_dir / 'checkpoints'}" in log
    assert urgent_out.read_text().strip() == "urgent job ran on node1"
