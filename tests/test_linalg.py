"""core/linalg.py: canonical null bases and the QR refresh's null columns.

Canonical null bases: the definition, span-only dependence, batch invariance. The QR refresh:
null columns kept from the old basis, continuity, batched equal to per-block.
"""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.config import SOAPConfig
from mlfop_megatron.core.batched import BatchedBlocks, compute_bases
from mlfop_megatron.core.linalg import (
    LinalgCounters,
    canonical_null_basis,
    canonical_null_columns,
    null_probe,
    orthonormal_factor,
    qr_refresh_basis,
)


def _orthonormal(n: int, count: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(count, n, n, generator=gen, dtype=torch.float64))
    return q.to(dtype)


def _gram_schmidt(a: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt of the columns of a (the QR factor with positive diagonal)."""
    cols = []
    for j in range(a.shape[1]):
        v = a[:, j].clone()
        for u in cols:
            v = v - (u @ v) * u
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("null", [1, 2, 5, 6, 7, 11, 12])
def test_canonical_null_columns_is_gram_schmidt_of_the_projected_probe(null):
    """Both ways (from the null columns, by projecting out the kept ones) give the definition."""
    n = 12
    basis = _orthonormal(n, 1, 0, torch.float64)[0]
    kept = basis[:, : n - null]
    probe = null_probe(n, torch.float64, torch.device("cpu"))[:, :null]
    expected = _gram_schmidt(probe - kept @ (kept.T @ probe))
    got = canonical_null_columns(basis[None], null)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    full = canonical_null_basis(basis, n - null)
    assert torch.equal(full[:, : n - null], kept)
    torch.testing.assert_close(full.T @ full, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("null", [1, 3, 9])
def test_canonical_null_columns_depend_only_on_the_span(null):
    """Another orthonormal basis of the same null space gives the same canonical columns."""
    n = 12
    basis = _orthonormal(n, 1, 1, torch.float64)[0]
    mix = _orthonormal(null, 1, 2, torch.float64)[0]
    other = basis.clone()
    other[:, n - null :] = basis[:, n - null :] @ mix
    torch.testing.assert_close(
        canonical_null_columns(other[None], null),
        canonical_null_columns(basis[None], null),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_null_column_is_batch_invariant(dtype):
    """One null column is computed elementwise: bitwise the same alone and in any batch."""
    bases = _orthonormal(48, 7, 4, dtype)
    together = canonical_null_columns(bases, 1)
    some = canonical_null_columns(bases[2:5], 1)
    for j in range(7):
        alone = canonical_null_columns(bases[j : j + 1], 1)[0]
        assert torch.equal(together[j], alone)
        assert torch.equal(alone.abs(), bases[j, :, 47:].abs())  # +-N exactly
        if 2 <= j < 5:
            assert torch.equal(some[j - 2], alone)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("null", [2, 5, 24, 30, 46])
def test_canonical_null_columns_batched_equal_alone(dtype, null):
    """A block's columns computed with other blocks equal its columns computed alone.

    To rounding, not bitwise: batched matmul is not batch-invariant on CPU for every shape
    (measured: float64 k = 5 at n = 48 differs in the last bits for odd batch positions).
    """
    n = 48
    bases = _orthonormal(n, 7, 3, dtype)
    together = canonical_null_columns(bases, null)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    for j in range(bases.shape[0]):
        alone = canonical_null_columns(bases[j : j + 1].contiguous(), null)[0]
        torch.testing.assert_close(together[j], alone, rtol=0, atol=atol)
    eye = torch.eye(null, dtype=dtype).expand(7, null, null)
    torch.testing.assert_close(together.transpose(-2, -1) @ together, eye, rtol=0, atol=atol)


def test_null_probe_is_drawn_once_per_size_dtype_and_device():
    """The probe is cached (no host draw or copy per refresh) and is seeded, not random."""
    a = null_probe(20, torch.float32, torch.device("cpu"))
    assert null_probe(20, torch.float32, torch.device("cpu")) is a
    gen = torch.Generator().manual_seed(20 * 7919)
    expected = torch.randn(20, 20, generator=gen, dtype=torch.float64).float()
    assert torch.equal(a, expected)


def test_orthonormal_factor_is_the_q_of_linalg_qr() -> None:
    """Q from geqrf + householder_product equals torch.linalg.qr's Q bitwise, batched or not."""
    gen = torch.Generator().manual_seed(3)
    for shape in [(7, 7), (3, 16, 16), (2, 9, 5)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        q = orthonormal_factor(x)
        assert torch.equal(q, torch.linalg.qr(x)[0])
        eye = torch.eye(q.shape[-1], dtype=q.dtype)
        torch.testing.assert_close(q.mT @ q, eye.expand_as(q.mT @ q), rtol=0, atol=1e-12)


def _rank_deficient_factor(n: int, rank: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return (g @ g.T).to(dtype)


def _mix_within(basis: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """``basis`` with its columns rank.. rotated among themselves (the same span)."""
    n = basis.shape[0]
    gen = torch.Generator().manual_seed(seed)
    rot, _ = torch.linalg.qr(torch.randn(n - rank, n - rank, generator=gen, dtype=torch.float64))
    out = basis.clone()
    out[:, rank:] = basis[:, rank:] @ rot.to(basis.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_refresh_keeps_the_old_null_directions(dtype):
    """Columns with a zero estimate (F q = 0) keep their old direction: no noise-picked basis.

    F has rank 5 of 12 and the old basis spans F's range with its first 5 columns, so Q^T F Q
    has 7 zero estimates. The refreshed null columns must equal the old ones up to sign (they
    are already orthogonal to the kept ones), whichever basis of the null space the old one
    holds: QR of F Q alone would make them from rounding noise.
    """
    n, rank = 12, 5
    factor = _rank_deficient_factor(n, rank, seed=1, dtype=dtype)
    _, vecs = torch.linalg.eigh(factor.double())
    eig = vecs.flip(1)  # range first
    counters = LinalgCounters()
    for seed in (2, 3):
        old = _mix_within(eig, rank, seed).to(dtype)
        new, order = qr_refresh_basis(factor, old, counters)
        assert order is not None and counters.qr_failures == 0
        assert torch.equal(order[rank:], torch.arange(rank, n))  # stable: nulls stay in place
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(new[:, rank:].abs(), old[:, rank:].abs(), atol=tol, rtol=0)
        eye = torch.eye(n, dtype=dtype)
        torch.testing.assert_close(new.T @ new, eye, atol=tol, rtol=0)


def test_qr_refresh_is_continuous_in_the_factor():
    """A last-bit change of a rank-deficient factor moves the refreshed basis by rounding only.

    Two data-parallel layouts reduce the factor in different orders; their bases must agree
    to rounding, up to the sign of each column (SOAP is invariant to those signs). The old
    basis spans F's range with its first columns (not F's eigenvectors: the power step has
    work to do) and F's null space with the others, as after an earlier refresh.
    """
    n, rank = 16, 6
    factor = _rank_deficient_factor(n, rank, seed=4, dtype=torch.float64)
    eig = torch.linalg.eigh(factor)[1].flip(1)
    gen = torch.Generator().manual_seed(5)
    mix, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
    old = _mix_within(eig, rank, seed=6)
    old[:, :rank] = eig[:, :rank] @ mix
    noise = torch.randn(n, n, generator=gen, dtype=torch.float64) * 1e-15
    counters = LinalgCounters()
    a, order_a = qr_refresh_basis(factor, old, counters)
    b, order_b = qr_refresh_basis(factor + (noise + noise.T), old, counters)
    assert order_a is not None and order_b is not None
    assert torch.equal(order_a, order_b)
    torch.testing.assert_close(a.abs(), b.abs(), atol=1e-9, rtol=0)
    torch.testing.assert_close(a[:, rank:].abs(), old[:, rank:].abs(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_refresh_batched_equals_per_block(dtype):
    """The batched engine's refresh makes the same null columns as ``qr_refresh_basis``."""
    n, rank, count = 10, 4, 3
    factors = torch.stack(
        [_rank_deficient_factor(n, rank, seed=10 + i, dtype=dtype) for i in range(count)]
    )
    eig = torch.linalg.eigh(factors.double())[1].flip(-1)
    olds = torch.stack([_mix_within(eig[i], rank, 20 + i) for i in range(count)]).to(dtype)
    states = []
    for i in range(count):
        states.append(
            {
                "step": 3,
                "initialized": True,
                "exp_avg": torch.zeros(n, 1, dtype=dtype).expand(n, n).clone(),
                "exp_avg_sq": torch.zeros(n, n, dtype=dtype),
                "L": factors[i].clone(),
                "QL": olds[i].clone(),
            }
        )
    want = [qr_refresh_basis(factors[i], olds[i], LinalgCounters())[0] for i in range(count)]
    cfg = SOAPConfig(refresh_tolerance=0.0)
    params = [torch.zeros(n, n, dtype=dtype) for _ in range(count)]
    engine = BatchedBlocks(states, params, [cfg] * count)
    compute_bases(engine.classes, "qr", LinalgCounters(), first=False)
    for i in range(count):
        torch.testing.assert_close(
            states[i]["QL"].abs(),
            want[i].abs(),
            atol=1e-5 if dtype == torch.float32 else 1e-12,
            rtol=0,
        )
