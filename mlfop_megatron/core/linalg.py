"""Robust linear algebra for basis computation: eigh with fallbacks and the QR refresh."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinalgCounters:
    """Counts of numerical fallbacks, surfaced in the optimizer's stats."""

    eigh_fp64_retries: int = 0
    eigh_failures: int = 0  # both precisions failed: previous basis kept
    qr_failures: int = 0  # QR refresh failed or was non-finite: previous basis kept

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return dict(vars(self))


def null_tolerance(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues at or below this are rounding noise of zero (n * eps * largest)."""
    eps = torch.finfo(values.dtype).eps
    return values.abs().max() * (values.numel() * eps * 10.0)


def canonical_null_basis(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """Replace columns rank.. (a numerically-null eigenspace) by a canonical basis of it.

    Inside a degenerate eigenspace any orthonormal basis is an eigenbasis, and eigh picks one
    from rounding noise, so two runs whose factors differ in the last bit (e.g. a different
    data-parallel reduction order) would rotate those coordinates arbitrarily. Projecting a
    fixed full-rank matrix onto the space and orthonormalising gives a basis that depends only
    on the space itself, continuously. Tall and wide gradients make this case the common one.
    """
    m = basis.shape[0]
    if rank >= m:
        return basis
    kept = basis[:, :rank]
    gen = torch.Generator(device="cpu").manual_seed(m * 7919 + rank)
    probe = torch.randn(m, m - rank, generator=gen, dtype=torch.float64)
    probe = probe.to(device=basis.device, dtype=basis.dtype)
    projected = probe - kept @ (kept.T @ probe)
    projected = projected - kept @ (kept.T @ projected)  # second pass: orthogonality to 1 ulp
    null, _ = torch.linalg.qr(projected)
    return torch.cat([kept, null], dim=1)


def _eigh_descending(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors as columns by descending eigenvalue, null space canonical; raises on NaN."""
    values, vecs = torch.linalg.eigh(matrix)
    if not bool(torch.isfinite(vecs).all()):
        raise torch.linalg.LinAlgError("eigh returned non-finite eigenvectors")
    values, vecs = torch.flip(values, dims=[0]), torch.flip(vecs, dims=[1])
    rank = int((values > null_tolerance(values)).sum())
    return canonical_null_basis(vecs, rank)


def robust_eigh_basis(
    factor: torch.Tensor, previous: torch.Tensor | None, counters: LinalgCounters
) -> torch.Tensor:
    """Orthogonal eigenbasis of a symmetric factor: try its dtype, retry in fp64, else keep.

    Never raises and never returns non-finite values: when both attempts fail the previous
    basis (or the identity when there is none) is returned and the failure is counted.
    """
    try:
        if bool(torch.isfinite(factor).all()):
            return _eigh_descending(factor)
    except (RuntimeError, torch.linalg.LinAlgError):
        pass
    counters.eigh_fp64_retries += 1
    try:
        if bool(torch.isfinite(factor).all()):
            return _eigh_descending(factor.double()).to(factor.dtype)
    except (RuntimeError, torch.linalg.LinAlgError):
        pass
    counters.eigh_failures += 1
    if previous is not None:
        return previous
    return torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)


def qr_refresh_basis(
    factor: torch.Tensor, basis: torch.Tensor, counters: LinalgCounters
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One power-iteration step + QR on a previous basis (SOAP's cheap refresh).

    Returns (new_basis, order) where ``order`` sorts the old basis columns by descending
    estimated eigenvalue diag(Q^T F Q); the moments must be permuted by the same order.
    On failure (a non-finite factor or result) the old basis is returned with order None
    (nothing to permute).
    """
    try:
        # A non-finite factor would sort as all-zero estimates and come out as the canonical
        # basis of "null space" everything: a fault, not a refresh.
        if not bool(torch.isfinite(factor).all()):
            raise torch.linalg.LinAlgError("QR refresh of a non-finite factor")
        fq = factor @ basis
        est_eig = (basis * fq).sum(dim=0)  # diag(Q^T F Q) without forming Q^T F Q
        # Noise-level estimates count as exact zeros so that the stable sort keeps the
        # null columns in place instead of permuting them by rounding noise.
        tol = null_tolerance(est_eig)
        est_eig = torch.where(est_eig > tol, est_eig, torch.zeros_like(est_eig))
        order = torch.argsort(est_eig, descending=True, stable=True)
        new_basis, _ = torch.linalg.qr(fq[:, order])
        rank = int((est_eig > 0).sum())
        new_basis = canonical_null_basis(new_basis, rank)
        if not bool(torch.isfinite(new_basis).all()):
            raise torch.linalg.LinAlgError("QR refresh produced non-finite values")
        return new_basis, order
    except (RuntimeError, torch.linalg.LinAlgError):
        counters.qr_failures += 1
        return basis, None
