"""Real signals during checkpoint writes never leave a checkpoint that resume would trust.

The two ranks are started the way srun starts them (one process each, RANK/WORLD_SIZE in the
environment) and checkpoint every step, so the temp folder of a save in progress can be seen
and a signal sent exactly then:

* SIGKILL while a save is being written: the half-written temp folder is ignored, the run
  resumes from the previous complete checkpoint and ends bit-identical to an uninterrupted run;
* SIGTERM while a save is being written: the save completes, the ranks agree to stop at the
  next step boundary, checkpoint, write requeue.flag and exit with the requeue code; resuming
  ends bit-identical too;
* a save killed after its rename but before the ``latest`` marker moved (the marker names an
  older folder, or is gone) resumes from a complete folder and ends bit-identical.

The checkpoints are the package's (mlfop_megatron.megatron.checkpointing): ``iter_N.tmp/``
while written, renamed to ``iter_N/`` when complete, then the ``latest`` marker.
"""

from __future__ import annotations

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
pytest.importorskip("torch")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
from tests.digits_checkpoints import assert_same_tensors, complete_step, temp_folders  # noqa: E402

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


def signal_during_save(procs: list[subprocess.Popen], out: Path, sig: int, after: int) -> int:
    """Send ``sig`` to both ranks while a save after step ``after`` is being written."""
    folder = out / "checkpoint" / "mlfop"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("ranks exited before the signal:\n" + logs(out)[-3000:])
        if temp_folders(folder):
            step = complete_step(folder)
            if step is not None and step >= after and temp_folders(folder):
                for p in procs:
                    p.send_signal(sig)
                return step
        time.sleep(0.0005)
    raise AssertionError("never saw a save in progress:\n" + logs(out)[-3000:])


def assert_same_end(reference: Path, resumed: Path) -> None:
    ref, res = reference / "checkpoint" / "mlfop", resumed / "checkpoint" / "mlfop"
    assert complete_step(ref) == complete_step(res) == STEPS
    assert_same_tensors(ref, res)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert wait_all(launch_ranks(out)) == [0, 0], logs(out)[-3000:]
    return out


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(reference, tmp_path):
    out = tmp_path / "killed"
    folder = out / "checkpoint" / "mlfop"
    procs = launch_ranks(out, "--save-interval", "1")
    previous = signal_during_save(procs, out, signal.SIGKILL, after=5)
    assert wait_all(procs) == [-signal.SIGKILL, -signal.SIGKILL]
    assert temp_folders(folder)  # a partial save was left behind, never renamed
    assert complete_step(folder) in (previous, previous + 1)  # killed before/after the rename
    assert wait_all(launch_ranks(out, "--resume", "--save-interval", "1")) == [0, 0], logs(out)
    assert not temp_folders(folder)
    assert_same_end(reference, out)


def test_sigterm_during_a_checkpoint_write_stops_cleanly_for_requeue(reference, tmp_path):
    out = tmp_path / "terminated"
    folder = out / "checkpoint" / "mlfop"
    procs = launch_ranks(out, "--save-interval", "1")
    during = signal_during_save(procs, out, signal.SIGTERM, after=5)
    assert wait_all(procs) == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], logs(out)[-3000:]
    stopped = int((out / REQUEUE_MARKER).read_text())
    # The interrupted save finished (step during+1), then the ranks stopped one step later.
    assert stopped == during + 2, (during, stopped)
    assert complete_step(folder) == stopped
    assert not temp_folders(folder)
    assert wait_all(launch_ranks(out, "--resume")) == [0, 0], logs(out)[-3000:]
    assert_same_end(reference, out)


@pytest.mark.parametrize("marker", ["stale", "missing"])
def test_crash_before_the_marker_moved_resumes_from_a_complete_checkpoint(
    reference, tmp_path, marker
):
    out = tmp_path / f"marker_{marker}"
    folder = out / "checkpoint" / "mlfop"
    assert wait_all(launch_ranks(out, "--stop-at-step", "8")) == [REQUEUE_EXIT_CODE] * 2
    # State after `iter_9.tmp -> iter_9` and before the marker update: iter_9 complete (a
    # copy of iter_8 renamed: resume must not care which it takes), marker stale or gone.
    shutil.copytree(folder / "iter_0000008", folder / "iter_0000009")
    if marker == "missing":
        os.remove(folder / "latest")
        assert complete_step(folder) == 9  # the newest complete folder
    else:
        assert complete_step(folder) == 8  # the marker still names iter_8
    (out / REQUEUE_MARKER).unlink(missing_ok=True)
    assert wait_all(launch_ranks(out, "--resume")) == [0, 0], logs(out)[-3000:]
    assert_same_end(reference, out)
