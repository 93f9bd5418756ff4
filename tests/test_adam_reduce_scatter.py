"""Issue 13 pts 2-3: ZeRO-1 Adam grads reduce-scattered, parameter all-gathers overlapped.

Real megatron-core tiny GPT on gloo. Reduce-scatter vs all-reduce of the Adam grads: each rank
receives exactly the slice it steps, with the same elementwise pre-scaling. At DP=2 every
element is a sum of two addends, which does not depend on their order: the params are bitwise
equal, and the global norm (summed from the ranks' slices instead of rank 0's whole
gradients: the same fp64 terms in another order) agrees to rel 1e-14. At DP=4 a ring sums
four addends in an order set by the element's position in the collective's buffer (gloo's
reduce-scatter and all-reduce agree bitwise for the same buffer, measured), and the ZeRO-1
buffer orders the Adam params by optimizer group and pads them to a multiple of N while the
DDP's all-reduce packs them in module order: Adam grads differ in the last fp32 bit, the
norm (hence the clipping factor) at rel ~1e-10, and SOAP's m/sqrt(v) turns such differences
into param differences up to a few percent of one step where a gradient element nearly
cancels; the next norms drift accordingly (measured after 3 applied steps: params 1.4e-4 =
0.014 lr, norm rel 3e-5; bounds below: 0.05 lr and rel 1e-4).

Overlap on vs off: the same all-gathers, only waited later (in the next forward's module
pre-hooks), so everything is bitwise equal, through clipping and a NaN-skipped step, and a
checkpoint saved right after a step holds the gathered params.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.distributed.comm_config import CommConfig  # noqa: E402
from mlfop_megatron.megatron.checkpointing import latest_checkpoint  # noqa: E402
from mlfop_megatron.megatron.optimizer import grad_stats_bytes  # noqa: E402
from mlfop_megatron.megatron.param_gather import PendingParamGathers  # noqa: E402
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402

pytestmark = pytest.mark.distributed
BASE = dict(iters=4, microbatches=4, global_micro=4, clip_grad=0.05, count_comm=True)


def _launches(run):
    """Per-step launches and bytes by kind (every step of a run launches the same)."""
    launches = [c for c, _ in run["comm_counts"]]
    return launches[-1], run["comm_counts"][-1][1]


def _assert_norms_close(got, want, rel):
    assert [ok for ok, _ in got] == [ok for ok, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=rel, abs=0.0)


@pytest.mark.parametrize("dp", [2, 4])
def test_adam_reduce_scatter_equals_all_reduce(dp):
    spec = dict(BASE, nan_at=(2, dp - 1))
    rs = run_distributed(run_tiny_gpt, dp, spec)
    ar = run_distributed(run_tiny_gpt, dp, dict(spec, comm={"adam_grad_reduce": "all_reduce"}))
    lr = 1e-2  # run_tiny_gpt's default
    for r in range(dp):
        assert [ok for ok, _ in rs[r]["results"]] == [True, True, False, True]
        _assert_norms_close(rs[r]["results"], ar[r]["results"], 1e-14 if dp == 2 else 1e-4)
        assert all(n > 0.05 for ok, n in rs[r]["results"] if ok)  # clipping active
        for name, value in ar[r]["params"].items():
            got = rs[r]["params"][name]
            assert torch.equal(got, rs[0]["params"][name]), (r, name)  # replicas agree
            if dp == 2:
                assert torch.equal(got, value), (r, name)
            else:
                assert float((got - value).abs().max()) <= 0.05 * lr, (r, name)
    launches, sent = _launches(rs[0])
    ar_launches, ar_sent = _launches(ar[0])
    # K=4: 3 level reduce-scatters + the Adam one; the norm pair is the only all-reduce
    assert launches == {"reduce_scatter": 4, "all_reduce": 1, "all_gather": 2}
    assert ar_launches == {"reduce_scatter": 3, "all_reduce": 2, "all_gather": 2}
    chain = rs[0]["chain_comm_bytes"]
    # Bytes: what the chain reports is what the real calls sent, but for the norm pair.
    # ring all-reduce of the fp64 [norm^2 per grad-norm group, found-inf] vector (0.19 adds
    # the separately clipped "mtp" group's norm^2)
    pair = 2 * (dp - 1) * grad_stats_bytes() // dp
    assert chain["total"] == sum(sent.values()) - pair
    assert chain["adam_grads"] == sent["reduce_scatter"] - rs[0]["comm_bytes"][0]["soap_grads"]
    # The Adam grads' reduce-scatter moves half the bytes of their all-reduce (ring), up to
    # the < N padding elements of the ZeRO-1 buffer.
    adam_ar = ar_sent["all_reduce"] - pair
    assert abs(2 * chain["adam_grads"] - adam_ar) <= 2 * 4 * dp
    assert sum(sent.values()) < sum(ar_sent.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dp", [2, 4])
def test_overlap_param_gather_is_bitwise_the_same(dp, dtype):
    spec = dict(BASE, dtype=dtype, iters=5, nan_at=(2, dp - 1))
    off = run_distributed(run_tiny_gpt, dp, spec)
    on = run_distributed(run_tiny_gpt, dp, dict(spec, comm={"overlap_param_gather": True}))
    for r in range(dp):
        assert [ok for ok, _ in on[r]["results"]] == [True, True, False, True, True]
        assert on[r]["results"] == off[r]["results"]  # same norms, same skipped step
        assert all(n > 0.05 for ok, n in on[r]["results"] if ok)  # clipping active
        for name, value in off[r]["params"].items():
            assert torch.equal(on[r]["params"][name], value), (r, name)
        assert on[r]["losses"] == off[r]["losses"]
        # Left in flight after each step: the SOAP engine's gather and the Adam buffer's
        # (none after the skipped step); without overlap nothing is.
        assert on[r]["pending_gathers"] == [2, 2, 0, 2, 2]
        assert off[r]["pending_gathers"] == [0] * 5
    # the same collectives, launched the same number of times
    assert _launches(on[0]) == _launches(off[0])


def test_checkpoint_right_after_an_overlapped_step(tmp_path):
    """Saved with the gathers in flight: the checkpoint holds the gathered params."""
    spec = dict(iters=3, microbatches=4, global_micro=4)
    dirs = {mode: str(tmp_path / str(mode)) for mode in (False, True)}
    runs = {
        mode: run_distributed(
            run_tiny_gpt,
            2,
            dict(spec, save_at=(1, dirs[mode]), comm={"overlap_param_gather": mode}),
        )
        for mode in (False, True)
    }
    assert runs[True][0]["pending_gathers"][1] == 2  # the save met two gathers in flight
    loaded = {
        mode: run_distributed(
            run_tiny_gpt, 2, dict(spec, iters=2, load_from=latest_checkpoint(dirs[mode]))
        )
        for mode in (False, True)
    }
    for r in range(2):
        assert loaded[True][r]["results"] == []  # loaded after step 1, no further step
        for name, value in loaded[False][r]["params"].items():
            assert torch.equal(loaded[True][r]["params"][name], value), (r, name)
    # and the runs themselves went on identically after the save
    for name, value in runs[False][0]["params"].items():
        assert torch.equal(runs[True][0]["params"][name], value), name


def test_pre_hooks_wait_only_for_the_modules_own_params():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    gathers = PendingParamGathers()
    gathers.install(model)
    gathers.install(model)  # idempotent
    waited: list[str] = []
    gathers.add(model[0].parameters(), lambda: waited.append("first"))
    gathers.add(model[2].parameters(), lambda: waited.append("last"))
    gathers.add([model[2].bias], lambda: waited.append("last bias"))
    model[0](torch.ones(1, 2))
    assert waited == ["first"] and len(gathers) == 2
    model(torch.ones(1, 2))
    assert waited == ["first", "last", "last bias"] and len(gathers) == 0
    gathers.add(model[0].parameters(), lambda: waited.append("again"))
    gathers.finish_all()
    assert waited[-1] == "again" and len(gathers) == 0


def test_overlap_option_is_validated():
    with pytest.raises(ValueError, match="overlap_param_gather must be True or False"):
        CommConfig(overlap_param_gather="yes")
    with pytest.raises(ValueError, match="adam_grad_reduce must be one of"):
        CommConfig(adam_grad_reduce="broadcast")
    assert CommConfig().adam_reduce_scatter
    assert not CommConfig(level_reduce="all_reduce").adam_reduce_scatter


def test_overlap_refused_with_megatron_lm_params_norm_logging():
    """Megatron-LM reads the params right after the step for --log-params-norm."""
    import argparse

    from mlfop_megatron.megatron_lm.arguments import add_mlfop_args
    from mlfop_megatron.megatron_lm.install import build_mlfop_optimizer

    args = add_mlfop_args(argparse.ArgumentParser()).parse_args(["--mlfop-overlap-param-gather"])
    assert args.mlfop_overlap_param_gather is True
    args.log_params_norm = True
    with pytest.raises(ValueError, match="--log-params-norm"):
        build_mlfop_optimizer(None, [], args)
