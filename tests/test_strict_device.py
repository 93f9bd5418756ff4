"""Strict device checking of the CPU emulation, and the optimizer under it.

Strict mode (mlfop_megatron.runtime.strict_device) makes host/"cuda" mixing fail on CPU as it
does on a GPU. These tests show that it catches the bug class (a CPU (1,) loss scale times a
CUDA loss), that the plain optimizer and the Megatron path (sharded and TP-full engines, grad
norm, found-inf, clipping, loss scale, stats, dist_checkpointing) are device-clean, and that
the per-micro-step fold path has no host sync.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.runtime.cpu_emulation import (  # noqa: E402
    cpu_emulation,
    is_cpu_emulation_installed,
)
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from mlfop_megatron.runtime.strict_device import (  # noqa: E402
    DeviceMismatchError,
    HostSyncError,
    forbid_host_sync,
    is_strict_installed,
    is_tagged,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation only")


@pytest.fixture
def strict():
    if is_cpu_emulation_installed():
        pytest.skip("an emulation is already installed in this process")
    with cpu_emulation(with_megatron=False, strict=True):
        yield
    assert not is_strict_installed()


def test_strict_mode_catches_host_device_mixing(strict: None) -> None:
    loss = (torch.randn(4, device="cuda") ** 2).sum()
    assert loss.device == torch.device("cuda", 0) and loss.is_cuda
    with pytest.raises(DeviceMismatchError, match=r"aten\.mul.*shape \(1,\)"):
        torch.ones(1) * loss  # the original get_loss_scale() bug
    assert (torch.tensor(2.0) * loss).device.type == "cuda"  # 0-dim host: fine on CUDA
    with pytest.raises(DeviceMismatchError, match="stack"):
        torch.stack([loss, torch.tensor(1.0)])  # ... but not in stack/cat
    with pytest.raises(DeviceMismatchError, match="cat"):
        torch.cat([loss.reshape(1), torch.ones(1)])
    # Devices derived from tagged tensors are redirected and tagged; views keep the tag.
    p = torch.nn.Parameter(torch.randn(3, 2, device="cuda"))
    assert torch.zeros(2, device=p.device).is_cuda and p.data.t()[0].is_cuda
    moved = torch.ones(3).to(p.device)
    assert moved.is_cuda and torch.ones(3).to(p).is_cuda
    # .cpu() is an untagged copy; the original stays on the device.
    host = p.detach().cpu()
    assert host.device.type == "cpu" and p.is_cuda and not is_tagged(host)
    assert host.data_ptr() != p.data_ptr()
    # Autograd's grads and host index tensors.
    (p * 2).sum().backward()
    assert p.grad.is_cuda and p[torch.tensor([0, 2])].is_cuda
    with forbid_host_sync():
        with pytest.raises(HostSyncError, match="_local_scalar_dense"):
            float(loss)
        with pytest.raises(HostSyncError, match="device-to-host"):
            loss.cpu()
        assert p.to(p.device, torch.float64).is_cuda  # no sync: stays on the device
    assert float(loss) > 0  # allowed outside forbid_host_sync


def test_uninstall_restores_tensor_device() -> None:
    if is_cpu_emulation_installed():
        pytest.skip("an emulation is already installed in this process")
    with cpu_emulation(with_megatron=False, strict=True):
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cuda"
    assert "device" not in torch.Tensor.__dict__ and t.device.type == "cpu"
    assert torch.ones(1) * t is not None  # no checks any more


def test_mlfop_soap_on_cuda_params(strict: None) -> None:
    from mlfop_megatron.optim import MLFOPSOAP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model.cuda()
    opts = dict(lr=1e-2, accumulation_steps=4, enabled=True)
    opt = MLFOPSOAP(model.parameters(), precondition_frequency=2, **opts)
    for step in range(3):
        if step == 2:  # grad-group diagnostics: per-micro-step bookkeeping is sync-free too
            opt.request_grad_diagnostics([0, 0, 1, 1])
        for _ in range(4):
            x, y = torch.randn(5, 8).cuda(), torch.randn(5, 2).to("cuda")
            ((model(x) - y) ** 2).mean().backward()
            with forbid_host_sync():  # folding is sync-free
                opt.accumulate()
        opt.step()
    stats = opt.stats()  # LevelDiagnostics.totals() on device tensors
    assert opt.steps == 3 and len(stats["levels"]) == 2
    assert -1.0 <= stats["grad"]["cos_g0_g1"] <= 1.0
    for p in model.parameters():
        assert p.is_cuda and torch.isfinite(p).all()
        assert all(v.is_cuda for v in opt.state[p].values() if torch.is_tensor(v))
    saved = opt.state_dict()
    fresh = MLFOPSOAP(model.parameters(), **opts)
    fresh.load_state_dict(saved)
    assert all(v.is_cuda for s in fresh.state.values() for v in s.values() if torch.is_tensor(v))


def test_fake_tensor_mode_soap_step() -> None:
    """FakeTensorMode: real 'cuda' devices (no emulation) for the pure SOAP math."""
    if is_cpu_emulation_installed():
        pytest.skip("an emulation is already installed in this process")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mlfop_megatron.config import SOAPConfig
    from mlfop_megatron.core.linalg import LinalgCounters
    from mlfop_megatron.core.soap import block_layout, init_state, soap_step

    # The drift gate's decision is a host read (data-dependent: no fake value has one); the
    # gate's device use is checked by the emulated-device tests of the batched engine.
    cfg = SOAPConfig(precondition_frequency=1, refresh_method="eigh", refresh_tolerance=0.0)
    with FakeTensorMode(allow_non_fake_inputs=False):
        param = torch.randn(6, 4, device="cuda")
        state = init_state(block_layout(param.shape, cfg), torch.float32, param.device)
        counters = LinalgCounters()
        for _ in range(2):
            grad = torch.randn(6, 4, device="cuda")
            soap_step(param, grad, state, cfg, counters, lr=1e-2, weight_decay=0.0)
        assert param.device.type == "cuda" and state["QL"].device.type == "cuda"
        with pytest.raises(Exception, match="(?i)device"):
            torch.ones(1) * param.sum()  # FakeTensorDeviceMismatchError


# ----------------------------------------------------------------------------- Megatron
def _megatron_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core.optimizer import OptimizerConfig

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.distributed.comm_config import CommConfig
    from mlfop_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.mlfop_runs import poison_next_backward
    from tests.support.tiny_gpt import (
        TinyGPTConfig,
        build_tiny_gpt,
        deterministic_init_,
        train_iteration,
    )

    assert is_strict_installed()
    init_megatron_parallel(tp=spec["tp"], seed=1234)
    cfg = TinyGPTConfig(hidden_size=16, num_layers=1, seq_length=8, on_device=True)
    model = build_tiny_gpt(cfg, ddp_class=FoldingDistributedDataParallel)
    deterministic_init_(model, seed=0)
    k = 4
    mlfop = MLFOPConfig.from_kwargs(
        lr=1e-2, precondition_frequency=2, accumulation_steps=k, enabled=True
    )
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=0.05)
    comm = CommConfig(**spec.get("comm", {}))
    optimizer = get_mlfop_optimizer(opt_config, [model], mlfop, tp_mode=spec["tp_mode"], comm=comm)
    ours = optimizer.mlfop[0]
    assert ours._folds.enabled == comm.fold_stream  # the side-stream path runs when asked
    assert all(p.is_cuda for p in model.parameters())
    assert ours.device.type == "cuda"

    def fold_without_sync(level: int, size: int) -> None:
        with forbid_host_sync():
            ours.reduce_and_fold_level(level, size)

    model.attach_folding(ours.schedule, fold_without_sync)
    reduce_segment = ours.reduce_segment

    def segment_without_sync(micro_steps: int) -> None:
        with forbid_host_sync():
            reduce_segment(micro_steps)

    ours.reduce_segment = segment_without_sync  # request_grad_diagnostics hands this to the DDP
    # A side-stream fold is told about every current-stream tensor it reads, also the open
    # level's earlier segments and the diagnostics sums it drops (else record_stream misses
    # them and the allocator may reuse their memory while the side stream reads it).
    launches = {"folds": 0, "with_earlier_tensors": 0}
    run_fold = ours._folds.run

    def checked_run(fold, inputs):
        reads = [t for e in ours.engines for t in [*(e._pending or ()), *_group_sq(e)]]
        passed = {id(t) for t in inputs()}
        assert all(id(t) in passed for t in reads), "a tensor the fold drops was not passed"
        launches["folds"] += 1
        launches["with_earlier_tensors"] += bool(reads)
        return run_fold(fold, inputs)

    ours._folds.run = checked_run
    # As Megatron-LM: the schedule multiplies the loss by the optimizer's loss scale.
    model.config.grad_scale_func = optimizer.scale_loss
    loss = torch.ones((), device="cuda") * 2.0
    for opt in (optimizer, ours):
        assert opt.get_loss_scale().is_cuda
        assert opt.scale_loss(loss).is_cuda
    results = []
    for it in range(3):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        if it == 1 and dist.get_rank() == 0:  # found-inf: a NaN micro-batch gradient
            poison_next_backward(model)
        if it == 2:  # grad-group diagnostics: extra sync points, segment sums on the device
            optimizer.request_grad_diagnostics([0, 0, 1, 1])
        train_iteration(model, cfg, it, k, 1, zero_grad=False)
        ok, norm, _ = optimizer.step()
        results.append((ok, norm))
    stats = optimizer.stats()
    for engine in ours.engines:
        for owned in engine.owned:
            assert all(v.is_cuda for v in owned.state.values() if torch.is_tensor(v))
    out = {
        "results": results,
        "skipped": stats["skipped_steps"],
        "levels": len(stats["levels"]),
        "grad": stats["grad"],
        "launches": launches,
        "level_buckets": [r.num_buckets for r, _ in ours._reducers],
    }
    if spec.get("checkpoint"):
        ckpt = spec["checkpoint"]
        save_checkpoint(ckpt, model, optimizer, 2)
        before = {n: v.clone() for n, v in _soap_state(ours).items()}
        assert load_checkpoint(os.path.join(ckpt, "iter_0000002"), model, optimizer) == 2
        after = _soap_state(ours)
        assert before.keys() == after.keys()
        for name, value in after.items():
            assert value.is_cuda, name
            assert torch.equal(value, before[name]), name
        train_iteration(model, cfg, 3, k, 1)  # and training continues on the device
        ok, norm, _ = optimizer.step()
        out["after_load"] = (ok, norm)
    return out


def _group_sq(engine: Any) -> list[torch.Tensor]:
    groups = getattr(engine, "_groups", None)
    return list(groups.sq or ()) if groups is not None else []


def _soap_state(opt: Any) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{engine.block_name(o)}.{k}": v
        for i, engine in enumerate(opt.engines)
        for o in engine.owned
        for k, v in o.state.items()
        if torch.is_tensor(v)
    }


def _check_run(results: list[dict[str, Any]]) -> None:
    for r in results:
        (ok0, n0), (ok1, n1), (ok2, n2) = r["results"]
        assert ok0 and ok2 and not ok1 and n1 is None  # the NaN step is skipped everywhere
        assert n0 > 0.05 and n2 > 0  # norms above clip_grad: clipping ran
        assert r["skipped"] == 1 and r["levels"] == 2
        assert -1.0 <= r["grad"]["cos_g0_g1"] <= 1.0 and r["grad"]["segments"] == 4
    assert results[0]["results"] == results[1]["results"]


def test_megatron_sharded_engine_strict_device() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"tp": 1, "tp_mode": "blockwise", "checkpoint": tmp}
        results = run_distributed(_megatron_worker, 2, spec, strict_device=True)
    _check_run(results)
    assert all(r["after_load"][0] for r in results)


def test_megatron_fold_stream_strict_device() -> None:
    """Folds on the side stream: no host sync in the hooks, the same run as inline folds.

    The emulation's streams are no-ops (CPU kernels are synchronous), so this checks the code
    path (stream waits, record_stream, joins before the step and before diagnostics
    segments) and that it adds no host sync, not the overlap itself (a GPU-only property).
    """
    spec = {"tp": 1, "tp_mode": "blockwise"}
    inline = run_distributed(_megatron_worker, 2, spec, strict_device=True)
    side = run_distributed(
        _megatron_worker, 2, dict(spec, comm={"fold_stream": True}), strict_device=True
    )
    _check_run(side)
    assert [r["results"] for r in side] == [r["results"] for r in inline]
    for r in side:  # the armed window folded on the side stream with earlier segments open
        assert r["launches"]["folds"] > 0 and r["launches"]["with_earlier_tensors"] > 0


def test_megatron_level_buckets_strict_device() -> None:
    """The level reduction in 2 buckets on the emulated device: no host sync in the hooks.

    The bucket waits are stream waits; the results are one bucket's (DP=2: bitwise).
    """
    spec = {"tp": 1, "tp_mode": "blockwise"}
    one = run_distributed(_megatron_worker, 2, spec, strict_device=True)
    two = run_distributed(
        _megatron_worker, 2, dict(spec, comm={"level_buckets": 2}), strict_device=True
    )
    _check_run(two)
    assert [r["level_buckets"] for r in two] == [[2], [2]]
    assert [r["level_buckets"] for r in one] == [[1], [1]]  # auto: one bucket at this size
    assert [r["results"] for r in two] == [r["results"] for r in one]


def test_megatron_tp_full_engine_strict_device() -> None:
    results = run_distributed(_megatron_worker, 2, {"tp": 2, "tp_mode": "full"}, strict_device=True)
    _check_run(results)


def _collective_worker() -> str:
    import torch.distributed as dist

    out = [torch.zeros(2) for _ in range(2)]  # host outputs, device input
    try:
        dist.all_gather(out, torch.ones(2, device="cuda"))
    except DeviceMismatchError as err:
        return str(err)
    return "no error"


def test_strict_mode_catches_mixed_collectives() -> None:
    messages = run_distributed(_collective_worker, 2, strict_device=True)
    assert all("c10d" in m and "collective" in m for m in messages)
