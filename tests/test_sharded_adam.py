"""ZeRO-1 Adam for the non-matrix params (ShardedMainParamAdamW) inside megatron-core on gloo.

Reference: the replicated AdamW path (Megatron's FP32Optimizer, MainParamAdamW for bf16), at the
same DP size, sees the same DP-mean gradients and runs the same AdamW kernel per element, so
the parameters must agree bitwise, also through clipping and a NaN-skipped step. Cross-DP
resume runs in fp64 with SOAP's rotation off (see tests/test_megatron_dp.py for why DP=N vs
DP=M is allclose, not bitwise); the resharded Adam state itself is compared bitwise.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.megatron.checkpointing import latest_checkpoint  # noqa: E402
from mlfop_megatron.megatron.sharded_adam import flat_range_boxes  # noqa: E402
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402

pytestmark = pytest.mark.distributed
TOL = {"rtol": 1e-5, "atol": 1e-7}


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5), (2, 1, 3, 4)])
def test_flat_range_boxes_tile_the_range_exactly(shape):
    numel = int(torch.tensor(shape).prod())
    index = torch.arange(numel).view(shape)
    rng = random.Random(0)
    ranges = [(0, numel), (0, 1), (numel - 1, numel)]
    ranges += [tuple(sorted(rng.sample(range(numel + 1), 2))) for _ in range(30)]
    for start, end in ranges:
        at = start
        for offset, box, flat in flat_range_boxes(shape, start, end):
            assert flat == at and all(o + b <= s for o, b, s in zip(offset, box, shape))
            sl = tuple(slice(o, o + b) for o, b in zip(offset, box))
            values = index[sl].reshape(-1)  # a box is contiguous in flat order
            assert torch.equal(values, torch.arange(at, at + values.numel()))
            at += values.numel()
        assert at == end


def _counted_run(spec: dict[str, Any]) -> dict[str, Any]:
    """run_tiny_gpt with the ZeRO-1 all-gathers counted at the torch.distributed call."""
    from mlfop_megatron.megatron import sharded_adam

    calls: list[int] = []
    real = sharded_adam._all_gather

    def counted(output, input, group, async_op):
        calls.append(output.numel() * output.element_size())
        return real(output, input, group, async_op)

    sharded_adam._all_gather = counted
    try:
        out = run_tiny_gpt(spec)
    finally:
        sharded_adam._all_gather = real
    out["all_gathers"] = calls
    return out


@pytest.mark.parametrize(
    "dp, adam_grad_reduce", [(2, "reduce_scatter"), (2, "all_reduce"), (4, "all_reduce")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sharded_adam_equals_replicated_bitwise(dp, dtype, adam_grad_reduce):
    """Params bitwise; the global norm bitwise when the Adam grads are all-reduced.

    All-reduced, both paths reduce the same DDP buffer. Reduce-scattered into the ZeRO-1
    slices (DP=2 here: a sum of two addends does not depend on their order), each rank sums
    the squares of its own Adam slices and the all-reduce adds the ranks' partial sums: the
    same fp64 terms in another order, so the norm may differ in its last bits (rel 1e-15); the
    clipping factor is applied in the grads' dtype, where that difference rounds away (the
    params are compared bitwise). At DP > 2 the reduce-scatter is allclose to the all-reduce
    (tests/test_adam_reduce_scatter.py says why).
    """
    base = dict(
        iters=4, microbatches=4, global_micro=4, dtype=dtype, clip_grad=0.05, nan_at=(2, dp - 1)
    )
    comm = {"adam_grad_reduce": adam_grad_reduce}
    sharded = run_distributed(_counted_run, dp, dict(base, shard_adam=True, comm=comm))
    replicated = run_distributed(run_tiny_gpt, dp, dict(base, shard_adam=False))
    for r in range(dp):
        assert [ok for ok, _ in sharded[r]["results"]] == [True, True, False, True]
        got, want = sharded[r]["results"], replicated[r]["results"]
        if adam_grad_reduce == "all_reduce":
            assert got == want  # same global norms
        else:
            assert [ok for ok, _ in got] == [ok for ok, _ in want]
            for (_, a), (_, b) in zip(got, want):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a == pytest.approx(b, rel=1e-14, abs=0.0)
        assert all(n > 0.05 for ok, n in sharded[r]["results"] if ok)  # clipping active
        for name, value in replicated[r]["params"].items():
            assert torch.equal(sharded[r]["params"][name], value), (r, name)
    # One all-gather per buffer (one dtype here) per applied step: 3 steps, the skipped none.
    assert all(len(s["all_gathers"]) == 3 for s in sharded)
    assert len({tuple(s["all_gathers"]) for s in sharded}) == 1
    # Each rank holds 1/N of the Adam state (plus padding < N elements per buffer).
    full = replicated[0]["adam_state_bytes"]
    assert max(s["adam_state_bytes"] for s in sharded) <= 1.1 * full / dp


def test_adam_state_per_rank_falls_as_one_over_n():
    """Per-rank Adam state measured on the real tensors at DP=1, 2, 4 (fp32 and bf16)."""
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        base = dict(iters=1, microbatches=4, global_micro=4, dtype=dtype)
        dp1 = run_distributed(run_tiny_gpt, 1, dict(base, shard_adam=False))[0]["adam_state_bytes"]
        sharded1 = run_distributed(run_tiny_gpt, 1, dict(base, shard_adam=True))[0]
        assert sharded1["adam_state_bytes"] == dp1  # DP=1: the same tensors, one shard
        for dp in (2, 4):
            runs = run_distributed(run_tiny_gpt, dp, dict(base, shard_adam=True))
            per_rank = [r["adam_state_bytes"] for r in runs]
            assert max(per_rank) <= 1.1 * dp1 / dp, (dtype, dp, per_rank, dp1)
            lines.append(f"{dtype} DP={dp}: {per_rank} of {dp1} at DP=1")
    print("\n".join(lines))


def _pieces_to_full(runs: list[dict[str, Any]]) -> dict[tuple[str, str], torch.Tensor]:
    """Reassemble every rank's Adam pieces into flat full tensors per (param, field)."""
    numel = {n: p.numel() for n, p in runs[0]["params"].items()}
    out: dict[tuple[str, str], torch.Tensor] = {}
    covered: dict[str, int] = {}
    for run in runs:
        for name, pieces in run["adam_pieces"].items():
            for start, end, fields in pieces:
                covered[name] = covered.get(name, 0) + end - start
                for field, value in fields.items():
                    full = out.setdefault(
                        (name, field), torch.full((numel[name],), float("nan"), dtype=value.dtype)
                    )
                    full[start:end] = value
    assert all(covered[n] == numel[n] for n in covered)  # every element exactly once
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_checkpoint_dp2_reshards_adam_state_to_dp4_and_dp1_exactly(tmp_path, dtype):
    """The Adam state saved at DP=2 is loaded at DP=4 and DP=1 element for element."""
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=3, microbatches=4, global_micro=4, dtype=dtype, max_precond_dim=1)
    saved = run_distributed(run_tiny_gpt, 2, dict(base, save_at=(2, ckpt)))
    path = latest_checkpoint(ckpt)
    expected = _pieces_to_full(saved)
    assert {f for _, f in expected} == {"exp_avg", "exp_avg_sq", "main"}
    for dp in (4, 1):
        loaded = run_distributed(run_tiny_gpt, dp, dict(base, load_from=path))  # no more steps
        got = _pieces_to_full(loaded)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), (dp, key)


def test_checkpoint_dp2_resumes_at_dp4_and_dp1(tmp_path):
    """Training continues after resharding: allclose to the uninterrupted DP=2 run (fp64)."""
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=5, microbatches=4, global_micro=4, dtype=torch.float64, max_precond_dim=1)
    full = run_distributed(run_tiny_gpt, 2, dict(base, save_at=(2, ckpt)))[0]
    for dp in (4, 1):
        resumed = run_distributed(run_tiny_gpt, dp, dict(base, load_from=latest_checkpoint(ckpt)))
        for r in range(dp):
            assert len(resumed[r]["results"]) == 2
            for name, value in full["params"].items():
                assert torch.allclose(resumed[r]["params"][name], value, **TOL), (dp, name)


def _strict_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from megatron.core.optimizer import OptimizerConfig

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.megatron.sharded_adam import ShardedMainParamAdamW
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from mlfop_megatron.runtime.strict_device import forbid_host_sync, is_strict_installed
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        build_tiny_gpt,
        deterministic_init_,
        train_iteration,
    )

    assert is_strict_installed()
    init_megatron_parallel(tp=1, seed=1234)
    torch.set_default_dtype(spec["dtype"])
    cfg = TinyGPTConfig(
        hidden_size=16, num_layers=1, seq_length=8, on_device=True, dtype=spec["dtype"]
    )
    model = build_tiny_gpt(cfg, ddp_class=FoldingDistributedDataParallel)
    deterministic_init_(model, seed=0)
    k = 4
    mlfop = MLFOPConfig.from_kwargs(
        lr=1e-2, precondition_frequency=2, accumulation_steps=k, enabled=True
    )
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-2,
        weight_decay=0.01,
        clip_grad=0.05,
        bf16=spec["dtype"] == torch.bfloat16,
    )
    optimizer = get_mlfop_optimizer(opt_config, [model], mlfop)
    adams = [o for o in optimizer.others if isinstance(o, ShardedMainParamAdamW)]
    assert adams
    for adam in adams:  # the ZeRO-1 step path may not read device values on the host
        step = adam.step_with_ready_grads

        def checked(step=step):
            with forbid_host_sync():
                return step()

        adam.step_with_ready_grads = checked
    for it in range(2):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        train_iteration(model, cfg, it, k, 1, zero_grad=False)
        ok, norm, _ = optimizer.step()
        assert ok and norm > 0
    for adam in adams:
        for b in adam.buffers:
            assert b.data.is_cuda and b.main.is_cuda
        for state in adam.optimizer.state.values():
            assert state["exp_avg"].is_cuda and state["exp_avg_sq"].is_cuda
    assert all(p.is_cuda for p in model.parameters())
    save_checkpoint(spec["checkpoint"], model, optimizer, 1)
    load_checkpoint(os.path.join(spec["checkpoint"], "iter_0000001"), model, optimizer)
    for adam in adams:
        for state in adam.optimizer.state.values():
            assert state["exp_avg"].is_cuda
    train_iteration(model, cfg, 2, k, 1)
    ok, _, _ = optimizer.step()
    return {"ok": ok, "params": {n: p.detach().cpu() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sharded_adam_strict_device(dtype):
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"dtype": dtype, "checkpoint": tmp}
        results = run_distributed(_strict_worker, 2, spec, strict_device=True)
    assert all(r["ok"] for r in results)
    for name, value in results[0]["params"].items():
        assert torch.equal(results[1]["params"][name], value), name


def _build(dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Tiny GPT (DDP) + chained optimizer on the current ranks; returns (model, opt, cfg)."""
    from megatron.core.optimizer import OptimizerConfig

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt, deterministic_init_

    init_megatron_parallel(tp=1, seed=1234)
    torch.set_default_dtype(dtype)
    cfg = TinyGPTConfig(dtype=dtype)
    model = build_tiny_gpt(cfg, ddp_class=FoldingDistributedDataParallel)
    deterministic_init_(model, seed=0)
    mlfop = MLFOPConfig.from_kwargs(lr=1e-2, accumulation_steps=4, enabled=True)
    config = OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.01, bf16=dtype == torch.bfloat16
    )
    return model, get_mlfop_optimizer(config, [model], mlfop), cfg


def _layout_worker(dtype: torch.dtype) -> dict[str, Any]:
    from mlfop_megatron.megatron.sharded_adam import ShardedMainParamAdamW

    _, optimizer, _ = _build(dtype)
    (adam,) = [o for o in optimizer.others if isinstance(o, ShardedMainParamAdamW)]
    return {
        "numel": [b.numel for b in adam.buffers],
        "padding": adam.padding(),
        "gather_bytes": adam.all_gather_bytes_per_step(),
    }


@pytest.mark.parametrize("dp", [2, 3, 4])
def test_padding_is_below_n_elements_per_buffer(dp):
    for r in run_distributed(_layout_worker, dp, torch.bfloat16):
        ((numel,), (pad,)) = r["numel"], r["padding"]
        assert (numel + pad) % dp == 0 and 0 <= pad < dp
        # Received per step: the (N-1)/N of the bf16 buffer the other ranks own.
        assert r["gather_bytes"] == (numel + pad) * (dp - 1) // dp * 2
        print(f"DP={dp}: {numel} Adam elements, padding {pad}, all-gather {r['gather_bytes']} B")


def _storage_fault_worker(dtype: torch.dtype) -> str:
    from tests.support.tiny_gpt import train_iteration

    model, optimizer, cfg = _build(dtype)
    norm = next(p for n, p in model.named_parameters() if "final_layernorm" in n)
    train_iteration(model, cfg, 0, 4, 1, zero_grad=False)
    norm.data = norm.data.clone()  # as model.to() would: storage leaves the buffer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        optimizer.step()
    except RuntimeError as err:
        for n, p in model.named_parameters():  # refused before any update
            assert torch.equal(p, before[n]), n
        return str(err)
    return "no error"


def test_replaced_param_storage_is_refused_before_any_update():
    (message,) = run_distributed(_storage_fault_worker, 1, torch.float32)
    assert "no longer lives in ShardedMainParamAdamW's buffer" in message
    assert "shard_adam=False" in message


def _state_dict_roundtrip_worker(dtype: torch.dtype) -> bool:
    import copy

    from tests.support.tiny_gpt import train_iteration

    model, optimizer, cfg = _build(dtype)

    def iteration(it: int) -> None:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        train_iteration(model, cfg, it, 4, 1, zero_grad=False)
        assert optimizer.step()[0]

    iteration(0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = copy.deepcopy(optimizer.state_dict())  # per-rank (legacy torch format) state
    iteration(1)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    optimizer.load_state_dict(saved)
    iteration(1)
    return all(torch.equal(p, after[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_rank_state_dict_roundtrip_repeats_the_step_bitwise(dtype):
    assert all(run_distributed(_state_dict_roundtrip_worker, 2, dtype))
