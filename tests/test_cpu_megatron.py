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

from mlfop_megatron.testing.distributed import init_megatron_parallel, run_distributed  # noqa: E402
from mlfop_megatron.testing.tiny_gpt import (  # noqa: E402
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
    cfg = TinyGPTConfig(overlap_grad_reduce=spec.get("overlap", True))
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
def reference() -> dict[str, Any]:
    """Single-process TP=PP=DP=1 run with micro-batch GLOBAL_MICRO."""
    return run_distributed(_worker, 1, [{}], timeout=120)[0][0]


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
        if dim is None:  # replicated params (norms, row-parallel bias) get identical grads
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name


def test_pp2_matches_pp1(reference: dict[str, Any]) -> None:
    ranks = [r[0] for r in run_distributed(_worker, 2, [{"pp": 2}], timeout=120)]
    stage0, stage1 = (set(r["grads"]) for r in ranks)
    assert not stage0 & stage1 and stage0 | stage1 == set(reference["grads"])
    assert "embedding.word_embeddings.weight" in stage0 and "output_layer.weight" in stage1
    for r in ranks:
        _assert_matches_reference(r, reference)
