"""Tensor and pipeline parallel layouts of ML-FOP-SOAP against their single-layout references.

TP=2 "blockwise" preconditions each shard on its own but sums the FOP inner products over the
TP group, so with the rotation off (max_precond_dim=1) it must equal TP=1 in math. Megatron's
own TP=2 path (vocab-parallel embedding and cross-entropy) already moves the gradients: after one
Adam-only step the fp64 embedding differs by ~7e-9 from TP=1. Hence rtol 1e-4 / atol 2e-5 on
parameters of size ~0.02-0.1; per-shard FOP sums (the bug this guards against) are off by 3e-2.
PP=2 computes every gradient with the same operations as PP=1 (activations cross stages as
exact copies), so full SOAP must agree tightly even in fp32.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.megatron_compare import assert_params_close, merged_params  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402

pytestmark = pytest.mark.distributed
# Rotation off, and Adam's own update scale: update_rms takes each block's RMS, and a
# TP-blockwise shard is its own block (as in Megatron's blockwise Muon), so TP=2 would
# equal TP=1 only with it off.
FP64_IDENTITY = dict(dtype=torch.float64, max_precond_dim=1, soap={"update_rms": 0.0})


def _full(runs):
    """Full params from the ranks of one TP=2 group."""
    return merged_params(runs, tp=2)


def test_tp2_blockwise_equals_tp1_with_rotation_off():
    base = dict(iters=6, microbatches=4, global_micro=2, **FP64_IDENTITY)
    tp1 = run_distributed(run_tiny_gpt, 1, base)[0]
    tp2 = run_distributed(run_tiny_gpt, 2, dict(base, tp=2))
    assert_params_close(_full(tp2), tp1["params"], 1e-4, 2e-5, "TP=2 vs TP=1")


def test_tp2_blockwise_with_rotation_trains_and_stays_consistent():
    runs = run_distributed(run_tiny_gpt, 2, dict(iters=8, microbatches=4, tp=2))
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[0]["losses"][-1] < runs[0]["losses"][0] - 0.2
    levels = runs[0]["stats"]["levels"]
    assert len(levels) == 2 and levels[0]["beta_mean"] != 0.0  # K=4: levels (1, 2, 4)
    assert -1.0 <= levels[0]["cosine_before"] <= 1.0 and levels[0]["ratio"] > 0
    stats = runs[0]["stats"]
    assert stats["time_fold_s"] > 0 and stats["time_update_s"] > 0
    assert stats["time_communication_s"] >= 0 and stats["time_refresh_s"] > 0
    # the fastest rank's phase times: positive where every rank works, never above the slowest
    assert 0 < stats["time_update_min_s"] <= stats["time_update_s"]
    for phase in ("fold", "refresh", "communication", "diagnostics"):
        assert 0 <= stats[f"time_{phase}_min_s"] <= stats[f"time_{phase}_s"]


def test_pp2_equals_pp1_full_soap():
    base = dict(iters=8, microbatches=4, global_micro=2)
    pp1 = run_distributed(run_tiny_gpt, 1, base)[0]
    pp2 = run_distributed(run_tiny_gpt, 2, dict(base, pp=2))
    merged = {**pp2[0]["params"], **pp2[1]["params"]}
    assert_params_close(merged, pp1["params"], 1e-5, 1e-6, "PP=2 vs PP=1")
    assert pp2[0]["losses"] == pytest.approx(pp1["losses"], rel=1e-5)


def test_dp2_tp2_matches_dp1_tp2():
    base = dict(iters=5, microbatches=4, global_micro=2, tp=2, **FP64_IDENTITY)
    dp1 = run_distributed(run_tiny_gpt, 2, base)
    dp2 = run_distributed(run_tiny_gpt, 4, base, timeout=400)
    # Ranks are TP-major inside a DP replica: world ranks (0, 1) form DP replica 0.
    assert_params_close(_full(dp2[:2]), _full(dp1), 1e-5, 1e-7, "DP=2xTP=2")
    assert_params_close(_full(dp2[2:]), _full(dp1), 1e-5, 1e-7, "DP replica 1")


def test_tp2_full_mode_inside_megatron():
    """Full mode through the DDP/optimizer plumbing: equals TP=1 (rotation off, fp64) and trains."""
    base = dict(iters=6, microbatches=4, global_micro=2, **FP64_IDENTITY)
    tp1 = run_distributed(run_tiny_gpt, 1, base)[0]
    full = run_distributed(run_tiny_gpt, 2, dict(base, tp=2, tp_mode="full"))
    assert "TensorParallelFullSOAP" in full[0]["engines"]  # the full-mode engine ran
    assert_params_close(_full(full), tp1["params"], 1e-4, 2e-5, "TP=2 full vs TP=1")
    rotated = run_distributed(run_tiny_gpt, 2, dict(iters=8, microbatches=4, tp=2, tp_mode="full"))
    assert rotated[0]["losses"][-1] < rotated[0]["losses"][0] - 0.2


GRAD_KEYS = ("cos_g0_g1", "cos_mi_g0_g1", "norm_g0", "norm_mi_g1", "pred_plain_g0")
GRAD_KEYS += ("pred_folded_g1", "cos_mi_plain_folded", "noise_trace", "grad_sq")


@pytest.fixture(scope="module")
def grad_groups_tp1():
    base = dict(iters=3, microbatches=4, global_micro=2, grad_groups=(0, 0, 1, 1))
    base.update(folding={"structure": "last"}, **FP64_IDENTITY)
    return base, run_distributed(run_tiny_gpt, 1, base)[0]["stats"]["grad"]


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2), dict(tp=2, tp_mode="full"), dict(pp=2)],
    ids=["tp2_blockwise", "tp2_full", "pp2"],
)
def test_grad_group_diagnostics_match_tp1(grad_groups_tp1, layout):
    """Grad-group diagnostics add up over TP shards and pipeline stages.

    Grad-group diagnostics are whole-model quantities: TP shards (blockwise rows summed over
    TP, counted once) and pipeline stages add up to the TP=1 values (rotation off, fp64).
    """
    base, ref = grad_groups_tp1
    runs = run_distributed(run_tiny_gpt, 2, dict(base, **layout))
    ours = runs[0]["stats"]["grad"]
    assert ours == runs[1]["stats"]["grad"]
    for key in GRAD_KEYS:
        assert ours[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-9), key
