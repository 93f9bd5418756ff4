"""``make gpu-check`` (benchmarks/gpu_check.py) on a machine without a GPU.

What can run here does: the refusal without CUDA (a real subprocess), part 3's whole code path
at the tiny size on the CPU emulation (worker process, figures, JSON and markdown), the GPU
suite's runner on tests/gpu (which skips here), and the GPU-only pieces that are plain
functions (sizing from the memory model, retries, the child environment, the report with
measured memory, CUDA-event timing under the emulation's events).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")

from benchmarks import gpu_check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


@no_cuda
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [gpu_check.NO_CUDA_MESSAGE]
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@no_cuda
def test_quick_cpu_path_measures_and_writes_the_figures(tmp_path: Path) -> None:
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["ok"] and results["quick"] and not results["over_budget"]
    device = results["device"]
    for key in ("torch", "megatron_core", "transformer_engine", "apex", gpu_check.TF32_ENV):
        assert key in device
    assert device["megatron_core"] != "absent"
    assert results["suite"] == {"status": "not run", "reason": "--quick"}
    m = results["measurement"]
    assert m["status"] == "ok" and m["engines"] == ["ShardedSOAP"]
    assert [a["status"] for a in m["attempts"]] == ["ok"]
    assert m["spec"]["cuda"] is False and m["spec"]["backend"] == "gloo"
    assert m["timed_iterations"] == gpu_check.QUICK.steps
    assert m["fwd_bwd_s"] > 0 and m["step_s"] > 0 and m["step_over_fwd_bwd"] > 0
    assert m["first_step_s"] > 0 and m["mean_step_s"] > 0
    its = m["iterations"]
    assert len(its) == gpu_check.QUICK.warmup + gpu_check.QUICK.steps
    assert all(r["ok"] for r in its) and all(r["loss"] > 0 for r in its)
    # SOAP's first step only collects statistics; the timed steps check (and refresh) bases.
    assert its[0]["refreshed_sides"] == 0
    mem = m["memory"]
    assert mem["measured"] is None  # no torch.cuda.max_memory_allocated on CPU
    model = mem["model"]
    assert model["soap_state"] > 0 and model["total"] > model["optimizer_peak"] > 0
    # The sizing's model from shapes alone is the model of the engine that was built.
    assert mem["model_from_shapes"] == model["total"]
    assert m["params_numel"] == sum(p.numel for p in gpu_check.stack_param_specs(gpu_check.QUICK))
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith(gpu_check.SECTION) and "step / fwd+bwd" in text
    # Part 4: every fused chain compiled (taken, not a silent fallback) and close to eager.
    compiled = results["compiled"]
    assert compiled["status"] == "ok" and compiled["device"] == "cpu"
    assert compiled["stack"] == list(gpu_check.COMPILED_STACK_QUICK)
    assert compiled["compiles"] >= len(compiled["chains"]) == 4
    assert all(r["max_rel_diff"] <= gpu_check.COMPILED_RTOL for r in compiled["chains"].values())
    assert "Compiled chains" in text

    # The GPU branch of the report: measured peaks beside the model, with the ratios.
    spec = gpu_check.StackSpec(**{**m["spec"], "cuda": True, "backend": "nccl"})
    timed = [
        dict(r, window_peak_bytes=int(0.9 * model["window_phase"]), step_peak_bytes=s)
        for r, s in zip(its[2:], (model["step_phase"], int(1.1 * model["step_phase"])))
    ]
    gpu_mem = gpu_check.memory_figures(spec, model, timed)
    assert gpu_mem["measured"]["step_peak"] == int(1.1 * model["step_phase"])
    assert gpu_mem["ratios"]["step_peak / model step phase"] == pytest.approx(1.1, rel=1e-6)
    gpu_results = dict(results, measurement=dict(m, memory=gpu_mem))
    gpu_results["suite"] = {
        "status": "failed",
        "command": "pytest tests/gpu",
        "wall_s": 1.0,
        "counts": {"passed": 4, "failed": 1, "skipped": 1},
        "skip_reasons": ["SKIPPED [1] tests/gpu/test_te_fp8.py:40: TransformerEngine missing"],
    }
    gpu_text = gpu_check.report(gpu_results)
    assert "| 1.100 |" in gpu_text and "**failed**, 1 failed, 4 passed, 1 skipped" in gpu_text
    assert "TransformerEngine missing" in gpu_text


def test_sizing_fits_the_stack_into_the_gpu_by_the_memory_model() -> None:
    full = gpu_check.StackSpec()
    at_20 = gpu_check.predicted_memory(full)
    # ~1.0B params with every side rotated: ~55 GiB at DP=1 with the refresh in waves (the
    # docstring; ~88 GiB with every new basis at once), so it fits an 80 GB H100, not a 40 GB.
    assert 50 * GIB < at_20["total"] < 60 * GIB
    a100, h100, h200 = 39.4 * GIB, 79.2 * GIB, 139.8 * GIB
    layers = gpu_check.choose_layers(full, int(a100))
    assert 8 <= layers <= 12
    fitted = replace(full, layers=layers)
    need = gpu_check.predicted_memory(fitted)["total"] + gpu_check.activation_bytes(fitted)
    assert need <= gpu_check.MEMORY_SHARE * a100
    assert gpu_check.choose_layers(full, int(h100)) == gpu_check.MOST_LAYERS
    assert gpu_check.choose_layers(full, int(h200)) == gpu_check.MOST_LAYERS
    layers = gpu_check.MOST_LAYERS
    spec = gpu_check.part3_spec(False, True, int(h100))
    assert (spec.layers, spec.backend, spec.cuda) == (layers, "nccl", True)
    assert spec.tokens_per_step == 1024 * 2 * 8
    assert gpu_check.part3_spec(False, True, int(h100), layers=3, backend="gloo").layers == 3
    quick = gpu_check.part3_spec(True, False, None)
    assert quick == replace(gpu_check.QUICK, cuda=False, backend="gloo")


def test_measurement_retries_out_of_memory_smaller_and_nccl_failures_on_gloo(
    tmp_path: Path,
) -> None:
    calls: list[tuple[int, str]] = []

    def fake(outcomes: list[str]):
        def run(spec: gpu_check.StackSpec, out: Path, timeout: float) -> dict[str, Any]:
            calls.append((spec.layers, spec.backend))
            status = outcomes[len(calls) - 1]
            return {"status": status, "error": status, "spec": spec.__dict__.copy()}

        return run

    spec = replace(gpu_check.StackSpec(), layers=12)
    far = 1e12  # no deadline
    res = gpu_check.measurement_attempts(spec, tmp_path, far, print, fake(["oom", "ok"]))
    assert calls == [(12, "nccl"), (8, "nccl")] and res["status"] == "ok"
    assert [a["status"] for a in res["attempts"]] == ["oom", "ok"]
    calls.clear()
    res = gpu_check.measurement_attempts(spec, tmp_path, far, print, fake(["failed", "failed"]))
    assert calls == [(12, "nccl"), (12, "gloo")] and res["status"] == "failed"
    calls.clear()
    gpu_check.measurement_attempts(spec, tmp_path, far, print, fake(["timed out"]))
    assert calls == [(12, "nccl")]  # no time for another try


def test_child_environment_spawns_ranks_and_unsets_forced_tf32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(gpu_check.TF32_ENV, "1")
    env = gpu_check.child_env(cuda=True)
    assert env[gpu_check.TF32_ENV] == "0" and env["MLFOP_MP_START_METHOD"] == "spawn"
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    assert gpu_check.child_env(cuda=False)["OMP_NUM_THREADS"] == "1"
    facts = dict(gpu_check.device_facts(cuda=False), capability="8.0")
    facts["transformer_engine"] = "absent"
    warnings = gpu_check.environment_warnings(facts, cuda=True)
    assert any("TransformerEngine is absent" in w for w in warnings)
    assert any("capability 8.0 < 8.9" in w for w in warnings)
    assert any(gpu_check.TF32_ENV in w for w in warnings)
    facts["capability"] = "10.0"  # Blackwell: compared as numbers, not strings
    assert not any("capability" in w for w in gpu_check.environment_warnings(facts, True))


def test_suite_counts_are_read_from_pytest_summaries() -> None:
    assert gpu_check.suite_counts("..\n6 skipped in 3.21s\n") == {"skipped": 6}
    text = "x\n== 1 failed, 4 passed, 1 skipped, 2 errors in 99.0s ==\n"
    assert gpu_check.suite_counts(text) == {"failed": 1, "passed": 4, "skipped": 1, "error": 2}
    assert gpu_check.suite_counts("no summary") == {}


@no_cuda
def test_gpu_suite_runner_on_a_cpu_machine_reports_the_skips(tmp_path: Path) -> None:
    res = gpu_check.run_suite(tmp_path, cuda=False, timeout_s=240)
    assert res["status"] == "skipped" and res["returncode"] == 0, res["tail"]
    # 3 without TE (one recipe), 6 with it
    assert set(res["counts"]) == {"skipped"} and res["counts"]["skipped"] >= 3
    assert res["skip_reasons"] and all("CUDA" in r for r in res["skip_reasons"])
    assert (tmp_path / "gpu_suite.log").read_text().strip()


@no_cuda
def test_cuda_event_timer_runs_on_the_emulations_events() -> None:
    from mlfop_megatron.runtime.cpu_emulation import cpu_emulation, is_cpu_emulation_installed

    if is_cpu_emulation_installed():
        pytest.skip("an emulation is already installed in this process")
    with cpu_emulation(with_megatron=False, strict=False):
        value, seconds = gpu_check.cuda_timer(lambda: sum(range(10_000)))
        gpu_check.reset_peak_memory(False)
    assert value == sum(range(10_000)) and 0 <= seconds < 10
    assert gpu_check.peak_memory(False) is None


@no_cuda
def test_part3_worker_failures_and_timeouts_are_reported_not_raised(tmp_path: Path) -> None:
    cpu = replace(gpu_check.QUICK, cuda=False, backend="gloo")
    # Killed before it wrote anything (the whole process group goes).
    res = gpu_check.run_measurement(cpu, tmp_path, timeout_s=1)
    assert res["status"] == "timed out" and "wrote no result" in res["error"]
    # A failure inside the worker (K = 0 micro-batches: refused by MLFOPConfig) is a result.
    res = gpu_check.run_measurement(replace(cpu, microbatches=0), tmp_path, timeout_s=240)
    assert res["status"] == "failed" and "accumulation_steps" in res["error"], res
    assert res["traceback"] and "fwd_bwd_s" not in res
    assert gpu_check.measurement_lines(res)[0].startswith("Optimizer cost at scale: **failed**")
