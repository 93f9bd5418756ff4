"""FOP: orthogonality, parallel case, identity metric, agreement with the dense reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlfop_megatron.config import FoldingConfig
from mlfop_megatron.core.fop import fold_coefficients, fop_accum
from tests.support.reference_soap import reference_fop

NO_CLIP = FoldingConfig(beta_max=None)


def random_rotation(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q


def random_problem(seed, m=6, n=5):
    gen = torch.Generator().manual_seed(seed)
    ql, qr = random_rotation(m, gen), random_rotation(n, gen)
    z = torch.randn(m, n, dtype=torch.float64, generator=gen)
    h = torch.randn(m, n, dtype=torch.float64, generator=gen)
    diag = torch.rand(m, n, dtype=torch.float64, generator=gen) * 3 + 0.1
    return z, h, diag, (lambda x: ql.T @ x @ qr)


def m_inner(rot, diag, x, y):
    return (rot(x) * diag * rot(y)).sum()


def test_d_perp_is_fisher_orthogonal_to_a():
    for seed in range(5):
        z, h, diag, rot = random_problem(seed)
        out, coef = fop_accum(z, h, 3, 1, NO_CLIP, rotate=rot, diag=diag)
        a, d = 0.75 * z + 0.25 * h, z - h
        d_perp = d - coef.s[0] * a
        scale = m_inner(rot, diag, d, d).sqrt() * m_inner(rot, diag, a, a).sqrt()
        assert abs(m_inner(rot, diag, d_perp, a)) / scale < 1e-6
        want, s, beta, _ = reference_fop(z, h, 3, 1, diag=diag, rot=rot)
        assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(coef.s[0], s) and torch.allclose(coef.beta[0], beta)


def test_beta_zero_when_d_parallel_to_a():
    _, h, diag, rot = random_problem(7)
    for c in (2.0, -0.5, 1e3):
        out, coef = fop_accum(c * h, h, 2, 2, NO_CLIP, rotate=rot, diag=diag)
        assert coef.beta[0].item() == 0.0
        assert torch.allclose(out, (c * h + h) / 2, rtol=1e-12)


def test_identity_metric_before_first_basis():
    z, h, _, _ = random_problem(3)
    out, coef = fop_accum(z, h, 1, 1, NO_CLIP)  # rotate=None, diag=None: M = I
    want, s, beta, _ = reference_fop(z, h, 1, 1)
    assert torch.allclose(out, want, rtol=1e-10) and torch.allclose(coef.beta[0], beta)


def test_beta_clipping_and_ablation_switches():
    z, h, diag, rot = random_problem(11)
    _, free = fop_accum(z, h, 1, 1, NO_CLIP, rotate=rot, diag=diag)
    tight = FoldingConfig(beta_max=0.01)
    _, clipped = fop_accum(z, h, 1, 1, tight, rotate=rot, diag=diag)
    assert abs(clipped.beta[0].item()) <= 0.01 + 1e-15
    assert abs(free.beta[0].item()) > 0.01
    out0, _ = fop_accum(z, h, 3, 1, FoldingConfig(fixed_beta=0.0), rotate=rot, diag=diag)
    assert torch.allclose(out0, 0.75 * z + 0.25 * h, rtol=1e-12)
    out1, c1 = fop_accum(z, h, 1, 1, FoldingConfig(fixed_beta=1.0), rotate=rot, diag=diag)
    a, d = (z + h) / 2, z - h
    assert torch.allclose(out1, a + (d - c1.s[0] * a), rtol=1e-12)
    _, noproj = fop_accum(z, h, 1, 1, FoldingConfig(project=False), rotate=rot, diag=diag)
    assert noproj.s[0].item() == 0.0


def test_batched_coefficients_match_single_blocks_and_reduce_fn_sums():
    """Batched blocks equal one-at-a-time; a reduce_fn that doubles sums leaves s, beta alone."""
    probs = [random_problem(s) for s in range(3)]
    zr = [rot(z) for z, _, _, rot in probs]
    hr = [rot(h) for _, h, _, rot in probs]
    ds = [d for _, _, d, _ in probs]
    batch = fold_coefficients(zr, hr, ds, 2, 3, NO_CLIP)
    doubled = fold_coefficients(zr, hr, ds, 2, 3, NO_CLIP, reduce_fn=lambda t: 2 * t)
    for i in range(3):
        one = fold_coefficients([zr[i]], [hr[i]], [ds[i]], 2, 3, NO_CLIP)
        assert torch.allclose(batch.beta[i], one.beta[0]) and torch.allclose(batch.s[i], one.s[0])
    assert torch.allclose(batch.beta, doubled.beta) and torch.allclose(batch.s, doubled.s)


vectors = st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=60, deadline=None)
@given(
    seed=vectors,
    nz=st.integers(1, 16),
    nh=st.integers(1, 16),
    scale=st.floats(1e-3, 1e3),
    m=st.integers(1, 6),
    n=st.integers(1, 6),
)
def test_fop_properties(seed, nz, nh, scale, m, n):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, n, dtype=torch.float64, generator=gen) * scale
    h = torch.randn(m, n, dtype=torch.float64, generator=gen) * scale
    diag = torch.rand(m, n, dtype=torch.float64, generator=gen) + 0.05
    out, coef = fop_accum(z, h, nz, nh, NO_CLIP, diag=diag)
    a = (nz * z + nh * h) / (nz + nh)
    d = z - h
    d_perp = d - coef.s[0] * a
    scale_ip = ((d * diag * d).sum() * (a * diag * a).sum()).sqrt()
    # Fisher-orthogonality of d_perp to a (relative to the norms involved).
    assert abs((d_perp * diag * a).sum()) <= 1e-6 * scale_ip + 1e-300
    # The result is a + beta * d_perp, with a finite beta, and equals the dense reference.
    assert torch.isfinite(coef.beta).all()
    assert torch.allclose(out, a + coef.beta[0] * d_perp, rtol=1e-8, atol=1e-10 * scale)
    want, _, _, _ = reference_fop(z, h, nz, nh, diag=diag)
    if coef.beta[0] != 0:  # beta forced to 0 only when d_perp is rounding noise
        assert torch.allclose(out, want, rtol=1e-6, atol=1e-8 * scale)
    # Coefficients reproduce the result: z_new = cz z + ch h.
    assert torch.allclose(out, coef.cz[0] * z + coef.ch[0] * h, rtol=1e-8, atol=1e-10 * scale)
