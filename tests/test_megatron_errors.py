"""Unsupported combinations fail with a clear message instead of wrong results."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.optimizer import OptimizerConfig  # noqa: E402

from mlfop_megatron.config import MLFOPConfig  # noqa: E402
from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel  # noqa: E402
from mlfop_megatron.megatron.factory import get_mlfop_optimizer  # noqa: E402
from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.megatron_compare import error_message  # noqa: E402
from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt, train_iteration  # noqa: E402

pytestmark = pytest.mark.distributed


class DDPWithUnusedParam(FoldingDistributedDataParallel):
    """Adds a weight the forward pass never touches."""

    def __init__(self, config, ddp_config, module, **kwargs):
        module.register_parameter("unused_weight", torch.nn.Parameter(torch.zeros(4, 4)))
        super().__init__(config, ddp_config, module, **kwargs)


def _error_cases():
    init_megatron_parallel(seed=1)
    cfg = TinyGPTConfig()
    model = build_tiny_gpt(cfg, ddp_class=FoldingDistributedDataParallel)
    plain = build_tiny_gpt(cfg)
    bf16_grads = build_tiny_gpt(
        TinyGPTConfig(grad_reduce_in_fp32=False, dtype=torch.bfloat16),
        ddp_class=FoldingDistributedDataParallel,
    )
    ok = OptimizerConfig(optimizer="adam", lr=1e-3)
    out = {
        "fp16": error_message(
            lambda: get_mlfop_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-3, fp16=True), [model]
            )
        ),
        "bf16": error_message(
            lambda: get_mlfop_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True), [bf16_grads]
            )
        ),
        "distopt": error_message(
            lambda: get_mlfop_optimizer(
                OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [model]
            )
        ),
        "tp_mode": error_message(lambda: get_mlfop_optimizer(ok, [model], tp_mode="rows")),
        "plain_ddp": error_message(lambda: get_mlfop_optimizer(ok, [plain])),
        "two_chunks": error_message(lambda: get_mlfop_optimizer(ok, [model, model])),
    }
    get_mlfop_optimizer(ok, [model], MLFOPConfig.from_kwargs(accumulation_steps=4, enabled=True))
    out["too_few"] = error_message(lambda: train_iteration(model, cfg, 0, 2, 1))
    out["too_many"] = error_message(lambda: train_iteration(model, cfg, 0, 5, 1))
    unused = build_tiny_gpt(cfg, ddp_class=DDPWithUnusedParam)
    get_mlfop_optimizer(ok, [unused], MLFOPConfig.from_kwargs(accumulation_steps=2, enabled=True))
    out["no_grad"] = error_message(lambda: train_iteration(unused, cfg, 0, 2, 1))
    return out


def test_unsupported_combinations_raise_clear_errors():
    msgs = run_distributed(_error_cases, 1)[0]
    assert "fp16" in msgs["fp16"] and "loss scaling" in msgs["fp16"]
    assert "grad_reduce_in_fp32=True" in msgs["bf16"]
    assert "use_distributed_optimizer=False" in msgs["distopt"]
    assert "tp_mode must be one of" in msgs["tp_mode"]
    assert (
        msgs["plain_ddp"].startswith("TypeError")
        and "FoldingDistributedDataParallel" in (msgs["plain_ddp"])
    )
    assert "virtual pipeline" in msgs["two_chunks"]
    assert "after 2 micro-steps" in msgs["too_few"] and "accumulation_steps=4" in msgs["too_few"]
    assert "more micro-batches than accumulation_steps=4" in msgs["too_many"]
    assert "unused_weight" in msgs["no_grad"] and "received no gradient" in msgs["no_grad"]
