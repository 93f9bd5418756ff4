"""Every supported training path steps every SOAP-managed weight by the SOAP equations.

One row per row of README's feature table that runs through the tiny Megatron GPT. Each row
trains a few steps and captures its third step on every engine (``tests/support/
step_capture.py``): every owned SOAP block must have changed, by the update the dense SOAP
equations give from the block's state before the step and the folded gradient it was given
(the fold itself is checked against FOP's equations in tests/test_fop*.py). The Adam-side
weights must have changed too, and every data-parallel replica must hold the same model.

Tolerances: fp64 rows 1e-9 (rounding only); bf16 rows (fp32 state and main weights) 1e-4.
A path that leaves a weight frozen (the FP8 bug of 2026-12) has relative error 1.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402
from tests.support.step_capture import check_block_step, plain_step  # noqa: E402

pytestmark = pytest.mark.distributed

F64 = torch.float64
MOE = (("num_moe_experts", 4), ("moe_router_topk", 2), ("moe_token_dispatcher_type", "allgather"))
# iters 4, the step of iteration 2 captured: after the statistics-only first step t goes
# 1 -> 2, with no refresh before it (refresh every f=3 steps, before the update by default).
BASE: dict[str, Any] = dict(
    package_order=True,
    iters=4,
    check_step=2,
    microbatches=4,
    global_micro=2,
    precondition_frequency=3,
    dtype=F64,
)
ROWS: dict[str, tuple[int, dict[str, Any]]] = {
    "dp2-sharded": (2, {}),
    "dp2-replicated": (2, dict(sharded=False)),
    "dp2-replicated-adam": (2, dict(shard_adam=False)),
    "dp2-no-folding": (2, dict(enabled=False)),
    "dp2-per-block-engine": (2, dict(soap={"batched": False})),
    # The SOAP reference's order: statistics-only first step, refresh after the update.
    "dp2-reference-order": (
        2,
        dict(soap={"refresh_first": False, "first_step_update": False}),
    ),
    # SPlus's sign normalisation in the eigenbasis
    "dp2-sign": (2, dict(soap={"normalization": "sign"})),
    "dp2-sign-per-block-engine": (2, dict(soap={"normalization": "sign", "batched": False})),
    # Muon's update scale: each block's update at RMS update_rms
    "dp2-update-rms": (2, dict(soap={"update_rms": 1.0})),
    "dp2-update-rms-per-block-engine": (2, dict(soap={"update_rms": 1.0, "batched": False})),
    "tp2-blockwise": (2, dict(tp=2)),
    "tp2-full": (2, dict(tp=2, tp_mode="full")),
    "tp2-sequence-parallel": (2, dict(tp=2, extra_config=(("sequence_parallel", True),))),
    "pp2": (2, dict(pp=2)),
    "pp2-recompute": (
        2,
        dict(
            pp=2,
            extra_config=(
                ("recompute_granularity", "full"),
                ("recompute_method", "uniform"),
                ("recompute_num_layers", 1),
            ),
        ),
    ),
    "ep2-moe": (
        2,
        dict(
            parallel=dict(expert_model_parallel_size=2),
            extra_config=(*MOE, ("expert_model_parallel_size", 2)),
        ),
    ),
    "dp2-bf16": (2, dict(dtype=torch.bfloat16)),
    # Megatron's rule: the learned position embeddings are SOAP's too
    "dp2-position-embeddings-soap": (2, dict(position_embeddings="soap")),
    "tp2-position-embeddings-soap": (2, dict(tp=2, position_embeddings="soap")),
}


def _check(ranks: list[dict[str, Any]], rtol: float) -> int:
    checked = 0
    for rank in ranks:
        assert rank["captured_steps"], "no SOAP step was captured"
        for record in rank["captured_steps"]:
            for block in record["blocks"]:
                assert plain_step(block, record), block["name"]
                check_block_step(block, record, rtol)
                checked += 1
    return checked


@pytest.mark.parametrize("row", list(ROWS))
def test_every_soap_block_steps_by_the_equations(row):
    nproc, extra = ROWS[row]
    spec = dict(BASE, **extra)
    ranks = run_distributed(run_tiny_gpt, nproc, spec)
    rtol = 1e-4 if spec["dtype"] == torch.bfloat16 else 1e-9
    assert _check(ranks, rtol) > 0
    # The learned position embeddings are stepped by SOAP exactly where the row asks it.
    names = {b["name"] for r in ranks for rec in r["captured_steps"] for b in rec["blocks"]}
    soap_positions = any("position_embeddings" in n for n in names)
    assert soap_positions == (spec.get("position_embeddings") == "soap"), sorted(names)
    # Every weight, SOAP or Adam side, moved over the run (against a run of zero steps).
    start = run_distributed(run_tiny_gpt, nproc, dict(spec, iters=0, check_step=None))
    for r in range(nproc):
        for name, value in ranks[r]["params"].items():
            assert not torch.equal(value, start[r]["params"][name]), f"{row}: {name} is frozen"


def test_hybrid_model_steps_every_soap_block_by_the_equations():
    from tests.support.tiny_hybrid import hybrid_available

    if not hybrid_available():
        pytest.skip("megatron.core.models.hybrid needs megatron-core >= 0.19")
    ranks = run_distributed(run_tiny_gpt, 2, dict(BASE, arch="hybrid"))
    assert _check(ranks, 1e-9) > 0


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-block"])
def test_a_resumed_run_steps_every_soap_block_by_the_equations(tmp_path, batched):
    """Save after step 1 at DP=2, resume in fresh processes, check the first step after it."""
    from mlfop_megatron.megatron.checkpointing import latest_checkpoint

    spec = dict(BASE, soap={"batched": batched}, check_step=None)
    run_distributed(run_tiny_gpt, 2, dict(spec, iters=2, save_at=(1, str(tmp_path))))
    resumed = run_distributed(
        run_tiny_gpt, 2, dict(spec, load_from=latest_checkpoint(str(tmp_path)), check_step=2)
    )
    assert _check(resumed, 1e-9) > 0
