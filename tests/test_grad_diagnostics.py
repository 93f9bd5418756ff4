"""Grad-group diagnostics (core/diagnostics.py) against a dense reference from the equations.

The reference flattens every block into one vector, builds M^-1 as an explicit block-diagonal
matrix Q diag(1/D) Q^T (Q = QL (x) QR of each block), and computes the group means, cosines,
predicted loss changes -lr <g_m, M^-1 u>, ascent fractions and the ANOVA noise scale directly
from the micro-step gradients. Tolerance: fp64, only summation order differs (rtol 1e-9).
"""

from __future__ import annotations

import math

import pytest
import torch

from mlfop_megatron.core.diagnostics import (
    DiagLayout,
    GroupSums,
    check_groups,
    group_block_rows,
    segment_ends,
    summarize_grad_diagnostics,
)
from mlfop_megatron.optim import MLFOPSOAP

TOL = {"rel": 1e-9, "abs": 1e-12}
SHAPES = [(3, 4), (5, 2), (1, 6)]


def test_segment_ends_split_levels_at_group_changes_and_halve_single_segments():
    # last, K=8, image half then text half: each group is one level -> halves split again.
    assert segment_ends((4, 8), (0,) * 4 + (1,) * 4) == (2, 4, 6, 8)
    # chain dyadic K=8: levels {1},{2},{3,4},{5..8}; text (5..8) alone in a level -> split.
    assert segment_ends((1, 2, 4, 8), (0,) * 4 + (1,) * 4) == (1, 2, 4, 6, 8)
    # folding off (one level), one group: the window is halved for the noise scale.
    assert segment_ends((8,), (0,) * 8) == (4, 8)
    # odd K, tree leaves: every micro-step is a segment already.
    assert segment_ends((1, 2, 3), (0, 1, 1)) == (1, 2, 3)
    # a group change inside a level (K=6 chain: level {3,4} mixes groups).
    assert segment_ends((1, 2, 4, 6), (0, 0, 0, 1, 1, 1)) == (1, 2, 3, 4, 6)
    with pytest.raises(ValueError, match="cover 0"):
        check_groups((0, 2), 2)
    with pytest.raises(ValueError, match="one id per micro-step"):
        check_groups((0, 1), 3)


def random_orthogonal(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q


def make_problem(seed, groups, sizes):
    """Micro-step gradients [K][block], bases, metric diagonals, folded grads, eta, lr."""
    gen = torch.Generator().manual_seed(seed)
    k = len(groups)
    offset = torch.tensor([0.7, -0.4, 0.2])  # groups differ in mean (a modality difference)
    micro = [
        [
            torch.randn(*shape, dtype=torch.float64, generator=gen) * 0.5 + offset[groups[i]]
            for shape in SHAPES
        ]
        for i in range(k)
    ]
    bases = [(random_orthogonal(r, gen), random_orthogonal(c, gen)) for r, c in SHAPES]
    diags = [torch.rand(*shape, dtype=torch.float64, generator=gen) + 0.1 for shape in SHAPES]
    comb = [torch.randn(*shape, dtype=torch.float64, generator=gen) for shape in SHAPES]
    eta = torch.rand(len(SHAPES), dtype=torch.float64, generator=gen) + 0.3
    lrs = [0.1, 0.05, 0.2]
    return micro, bases, diags, comb, eta, lrs


def dense_reference(micro, groups, sizes, bases, diags, comb, eta, lrs):
    """Everything from the equations on flattened vectors (original coordinates)."""
    k, num_groups = len(groups), max(groups) + 1
    flat = [torch.cat([g.reshape(-1) for g in step]) for step in micro]
    counts = [groups.count(m) for m in range(num_groups)]
    g = [sum(flat[i] for i in range(k) if groups[i] == m) / counts[m] for m in range(num_groups)]
    u0 = sum(counts[m] / k * g[m] for m in range(num_groups))
    # M^-1 per block: vec(rot X) = (QL (x) QR)^T vec(X) (row-major), M^-1 = Q diag(1/D) Q^T.
    minv_blocks, slices, at = [], [], 0
    for (ql, qr), d in zip(bases, diags):
        q = torch.kron(ql, qr)
        minv_blocks.append(q @ torch.diag(1 / d.reshape(-1)) @ q.T)
        slices.append(slice(at, at + d.numel()))
        at += d.numel()
    minv = torch.block_diag(*minv_blocks)
    u = torch.cat([eta[b] * comb[b].reshape(-1) for b in range(len(SHAPES))])
    lr_vec = torch.cat(
        [torch.full((d.numel(),), lr, dtype=torch.float64) for d, lr in zip(diags, lrs)]
    )
    out = {"blocks": float(len(SHAPES)), "micro_steps": float(k)}
    for m in range(num_groups):
        out[f"norm_g{m}"] = float(g[m].norm())
        out[f"norm_mi_g{m}"] = float((g[m] @ minv @ g[m]).sqrt())
        # predicted change of loss m for the step -lr M^-1 u: -<g_m, lr * M^-1 u>
        out[f"pred_plain_g{m}"] = float(-(g[m] * lr_vec) @ (minv @ u0))
        out[f"pred_folded_g{m}"] = float(-(g[m] * lr_vec) @ (minv @ u))
        for name, direction in (("plain", u0), ("folded", u)):
            ascends = [float(g[m][sl] @ (minv @ direction)[sl] < 0) for sl in slices]
            out[f"ascent_{name}_g{m}"] = sum(ascends) / len(slices)
    for name, direction in (("plain", u0), ("folded", u)):
        anys = [
            float(any(g[m][sl] @ (minv @ direction)[sl] < 0 for m in range(num_groups)))
            for sl in slices
        ]
        out[f"ascent_{name}_any"] = sum(anys) / len(slices)
    for i in range(num_groups):
        for j in range(i + 1, num_groups):
            out[f"cos_g{i}_g{j}"] = float(g[i] @ g[j] / (g[i].norm() * g[j].norm()))
            out[f"cos_mi_g{i}_g{j}"] = float(
                g[i] @ minv @ g[j] / ((g[i] @ minv @ g[i]) * (g[j] @ minv @ g[j])).sqrt()
            )
    out["cos_mi_plain_folded"] = float(u0 @ minv @ u / ((u0 @ minv @ u0) * (u @ minv @ u)).sqrt())
    # Noise: segments (start, size) -> within-group sum of squares over (S - G) dof.
    ss, start = 0.0, 0
    for size in sizes:
        x = sum(flat[start : start + size]) / size
        ss += size * float((x - g[groups[start]]).pow(2).sum())
        start += size
    trace = ss / (len(sizes) - num_groups)
    grad_sq = float(u0 @ u0) - trace / k
    out.update(noise_trace=trace, grad_sq=grad_sq, noise_scale=trace / grad_sq)
    out["segments"] = float(len(sizes))
    return out


def package_summary(micro, groups, sizes, bases, diags, comb, eta, lrs):
    sums = GroupSums(tuple(groups), len(SHAPES))
    start = 0
    for size in sizes:
        seg = [sum(micro[i][b] for i in range(start, start + size)) for b in range(len(SHAPES))]
        # as the Megatron path hands it over: level mean times weight = segment sum
        sums.add_segment(start, size, [x / 2.0 for x in seg], weight=2.0)
        start += size
    rotate_fns = [lambda x, q=q: q[0].T @ x @ q[1] for q in bases]
    comb_rot = [q[0].T @ c @ q[1] for q, c in zip(bases, comb)]
    rows = group_block_rows(sums, rotate_fns, diags, comb_rot, eta, lrs)
    assert rows.shape == (len(SHAPES), DiagLayout(max(groups) + 1).width)
    return summarize_grad_diagnostics(rows.sum(0), sums.counts, len(sizes))


@pytest.mark.parametrize(
    "groups, sizes",
    [
        ((0, 0, 0, 0, 1, 1, 1, 1), (2, 2, 2, 2)),  # by-modality halves, last/chain split points
        ((0, 0, 1, 1, 1, 0, 0, 2, 2), (1, 1, 2, 1, 2, 1, 1)),  # three groups, uneven segments
    ],
    ids=["two-groups", "three-groups"],
)
def test_rows_and_summary_match_the_dense_reference(groups, sizes):
    problem = make_problem(3, groups, sizes)
    ours = package_summary(problem[0], groups, sizes, *problem[1:])
    ref = dense_reference(problem[0], groups, sizes, *problem[1:])
    assert set(ref) <= set(ours)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, **TOL), key
    assert 0.0 < ours["ascent_folded_any"] <= 1.0 or ours["ascent_folded_any"] == 0.0


def test_without_a_fold_the_folded_update_is_the_plain_mean():
    groups, sizes = (0, 0, 1, 1), (1, 1, 1, 1)
    micro, bases, diags, _, _, lrs = make_problem(5, groups, sizes)
    sums = GroupSums(groups, len(SHAPES))
    for i, step in enumerate(micro):
        sums.add_segment(i, 1, step)
    rotate_fns = [lambda x, q=q: q[0].T @ x @ q[1] for q in bases]
    rows = group_block_rows(sums, rotate_fns, diags, None, None, lrs)
    out = summarize_grad_diagnostics(rows.sum(0), sums.counts, 4)
    assert out["cos_mi_plain_folded"] == pytest.approx(1.0, rel=1e-12)
    for m in (0, 1):
        assert out[f"pred_folded_g{m}"] == pytest.approx(out[f"pred_plain_g{m}"], rel=1e-12)


def test_segments_must_hold_one_group_and_continue_the_window():
    sums = GroupSums((0, 0, 1, 1), 1)
    with pytest.raises(ValueError, match="mixes grad groups"):
        sums.add_segment(0, 3, [torch.ones(2)])
    with pytest.raises(ValueError, match="does not continue"):
        sums.add_segment(1, 1, [torch.ones(2)])


def test_noise_scale_estimate_is_unbiased_on_synthetic_gradients():
    """The noise-scale estimates are unbiased on Gaussian micro-step noise.

    Micro-step gradient = G + N(0, sigma^2 I_d): tr(Sigma) = d sigma^2, B_noise =
    d sigma^2 / |G|^2. The trace and |G|^2 estimates average to the truth over windows.
    """
    gen = torch.Generator().manual_seed(0)
    d, k, sigma, windows = 40, 8, 0.5, 400
    true_g = torch.randn(d, dtype=torch.float64, generator=gen) * 0.3
    traces, grad_sqs = [], []
    for _ in range(windows):
        sums = GroupSums((0,) * k, 1)
        for seg in range(4):  # 4 segments of 2 micro-steps
            steps = true_g + sigma * torch.randn(2, d, dtype=torch.float64, generator=gen)
            sums.add_segment(2 * seg, 2, [steps.sum(0)])
        rows = group_block_rows(sums, [lambda x: x], [None], None, None, [1.0])
        out = summarize_grad_diagnostics(rows.sum(0), sums.counts, 4)
        traces.append(out["noise_trace"])
        grad_sqs.append(out["grad_sq"])
    true_trace, true_sq = d * sigma**2, float(true_g @ true_g)
    mean_trace = sum(traces) / windows
    mean_sq = sum(grad_sqs) / windows
    # standard errors: trace ~ chi^2 with 3 d dof -> rel sd sqrt(2 / (3 d)) / sqrt(windows)
    assert mean_trace == pytest.approx(true_trace, rel=4 * math.sqrt(2 / (3 * d)) / windows**0.5)
    assert mean_sq == pytest.approx(true_sq, rel=0.05)


def _train_plain(groups, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model.double()
    opt = MLFOPSOAP(model.parameters(), accumulation_steps=len(groups), enabled=True, **options)
    recorded = []
    for step in range(3):
        if step == 2:
            opt.request_grad_diagnostics(groups)
        for i in range(len(groups)):
            x = torch.randn(4, 6, dtype=torch.float64) + 2.0 * groups[i]
            model(x).pow(2).mean().backward()
            if step == 2:
                recorded.append([p.grad.detach().clone() for p in model.parameters()])
            opt.accumulate()
        opt.step()
    return opt, recorded, model


def test_plain_optimizer_reports_grad_groups_once_per_request():
    groups = (0, 0, 1, 1)
    opt, recorded, model = _train_plain(groups, lr=1e-2, fixed_beta=0.0)
    stats = opt.stats()["grad"]
    flat = [torch.cat([g.reshape(-1) for g in step]) for step in recorded]
    g0, g1 = (flat[0] + flat[1]) / 2, (flat[2] + flat[3]) / 2
    assert stats["cos_g0_g1"] == pytest.approx(float(g0 @ g1 / (g0.norm() * g1.norm())), **TOL)
    assert stats["norm_g1"] == pytest.approx(float(g1.norm()), **TOL)
    assert stats["segments"] == 4 and stats["blocks"] == 4  # every micro-step is a segment
    # beta fixed to 0: the folded gradient is the plain mean
    for m in (0, 1):
        assert stats[f"pred_folded_g{m}"] == pytest.approx(stats[f"pred_plain_g{m}"], rel=1e-9)
    # not requested for the next window: no grad stats
    for _ in range(4):
        model(torch.randn(4, 6, dtype=torch.float64)).pow(2).mean().backward()
        opt.accumulate()
    opt.step()
    assert "grad" not in opt.stats()


def test_plain_optimizer_eta_star_summaries():
    opt, _, _ = _train_plain((0, 0, 1, 1), lr=1e-2, structure="last", step_size="eta_star")
    stats = opt.stats()
    assert 1 / 3 - 1e-9 <= stats["eta_min"] <= stats["eta_mean"] <= stats["eta_max"] <= 1 + 1e-9
    (level,) = stats["levels"]
    assert level["beta_min"] <= level["beta_mean"] <= level["beta_max"]
    assert math.isfinite(level["cz_mean"]) and math.isfinite(level["ch_mean"])
    assert -1.0 <= stats["grad"]["cos_mi_g0_g1"] <= 1.0
