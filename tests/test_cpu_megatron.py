"""Real megatron-core on CPU: GPTModel + Megatron DDP + schedules at DP=2, TP=2, PP=2 over gloo.

Every layout trains the same tiny GPT (deterministic_init_ makes the weights layout-independent)
on the same global samples, so each must reproduce the single-process reference: losses over a
few plain-SGD iterations and the first iteration's reduced main_grad, shard by shard.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel  # noqa: E402

from mlfop_megatron.runtime.cpu_emulation import (  # noqa: E402
    cpu_emulation,
    is_cpu_emulation_installed,
)
from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel  # noqa: E402
from mlfop_megatron.runtime.spawn import DistributedRunError, run_distributed  # noqa: E402
from tests.support.tiny_gpt import (  # noqa: E402
    TinyGPTConfig,
    build_tiny_gpt,
    canonical_param_names,
    deterministic_init_,
    global_mean_loss,
    train_iteration,
)

pytestmark = pytest.mark.distributed

ITERS = 3
MICROBATCHES = 2
GLOBAL_MICRO = 2  # samples per microbatch summed over DP ranks
LR = 0.1
TOL = {"rtol": 1e-5, "atol": 1e-6}


class CountingDDP(DistributedDataParallel):
    """Megatron DDP subclass that counts finish_grad_sync calls (checks ddp_class plumbing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finish_calls = 0

    def finish_grad_sync(self, *args: Any, **kwargs: Any) -> None:
        self.finish_calls += 1
        super().finish_grad_sync(*args, **kwargs)


def _run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ITERS iterations of plain SGD on main_grad for one layout; report what tests need."""
    init_megatron_parallel(tp=spec.get("tp", 1), pp=spec.get("pp", 1), seed=1234)
    cfg = TinyGPTConfig(
        overlap_grad_reduce=spec.get("overlap", True), tie_embeddings=spec.get("tie", False)
    )
    model = build_tiny_gpt(cfg, ddp_class=spec.get("ddp_class", DistributedDataParallel))
    deterministic_init_(model, seed=0)
    names = canonical_param_names(model)
    dp = parallel_state.get_data_parallel_world_size()
    losses, grads = [], {}
    for it in range(ITERS):
        local = train_iteration(model, cfg, 0, MICROBATCHES, GLOBAL_MICRO // dp)
        losses.append(global_mean_loss(local))
        if it == 0:
            grads = {names[p]: p.main_grad.detach().clone() for p in model.parameters()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.main_grad, alpha=-LR)
    return {
        "spec": {k: v for k, v in spec.items() if k != "ddp_class"},
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "losses": losses,
        "grads": grads,
        "params": {names[p]: p.detach().clone() for p in model.parameters()},
        "split_dim": {
            names[p]: p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            for p in model.parameters()
        },
        "buckets": sum(len(b.buckets) for b in model.buffers),
        "finish_calls": getattr(model, "finish_calls", None),
    }


def _worker(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spawned per rank: run each layout in turn (re-initialising megatron parallel state)."""
    return [_run_spec(spec) for spec in specs]


@pytest.fixture(scope="module")
def references() -> list[dict[str, Any]]:
    """Single-process TP=PP=DP=1 runs with micro-batch GLOBAL_MICRO: [untied, tied embeddings]."""
    return run_distributed(_worker, 1, [{}, {"tie": True}], timeout=120)[0]


@pytest.fixture(scope="module")
def reference(references: list[dict[str, Any]]) -> dict[str, Any]:
    """The untied-embedding reference run."""
    return references[0]


def _assert_matches_reference(out: dict[str, Any], ref: dict[str, Any]) -> None:
    """Losses and (TP-sliced) first-iteration grads equal the reference within TOL."""
    torch.testing.assert_close(
        torch.tensor(out["losses"]), torch.tensor(ref["losses"]), **TOL, check_dtype=False
    )
    for name, grad in out["grads"].items():
        expected = ref["grads"][name]
        dim = out["split_dim"][name]
        if dim is not None:
            expected = torch.chunk(expected, out["tp_size"], dim=dim)[out["tp_rank"]]
        torch.testing.assert_close(grad, expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_reference_loss_decreases(reference: dict[str, Any]) -> None:
    losses = reference["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


def test_dp2_buckets_overlap_and_no_sync_match_dp1(reference: dict[str, Any]) -> None:
    specs = [{"overlap": True}, {"overlap": False, "ddp_class": CountingDDP}]
    ranks = run_distributed(_worker, 2, specs, timeout=120)
    for i, spec in enumerate(specs):
        r0, r1 = ranks[0][i], ranks[1][i]
        for name in r0["grads"]:  # all-reduced main_grad is bitwise identical on both ranks
            assert torch.equal(r0["grads"][name], r1["grads"][name]), name
            assert torch.equal(r0["params"][name], r1["params"][name]), name
        _assert_matches_reference(r0, reference)
        if spec["overlap"]:
            assert r0["buckets"] > 1  # small bucket_size -> several async bucket all-reduces
    assert ranks[0][1]["finish_calls"] == ITERS  # ddp_class subclass is what the schedule drives


def test_tp2_matches_tp1(reference: dict[str, Any]) -> None:
    ranks = [r[0] for r in run_distributed(_worker, 2, [{"tp": 2}], timeout=120)]
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        _assert_matches_reference(r, reference)
    for name, dim in ranks[0]["split_dim"].items():
        if dim is None:  # replicated params (norms, position embedding) get identical grads
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


def test_pp2_matches_pp1(references: list[dict[str, Any]]) -> None:
    specs = [{"pp": 2}, {"pp": 2, "tie": True}]
    ranks = run_distributed(_worker, 2, specs, timeout=120)
    for i, spec in enumerate(specs):
        stage0, stage1 = ranks[0][i], ranks[1][i]
        names0, names1 = set(stage0["grads"]), set(stage1["grads"])
        shared = {"embedding.word_embeddings.weight"} if spec.get("tie") else set()
        assert names0 & names1 == shared and names0 | names1 == set(references[i]["grads"])
        assert "embedding.word_embeddings.weight" in names0
        assert "output_layer.weight" in names1 or spec.get("tie")
        for r in (stage0, stage1):  # tied copies hold the summed grad after finalize_model_grads
            _assert_matches_reference(r, references[i])


def _fail_on_rank1() -> None:
    """Rank 1 raises while rank 0 waits in a collective that can never complete."""
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom on rank 1")
    torch.distributed.barrier()


def _hang_on_rank1() -> int:
    """Rank 1 never returns."""
    if torch.distributed.get_rank() == 1:
        import time

        time.sleep(60)
    return 0


def test_harness_reports_failing_rank_and_timeout() -> None:
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1 raised.*boom on rank 1"):
        run_distributed(_fail_on_rank1, 2, timeout=30, emulate_cuda=False)
    with pytest.raises(DistributedRunError, match=r"ranks \[(0, )?1\]: no report"):
        run_distributed(_hang_on_rank1, 2, timeout=1.5, emulate_cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulation refuses to install with CUDA")
def test_cpu_emulation_context_is_idempotent_and_reversible() -> None:
    if is_cpu_emulation_installed():
        pytest.skip("emulation already installed process-wide by another test")
    with cpu_emulation(), cpu_emulation():
        assert is_cpu_emulation_installed()
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1, device=torch.cuda.current_device()).cuda().device.type == "cpu"
        state = torch.cuda.get_rng_state()
        a = torch.rand(3)
        torch.cuda.set_rng_state(state)
        assert torch.equal(a, torch.rand(3))  # the "cuda" RNG is the CPU generator
    assert not is_cpu_emulation_installed()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def _groups_and_threads_per_run(runs: int, out: str) -> list[tuple[int, int]]:
    import os

    from torch.distributed import distributed_c10d

    from examples.digits.spec import RunSpec
    from examples.digits.train import train_worker

    counts = []
    for i in range(runs):
        spec = RunSpec(
            optimizer="mlfop",
            out=os.path.join(out, str(i)),
            steps=2,
            global_batch=8,
            micro_batch=2,
            lr=1e-3,
            seed=0,
            num_layers=1,
            hidden=32,
            diag_every=0,
            log_every=1,
        )
        os.makedirs(spec.out, exist_ok=True)
        train_worker(spec)  # model, DDP and optimizer on Megatron's groups, then dropped
        counts.append((len(distributed_c10d._world.pg_map), len(os.listdir("/proc/self/task"))))
    return counts


def test_runs_in_one_process_do_not_pile_up_process_groups(tmp_path) -> None:
    """Process groups and their gloo threads do not pile up over runs in one process.

    Megatron's destroy_model_parallel only drops its references, and a finished run's model and
    optimizer keep the groups alive from reference cycles: every digits run in one process
    used to leave ~17 groups and ~50 gloo threads behind (4000 threads, load average 140, in
    the sample-efficiency benchmark).
    """
    for counts in run_distributed(_groups_and_threads_per_run, 2, 3, str(tmp_path)):
        assert counts[-1] == counts[0], counts


def test_megatron_clip_grads_run_on_cpu_as_its_local_path() -> None:
    """Megatron's own optimizers clip CPU grads under the emulation (compat.clip_grads_on_cpu).

    Its ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor``; the stand-in
    scales exactly as its local (no apex / TE) multi-tensor path, and is removed on exit.
    """
    from megatron.core.optimizer import optimizer as megatron_optimizer

    original = megatron_optimizer.clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = [p.grad * (1.0 / (4.0 + 1.0e-6)) for p in params]
    with pytest.raises(AssertionError):
        original(params, 1.0, 4.0)
    with cpu_emulation():
        megatron_optimizer.clip_grad_by_total_norm_fp32(params, 1.0, 4.0)  # clip 1/4
        assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
        megatron_optimizer.clip_grad_by_total_norm_fp32(params, 1.0, 0.5)  # below max: kept
        assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    assert megatron_optimizer.clip_grad_by_total_norm_fp32 is original
