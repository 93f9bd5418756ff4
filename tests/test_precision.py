"""TF32 off around the SOAP math, restored after; the cuBLAS TF32 override refused up front."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.core.precision import TF32_OVERRIDE_ENV, check_tf32_override, fp32_matmuls
from mlfop_megatron.optim import MLFOPSOAP


def _flags() -> tuple[bool, bool, str]:
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )


@pytest.fixture
def tf32_on():
    """The model's setting in many training scripts: TF32 on everywhere."""
    before = _flags()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    yield (True, True, "high")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
    torch.set_float32_matmul_precision(before[2])


def _recorder(monkeypatch, module, name, seen):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append((name, _flags()))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_fp32_matmuls_turns_tf32_off_and_restores_it(tf32_on):
    with fp32_matmuls():
        assert _flags() == (False, False, "highest")
    assert _flags() == tf32_on
    with pytest.raises(ZeroDivisionError), fp32_matmuls():
        _ = 1 / 0
    assert _flags() == tf32_on  # restored on an exception too


@pytest.mark.parametrize("batched", [True, False])
def test_mlfop_soap_accumulates_folds_and_steps_without_tf32(tf32_on, monkeypatch, batched):
    """Every rotation, moment update and refresh of MLFOPSOAP runs with TF32 off."""
    from mlfop_megatron.core import batched as batched_mod
    from mlfop_megatron.core import soap

    seen: list = []
    _recorder(monkeypatch, batched_mod, "compute_bases", seen)
    _recorder(monkeypatch, batched_mod, "adam_moments_update", seen)
    _recorder(monkeypatch, soap, "adam_moments_update", seen)
    _recorder(monkeypatch, soap, "refresh_bases", seen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = MLFOPSOAP(
        model.parameters(),
        accumulation_steps=2,
        enabled=True,
        precondition_frequency=1,
        batched=batched,
    )
    for _ in range(3):
        for _ in range(2):
            model(torch.randn(5, 6)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
        opt.zero_grad()
    names = {name for name, _ in seen}
    assert "adam_moments_update" in names and len(names) >= 2, names
    assert {flags for _, flags in seen} == {(False, False, "highest")}
    assert _flags() == tf32_on


def _megatron_flags(spec):
    """DP=2 tiny GPT with TF32 on in the script: the optimizer's calls see it off."""
    from mlfop_megatron.core import batched as batched_mod
    from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
    from tests.support.mlfop_runs import run_tiny_gpt

    seen = []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    for owner, name in (
        (ShardedSOAP, "fold_owned_level"),
        (ShardedSOAP, "fold_reduced_level"),
        (ShardedSOAP, "step"),
        (batched_mod, "compute_bases"),
    ):
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, _flags()))
            return _original(*args, **kwargs)

        setattr(owner, name, wrapped)
    run_tiny_gpt(spec)
    return {"seen": seen, "after": _flags()}


@pytest.mark.distributed
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "replicated"])
def test_megatron_optimizer_folds_and_steps_without_tf32(sharded):
    pytest.importorskip("megatron.core")
    from mlfop_megatron.runtime.spawn import run_distributed

    spec = dict(iters=3, microbatches=4, global_micro=2, sharded=sharded, precondition_frequency=1)
    for rank in run_distributed(_megatron_flags, 2, spec):
        names = {name for name, _ in rank["seen"]}
        assert "step" in names and names & {"fold_owned_level", "fold_reduced_level"}, names
        assert {flags for _, flags in rank["seen"]} == {(False, False, "highest")}
        assert rank["after"][0] is True and rank["after"][2] == "high"  # the script's again


def test_tf32_cublas_override_is_refused_on_cuda_with_the_fix(monkeypatch):
    monkeypatch.setenv(TF32_OVERRIDE_ENV, "1")
    with pytest.raises(RuntimeError, match=f"{TF32_OVERRIDE_ENV}=1 forces TF32.*unset"):
        check_tf32_override(torch.device("cuda", 0))
    check_tf32_override(torch.device("cpu"))  # no cuBLAS: nothing to refuse
    monkeypatch.setenv(TF32_OVERRIDE_ENV, "0")
    check_tf32_override(torch.device("cuda", 0))
