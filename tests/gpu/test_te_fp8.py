"""FP8 with TransformerEngine on one GPU: TE LayerNormLinear / Linear stacks (TP=1), folding on.

Skipped without CUDA (tests/conftest.py) or without TransformerEngine (one-line reasons).
Every run goes through the real path: Megatron's TE wrappers (fused wgrad accumulation into
main_grad), FoldingDistributedDataParallel, get_mlfop_optimizer, and for fp8 primary weights
the requantization with megatron.core.fp8_utils.quantize_param_shard. The process group is
gloo (CUDA tensors), so that two ranks can share one GPU for the data-parallel check.

After training, as on CPU (tests/test_trains_what_it_claims.py, tests/test_fp8_emulated.py):
every SOAP-managed weight changed from its initial value, the captured plain SOAP steps follow
the dense SOAP equations (tests/support/step_capture.py), bf16 weights equal their fp32 main
weights cast to bf16 (bitwise), and each FP8 primary weight holds the requantization of its
fp32 main weights (the bf16 shadow cast with the scale TE stored beside the bytes).
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
# SOAP steps captured from this iteration on (0: statistics only; with precondition_frequency
# 2 every other step refreshes before its update, and only the others are checked).
CAPTURE_FROM = 2
# Captured steps against the dense SOAP equations (computed on the CPU in fp32): a frozen or
# wrong update is off by O(1); GPU fp32 reductions in another order stay far below this.
STEP_RTOL = 1e-2
# FP8 bytes against the requantized main weights: TE multiplies by its scale, we by
# 1/scale_inv, which can differ in the last fp32 bit and move a value sitting on a rounding
# tie by one fp8 step. A frozen weight misses by several steps on most elements.
REQUANT_MIN_EQUAL = 0.999


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


def _fp8_codes(p):
    """(the fp8 values of a TE Float8Tensor as float32, the torch fp8 dtype, scale_inv)."""
    fp8 = torch.float8_e5m2 if "E5M2" in str(getattr(p, "_fp8_dtype", "")) else None
    fp8 = fp8 or torch.float8_e4m3fn
    scale_inv = p._scale_inv.detach().float().reshape(-1)[0]
    data = getattr(p, "_data", None)
    if torch.is_tensor(data) and data.numel() == p.numel():
        return data.detach().view(fp8).float().reshape(p.shape), fp8, scale_inv
    # No rowwise bytes kept: the dequantized values divided back by the scale.
    return p.dequantize().float() / scale_inv, fp8, scale_inv


def requantization_error(p, master):
    """How far the fp8 bytes of ``p`` are from quantize(bf16(master)) with p's stored scale.

    Returns the share of elements whose fp8 value equals the requantization and the largest
    difference in fp8 steps (the spacing of fp8 values at that magnitude).
    """
    codes, fp8, scale_inv = _fp8_codes(p)
    info = torch.finfo(fp8)
    shadow = master.to(p.dtype).float()  # the owner's bf16 shadow, what TE quantizes
    want = (shadow * (1.0 / scale_inv)).clamp(-info.max, info.max).to(fp8).float()
    mag = torch.maximum(codes.abs(), want.abs())
    binade = torch.exp2(torch.floor(torch.log2(mag.clamp_min(info.smallest_normal))))
    step = binade * info.eps  # fp8 spacing at mag (subnormals: smallest_normal * eps)
    diff = (codes - want).abs()
    return {
        "equal_fraction": float((diff == 0).float().mean()),
        "max_steps": float((diff / step).max()),
        "numel": codes.numel(),
    }


def _to_cpu(obj):
    """Tensors anywhere in nested dicts / lists moved to the CPU (results leave the rank)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


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
    from mlfop_megatron.distributed.owner_buffer import block_view
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.step_capture import capture_engine_steps

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
    ours = optimizer.mlfop[0]
    names = {id(p): n for n, p in model.module.named_parameters()}
    # The SOAP-managed weights: the model params behind the engines' params (or shadows).
    soap = {
        names[id(ours.fp8.model_param(p))]: ours.fp8.model_param(p)
        for engine in ours.engines
        for p in engine.params
    }

    def value(p):
        return (p.dequantize() if is_float8tensor(p) else p.detach()).float().cpu()

    initial = {name: value(p) for name, p in soap.items()}
    now = [0]  # the iteration, read by the capture below
    captured: list = []
    capture_engine_steps(optimizer, lambda: now[0] >= CAPTURE_FROM, captured)

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    teacher = torch.Generator().manual_seed(7)
    w_teacher = torch.randn(HIDDEN, HIDDEN, generator=teacher) / math.sqrt(HIDDEN)
    losses = []
    for it in range(ITERS):
        now[0] = it
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
    out["soap_moved"] = {n: not torch.equal(initial[n], value(p)) for n, p in soap.items()}
    out["captured"] = _to_cpu(captured)
    # Each SOAP weight against its fp32 main weights, assembled from the owned blocks.
    masters: dict = {}
    for engine in ours.engines:
        for o in engine.owned:
            if "master" in o.state:
                p = ours.fp8.model_param(o.param)
                full = masters.setdefault(
                    names[id(p)], torch.full(p.shape, float("nan"), device=p.device)
                )
                block_view(full, o.block).copy_(o.state["master"])
    out["main_weight_checks"] = {}
    for name, full in masters.items():
        p = soap[name]
        if full.isnan().any():  # blocks owned by another rank (DP > 1): not checked here
            continue
        if is_float8tensor(p):
            out["main_weight_checks"][name] = requantization_error(p, full)
        else:
            out["main_weight_checks"][name] = {"equal": torch.equal(p.detach(), full.to(p.dtype))}
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
    for run in (bf16, ours):
        _check_trained_what_it_claims(run, fp8_param=fp8_param and run is ours)


def _check_trained_what_it_claims(run, fp8_param):
    """SOAP weights moved, plain steps follow the equations, weights match the main weights."""
    from tests.support.step_capture import check_block_step, plain_step

    moved = run["soap_moved"]
    assert len(moved) == 4 and all(moved.values()), f"frozen SOAP weights: {moved}"
    checked = set()
    for record in run["captured"]:
        for block in record["blocks"]:
            if plain_step(block, record):
                check_block_step(block, record, STEP_RTOL)
                checked.add(block["name"])
    assert len(checked) == 4, f"plain SOAP steps checked for {sorted(checked)} only"
    checks = run["main_weight_checks"]
    assert set(checks) == set(moved), (sorted(checks), sorted(moved))  # DP=1: one owner
    for name, check in checks.items():
        if fp8_param:
            assert check["equal_fraction"] >= REQUANT_MIN_EQUAL, (name, check)
            assert check["max_steps"] <= 1.0, (name, check)
        else:
            assert check == {"equal": True}, f"{name} != bf16(its fp32 main weights)"


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
