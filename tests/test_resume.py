"""--resume continues bit-exactly and never trusts a half-written checkpoint.

A 30-step run stopped at step 20 as if preempted (complete checkpoint), with a later save
killed mid-write (a partial temp directory left behind), must resume from step 20 and end
exactly where an uninterrupted 30-step run ends.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("sklearn")
pytest.importorskip("torch")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
from tests.digits_checkpoints import assert_same_tensors, complete_step  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def _train(out: Path, *extra: str, code: int = 0) -> str:
    cmd = [sys.executable, str(SCRIPT), "--nproc", "2", "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _folder(out: Path) -> Path:
    return out / "checkpoint" / "mlfop"


def _saved_counters(folder: Path) -> list[dict]:
    """The linalg counters in the common state of the latest checkpoint in ``folder``."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    latest = folder / (folder / "latest").read_text().strip()
    optimizer = load_common_state_dict(str(latest))["optimizer"]
    if isinstance(optimizer, dict) and "counters" not in optimizer:  # chained: by index
        optimizer = list(optimizer.values())
    parts = optimizer if isinstance(optimizer, list) else [optimizer]
    return [part["counters"] for part in parts if isinstance(part, dict) and "counters" in part]


def test_resume_skips_partial_checkpoint_and_matches_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(full, "--steps", "30")
    log = _train(resumed, "--steps", "30", "--stop-at-step", "20", code=3)
    assert "preempted: checkpoint at step 20" in log
    assert (resumed / "requeue.flag").read_text().strip() == "20"
    # A later save that died mid-write: its temp folder with a truncated file, never renamed.
    partial = _folder(resumed) / "iter_0000025.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x80\x02truncated")
    assert complete_step(_folder(resumed)) == 20
    _train(resumed, "--steps", "30", "--resume")
    assert complete_step(_folder(full)) == complete_step(_folder(resumed)) == 30
    assert_same_tensors(_folder(full), _folder(resumed))  # model and optimizer state
    # The counters' world totals (common state) carry on across the resume as well.
    counters = _saved_counters(_folder(full))
    assert counters and counters == _saved_counters(_folder(resumed))
    assert counters[0]["refreshes_done"] > 0 and counters[0]["refreshes_skipped"] > 0
    rows = (resumed / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 30 and rows[-1].startswith("30,")
    assert not partial.exists()  # the next save pruned the stale temp folder
