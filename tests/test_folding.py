"""Multi-level folding: reference agreement, folding-off/K=1 bitwise identities, schedules."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.config import FoldingConfig
from mlfop_megatron.core.levels import LevelSchedule, dyadic_boundaries
from mlfop_megatron.optim import MLFOPSOAP
from tests.support.reference_soap import ReferenceSOAP, reference_fop


def make_grads(shape, steps, k, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, dtype=dtype, generator=gen)
    # A shared signal plus per-micro-step noise, so levels differ but correlate.
    grads = []
    for _ in range(steps):
        signal = torch.randn(shape, dtype=dtype, generator=gen)
        grads.append(
            [signal + 0.7 * torch.randn(shape, dtype=dtype, generator=gen) for _ in range(k)]
        )
    return w0, grads


def run_optimizer(w0, grads, **opts):
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP([p], **opts)
    for micro in grads:
        for g in micro:
            p.grad = g.clone()
            opt.accumulate()
        opt.step()
    return p.detach(), opt


def sequential_mean(micro):
    mean = micro[0].clone()
    for g in micro[1:]:
        mean += g
    return mean / len(micro)


@pytest.mark.parametrize("shape,k", [((10, 6), 4), ((6, 9), 6), ((13,), 3), ((8, 8), 5)])
def test_ml_fop_soap_matches_dense_reference(shape, k):
    opts = dict(lr=1e-2, precondition_frequency=4, accumulation_steps=k, enabled=True)
    w0, grads = make_grads(shape, steps=32, k=k, seed=k)
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP([p], **opts)
    ref = ReferenceSOAP(w0, lr=1e-2, precondition_frequency=4)
    bounds = dyadic_boundaries(k)
    betas = []
    for step, micro in enumerate(grads):
        for g in micro:
            p.grad = g.clone()
            opt.accumulate()
        opt.step()
        # Reference: fold level means with the metric of the previous step.
        rot = ref.rot if ref.started else None
        z = micro[0]
        for j in range(1, len(bounds)):
            h = torch.stack(micro[bounds[j - 1] : bounds[j]]).mean(0)
            z, _, beta, _ = reference_fop(
                z,
                h,
                bounds[j - 1],
                bounds[j] - bounds[j - 1],
                diag=ref.metric_diag(),
                rot=rot,
                beta_max=1.0,
            )
            betas.append(beta.item())
        ref.step(z)
        if step == 0:
            ref.adopt_initial_bases(opt.state[p].get("QL"), opt.state[p].get("QR"))
    rel = ((p.detach() - ref.w).abs().max() / ref.w.abs().max()).item()
    assert rel < 1e-5, rel
    assert any(abs(b) > 1e-3 for b in betas), "folding never changed the mean: weak test"
    levels = opt.stats()["levels"]
    assert len(levels) == len(bounds) - 1
    assert abs(levels[-1]["beta_mean"] - betas[-1]) < 1e-6


@pytest.mark.parametrize("k", [1, 3, 4])
def test_folding_off_equals_plain_soap_on_mean_gradient_bitwise(k):
    w0, grads = make_grads((9, 7), steps=15, k=k, dtype=torch.float32)
    folded, _ = run_optimizer(
        w0, grads, accumulation_steps=k, enabled=False, precondition_frequency=3
    )
    p = torch.nn.Parameter(w0.clone())
    plain = MLFOPSOAP([p], precondition_frequency=3)
    for micro in grads:
        p.grad = sequential_mean(micro)
        plain.step()
    assert torch.equal(folded, p.detach())


def test_k1_with_folding_equals_plain_soap_bitwise():
    w0, grads = make_grads((7, 5), steps=12, k=1, dtype=torch.float32)
    folded, _ = run_optimizer(w0, grads, accumulation_steps=1, enabled=True)
    p = torch.nn.Parameter(w0.clone())
    plain = MLFOPSOAP([p])
    for micro in grads:
        p.grad = micro[0].clone()
        plain.step()
    assert torch.equal(folded, p.detach())


def test_dyadic_and_explicit_boundaries_agree():
    w0, grads = make_grads((6, 5), steps=8, k=8)
    fold = dict(accumulation_steps=8, enabled=True)
    dyadic, _ = run_optimizer(w0, grads, **fold)
    explicit, _ = run_optimizer(w0, grads, **fold, boundaries=(1, 2, 4, 8))
    other, _ = run_optimizer(w0, grads, **fold, boundaries=(1, 3, 8))
    assert torch.equal(dyadic, explicit)
    assert not torch.equal(dyadic, other)


def test_schedule_weights_for_k_not_power_of_two():
    sched = LevelSchedule.from_config(FoldingConfig(enabled=True, accumulation_steps=6))
    assert sched.boundaries == (1, 2, 4, 6)
    assert [sched.fold_weights(j) for j in (1, 2, 3)] == [(1, 1), (2, 2), (4, 2)]
    assert sum(sched.level_size(j) for j in range(sched.num_levels)) == 6
    assert dyadic_boundaries(1) == (1,) and dyadic_boundaries(8) == (1, 2, 4, 8)
    assert dyadic_boundaries(9) == (1, 2, 4, 8, 9)
    assert LevelSchedule.from_config(
        FoldingConfig(accumulation_steps=6, enabled=False)
    ).boundaries == (6,)
    # Folding is off by default: one level holding all K micro-steps.
    assert LevelSchedule.from_config(FoldingConfig(accumulation_steps=6)).boundaries == (6,)


@pytest.mark.parametrize("k", [3, 5, 6, 7])
def test_beta_zero_fold_is_the_plain_mean(k):
    """With beta fixed at 0 every fold is the count-weighted mean: the level weights are right."""
    w0, grads = make_grads((5, 4), steps=1, k=k)
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP([p], accumulation_steps=k, enabled=True, fixed_beta=0.0)
    for g in grads[0]:
        p.grad = g.clone()
        opt.accumulate()
    folded, _ = opt._folder.result()
    assert torch.allclose(folded[0], torch.stack(grads[0]).mean(0), rtol=1e-12, atol=1e-14)


def test_accumulate_misuse_raises_clear_errors():
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = MLFOPSOAP([p], accumulation_steps=2, enabled=True)
    p.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match="without accumulate"):
        opt.step()
    opt.accumulate()
    with pytest.raises(ValueError, match="accumulation_steps=2"):
        opt.step()
    p.grad = torch.randn(3, 3)
    opt.accumulate()
    p.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match="more than accumulation_steps"):
        opt.accumulate()


def test_level_folding_walks_the_schedule_with_and_without_blocks():
    """fold_level advances the window, also on a rank that owns no block.

    fold_level (level means reduced by the caller, as the Megatron path does) advances the
    window; a rank that owns no block still completes it with an empty result.
    """
    from mlfop_megatron.core.folding import WindowFolder

    cfg = FoldingConfig(enabled=True, accumulation_steps=4)
    schedule = LevelSchedule.from_config(cfg)
    empty = WindowFolder(schedule, cfg, rotate_fns=[], metric_diags=[])
    one = WindowFolder(schedule, cfg, rotate_fns=[lambda x: x], metric_diags=[None])
    for level in range(schedule.num_levels):
        assert not empty.complete and not one.complete
        empty.fold_level(level, [])
        one.fold_level(level, [torch.full((2, 3), float(level + 1))])
        assert empty.micro_steps == one.micro_steps == schedule.boundaries[level]
    assert empty.complete and empty.result() == ([], [])
    folded, _ = one.result()
    assert folded[0].shape == (2, 3) and torch.isfinite(folded[0]).all()
