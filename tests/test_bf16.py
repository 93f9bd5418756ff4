"""bf16 params with fp32 main weights and fp32 optimizer state (CPU-testable part of FP8/bf16)."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.optim import MLFOPSOAP
from mlfop_megatron.runtime.spawn import run_distributed


def test_bf16_params_follow_fp32_main_weights_exactly():
    """Fed the same fp32 gradients, the fp32 main weights of a bf16 model equal an fp32 run."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 7, generator=gen)
    grads = [[torch.randn(12, 7, generator=gen) for _ in range(4)] for _ in range(12)]
    p32 = torch.nn.Parameter(w0.clone())
    p16 = torch.nn.Parameter(w0.to(torch.bfloat16))
    opts = dict(accumulation_steps=4, enabled=True, precondition_frequency=3)
    o32, o16 = MLFOPSOAP([p32], **opts), MLFOPSOAP([p16], **opts)
    # Start both from the bf16-rounded weights so the comparison is exact.
    with torch.no_grad():
        p32.copy_(p16.float())
    for micro in grads:
        for g in micro:
            p32.grad, p16.grad = g.clone(), g.to(torch.bfloat16).float().to(torch.bfloat16)
            p32.grad = p16.grad.float()
            o32.accumulate()
            o16.accumulate()
        o32.step()
        o16.step()
    master = o16.state[p16]["master"]
    assert master.dtype == torch.float32 and o16.state[p16]["exp_avg"].dtype == torch.float32
    assert torch.equal(master, p32.detach())
    assert torch.equal(p16.detach(), master.to(torch.bfloat16))


@pytest.mark.distributed
def test_megatron_bf16_dp2_sharded_equals_replicated_and_trains():
    from tests.support.mlfop_runs import run_tiny_gpt

    base = dict(iters=8, microbatches=4, global_micro=2, dtype=torch.bfloat16)
    sharded = run_distributed(run_tiny_gpt, 2, dict(base, sharded=True))
    replicated = run_distributed(run_tiny_gpt, 2, dict(base, sharded=False))
    for name, value in sharded[0]["params"].items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, replicated[0]["params"][name]), name
        assert torch.equal(value, sharded[1]["params"][name]), name
    assert sharded[0]["losses"][-1] < sharded[0]["losses"][0] - 0.2
