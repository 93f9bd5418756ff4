"""FP8 with TransformerEngine on one GPU: TE LayerNormLinear / Linear stacks (TP=1), folding on.

Skipped without CUDA (tests/conftest.py) or without TransformerEngine (one-line reasons).
Every run goes through the real path: Megatron's TE wrappers (fused wgrad accumulation into
main_grad), FoldingDistributedDataParallel, get_mlfop_optimizer, and for fp8 primary weights
the requantization with megatron.core.fp8_utils.quantize_param_shard. The process group is
gloo (CUDA tensors), so that two ranks can share one GPU for the data-parallel check.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlfop_megatron.runtime.spawn import run_distributed

pytestmark = pytest.mark.gpu

ITERS = 6
MICRO = 4  # accumulation steps: dyadic levels 1, 2, 4
TOKENS = 32  # per micro-batch on each rank (FP8 GEMMs want multiples of 16)
HIDDEN, FFN = 64, 128
# bf16 vs FP8 compute on the same data and init: e4m3 activations/weights (~2^-4 relative)
# perturb the regression loss by a few percent; 15% per iteration bounds it with margin.
LOSS_RTOL = 0.15


def _needs_te():
    te = pytest.importorskip("transformer_engine.pytorch", reason="TransformerEngine missing")
    if not torch.cuda.is_available():  # pragma: no cover - conftest skips first
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (8, 9):  # FP8 GEMMs: Ada, Hopper, Blackwell
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    return te


def _recipes():
    out = ["delayed"]
    try:
        from transformer_engine.common.recipe import Float8CurrentScaling  # noqa: F401
    except Exception:  # noqa: BLE001
        return out
    return out + ["tensorwise"]


def _run(spec):
    """One training run on this rank; returns losses and FP8 metadata by param name."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )
    from megatron.core.fp8_utils import get_fp8_context, is_float8tensor
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel

    torch.cuda.set_device(0)
    init_megatron_parallel(seed=1234)
    fp8 = spec["fp8"]
    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=4,
        params_dtype=torch.bfloat16,
        bf16=True,
        fp8="hybrid" if fp8 else None,
        fp8_recipe=spec.get("recipe", "delayed"),
        fp8_param=bool(fp8 and spec.get("fp8_param")),
        gradient_accumulation_fusion=True,  # TE writes wgrad straight into main_grad
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )

    class Stack(MegatronModule):
        def __init__(self):
            super().__init__(config)
            init = lambda w: torch.nn.init.normal_(w, std=0.05)  # noqa: E731
            with get_fp8_context(config, is_init=True):
                self.fc1 = torch.nn.ModuleList(
                    TELayerNormColumnParallelLinear(
                        HIDDEN,
                        FFN,
                        config=config,
                        init_method=init,
                        gather_output=False,
                        bias=True,
                        skip_bias_add=False,
                        is_expert=False,
                    )
                    for _ in range(config.num_layers)
                )
                self.fc2 = torch.nn.ModuleList(
                    TERowParallelLinear(
                        FFN,
                        HIDDEN,
                        config=config,
                        init_method=init,
                        bias=True,
                        input_is_parallel=True,
                        skip_bias_add=False,
                        is_expert=False,
                    )
                    for _ in range(config.num_layers)
                )

        def forward(self, x):
            with get_fp8_context(config):
                for fc1, fc2 in zip(self.fc1, self.fc2):
                    h, _ = fc1(x)
                    y, _ = fc2(F.gelu(h))
                    x = x + y
            return x

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    model = FoldingDistributedDataParallel(config=config, ddp_config=ddp_config, module=Stack())
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.01,
        bf16=True,
        fp8_recipe=config.fp8_recipe if fp8 else None,
    )
    mlfop = MLFOPConfig.from_kwargs(
        lr=3e-3, accumulation_steps=MICRO, enabled=True, precondition_frequency=2
    )
    optimizer = get_mlfop_optimizer(opt_config, [model], mlfop, sharded=True)

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    teacher = torch.Generator().manual_seed(7)
    w_teacher = torch.randn(HIDDEN, HIDDEN, generator=teacher) / math.sqrt(HIDDEN)
    losses = []
    for it in range(ITERS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        for m in model.modules():  # as Megatron's schedules do on the first micro-batch
            if hasattr(m, "is_first_microbatch"):
                m.is_first_microbatch = True
        total = 0.0
        for micro in range(MICRO):
            gen = torch.Generator().manual_seed(1000 * it + micro)
            x_all = torch.randn(TOKENS * spec["global_dp"], HIDDEN, generator=gen)
            per = x_all.shape[0] // dp  # this rank's share of the global micro-batch
            x = x_all[dp_rank * per : (dp_rank + 1) * per]
            y = torch.tanh(x @ w_teacher)
            x = x.to("cuda", torch.bfloat16)
            y = y.to("cuda", torch.float32)
            loss = F.mse_loss(model(x).float(), y)
            loss.backward()
            total += float(loss)
        value = torch.tensor([total / MICRO], device="cuda")
        torch.distributed.all_reduce(value)
        losses.append(float(value) / torch.distributed.get_world_size())
        ok, _, _ = optimizer.step()
        assert ok
    out = {"losses": losses, "fp8": {}, "n_fp8": 0}
    ours = optimizer.mlfop[0]
    out["shadow_numel"] = [s.numel() for s in ours.fp8.shadows]
    out["master_dtypes"] = sorted(
        {str(o.state["master"].dtype) for e in ours.engines for o in e.owned if "master" in o.state}
    )
    for name, p in model.module.named_parameters():
        if not is_float8tensor(p):
            continue
        out["n_fp8"] += 1
        entry = {"dequant": p.dequantize().float().cpu()}
        for attr in ("_data", "_scale_inv"):
            t = getattr(p, attr, None)
            if torch.is_tensor(t):
                entry[attr] = t.detach().view(torch.uint8).cpu() if attr == "_data" else t.cpu()
        quantizer = getattr(p, "_quantizer", None)
        for attr in ("amax", "scale"):
            t = getattr(quantizer, attr, None)
            if torch.is_tensor(t) and t.numel():
                entry[f"quantizer.{attr}"] = t.detach().float().cpu()
        out["fp8"][name] = entry
    return out


@pytest.mark.parametrize("recipe", _recipes())
@pytest.mark.parametrize("fp8_param", [False, True], ids=["fp8_compute", "fp8_params"])
def test_te_fp8_training_with_folding_tracks_bf16(recipe, fp8_param):
    _needs_te()
    base = {"global_dp": 1, "recipe": recipe}
    (bf16,) = run_distributed(_run, 1, dict(base, fp8=False), emulate_cuda=False)
    (ours,) = run_distributed(
        _run, 1, dict(base, fp8=True, fp8_param=fp8_param), emulate_cuda=False
    )
    assert ours["losses"][-1] < ours["losses"][0], ours["losses"]
    for a, b in zip(ours["losses"], bf16["losses"]):
        assert abs(a - b) <= LOSS_RTOL * abs(b) + 1e-4, (ours["losses"], bf16["losses"])
    if fp8_param:
        assert ours["n_fp8"] == 4  # the four GEMM weights are Float8Tensors, still after steps
        assert ours["master_dtypes"] == ["torch.float32"]
        assert ours["shadow_numel"] == [0] * 4
    else:
        assert ours["n_fp8"] == 0


@pytest.mark.parametrize("recipe", _recipes())
def test_te_fp8_params_scales_agree_across_two_dp_ranks_on_one_gpu(recipe):
    _needs_te()
    spec = {"global_dp": 2, "recipe": recipe, "fp8": True, "fp8_param": True}
    r0, r1 = run_distributed(_run, 2, spec, emulate_cuda=False)
    assert r0["losses"] == r1["losses"]
    assert r0["n_fp8"] == 4 and set(r0["fp8"]) == set(r1["fp8"])
    for name, e0 in r0["fp8"].items():
        e1 = r1["fp8"][name]
        assert set(e0) == set(e1), name
        for key, value in e0.items():  # fp8 bytes, scale_inv, amax, scale: identical
            assert torch.equal(value, e1[key]), (name, key)
