"""The "when does the folding help" benchmark: its statistics, its controls and its --smoke run.

Unit checks of the pieces whose errors would silently bias the report (the sign test, the
PCGrad projection, the synthetic problem's conflict angle and closed-form losses), part (b)'s
Megatron peer rows (built from the digits optimizer table, skipped with their reason where they
cannot run, ratios against the best peer, rows added to saved results), then one
``python -m benchmarks.sample_efficiency --smoke`` run (what CI runs) whose results.json and
printed report must have every part's structure and finite numbers, and a real peer row where
emerging-optimizers is installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import fold_training, sample_efficiency
from benchmarks.conflict import FOLD_VARIANTS, pcgrad_combine, sign_test
from benchmarks.fold_synthetic import SyntheticPlan, init_gradient_cosine, make_problem
from examples.digits.optimizers import TABLE, entry
from mlfop_megatron.config import REFERENCE_SOAP

ROOT = Path(__file__).resolve().parents[1]
CELL = "by-modality|base"


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


# ------------------------------------------------------------------ part (b): Megatron's peers
def test_peer_rows_come_from_the_optimizer_table() -> None:
    assert set(fold_training.PEERS) == {"megatron-soap", "megatron-muon"}
    assert {n for n, e in TABLE.items() if not e.ours} == set(fold_training.PEERS)
    assert set(fold_training.PEERS) <= set(fold_training.TrainingPlan().rows)
    assert {fold_training.name_of(p) for p in fold_training.PEERS} == {
        "Megatron SOAP",
        "Megatron Muon",
    }
    args = sample_efficiency.parse_args(["--training-rows", "adamw,megatron-soap,megatron-muon"])
    plan = sample_efficiency.plans(args)["training"]
    assert plan.rows == ("adamw", "megatron-soap", "megatron-muon")
    with pytest.raises(SystemExit, match="megatron-adam"):
        sample_efficiency.plans(sample_efficiency.parse_args(["--training-rows", "megatron-adam"]))


def test_row_spec_builds_the_peer_with_megatron_defaults() -> None:
    plan = fold_training.SMOKE_TRAINING
    base = fold_training.make_job(plan, Path("out"), "mixed", "large", "adamw", 1e-2, 1, 1).spec
    assert base.soap_options == tuple(REFERENCE_SOAP.items())  # ours: the reference's choices
    for peer in fold_training.PEERS:
        spec = fold_training.row_spec(base, peer)
        # Our SOAP options do not apply to Megatron's optimizers: the run records none.
        assert spec == replace(base, optimizer=peer, soap_options=())
    job = fold_training.make_job(plan, Path("out"), "mixed", "large", "megatron-muon", 1e-2, 1, 1)
    assert job.spec.optimizer == "megatron-muon" and job.spec.global_batch == 16
    assert job.spec.out == str(Path("out/mixed_large/megatron-muon_lr0.01_s1"))


def test_a_peer_that_cannot_run_is_skipped_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only the probe is faked (the skip logic); no run starts: the only row is skipped.
    reason = "emerging-optimizers is not installed (faked by the test)"
    monkeypatch.setitem(
        TABLE, "megatron-muon", replace(TABLE["megatron-muon"], probe=lambda: reason)
    )
    logged: list[str] = []
    plan = replace(fold_training.SMOKE_TRAINING, rows=("megatron-muon",))
    res = fold_training.run_training(plan, Path("unused"), 2, False, logged.append)
    assert res["skipped"] == {"megatron-muon": reason} and res["runs"] == []
    assert f"training: skipping megatron-muon: {reason}" in logged
    report = sample_efficiency.training_report({**res, "part_wall_s": 0.0})
    assert f"- Megatron Muon (`megatron-muon`): {reason}" in report


def fake_run(label: str, seed: int, end: float, cell: str = CELL) -> dict[str, Any]:
    """A result.json of 10 steps whose losses fall linearly from 2 to ``end``."""
    losses = [2.0 - (2.0 - end) * i / 9 for i in range(10)]
    rows = [
        {"step": i + 1, "loss": v, "image_loss": v, "text_loss": v, "step_time_s": 0.1}
        for i, v in enumerate(losses)
    ]
    summary = {"lr": 1e-2, "steps": 10, "skipped_steps": 0}
    for k in fold_training.KEYS:  # window 1 (10 steps): the final loss is the last step's
        summary |= {f"final_{k}": end, f"val_{k}": end, f"first_{k}": 2.0}
    spec = {"steps": 10, "seed": seed, "global_batch": 32, "lr": 1e-2}
    return {"cell": cell, "label": label, "spec": spec, "summary": summary, "rows": rows}


def fake_part(ends: dict[str, float], seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """A part (b) result: every row of ``ends`` (label -> final loss) on every seed."""
    runs = [fake_run(label, s, end) for label, end in ends.items() for s in seeds]
    plan = {**json.loads(json.dumps(asdict(fold_training.SMOKE_TRAINING))), "rows": list(ends)}
    return {
        "plan": plan,
        "chosen_lr": {CELL: {label: 1e-2 for label in ends}},
        "grid": [fold_training._slim(r) for r in runs if r["spec"]["seed"] == seeds[0]],
        "runs": runs,
        "part_wall_s": 60.0,
    }


def test_ratios_against_the_best_peer_of_the_cell() -> None:
    bench = fake_part({"adamw": 1.0, "soap": 0.9, "megatron-soap": 0.8, "megatron-muon": 0.5})
    table = fold_training.analyse_training(bench)[CELL]
    assert fold_training.best_peer(table) == "megatron-muon"
    assert "vs_peer" not in table["megatron-muon"]
    # Muon reaches 0.5 at step 10; SOAP never does (its ratio is an upper bound), Megatron's
    # SOAP (0.8) neither.
    soap = table["soap"]["vs_peer"]["image_loss"]
    assert [e["reached"] for e in soap] == [False, False]
    assert soap[0]["ref_steps"] == 10 and soap[0]["step_ratio"] == pytest.approx(1.0)
    assert {"adamw", "soap", "megatron-soap"} <= {lb for lb in table if "vs_peer" in table[lb]}
    text = "\n".join(fold_training.training_section(bench, {CELL: table}))
    assert "Ratios vs the best Megatron peer of this cell, Megatron Muon" in text
    assert "| Megatron SOAP | 10+ / 10+ / 10+ |" in text
    # A row that beats the peer: the peer's final loss in fewer steps (ratio > 1).
    bench = fake_part({"adamw": 1.0, "megatron-soap": 0.8, "fop-last-eta-mean": 0.4})
    fop = fold_training.analyse_training(bench)[CELL]["fop-last-eta-mean"]["vs_peer"]["loss"]
    assert all(e["reached"] and e["step_ratio"] > 1 for e in fop)


def test_results_without_peers_render_as_before() -> None:
    bench = fake_part({"adamw": 1.0, "soap": 0.9, "fop-last-eta-mean": 0.8})
    table = fold_training.analyse_training(bench)[CELL]
    assert fold_training.best_peer(table) is None
    assert not any("vs_peer" in e for e in table.values())
    text = "\n".join(sample_efficiency.training_report(bench))
    assert "Megatron" not in text and "Rows not run here" not in text
    assert "Ratios vs AdamW" in text and "Against SOAP's final loss" in text


def test_resume_adds_the_rows_run_to_the_saved_part() -> None:
    old = {**fake_part({"adamw": 1.0, "soap": 0.9}), "command": "first"}
    new = {
        **fake_part({"megatron-soap": 0.8, "megatron-muon": 0.7}),
        "command": "second",
    }
    new["runs"] = [r for r in new["runs"] if r["label"] == "megatron-soap"]
    new["chosen_lr"] = {CELL: {"megatron-soap": 1e-2}}
    new["skipped"] = {"megatron-muon": "not installed"}
    merged = sample_efficiency.keep_training_rows({"training": old}, {"training": new})["training"]
    assert merged["plan"]["rows"] == ["adamw", "soap", "megatron-soap", "megatron-muon"]
    assert sorted({r["label"] for r in merged["runs"]}) == ["adamw", "megatron-soap", "soap"]
    assert merged["skipped"] == {"megatron-muon": "not installed"}
    assert set(merged["chosen_lr"][CELL]) == {"adamw", "soap", "megatron-soap"}
    assert merged["part_wall_s"] == 120.0 and merged["command"] == "first, then second"
    # A row run again replaces its saved runs; a saved row this run skipped keeps them.
    saved = fake_part({"adamw": 1.0, "soap": 0.9, "megatron-muon": 0.6})
    again = {**fake_part({"soap": 0.95, "megatron-muon": 0.7})}
    again["runs"] = [r for r in again["runs"] if r["label"] == "soap"]
    again["skipped"] = {"megatron-muon": "not installed"}
    merged = fold_training.merge_rows(saved, again)
    assert merged["plan"]["rows"] == ["adamw", "soap", "megatron-muon"]
    finals = {(r["label"], r["summary"]["final_loss"]) for r in merged["runs"]}
    assert finals == {("adamw", 1.0), ("soap", 0.95), ("megatron-muon", 0.6)}
    assert len(merged["runs"]) == 6 and merged["skipped"] == {}
    assert merged["chosen_lr"][CELL] == {"adamw": 1e-2, "soap": 1e-2, "megatron-muon": 1e-2}
    # Another plan (here: other steps) is not merged: the fresh part replaces the saved one.
    other = {**new, "plan": {**new["plan"], "steps": 99}}
    assert sample_efficiency.keep_training_rows({"training": old}, {"training": other}) == {
        "training": other
    }


def test_main_with_resume_keeps_the_saved_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one row asked for cannot run (faked probe): no training starts, the merge is checked.
    reason = "faked by the test"
    monkeypatch.setitem(
        TABLE, "megatron-muon", replace(TABLE["megatron-muon"], probe=lambda: reason)
    )
    saved = fake_part({"adamw": 1.0, "soap": 0.9})
    saved["plan"] = json.loads(
        json.dumps(asdict(fold_training.TrainingPlan(rows=("adamw", "soap"))))
    )
    (tmp_path / "results.json").write_text(json.dumps({"results": {"training": saved}}))
    argv = ["--out", str(tmp_path), "--parts", "training", "--no-write", "--resume"]
    assert sample_efficiency.main([*argv, "--training-rows", "megatron-muon"]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())["results"]
    assert merged["training"]["plan"]["rows"] == ["adamw", "soap", "megatron-muon"]
    assert len(merged["training"]["runs"]) == 4
    assert merged["training"]["skipped"] == {"megatron-muon": reason}


# ------------------------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One ``--smoke`` run of every part: (printed report, results.json's results)."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.sample_efficiency", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout, json.loads((out / "results.json").read_text())["results"]


@pytest.mark.slow
@pytest.mark.distributed
def test_smoke_run_writes_every_part(smoke: tuple[str, dict[str, Any]]) -> None:
    stdout, results = smoke
    for heading in ("### (a)", "### (b)", "### (c)", "Headline checks"):
        assert heading in stdout, heading
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
    rows = [lb for lb in training["plan"]["rows"] if lb not in training["skipped"]]
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


@pytest.mark.slow
@pytest.mark.distributed
def test_smoke_run_trains_a_megatron_peer_row(smoke: tuple[str, dict[str, Any]]) -> None:
    stdout, results = smoke
    training = results["training"]
    peers = [lb for lb in training["plan"]["rows"] if lb in fold_training.PEERS]
    assert len(peers) == 1
    peer, name = peers[0], fold_training.name_of(peers[0])
    reason = entry(peer).missing()
    if reason is not None:
        assert training["skipped"] == {peer: reason}
        assert f"- {name} (`{peer}`): {reason}" in stdout
        pytest.skip(f"{peer} cannot run in this Python: {reason}")
    assert training["skipped"] == {}
    (run,) = [r for r in training["runs"] if r["label"] == peer]
    assert run["spec"]["optimizer"] == peer and run["spec"]["soap_options"] == []
    assert f"| {name} | " in stdout
    assert f"Ratios vs the best Megatron peer of this cell, {name}" in stdout
