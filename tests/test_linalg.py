"""Canonical null bases (core/linalg.py): the definition, span-only dependence, batch invariance."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.core.linalg import (
    canonical_null_basis,
    canonical_null_columns,
    null_probe,
    orthonormal_factor,
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
