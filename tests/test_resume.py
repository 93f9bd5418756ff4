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
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def _train(out: Path, *extra: str, code: int = 0) -> str:
    cmd = [sys.executable, str(SCRIPT), "--nproc", "2", "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _model(out: Path, rank: int) -> dict:
    return torch.load(out / "checkpoint" / "mlfop" / f"rank_{rank:05d}.pt", weights_only=False)


def test_resume_skips_partial_checkpoint_and_matches_uninterrupted(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(full, "--steps", "30")
    log = _train(resumed, "--steps", "30", "--stop-at-step", "20", code=3)
    assert "preempted: checkpoint at step 20" in log
    assert (resumed / "requeue.flag").read_text().strip() == "20"
    # A save that died mid-write: temp dir with a truncated rank file and no meta.json.
    partial = resumed / "checkpoint" / ".mlfop.tmp"
    partial.mkdir()
    (partial / "rank_00000.pt.part").write_bytes(b"\x80\x02truncated")
    assert _model(resumed, 0)["step"] == 20
    _train(resumed, "--steps", "30", "--resume")
    for rank in (0, 1):
        a, b = _model(full, rank), _model(resumed, rank)
        assert a["step"] == b["step"] == 30
        for key, value in a["model"].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b["model"][key]), key
    rows = (resumed / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 30 and rows[-1].startswith("30,")
    assert not partial.exists()  # the next save replaced the stale temp directory
