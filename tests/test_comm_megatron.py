"""Issue 13 in a real megatron-core run (tiny GPT, gloo, DP=2).

Collectives are counted on the real torch.distributed calls, and the owner-ordered path is
checked against the first version. At DP=2 a sum of two addends does not depend on the order,
and both paths pre-scale by 1/DP before the reduction as Megatron does, so the SOAP params'
level means, hence their updates, are bitwise those of the all-reduce + broadcast path. The Adam
params differ in rounding only: the first version averaged their partial sums at every level
(mean(x + b_r) = x + mean(b_r) up to rounding), the new path reduces the window's sum once; so
after one step SOAP params agree bitwise and Adam params to fp32 round-off, and without folding
(one level) everything is bitwise, over several steps. The bf16 wire rounds each rank's level
sum to bf16 (relative error <= 2^-9) before the fp32 sum. SOAP skips its first update (it only
builds its factors), so after two steps the Adam params (fp32 wire, unchanged inputs) are
bitwise those of the fp32 wire. The SOAP params are compared by the RMS of their difference, in
units of one step (lr): elementwise bounds do not exist, because where the ranks' gradients
nearly cancel the bf16 error is relative to the pieces, not to their sum, and Adam's m/sqrt(v)
(here without rotation, max_precond_dim=1) turns such a tiny absolute error into a full +-lr
step (measured: max |difference| 2.0e-2 = 2 lr after two steps). The level sums themselves are
checked against their bound in test_comm.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.distributed.comm_model import norm_all_reduce_bytes  # noqa: E402
from mlfop_megatron.megatron.optimizer import grad_norm_groups, grad_stats_bytes  # noqa: E402
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402

pytestmark = pytest.mark.distributed
BASE = dict(iters=4, microbatches=4, global_micro=2, count_comm=True)
OLD = {"level_reduce": "all_reduce", "param_sync": "broadcast"}


def _is_adam(name, param):
    return param.dim() < 2 or "embedding" in name or "output_layer" in name


def _steps(run):
    """Per-step launches by kind (every step of a run launches the same)."""
    launches = [c for c, _ in run["comm_counts"]]
    assert all(c == launches[0] for c in launches)
    return launches[0], run["comm_counts"][0][1]


@pytest.mark.parametrize("enabled", [True, False], ids=["folding", "no_folding"])
def test_owner_reduce_scatter_equals_first_version_bitwise(enabled):
    spec = dict(BASE, enabled=enabled, iters=1 if enabled else 4)
    new = run_distributed(run_tiny_gpt, 2, spec)
    old = run_distributed(run_tiny_gpt, 2, dict(spec, comm=OLD))
    for r in (0, 1):
        for name, p in new[r]["params"].items():
            q = old[r]["params"][name]
            if _is_adam(name, p) and enabled:
                assert torch.allclose(p, q, rtol=1e-6, atol=1e-8), name
            else:
                assert torch.equal(p, q), name
    levels = 3 if enabled else 1  # K=4 dyadic: boundaries 1, 2, 4
    launches, sent = _steps(new[0])
    # L reduce-scatters + the ZeRO-1 Adam grads' one, the norm/found-inf all-reduce, one
    # all-gather of the SOAP params and one of the ZeRO-1 Adam params (shard_adam=True)
    assert launches == {"reduce_scatter": levels + 1, "all_reduce": 1, "all_gather": 2}
    assert sum(launches.values()) <= levels + 4
    old_launches, old_sent = _steps(old[0])
    # the first version: every Megatron bucket all-reduced at every level, N broadcasts
    assert old_launches["broadcast"] == 2 and old_launches["all_reduce"] >= levels + 1
    assert sum(sent.values()) < sum(old_sent.values())
    # communication_bytes_per_step counts what the real calls sent, but for the step's
    # packed [norm^2, found-inf] fp64 pair (16 B; a ring all-reduce at DP=2 sends as much;
    # 0.19 adds the norm^2 of its separately clipped "mtp" group: 24 B); the chain adds the
    # ZeRO-1 Adam optimizer's reduce-scatter and all-gather to SOAP's counts
    model = new[0]["comm_bytes"][0]
    chain = new[0]["chain_comm_bytes"]
    adam_gather = new[0]["adam_gather_bytes"]
    assert adam_gather > 0 and chain["adam_params"] == adam_gather
    assert chain["total"] == sum(sent.values()) - grad_stats_bytes()
    groups = len(grad_norm_groups())  # the cost model's norm all-reduce is the measured one
    assert sent["all_reduce"] == norm_all_reduce_bytes(2, groups) == grad_stats_bytes()
    assert model["soap_grads"] + chain["adam_grads"] == sent["reduce_scatter"]
    assert model["adam_grads"] == 0  # no Adam grad is all-reduced any more
    assert model["params"] == sent["all_gather"] - adam_gather


def test_bf16_wire_close_to_fp32_wire():
    # SOAP does not update in its first step; no rotation (see the module docstring)
    spec = dict(BASE, iters=2, lr=1e-2, max_precond_dim=1)
    fp32 = run_distributed(run_tiny_gpt, 2, spec)
    bf16 = run_distributed(run_tiny_gpt, 2, dict(spec, comm={"grad_wire_dtype": "bf16"}))
    launches, sent = _steps(bf16[0])
    # the SOAP level sums go as all-to-alls; the ZeRO-1 Adam grads' reduce-scatter stays fp32
    assert launches["all_to_all"] == 3 and launches["reduce_scatter"] == 1
    assert sent["reduce_scatter"] == bf16[0]["chain_comm_bytes"]["adam_grads"]
    fp32_soap = _steps(fp32[0])[1]["reduce_scatter"] - fp32[0]["chain_comm_bytes"]["adam_grads"]
    assert sent["all_to_all"] * 2 == fp32_soap  # half the bytes
    sq, count = 0.0, 0
    for name, p in fp32[0]["params"].items():
        q = bf16[0]["params"][name]
        assert torch.equal(q, bf16[1]["params"][name]), name  # replicas agree bitwise
        if _is_adam(name, p):  # fp32 on the wire, once: unchanged by the SOAP wire dtype
            assert torch.equal(p, q), name
        else:
            sq += float((p - q).double().pow(2).sum())
            count += p.numel()
    rms = (sq / count) ** 0.5  # RMS change of the SOAP params, in units of one step (lr)
    assert 0.0 < rms <= 0.1 * spec["lr"], rms


def test_exact_segments_equal_padded_segments_bitwise():
    """segments='exact' changes the collectives only: same params, no padding on the wire."""
    # 1 layer: owners of 7h^2 and 5h^2 elements at DP=2. The Adam grads are all-reduced so that
    # every reduce-scatter counted is a SOAP level's (the Adam reduce-scatter is tested in
    # tests/test_adam_reduce_scatter.py).
    spec = dict(BASE, iters=2, layers=1, comm={"adam_grad_reduce": "all_reduce"})
    padded = run_distributed(run_tiny_gpt, 2, spec)
    exact = run_distributed(
        run_tiny_gpt, 2, dict(spec, comm={"adam_grad_reduce": "all_reduce", "segments": "exact"})
    )
    for r in (0, 1):
        for name, p in padded[r]["params"].items():
            assert torch.equal(p, exact[r]["params"][name]), name
    launches, sent = _steps(exact[0])
    # gloo runs the uneven parameter all-gather as one all-to-all
    assert launches == {"reduce_scatter": 3, "all_reduce": 2, "all_gather": 1, "all_to_all": 1}
    model = exact[0]["comm_bytes"][0]
    assert model["soap_grads"] == sent["reduce_scatter"]
    assert model["params"] == sent["all_to_all"]
    padded_model = padded[0]["comm_bytes"][0]
    assert model["soap_grads"] < padded_model["soap_grads"]  # the padding is gone
