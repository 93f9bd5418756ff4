"""Megatron features a user can switch on: each one trains correctly or is refused up front.

Supported, checked against a layout without the feature (real megatron-core objects, gloo):
sequence parallelism (TP=2 + SP, with an MoE router whose 2-D grad finalize_model_grads reduces
over TP, equals TP=1), expert parallelism (EP=2 equals EP=1 at the same DP), context
parallelism (CP=2 equals DP=2: same grad norm and params) and activation recompute at PP=2
(full and selective equal no recompute). Refused with the field and the fix: per-token loss,
CUDA graphs, overlap_param_gather, virtual pipeline stages, delay_wgrad_compute, the
distributed optimizer.

Cross-layout comparisons run in fp64 with the rotation off (max_precond_dim=1), as in
tests/test_megatron_tp_pp.py: TP/EP/SP change reduction orders (last-bit differences that
SOAP's eigenbases would amplify), so the tolerance there is rtol 1e-4 / atol 2e-5 (5e-5 with
the MoE router, measured 1.5e-5) on params of size ~0.02-0.1. Recompute replays the same fp64
forward and backward ops, so it is bitwise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.megatron_compare import assert_params_close, error_message, merged_params  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402
from tests.support.step_capture import (  # noqa: E402
    capture_engine_steps,
    check_block_step,
    plain_step,
)

pytestmark = pytest.mark.distributed
# Rotation off, and Adam's own update scale: update_rms takes each block's RMS, and a
# TP-blockwise shard is its own block (as in Megatron's blockwise Muon), so TP=2 would
# equal TP=1 only with it off.
FP64_IDENTITY = dict(dtype=torch.float64, max_precond_dim=1, soap={"update_rms": 0.0})
MOE = (
    ("num_moe_experts", 4),
    ("moe_router_topk", 2),
    ("moe_token_dispatcher_type", "allgather"),
)


def _norms(run):
    return [norm for _, norm in run["results"]]


# ------------------------------------------------------------------ sequence parallelism
def test_sequence_parallel_tp2_with_moe_router_equals_tp1():
    """SP norms and the 2-D MoE router weight (sequence_parallel=True) go to Adam."""
    base = dict(iters=4, microbatches=4, global_micro=2, **FP64_IDENTITY)
    moe = dict(base, extra_config=MOE)
    tp1 = run_distributed(run_tiny_gpt, 1, moe)[0]
    sp = run_distributed(
        run_tiny_gpt, 2, dict(moe, tp=2, extra_config=(*MOE, ("sequence_parallel", True)))
    )
    # max diff 1.5e-5 measured
    assert_params_close(merged_params(sp, tp=2), tp1["params"], 1e-4, 5e-5, "TP=2+SP vs TP=1")
    assert _norms(sp[0]) == pytest.approx(_norms(tp1), rel=1e-5)  # 2e-7 measured


# ------------------------------------------------------------------- expert parallelism
def test_expert_parallel_ep2_equals_ep1():
    """Experts sharded over the expert-data-parallel group, each expert grad counted once."""
    base = dict(iters=4, microbatches=4, global_micro=2, extra_config=MOE, **FP64_IDENTITY)
    ep1 = run_distributed(run_tiny_gpt, 2, base)
    ep2 = run_distributed(
        run_tiny_gpt,
        2,
        dict(
            base,
            parallel=dict(expert_model_parallel_size=2),
            extra_config=(*MOE, ("expert_model_parallel_size", 2)),
        ),
    )
    assert sum("local_experts.3." in n for n in ep2[1]["params"]) > 0  # global expert index
    assert_params_close(merged_params(ep2), merged_params(ep1), 1e-4, 2e-5, "EP=2 vs EP=1")
    assert _norms(ep2[0]) == pytest.approx(_norms(ep1[0]), rel=1e-6)
    assert _norms(ep2[0]) == _norms(ep2[1])


# ------------------------------------------------------------------- context parallelism
def _small_model_run(context_parallel: int):
    """A two-layer MLP in FoldingDistributedDataParallel; each rank trains on its own half.

    Megatron's local attention refuses CP > 1 without TransformerEngine, so the CP=2 layout
    is checked on this model: DDP reduces over the data x context parallel group, exactly as
    DP=2 does, and the optimizer must shard and count over that group too.
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel

    init_megatron_parallel(context_parallel_size=context_parallel)
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)
    ).double()
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True
    )
    ddp = FoldingDistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(overlap_grad_reduce=True, bucket_size=40),
        module=module,
    )
    k = 4
    opt = get_mlfop_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1e-3),
        [ddp],
        MLFOPConfig.from_kwargs(accumulation_steps=k, enabled=True, precondition_frequency=2),
    )
    gen = torch.Generator().manual_seed(1)
    rank = torch.distributed.get_rank()
    norms = []
    captured: list = []  # one step of every engine, checked against the SOAP equations
    done = [0]  # optimizer steps so far
    # The fourth step: t 2 -> 3, no refresh before it (every 2 steps, before the update).
    capture_engine_steps(opt, lambda: done[0] == 3, captured)
    for _ in range(4):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for _ in range(k):
            x = torch.randn(2, 2, 8, generator=gen, dtype=torch.float64)[rank]
            (ddp(x).pow(2).mean() / k).backward()
        norms.append(opt.step()[1])
        done[0] += 1
    return norms, {n: p.detach().clone() for n, p in module.named_parameters()}, captured


def test_context_parallel_cp2_equals_dp2():
    dp2 = run_distributed(_small_model_run, 2, 1)
    cp2 = run_distributed(_small_model_run, 2, 2)
    assert cp2[0][0] == pytest.approx(dp2[0][0], rel=1e-9)  # norms: Adam grads counted once
    assert_params_close(cp2[0][1], dp2[0][1], 1e-9, 1e-12, "CP=2 vs DP=2")
    assert_params_close(cp2[1][1], cp2[0][1], 0, 0, "CP ranks")
    # Every SOAP block of the CP=2 run steps by the SOAP equations (fp64).
    blocks = [(b, rec) for rank in cp2 for rec in rank[2] for b in rec["blocks"]]
    assert blocks
    for block, record in blocks:
        assert plain_step(block, record)
        check_block_step(block, record, 1e-9)


# ------------------------------------------------------------------ activation recompute
RECOMPUTE = {
    "full": (
        ("recompute_granularity", "full"),
        ("recompute_method", "uniform"),
        ("recompute_num_layers", 1),
    ),
    "selective": (("recompute_granularity", "selective"),),
}


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_recompute_at_pp2_equals_no_recompute(granularity):
    """Full recompute: micro-steps end when every param reported, bitwise.

    Full recompute's first grad on stage 0 arrives in a nested backward: the micro-step
    must end when every param reported, not when that backward ends. Bitwise equal.
    """
    base = dict(iters=3, microbatches=4, global_micro=2, pp=2, layers=2, dtype=torch.float64)
    plain = run_distributed(run_tiny_gpt, 2, base)
    recomputed = run_distributed(run_tiny_gpt, 2, dict(base, extra_config=RECOMPUTE[granularity]))
    for a, b in zip(recomputed, plain):
        assert_params_close(a["params"], b["params"], 0, 0, f"{granularity} recompute")
        assert _norms(a) == _norms(b)


# ---------------------------------------------------------------------- refused features
REFUSED_CONFIG = {
    "calculate_per_token_loss": (True, "calculate_per_token_loss=False"),
    "enable_cuda_graph": (True, "enable_cuda_graph=False"),
    "cuda_graph_impl": ("local", "cuda_graph_impl='none'"),
    "external_cuda_graph": (True, "external_cuda_graph=False"),
    "virtual_pipeline_model_parallel_size": (2, "virtual_pipeline_model_parallel_size=None"),
    "delay_wgrad_compute": (True, "delay_wgrad_compute=False"),
    "defer_embedding_wgrad_compute": (True, "defer_embedding_wgrad_compute=False"),
}


def _refusals():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt

    init_megatron_parallel(seed=1)
    ok = OptimizerConfig(optimizer="adam", lr=1e-3)
    out = {}
    for field, (value, _) in REFUSED_CONFIG.items():
        model = build_tiny_gpt(TinyGPTConfig(), ddp_class=FoldingDistributedDataParallel)
        setattr(model.config, field, value)  # switched on after wrapping: factory refuses
        out["factory:" + field] = error_message(lambda m=model: get_mlfop_optimizer(ok, [m]))
    # Switched on before wrapping: FoldingDistributedDataParallel refuses.
    out["ddp:calculate_per_token_loss"] = error_message(
        lambda: build_tiny_gpt(
            TinyGPTConfig(extra_config=(("calculate_per_token_loss", True),)),
            ddp_class=FoldingDistributedDataParallel,
        )
    )
    for field in ("overlap_param_gather", "use_distributed_optimizer"):
        ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=True, use_distributed_optimizer=True
        )
        if field == "overlap_param_gather":
            ddp_config.overlap_param_gather = True
        out["ddp:" + field] = error_message(
            lambda c=ddp_config: build_tiny_gpt(
                TinyGPTConfig(), ddp_class=FoldingDistributedDataParallel, ddp_config=c
            )
        )
    model = build_tiny_gpt(TinyGPTConfig(), ddp_class=FoldingDistributedDataParallel)
    model.ddp_config.overlap_param_gather = True
    out["factory:overlap_param_gather"] = error_message(lambda: get_mlfop_optimizer(ok, [model]))
    return out


def test_features_that_break_folding_are_refused_naming_the_fix():
    msgs = run_distributed(_refusals, 1)[0]
    for field, (_, fix) in REFUSED_CONFIG.items():
        assert fix in msgs["factory:" + field], msgs["factory:" + field]
    assert "calculate_per_token_loss=False" in msgs["ddp:calculate_per_token_loss"]
    assert "use_distributed_optimizer=False" in msgs["ddp:use_distributed_optimizer"]
    assert "overlap_param_gather=False" in msgs["factory:overlap_param_gather"]
    assert msgs["ddp:overlap_param_gather"].startswith("ValueError")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(overlap_param_gather=True), "drop --overlap-param-gather"),
        (dict(calculate_per_token_loss=True), "drop --calculate-per-token-loss"),
        (dict(enable_cuda_graph=True), "CUDA graphs (--enable-cuda-graph"),
        (dict(cuda_graph_impl="transformer_engine"), "--cuda-graph-impl none"),
        (dict(external_cuda_graph=True), "--external-cuda-graph"),
        (dict(delay_wgrad_compute=True), "--delay-wgrad-compute is not supported"),
        (dict(defer_embedding_wgrad_compute=True), "--defer-embedding-wgrad-compute is not"),
        (dict(async_save=True), "drop --async-save"),
        (dict(fp8_param_gather=True), "--fp8-param-gather is not supported"),
        (dict(use_distributed_optimizer=True), "--use-distributed-optimizer cannot be"),
        (dict(virtual_pipeline_model_parallel_size=2), "virtual pipeline stages"),
    ],
)
def test_megatron_lm_flags_that_break_folding_are_refused(overrides, expected):
    import argparse

    from mlfop_megatron.megatron_lm.arguments import validate_megatron_args

    args = dict(optimizer="mlfop_soap", cuda_graph_impl="none")
    validate_megatron_args(argparse.Namespace(**args))
    with pytest.raises(ValueError) as exc:
        validate_megatron_args(argparse.Namespace(**{**args, **overrides}))
    assert expected in str(exc.value)
