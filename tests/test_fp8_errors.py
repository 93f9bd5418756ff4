"""FP8 requested without TransformerEngine or without a GPU fails early with the fix.

Real megatron-core TransformerConfig / OptimizerConfig objects with their fp8 fields set; only
our own probes for TE and CUDA are overridden to reach each branch on any machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mlfop_megatron.megatron import fp8  # noqa: E402
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402


def _tconfig(**kwargs) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, **kwargs)


def test_module_imports_without_transformer_engine_and_sees_no_fp8():
    assert fp8.fp8_requests(_tconfig(), OptimizerConfig(optimizer="adam", lr=1e-3)) == []
    assert not fp8.check_fp8_support(_tconfig(), OptimizerConfig(lr=1e-3), [torch.zeros(2)])
    assert not fp8.is_quantized(torch.nn.Parameter(torch.zeros(2, 2)))


def test_optimizer_recipe_alone_is_not_a_request():
    """Megatron-LM's default fp8_recipe alone does not ask for FP8.

    Megatron-LM copies TransformerConfig's default fp8_recipe ('delayed') into every
    OptimizerConfig, FP8 or not: that alone must not count as asking for FP8.
    """
    recipe_only = OptimizerConfig(optimizer="adam", lr=1e-3, fp8_recipe="delayed")
    assert fp8.fp8_requests(_tconfig(), recipe_only) == []
    assert not fp8.check_fp8_support(_tconfig(), recipe_only)


def test_fp8_settings_are_all_detected():
    requests = fp8.fp8_requests(
        _tconfig(fp8="hybrid", fp8_param=True, fp8_recipe="tensorwise"),
        OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True, fp8_recipe="tensorwise"),
    )
    assert requests == [
        "TransformerConfig.fp8='hybrid'",
        "TransformerConfig.fp8_param=True",
        "OptimizerConfig.fp8_recipe='tensorwise'",
    ]


@pytest.mark.parametrize(
    "te, cuda, expected, absent",
    [
        (False, False, ["TransformerEngine", "no CUDA GPU"], []),
        (False, True, ["TransformerEngine (transformer_engine.pytorch) is not installed"], ["GPU"]),
        (True, False, ["no CUDA GPU is available"], ["not installed"]),
    ],
)
def test_missing_te_or_gpu_raise_with_option_and_fix(monkeypatch, te, cuda, expected, absent):
    monkeypatch.setattr(fp8, "_te_importable", lambda: te)
    monkeypatch.setattr(fp8, "_cuda_available", lambda: cuda)
    with pytest.raises(RuntimeError) as info:
        fp8.check_fp8_support(_tconfig(fp8="e4m3"), OptimizerConfig(optimizer="adam", lr=1e-3))
    msg = str(info.value)
    assert "TransformerConfig.fp8='e4m3'" in msg
    assert "mlfop_megatron[te]" in msg and "fp8=None" in msg  # the fix
    assert all(e in msg for e in expected), msg
    assert not any(a in msg for a in absent), msg


def test_te_and_gpu_present_accepts_fp8(monkeypatch):
    monkeypatch.setattr(fp8, "_te_importable", lambda: True)
    monkeypatch.setattr(fp8, "_cuda_available", lambda: True)
    assert fp8.check_fp8_support(_tconfig(fp8="hybrid"), None)


def test_this_machine_reports_what_is_missing():
    """No monkeypatching: on a CPU-only machine without TE, both problems are named."""
    if torch.cuda.is_available() and fp8._te_importable():
        pytest.skip("TransformerEngine and CUDA are both present here")
    with pytest.raises(RuntimeError, match="FP8 training was requested"):
        fp8.check_fp8_support(_tconfig(fp8="hybrid", fp8_param=True), None)


def _factory_errors():
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt

    init_megatron_parallel(seed=1)
    model = build_tiny_gpt(TinyGPTConfig(), ddp_class=FoldingDistributedDataParallel)
    out = {}
    ok = OptimizerConfig(optimizer="adam", lr=1e-3)
    # Megatron-LM's default recipe on a non-FP8 model builds fine.
    get_mlfop_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, fp8_recipe="delayed"), [model])
    out["recipe_only"] = "built"
    # The model's own TransformerConfig asking for fp8 compute (a real config, re-validated).
    model.config = dataclasses.replace(model.config, fp8="hybrid")
    try:
        get_mlfop_optimizer(ok, [model])
    except RuntimeError as exc:
        out["transformer_config"] = str(exc)
    return out


@pytest.mark.distributed
def test_get_mlfop_optimizer_rejects_fp8_configs_on_this_machine():
    if torch.cuda.is_available() and fp8._te_importable():
        pytest.skip("TransformerEngine and CUDA are both present here")
    msgs = run_distributed(_factory_errors, 1)[0]
    assert msgs.pop("recipe_only") == "built"
    assert "TransformerConfig.fp8='hybrid'" in msgs["transformer_config"]
    for msg in msgs.values():
        assert "FP8 training was requested" in msg and "mlfop_megatron[te]" in msg
