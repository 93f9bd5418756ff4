"""The "when does the folding help" benchmark: its statistics, its controls and its --smoke run.

Unit checks of the pieces whose errors would silently bias the report (the sign test, the
PCGrad projection, the synthetic problem's conflict angle and closed-form losses), then one
``python -m benchmarks.sample_efficiency --smoke`` run (what CI runs) whose results.json and
printed report must have every part's structure and finite numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.conflict import FOLD_VARIANTS, pcgrad_combine, sign_test
from benchmarks.fold_synthetic import SyntheticPlan, init_gradient_cosine, make_problem

ROOT = Path(__file__).resolve().parents[1]


def test_sign_test_matches_the_binomial_by_hand() -> None:
    assert sign_test([1, 2, 3, 4, 5]) == {"n": 5, "positive": 5, "negative": 0, "p": 2 / 32}
    # 1 of 6 negative: P(X <= 1) = (1 + 6) / 64, two-sided 14 / 64; zeros are dropped.
    res = sign_test([-1, 2, 3, 0, 4, 5, 6])
    assert (res["n"], res["negative"]) == (6, 1) and res["p"] == pytest.approx(14 / 64)
    assert sign_test([1, -1])["p"] == 1.0 and sign_test([0, 0])["n"] == 0


def test_pcgrad_projects_each_gradient_off_the_other_only_on_conflict() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=gen, dtype=torch.float64)
    b = -a + 0.3 * torch.randn(50, generator=gen, dtype=torch.float64)  # conflicting
    combined, hit = pcgrad_combine(a, b)
    assert hit
    pa = a - (a @ b) / (b @ b) * b  # the definition, written out
    pb = b - (a @ b) / (a @ a) * a
    torch.testing.assert_close(combined, 0.5 * (pa + pb))
    assert abs(float(pa @ b)) < 1e-10 and abs(float(pb @ a)) < 1e-10
    c = a + 0.3 * torch.randn(50, generator=gen, dtype=torch.float64)  # agreeing
    combined, hit = pcgrad_combine(a, c)
    assert not hit
    torch.testing.assert_close(combined, 0.5 * (a + c))


@pytest.mark.parametrize("curvature", ["rotated", "axis-aligned"])
@pytest.mark.parametrize("angle", [0.0, 60.0, 90.0, 150.0])
def test_synthetic_problem_sets_the_conflict_angle_and_exact_losses(
    angle: float, curvature: str
) -> None:
    plan = SyntheticPlan(dim=6, curvature=curvature)
    problem = make_problem(plan, angle)
    off_diagonal = problem.cov - torch.diag(torch.diagonal(problem.cov))
    # Rotated: Sigma = Q S Q^T is far from diagonal; the control is exactly diagonal.
    assert (off_diagonal.abs().max() > 1.0) == (curvature == "rotated")
    assert init_gradient_cosine(problem) == pytest.approx(math.cos(math.radians(angle)), abs=1e-9)
    # Closed-form task loss against a Monte-Carlo estimate from the sampler.
    w = torch.full((6, 6), 0.05, dtype=torch.float64)
    x, y = problem.sample(0, 200_000, torch.Generator().manual_seed(1))
    mc = 0.5 * float(((x @ w.T - y) ** 2).sum(1).mean())
    assert problem.task_loss(w, 0) == pytest.approx(mc, rel=2e-2)
    assert problem.excess(problem.optimum) == pytest.approx(0.0, abs=1e-12)
    assert problem.excess(w) > 0


def test_fold_variants_are_valid_folding_configs() -> None:
    from mlfop_megatron.config import FoldingConfig

    labels = [v.label for v in FOLD_VARIANTS]
    assert len(set(labels)) == len(labels)
    for v in FOLD_VARIANTS:
        FoldingConfig(enabled=True, accumulation_steps=8, **v.kwargs())


@pytest.mark.slow
@pytest.mark.distributed
def test_smoke_run_writes_every_part(tmp_path: Path) -> None:
    pytest.importorskip("megatron.core")
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks.sample_efficiency", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for heading in ("### (a)", "### (b)", "### (c)", "Headline checks"):
        assert heading in proc.stdout, heading
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"lookahead", "training", "synthetic"}

    cell = results["lookahead"]["cells"]["by-modality|base"]
    plan = results["lookahead"]["plan"]
    rules = ["plain-mean", *plan["variants"]]
    pairs = len(cell["marks"]) * plan["probe_batches"]
    assert len(cell["records"]) == pairs * len(rules)
    for rule in rules:
        entry = cell["analysis"][rule]
        assert entry["pairs"] == pairs
        for m in ("image_loss", "text_loss", "balanced"):
            assert math.isfinite(entry[m]["change"][0])
        # One step from these early states lowers the objective it optimises (one modality may
        # rise: that is the competition the folds act on).
        assert entry["balanced"]["change"][0] < 0
    assert cell["analysis"]["plain-mean"]["balanced"]["sign"]["n"] == 0  # paired with itself

    training = results["training"]
    rows = training["plan"]["rows"]
    assert sorted(r["label"] for r in training["runs"]) == sorted(rows)
    for r in training["runs"]:
        s = r["summary"]
        assert len(r["rows"]) == s["steps"] == training["plan"]["steps"]
        assert 0 < s["final_image_loss"] < s["first_image_loss"]
        assert 0 < s["final_text_loss"] < s["first_text_loss"]
    pcgrad = next(r for r in training["runs"] if r["label"] == "pcgrad")
    assert 0 <= pcgrad["summary"]["pcgrad_conflict_steps"] <= pcgrad["summary"]["steps"]

    synthetic = results["synthetic"]
    splan = synthetic["plan"]
    assert len(synthetic["summary"]) == len(splan["angles"]) * len(splan["layouts"]) * 2
    for entry in synthetic["summary"].values():
        assert set(entry) == set(splan["optimizers"])
        for e in entry.values():
            assert e["lr"] in splan["lr_grid"] and e["seeds"] == len(splan["seeds"])
            assert math.isfinite(e["final_excess"][0]) and e["final_excess"][0] >= 0
