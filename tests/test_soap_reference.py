"""SOAP against the dense reference over 30+ steps with refreshes, several shapes (fp64)."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.optim import MLFOPSOAP
from tests.support.reference_soap import ReferenceSOAP

SHAPES = {
    "square": (12, 12),
    "tall": (24, 6),
    "wide": (5, 20),
    "dim_gt_max": (40, 6),  # rows > max_precond_dim=32 -> identity on the left
    "vector": (17,),
    "merged_3d": (6, 3, 4),
}


# The SOAP reference's order (statistics-only first step, refresh after the update) for the
# rank-deficient shapes: with the default order a refresh at a rank-deficient factor (tall,
# wide blocks, early steps) picks null columns (ours canonical, the reference's whatever QR
# returns) in which later gradients have components, so the two legitimately part there; the
# default order is compared on full-rank factors (VARIANTS, DEFAULT_CASES).
REFERENCE_ORDER = {"first_step_update": False, "refresh_first": False}


def run_pair(shape, steps=35, seed=0, **opts):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, dtype=torch.float64, generator=gen)
    grads = [torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(steps)]
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP([p], **opts)
    ref = ReferenceSOAP(w0, **{k: v for k, v in opts.items() if k != "batched"})
    for i, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        if i == 0:
            ref.adopt_initial_bases(opt.state[p].get("QL"), opt.state[p].get("QR"))
    return p.detach(), ref.w, opt


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_soap_matches_reference(name, method):
    opts = dict(lr=1e-2, precondition_frequency=5, max_precond_dim=32, refresh_method=method)
    got, want, opt = run_pair(SHAPES[name], **REFERENCE_ORDER, **opts)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"{name}/{method}: max relative error {rel:.2e}"
    assert torch.isfinite(got).all()
    assert opt.stats()["eigh_failures"] == 0


def test_soap_reference_defaults_and_options():
    """The reference's choices (frequency 10, 1-D by AdamW), options, and our defaults."""
    reference = {**REFERENCE_ORDER, "precondition_frequency": 10}
    for opts in (
        reference,
        {**reference, "precondition_1d": True},
        {
            **reference,
            "correct_bias": False,
            "weight_decay": 0.0,
            "shampoo_beta": 0.9,
            "betas": (0.9, 0.99),
        },
        {},  # the package defaults (both sides: the reference's defaults mirror them)
    ):
        for shape in ((10, 7), (9,)):
            got, want, _ = run_pair(shape, steps=32, seed=3, **opts)
            rel = ((got - want).abs().max() / want.abs().max()).item()
            assert rel < 1e-5, (opts, shape, rel)


VARIANTS = {
    "kl": dict(REFERENCE_ORDER, factor_estimator="kl"),
    "kl_bias": dict(REFERENCE_ORDER, factor_estimator="kl", correct_factor_bias=True),
    "kl_eps_only": dict(REFERENCE_ORDER, factor_estimator="kl", kl_damping=0.0),
    "first_update": dict(REFERENCE_ORDER, first_step_update=True),
    "refresh_first": dict(REFERENCE_ORDER, refresh_first=True, precondition_frequency=3),
    "defaults": dict(),  # update from step 1, refresh before the update, every step
    "megatron_like": dict(
        factor_estimator="kl",
        correct_factor_bias=True,
        first_step_update=True,
        refresh_first=True,
        precondition_frequency=1,
        betas=(0.9, 0.999),
    ),
}


# Refreshed at every step, a tall or wide block's factors are rank-deficient at a refresh: the
# null columns are an arbitrary choice (ours canonical, the reference's whatever QR returns),
# and the next gradients have components there. Every-step refresh is compared on full rank.
CASES = [
    (variant, name)
    for variant in VARIANTS
    for name in ("square", "tall", "wide", "dim_gt_max", "merged_3d")
    if VARIANTS[variant].get("precondition_frequency", 1) != 1 or name in ("square", "dim_gt_max")
]


@pytest.mark.parametrize(("variant", "name"), CASES)
def test_soap_variants_match_reference(variant, name):
    """KL-Shampoo factors, factor bias correction, first-step update, refresh before update.

    fp64 over 35 steps (refreshes every 5, or as set), the dense reference's own equations.
    """
    opts = dict(lr=1e-2, precondition_frequency=5, max_precond_dim=32)
    opts.update(VARIANTS[variant])
    got, want, opt = run_pair(SHAPES[name], **opts)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"{variant}/{name}: max relative error {rel:.2e}"
    assert opt.stats()["eigh_failures"] == 0


def test_first_step_update_moves_the_weights_at_once():
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    before = p.detach().clone()
    opt = MLFOPSOAP([p], first_step_update=True, weight_decay=0.0)
    p.grad = torch.randn(4, 3, dtype=torch.float64)
    opt.step()
    assert not torch.equal(p.detach(), before)
    assert opt.state[p]["step"] == 1


def test_first_step_only_collects_statistics():
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    before = p.detach().clone()
    opt = MLFOPSOAP([p], first_step_update=False)
    p.grad = torch.randn(4, 3, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), before)
    state = opt.state[p]
    assert state["initialized"] and state["step"] == 0
    eye = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(state["QL"].T @ state["QL"], eye, atol=1e-12)


# Tall and wide blocks at frequency 3 (see CASES: not refreshed while rank-deficient).
DRIFT_CASES = [
    ("reference_order", "qr", name) for name in ("square", "tall", "wide", "merged_3d")
] + [
    ("reference_order", "eigh", "square"),
    ("defaults", "qr", "square"),
    ("defaults", "qr", "dim_gt_max"),
]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("order", ["default", "reference_order"])
@pytest.mark.parametrize("name", ["square", "dim_gt_max", "vector", "merged_3d"])
def test_nesterov_matches_reference(name, order, batched):
    """nesterov: the step takes beta1 m + (1 - beta1) rot(G), bias-corrected by 1 - beta1^(t+1).

    fp64 over 35 steps against the dense reference (m kept in original coordinates there),
    both engines, both orders; the result must also differ from the plain-momentum step.
    """
    opts = dict(lr=1e-2, max_precond_dim=32, betas=(0.9, 0.95))
    if order == "reference_order":
        opts.update(REFERENCE_ORDER, precondition_frequency=5)
    got, want, _ = run_pair(SHAPES[name], nesterov=True, batched=batched, **opts)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"{order}/{name}: max relative error {rel:.2e}"
    plain, _, _ = run_pair(SHAPES[name], batched=batched, **opts)
    assert (plain - got).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(
    ("order", "name"),
    [(o, n) for o in ("default", "reference_order") for n in ("square", "dim_gt_max", "vector")]
    + [("reference_order", "tall"), ("default", "merged_3d")],  # tall: see REFERENCE_ORDER
)
def test_sign_normalization_matches_reference(name, order, nesterov, batched):
    """normalization="sign" (SPlus): W -= lr Q_L sign(Q_L^T M Q_R) Q_R^T, no v, no bias term.

    fp64 over 35 steps against the dense reference (M kept in original coordinates there and
    rotated at each step), both engines, both orders, with and without Nesterov's look-ahead;
    it must differ from the Adam-normalised step. A sign flips only where rot(M) is within
    rounding of 0: the engines and the reference zero those (a rank-deficient factor's null
    directions; the tall block's in the reference order) and random gradients reach no other.
    """
    opts = dict(lr=1e-2, max_precond_dim=32, betas=(0.9, 0.95), nesterov=nesterov)
    if order == "reference_order":
        opts.update(REFERENCE_ORDER, precondition_frequency=5)
    got, want, _ = run_pair(SHAPES[name], normalization="sign", batched=batched, **opts)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"{order}/{name}: max relative error {rel:.2e}"
    adam, _, _ = run_pair(SHAPES[name], batched=batched, **opts)
    assert (adam - got).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [True, False])
def test_sign_normalization_takes_no_step_in_a_null_direction(batched, dtype):
    """Gradients u a_t^T (rank 1): the step stays in span(u), none from rounding's signs.

    The left factor's 23 null directions carry rotated entries that are rounding noise; a
    plain sign() would step lr along each of them (seen: a null share of order 1).
    """
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(24, 1, dtype=dtype, generator=gen)
    p = torch.nn.Parameter(torch.randn(24, 6, dtype=dtype, generator=gen))
    lr = 1e-2
    opt = MLFOPSOAP([p], lr=lr, weight_decay=0.0, normalization="sign", batched=batched)
    null = torch.eye(24, dtype=dtype) - u @ u.T / (u.T @ u)
    for i in range(6):
        before = p.detach().clone()
        p.grad = u @ torch.randn(1, 6, dtype=dtype, generator=gen)
        opt.step()
        step = before - p.detach()
        if i:
            assert step.norm() > lr  # a step in span(u) was taken ...
            assert (null @ step).norm() <= 1e-3 * step.norm()  # ... and none off it


@pytest.mark.parametrize("batched", [True, False])
def test_sign_normalization_steps_by_lr_in_every_rotated_coordinate(batched):
    """Each step moves every rotated coordinate by exactly lr (before decay): |sign| = 1."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(12, 8, dtype=torch.float64, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    lr, wd = 1e-2, 0.01
    opt = MLFOPSOAP([p], lr=lr, weight_decay=wd, normalization="sign", batched=batched)
    for i in range(4):
        before = p.detach().clone()
        p.grad = torch.randn(12, 8, dtype=torch.float64, generator=gen)
        opt.step()
        if i == 0:  # the first step only collects statistics
            assert torch.equal(p.detach(), before)
            continue
        state = opt.state[p]
        # W' = (W - lr U)(1 - lr wd): undo the decay, rotate the step into the eigenbasis
        step = before - p.detach() / (1 - lr * wd)
        rotated = state["QL"].T @ step @ state["QR"]
        assert torch.allclose(rotated.abs(), torch.full_like(rotated, lr), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("normalization", ["adam", "sign"])
@pytest.mark.parametrize(
    ("order", "name"),
    [(o, n) for o in ("default", "reference_order") for n in ("square", "dim_gt_max", "vector")]
    + [("reference_order", "tall"), ("default", "merged_3d")],  # tall: see REFERENCE_ORDER
)
def test_update_rms_matches_reference(name, order, normalization, batched):
    """update_rms: W -= lr c U / rms(U), U the preconditioned update in the weights' coordinates.

    fp64 over 35 steps against the dense reference, which takes the RMS of the unrotated
    update (the engines take it in the eigenbasis: equal, as the bases are orthogonal), both
    engines, both orders, Adam's and sign normalisation; it must differ from the unscaled step.
    """
    opts = dict(lr=1e-2, max_precond_dim=32, betas=(0.9, 0.95), normalization=normalization)
    if order == "reference_order":
        opts.update(REFERENCE_ORDER, precondition_frequency=5)
    got, want, _ = run_pair(SHAPES[name], update_rms=0.7, batched=batched, **opts)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-5, f"{order}/{name}: max relative error {rel:.2e}"
    plain, _, _ = run_pair(SHAPES[name], update_rms=0.0, batched=batched, **opts)
    assert (plain - got).abs().max() > 1e-3 * want.abs().max()


@pytest.mark.parametrize("batched", [True, False])
def test_update_rms_sets_each_blocks_step_rms(batched):
    """Each step moves each block by RMS exactly lr c before decay, whatever its gradient scale.

    Two matrices of one shape class (stacked together in the batched engine) with gradients
    1e4 apart in scale: Adam's step would already be scale-free per coordinate, but their
    RMS would differ with the moments; scaled, both step by lr c.
    """
    gen = torch.Generator().manual_seed(4)
    shapes = [(10, 6), (10, 6), (7,)]
    params = [
        torch.nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen)) for s in shapes
    ]
    lr, wd, c = 1e-2, 0.01, 0.3
    opt = MLFOPSOAP(params, lr=lr, weight_decay=wd, update_rms=c, batched=batched)
    for i in range(5):
        before = [p.detach().clone() for p in params]
        for p, scale in zip(params, (1e-3, 10.0, 1.0)):
            p.grad = scale * torch.randn(p.shape, dtype=torch.float64, generator=gen)
        opt.step()
        if i == 0:  # the first step only collects statistics
            continue
        for p, b in zip(params, before):
            step = b - p.detach() / (1 - lr * wd)
            rms = step.pow(2).mean().sqrt().item()
            assert rms == pytest.approx(lr * c, rel=1e-12), (p.shape, rms)


def test_update_rms_is_validated():
    """A negative or infinite update_rms is refused naming the option."""
    from mlfop_megatron.config import SOAPConfig

    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="update_rms"):
            SOAPConfig(update_rms=bad)
    assert SOAPConfig(update_rms=0.0).update_rms == 0.0 and SOAPConfig().update_rms == 1.0


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(("order", "method", "name"), DRIFT_CASES)
def test_drift_gated_refresh_matches_reference(order, method, name, batched):
    """refresh_tolerance: a basis is refreshed only when Q^T F Q's off-diagonal share exceeds it.

    The reference forms Q^T F Q and sums its off-diagonal squares; the engine uses
    ||Q^T F Q||_F = ||F||_F and diag(Q^T F Q) only. fp64 over 35 steps, refresh checked every
    step (tall, wide: every 3); the tolerance is set so that some checks refresh and others
    keep the basis, and both sides count the same of each.
    """
    frequency = 3 if name in ("tall", "wide") else 1
    opts = dict(lr=1e-2, max_precond_dim=32, refresh_method=method, refresh_tolerance=1e-2)
    # beta2's factor EMA: white-noise gradients drift the default 0.8's bases past 1e-2 always
    opts["shampoo_beta"] = 0.95
    opts["precondition_frequency"] = frequency
    if order == "reference_order":
        opts.update(REFERENCE_ORDER)
    gen = torch.Generator().manual_seed(5)
    shape = SHAPES[name]
    w0 = torch.randn(shape, dtype=torch.float64, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP([p], batched=batched, **opts)
    ref = ReferenceSOAP(w0, **opts)
    for i in range(35):
        g = torch.randn(shape, dtype=torch.float64, generator=gen)
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        if i == 0:
            ref.adopt_initial_bases(opt.state[p].get("QL"), opt.state[p].get("QR"))
    rel = ((p.detach() - ref.w).abs().max() / ref.w.abs().max()).item()
    assert rel < 1e-5, f"{order}/{method}/{name}: max relative error {rel:.2e}"
    stats = opt.stats()
    assert (stats["refreshes_done"], stats["refreshes_skipped"]) == (ref.refreshed, ref.skipped)
    assert ref.refreshed > 0 and ref.skipped > 0, (ref.refreshed, ref.skipped)


ESTIMATE_SHAPES = [(12, 12), (24, 6), (5, 20), (40, 6)]  # 40 > max_precond_dim: one side


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("estimator", ["shampoo", "kl"])
@pytest.mark.parametrize("order", ["defaults", "reference_order", "folded_mean_statistics"])
def test_tracked_estimates_equal_diag_in_basis(order, estimator, batched):
    """DL, DR stay diag(QL^T L QL), diag(QR^T R QR) through updates, refreshes and skips.

    The engines never form Q^T F Q for them: each factor update adds the row / column sums
    of the rotated gradient's squares (KL: divided by the other side's floored estimate), a
    refresh forms them anew. Checked against the product itself after every step, fp64,
    relative to the largest entry (1e-10): a wrong increment, a missed refresh or a stale
    part would be off by O(1). ``folded_mean_statistics``: the factors are fed the window's
    plain mean through the folder's rotated statistics (K=2, statistics_from="mean").
    """
    opts = dict(lr=1e-2, max_precond_dim=32, refresh_tolerance=1e-2, factor_estimator=estimator)
    k = 1
    if order == "reference_order":
        opts.update(REFERENCE_ORDER, precondition_frequency=2)
    if order == "folded_mean_statistics":
        k = 2
        opts.update(enabled=True, accumulation_steps=k, statistics_from="mean")
    gen = torch.Generator().manual_seed(11)
    params = [
        torch.nn.Parameter(torch.randn(s, dtype=torch.float64, generator=gen))
        for s in ESTIMATE_SHAPES
    ]
    opt = MLFOPSOAP(params, batched=batched, **opts)
    checked = 0
    for _ in range(12):
        for _micro in range(k):
            for p in params:
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen)
            if k > 1:
                opt.accumulate()
        opt.step()
        for p in params:
            st = opt.state[p]
            for f in ("L", "R"):
                if f not in st:
                    continue
                want = (st["Q" + f] * (st[f] @ st["Q" + f])).sum(dim=0)
                err = ((st["D" + f] - want).abs().max() / want.abs().max()).item()
                assert err < 1e-10, f"{f} of {tuple(p.shape)}: {err:.1e}"
                checked += 1
    stats = opt.stats()
    assert stats["refreshes_done"] > 0 and stats["refreshes_skipped"] > 0, stats
    assert checked == 12 * 7
