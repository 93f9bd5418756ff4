"""End-to-end run of the digits demo (examples/train_digits.py --quick --compare, 2 gloo ranks).

One subprocess run (the real command line, as `make demo` runs it, minus the size) trains the
three optimizers one after another through the Megatron integration; the tests then check the
run folder: falling per-modality losses, metrics.csv / metrics.jsonl columns, the package-format
checkpoint, the PNG plots and summary.json.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
from examples.digits.optimizers import available  # noqa: E402
from tests.digits_checkpoints import complete_step, saved_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"
OPTIMIZERS = ("mlfop", "soap", "adamw")  # ours: checkpoints, folding diagnostics
# --compare trains every optimizer installed here: ours, plus Megatron's peers in .venv-peers.
COMPARED = tuple(available()[0])
STEPS = 30  # --quick
BASE_COLUMNS = [
    "step",
    "optimizer",
    "loss",
    "image_loss",
    "text_loss",
    "tokens_per_s",
    "grad_norm",
    "lr",
    "step_time_s",
    "elapsed_s",
    "skipped_steps",
    "modality_cosine",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the quick comparison once for the whole module; return its folder and output."""
    out = tmp_path_factory.mktemp("digits") / "run"
    cmd = [sys.executable, str(SCRIPT), "--nproc", "2", "--quick", "--compare", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "stdout": proc.stdout, "rows": rows}


def _rows(run: dict[str, Any], optimizer: str) -> list[dict[str, Any]]:
    return [r for r in run["rows"] if r["optimizer"] == optimizer]


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_loss_falls_in_both_modalities(run: dict[str, Any], optimizer: str) -> None:
    rows = _rows(run, optimizer)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "image_loss", "text_loss"):
        first, last = _mean(rows[:3], key), _mean(rows[-5:], key)
        assert last < 0.7 * first, f"{optimizer} {key}: {first:.3f} -> {last:.3f}"
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
    assert rows[-1]["skipped_steps"] == 0


def test_metrics_csv_and_jsonl_columns(run: dict[str, Any]) -> None:
    out = run["out"]
    with open(out / "metrics.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        csv_rows = list(reader)
    assert header[: len(BASE_COLUMNS)] == BASE_COLUMNS
    # --quick: global batch 16, micro 2, DP 2 -> 4 micro-steps, dyadic levels 1, 2, 4.
    for level in (1, 2):
        for field in ("beta", "s", "ratio", "cosine"):
            assert f"level{level}_{field}" in header
    assert len(csv_rows) == len(run["rows"]) == STEPS * len(COMPARED)
    assert all(list(r) == header for r in run["rows"])
    for row, js in zip(csv_rows, run["rows"]):
        assert int(row["step"]) == js["step"] and row["optimizer"] == js["optimizer"]
        assert float(row["loss"]) == pytest.approx(js["loss"])


def test_folding_diagnostics_only_for_mlfop(run: dict[str, Any]) -> None:
    mlfop = _rows(run, "mlfop")
    # Steps 1-2 fold in the identity metric; afterwards beta is adaptive and non-trivial.
    betas = [r["level1_beta"] for r in mlfop[2:]]
    assert all(b is not None and abs(b) <= 1.0 for b in betas)
    assert max(abs(b) for b in betas) > 1e-3
    assert all(-1.0 <= r["level2_cosine"] <= 1.0 and r["level2_ratio"] >= 0 for r in mlfop)
    for name in ("soap", "adamw"):
        assert all(r["level1_beta"] is None for r in _rows(run, name))
    cosines = [r["modality_cosine"] for r in run["rows"] if r["modality_cosine"] is not None]
    assert len(cosines) >= 3 * len(OPTIMIZERS)
    assert all(-1.0 <= c <= 1.0 for c in cosines)


def test_checkpoint_is_the_package_format_one_complete_per_optimizer(run: dict[str, Any]) -> None:
    """checkpoint/<optimizer>/ holds one complete dist_checkpointing folder.

    The folder is the package's save_checkpoint (reshardable); with it its ``latest`` marker
    and run.json; no temp folder left.
    """
    root = run["out"] / "checkpoint"
    assert sorted(p.name for p in root.iterdir()) == sorted(OPTIMIZERS)
    for name in OPTIMIZERS:
        folder = root / name
        assert sorted(p.name for p in folder.iterdir()) == ["iter_0000030", "latest", "run.json"]
        assert complete_step(folder) == STEPS
        assert json.loads((folder / "run.json").read_text())["spec"]["optimizer"] == name
        tensors = saved_tensors(folder)
        assert any(k.startswith("decoder.layers") for k in tensors)
        assert any("optimizer" in k for k in tensors)


@pytest.mark.parametrize("name", ["loss.png", "cosine.png", "beta.png", "grad.png"])
def test_plots_are_png(run: dict[str, Any], name: str) -> None:
    data = (run["out"] / name).read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_summary(run: dict[str, Any]) -> None:
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert [s["optimizer"] for s in summary["runs"]] == list(COMPARED)
    for s in summary["runs"]:
        for key in ("val_image_loss", "val_text_loss", "final_image_loss", "final_text_loss"):
            assert math.isfinite(s[key]) and 0 < s[key] < 3.0
    for name in COMPARED:
        assert name in run["stdout"]
    assert "final_image_loss" in run["stdout"]


def test_strict_device_run_matches_the_plain_run(run: dict[str, Any], tmp_path: Path) -> None:
    """The demo's GPU data path (model and batches on "cuda") under the strict CPU emulation.

    MLFOP_STRICT_DEVICE=1 tags what is created for the accelerator and fails on any op mixing it
    with a host tensor (mlfop_megatron/runtime/strict_device.py), so a device bug anywhere in
    the Megatron path (forward, backward hooks, folds, step, stats, checkpoint) fails this run.
    Tagging changes no arithmetic: the losses equal the plain run's bit for bit.
    """
    out = tmp_path / "strict"
    cmd = [sys.executable, str(SCRIPT), "--nproc", "2", "--quick", "--out", str(out)]
    env = {**os.environ, "MLFOP_STRICT_DEVICE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "strict device emulation" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "image_loss", "text_loss", "grad_norm")
    strict = [[r[k] for k in keys] for r in rows]
    plain = [[r[k] for k in keys] for r in _rows(run, "mlfop")]
    assert strict == plain


def test_by_modality_layout_dp2_grad_diagnostics(tmp_path: Path) -> None:
    """--micro-batch-layout by-modality at DP=2 through the Megatron path.

    4 micro-steps: image, image, text, text. The optimizer's grad-group cosine of the armed
    steps equals the demo's independent autograd cosine of the image and text losses (both
    over the decoder matrices), and the diagnostics columns and plot are written.
    """
    out = tmp_path / "by_modality"
    cmd = [sys.executable, str(SCRIPT), "--nproc", "2", "--quick", "--steps", "4"]
    cmd += ["--diag-every", "2", "--micro-batch-layout", "by-modality", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    armed = [r for r in rows if r["modality_cosine"] is not None]
    assert [r["step"] for r in armed] == [1, 3, 4]
    for r in armed:
        assert r["grad_cos_image_text"] == pytest.approx(r["modality_cosine"], rel=1e-4, abs=1e-5)
        assert -1.0 <= r["grad_cos_mi_image_text"] <= 1.0 and r["grad_micro_steps"] == 4
        for key in ("grad_pred_folded_image", "grad_pred_folded_text", "grad_noise_scale"):
            assert math.isfinite(r[key]), key
        assert 0.0 <= r["grad_ascent_folded"] <= 1.0
    assert all(r["grad_cos_image_text"] is None for r in rows if r not in armed)
    assert (out / "grad.png").read_bytes().startswith(PNG_MAGIC)
