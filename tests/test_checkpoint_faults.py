"""Real signals during checkpoint writes never leave a checkpoint that resume would trust.

The two ranks are started the way srun starts them (one process each, RANK/WORLD_SIZE in the
environment) and checkpoint every step, so the temp folder of a save in progress can be seen
and a signal sent exactly then:

* SIGKILL while a save is being written: the half-written temp folder is ignored, the run
  resumes from the previous complete checkpoint and ends bit-identical to an uninterrupted run;
* SIGTERM while a save is being written: the save completes, the ranks agree to stop at the
  next step boundary, checkpoint, write requeue.flag and exit with the requeue code; resuming
  ends bit-identical too;
* a save killed between its two renames (only ``.<name>.old`` complete) resumes from that one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlfop_megatron.launch.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER
from mlfop_megatron.runtime.spawn import find_free_port

pytest.importorskip("megatron.core")
pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
STEPS = 16


def launch_ranks(out: Path, *extra: str) -> list[subprocess.Popen]:
    """Two rank processes with env rendezvous, as srun / torchrun would start them."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(find_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        cmd = [sys.executable, str(SCRIPT), "--quick", "--steps", str(STEPS), "--out", str(out)]
        with open(out / f"rank{rank}.log", "ab") as log:  # the child keeps its own copy
            procs.append(subprocess.Popen([*cmd, *extra], env=env, stdout=log, stderr=log))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


def logs(out: Path) -> str:
    return "".join((out / f"rank{r}.log").read_text(errors="replace") for r in (0, 1))


def complete_step(folder: Path) -> int | None:
    """Step of a complete checkpoint folder (meta.json is written last), else None."""
    try:
        return int(json.loads((folder / "meta.json").read_text())["step"])
    except (FileNotFoundError, ValueError):  # absent, or renamed away while reading
        return None


def save_in_progress(tmp: Path) -> bool:
    try:
        return tmp.is_dir() and "meta.json" not in os.listdir(tmp)
    except FileNotFoundError:
        return False


def signal_during_save(procs: list[subprocess.Popen], out: Path, sig: int, after: int) -> int:
    """Send ``sig`` to both ranks while a save after step ``after`` is being written."""
    tmp = out / "checkpoint" / ".mlfop.tmp"
    final = out / "checkpoint" / "mlfop"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("ranks exited before the signal:\n" + logs(out)[-3000:])
        if save_in_progress(tmp):
            step = complete_step(final)
            if step is not None and step >= after and save_in_progress(tmp):
                for p in procs:
                    p.send_signal(sig)
                return step
        time.sleep(0.0005)
    raise AssertionError("never saw a save in progress:\n" + logs(out)[-3000:])


def final_params(out: Path) -> list[dict]:
    return [
        torch.load(out / "checkpoint" / "mlfop" / f"rank_{r:05d}.pt", weights_only=False)
        for r in (0, 1)
    ]


def assert_same_end(reference: Path, resumed: Path) -> None:
    for a, b in zip(final_params(reference), final_params(resumed)):
        assert a["step"] == b["step"] == STEPS
        for key, value in a["model"].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b["model"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert wait_all(launch_ranks(out)) == [0, 0], logs(out)[-3000:]
    return out


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    out = tmp_path / "killed"
    procs = launch_ranks(out, "--save-interval", "1")
    previous = signal_during_save(procs, out, signal.SIGKILL, after=5)
    assert wait_all(procs) == [-signal.SIGKILL, -signal.SIGKILL]
    tmp = out / "checkpoint" / ".mlfop.tmp"
    assert tmp.is_dir() and not (tmp / "meta.json").exists()  # a partial save was left behind
    assert complete_step(out / "checkpoint" / "mlfop") == previous
    assert wait_all(launch_ranks(out, "--resume", "--save-interval", "1")) == [0, 0], logs(out)
    assert not tmp.exists()
    assert_same_end(reference, out)


def test_sigterm_during_a_checkpoint_write_stops_cleanly_for_requeue(reference, tmp_path):
    out = tmp_path / "terminated"
    procs = launch_ranks(out, "--save-interval", "1")
    during = signal_during_save(procs, out, signal.SIGTERM, after=5)
    assert wait_all(procs) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], logs(out)[-3000:]
    stopped = int((out / REQUEUE_MARKER).read_text())
    # The interrupted save finished (step during+1), then the ranks stopped one step later.
    assert stopped == during + 2, (during, stopped)
    assert complete_step(out / "checkpoint" / "mlfop") == stopped
    assert not (out / "checkpoint" / ".mlfop.tmp").exists()
    assert wait_all(launch_ranks(out, "--resume")) == [0, 0], logs(out)[-3000:]
    assert_same_end(reference, out)


def test_crash_between_the_renames_resumes_from_the_old_checkpoint(reference, tmp_path):
    out = tmp_path / "renamed"
    assert wait_all(launch_ranks(out, "--stop-at-step", "8")) == [REQUEUE_EXIT_CODE] * 2
    root = out / "checkpoint"
    # State after `final -> .old` and before `.tmp -> final`: only the old one is complete.
    os.replace(root / "mlfop", root / ".mlfop.old")
    shutil.copytree(root / ".mlfop.old", root / ".mlfop.tmp")
    os.remove(root / ".mlfop.tmp" / "meta.json")
    assert wait_all(launch_ranks(out, "--resume")) == [0, 0], logs(out)[-3000:]
    assert not (root / ".mlfop.old").exists()
    assert_same_end(reference, out)
