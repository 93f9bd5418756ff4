"""Two-node Slurm: slurm/pretrain.sbatch with --nodes=2 on the namespace cluster.

slurm/start_test_cluster.sh (CI runs it) starts slurmctld and two slurmd "nodes", each in its own
network namespace (own hostname and address on a veth/bridge link). These tests submit the CPU
job to both nodes and check that

* the ranks ran on different nodes and talked over the link (per-rank log lines: hostname,
  SLURMD_NODENAME, interface and source address; established TCP connections between the two
  node addresses seen from inside the namespaces while the job runs; bytes on the node's veth);
* a stop signal sent only to the batch shell (as --signal=B:USR1@180 does) reaches every rank on
  both nodes, the checkpoint is complete and readable from each node's own view (its
  namespaces), and the requeued job ends with exactly the parameters of an uninterrupted run;
* a node killed mid-step (its slurmd, slurmstepd and ranks SIGKILLed) makes the job fail without
  leftover ranks, and the requeued job resumes from the last complete checkpoint to the same
  parameters.

Skipped unless that cluster runs here (the env file it writes, root for ip netns / nsenter).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.digits_checkpoints import assert_same_tensors, complete_step, temp_folders
from tests.test_megatron_lm_entry import SKIP_REASON as MEGATRON_LM_SKIP_REASON
from tests.test_slurm import (
    _job,
    _wait,
    _wait_requeued_completion,
    preempt_megatron_lm_job,
    sbatch_cpu_job,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_ENV = Path("/run/mlfop-test-cluster.env")
STEPS = 60
SAVE_INTERVAL = 10


def _cluster() -> dict[str, str] | None:
    """The test cluster's layout (node names, namespaces, addresses), None if it is not up."""
    if not CLUSTER_ENV.exists() or os.geteuid() != 0:
        return None
    env = {}
    for line in CLUSTER_ENV.read_text().splitlines():
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip().strip('"')
    nodes = env.get("MLFOP_CLUSTER_NODES", "").split()
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
    states = dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())
    if len(nodes) < 2 or any(n not in states for n in nodes):
        return None
    return env


CLUSTER = _cluster()
NODES = CLUSTER["MLFOP_CLUSTER_NODES"].split() if CLUSTER else []

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CLUSTER is None,
        reason="no two-node Slurm test cluster here (start it as root with "
        "slurm/start_test_cluster.sh; CI does)",
    ),
]


def _ns(node: str) -> str:
    return CLUSTER[f"MLFOP_CLUSTER_NETNS_{node}"]


def _addr(node: str) -> str:
    return CLUSTER[f"MLFOP_CLUSTER_ADDR_{node}"]


def _submit(run_dir: Path, steps: int = STEPS, extra: str = "", **job_env: str) -> str:
    """Sbatch the CPU job on both nodes, one rank per node."""
    train_args = f"--quick --steps {steps} {extra}".strip()
    return sbatch_cpu_job(run_dir, len(NODES), 1, train_args, **job_env)


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def _complete_step(run_dir: Path) -> int:
    """Step of the latest complete checkpoint (the package format), 0 if none."""
    return complete_step(run_dir / "checkpoint" / "mlfop") or 0


def _assert_same_parameters(a_dir: Path, b_dir: Path) -> None:
    a, b = a_dir / "checkpoint" / "mlfop", b_dir / "checkpoint" / "mlfop"
    assert complete_step(a) == complete_step(b) == STEPS
    assert_same_tensors(a, b)


def _slurmd_pid(node: str) -> int:
    return int(Path(f"/run/slurmd-{node}.pid").read_text().split()[0])


def _on_node(node: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run cmd as that node sees the world: its network, hostname and mounts (its slurmd's)."""
    ns = ["nsenter", "-t", str(_slurmd_pid(node)), "-n", "-u", "-m", "--"]
    return subprocess.run([*ns, *cmd], capture_output=True, text=True, timeout=120)


def _processes_in(node: str) -> dict[int, str]:
    """Pid -> command line of every process in the node's namespace except its slurmd."""
    pids = subprocess.run(["ip", "netns", "pids", _ns(node)], capture_output=True, text=True)
    procs = {}
    for pid in map(int, pids.stdout.split()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if pid != _slurmd_pid(node):
            procs[pid] = cmdline.decode(errors="replace").strip()
    return procs


def _ranks_in(node: str) -> list[int]:
    """Pids of training ranks still alive in the node's namespace."""
    return [pid for pid, cmd in _processes_in(node).items() if "train_digits.py" in cmd]


CHECK_CHECKPOINT = """
import json, socket, sys
from pathlib import Path
from torch.distributed.checkpoint import FileSystemReader
from mlfop_megatron.megatron.checkpointing import latest_checkpoint
path = Path(latest_checkpoint(sys.argv[1]))
FileSystemReader(str(path)).read_metadata()  # complete and readable from this node
ranks = {p.name.split("_")[2] for p in path.glob("__*_*.distcp")}
print(socket.gethostname(), int(path.name.removeprefix("iter_")), len(ranks))
"""


def _wait_rows(run_dir: Path, rows: int, job: str, timeout: float = 300.0) -> None:
    """Wait until the job has logged ``rows`` steps; fails at once if it ended before."""
    deadline = time.monotonic() + timeout
    while _rows(run_dir) < rows:
        state = _job(job).get("JobState")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED"):
            log = Path(f"{run_dir}.out")
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise AssertionError(f"job {job} {state} before step {rows}:\n{tail}")
        assert time.monotonic() < deadline, f"training never reached {rows} steps"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted two-node run, submitted once; tests wait for it with _finished().

    While it trains: the established TCP connections seen inside the second node.
    """
    run_dir = tmp_path_factory.mktemp("multinode") / "clean"
    veth = Path(f"/sys/class/net/mlfop-{NODES[1]}/statistics/rx_bytes")
    rx0 = int(veth.read_text())
    job = _submit(run_dir)
    _wait_rows(run_dir, 3, job)
    sockets = _on_node(NODES[1], "ss", "-tnpH", "state", "established").stdout
    return {"job": job, "dir": run_dir, "sockets": sockets, "veth": veth, "rx0": rx0}


def _finished(clean_run: dict) -> Path:
    """Wait for the uninterrupted run; its run dir."""
    _wait(clean_run["job"], lambda i: i.get("JobState") == "COMPLETED")
    if "sent_bytes" not in clean_run:  # rx of the host-side veth: what node 2 sent on the link
        clean_run["sent_bytes"] = int(clean_run["veth"].read_text()) - clean_run["rx0"]
    return clean_run["dir"]


def test_two_node_preemption_reaches_every_rank_and_resumes_exactly(clean_run, tmp_path):
    run_dir = tmp_path / "preempted"
    job = _submit(run_dir)
    _wait_rows(run_dir, 15, job)
    # Only the batch shell gets the signal, as with --signal=B:USR1@180: it forwards it to srun,
    # which forwards it to the ranks on both nodes.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)

    # The requeued job is held a few seconds: check the checkpoint from each node's view first.
    deadline = time.monotonic() + 180
    while _job(job).get("Restarts", "0") == "0":
        assert time.monotonic() < deadline, _job(job)
        time.sleep(0.3)
    step = _complete_step(run_dir)
    assert 0 < step < STEPS
    assert not temp_folders(run_dir / "checkpoint" / "mlfop")
    for node in NODES:
        res = _on_node(
            node, sys.executable, "-c", CHECK_CHECKPOINT, str(run_dir / "checkpoint" / "mlfop")
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split() == [node, str(step), str(len(NODES))], res.stdout

    _wait_requeued_completion(job)
    log = Path(f"{run_dir}.out").read_text()
    for rank, node in enumerate(NODES):
        assert (
            f"rank {rank} on {node}: stop signal SIGUSR1, checkpoint at step {step} saved" in log
        ), log[-4000:]
        assert f"rank {rank} on {node}: resumed from {run_dir / 'checkpoint'} at step {step}" in (
            log
        ), log[-4000:]
    assert "restart 1" in log and "asked for a requeue" in log
    assert _rows(run_dir) == STEPS  # metrics continue, no step lost or repeated
    _assert_same_parameters(_finished(clean_run), run_dir)


def test_two_node_job_runs_ranks_on_both_nodes_over_the_link(clean_run):
    run_dir, (first, second) = _finished(clean_run), NODES
    log = Path(f"{run_dir}.out").read_text()
    assert re.search(r"restart 0: 2 ranks on \S*node", log), log[:2000]
    ifname, master = CLUSTER["MLFOP_CLUSTER_IFNAME"], _addr(first)
    for rank, node in enumerate(NODES):
        # Picked per rank from the route to the rendezvous (GLOO_SOCKET_IFNAME not set by us).
        line = (
            f"rank {rank}/2 on host {node} (SLURMD_NODENAME={node}, local rank 0): "
            f"gloo iface {ifname} src {_addr(node)}, rendezvous {master}:"
        )
        assert line in log, log[:3000]
    # While it trained: node 2's rank held TCP connections from node 2's address to node 1's
    # (gloo pairs, the rendezvous store). Each node has its own loopback here, so a rank that
    # tried loopback across nodes could not have connected at all.
    peers = [
        line
        for line in clean_run["sockets"].splitlines()
        if "python" in line and f"{_addr(second)}:" in line and f"{_addr(first)}:" in line
    ]
    assert peers, clean_run["sockets"]
    # Node 2 put the gradients on the link: at least 100 kB per step (the model has 112k fp32
    # parameters; Slurm's own messages are a few kB in all).
    assert clean_run["sent_bytes"] > STEPS * 100_000, clean_run["sent_bytes"]
    assert _rows(run_dir) == STEPS


def test_node_killed_mid_step_fails_cleanly_and_requeue_resumes_last_complete(clean_run, tmp_path):
    run_dir, victim = tmp_path / "node_failure", NODES[1]
    job = _submit(run_dir, extra=f"--save-interval {SAVE_INTERVAL}")
    _wait_rows(run_dir, SAVE_INTERVAL + 3, job)
    assert _complete_step(run_dir) >= SAVE_INTERVAL
    assert _ranks_in(victim), "no rank running on the node to kill"
    # Node failure: every process of node 2 (slurmd, slurmstepd, its rank) SIGKILLed mid-step.
    subprocess.run(["bash", "slurm/stop_test_cluster.sh", "--node", victim], cwd=ROOT, check=True)
    killed_at = _rows(run_dir)

    # The job fails (or Slurm requeues it as NODE_FAIL): no hang, no rank left on node 1.
    deadline = time.monotonic() + 240
    while True:
        info = _job(job)
        state = info.get("JobState")
        if state in ("FAILED", "NODE_FAIL") or info.get("Restarts", "0") != "0":
            break
        assert time.monotonic() < deadline, f"job still {state} after the node died"
        time.sleep(0.5)
    # Nothing of the failed run is left on the surviving node (ranks, srun, batch shell,
    # slurmstepd; srun may wait KillWait for the lost step). Only then does the node come back
    # and the job start again: a leftover srun would later kill the new run's step (same id).
    deadline = time.monotonic() + 90
    while _processes_in(NODES[0]):
        assert time.monotonic() < deadline, f"left on {NODES[0]}: {_processes_in(NODES[0])}"
        time.sleep(0.5)
    assert not (run_dir / "requeue.flag").exists()  # no preemption checkpoint was claimed
    # A save cut by the failure leaves at most its temp folder, never renamed complete: the
    # latest complete checkpoint is a save-interval one (checked below).
    last = _complete_step(run_dir)
    assert SAVE_INTERVAL <= last <= killed_at and last % SAVE_INTERVAL == 0, (last, killed_at)

    # The node comes back; the job is requeued (if Slurm has not already) and resumes.
    subprocess.run(["bash", "slurm/start_test_cluster.sh", "--node", victim], cwd=ROOT, check=True)
    if _job(job).get("JobState") in ("FAILED", "NODE_FAIL"):
        subprocess.run(["scontrol", "requeue", job], check=True)
    _wait_requeued_completion(job)
    log = Path(f"{run_dir}.out").read_text()
    restart = log[log.index("restart 1") :]
    for rank, node in enumerate(NODES):
        resumed = f"rank {rank} on {node}: resumed from {run_dir / 'checkpoint'} at step {last}"
        assert resumed in restart, restart[-4000:]
    _assert_same_parameters(_finished(clean_run), run_dir)


MEGATRON_ITERS = 30


@pytest.mark.skipif(MEGATRON_LM_SKIP_REASON is not None, reason=MEGATRON_LM_SKIP_REASON or "")
def test_megatron_lm_two_node_job_preempted_resumes_to_the_same_losses(tmp_path):
    """LAUNCH=megatron-lm on two nodes survives a preemption with the same losses.

    LAUNCH=megatron-lm on both nodes: Megatron-LM's pretrain, stopped by USR1 to the batch
    shell, saves (torch_dist, on the shared run dir), requeues and resumes to the same losses.
    """
    log, _, _ = preempt_megatron_lm_job(tmp_path, _submit, MEGATRON_ITERS, "--batch")
    for rank, node in enumerate(NODES):
        assert f"rank {rank}/2 on host {node} (SLURMD_NODENAME={node}" in log, log[:3000]
