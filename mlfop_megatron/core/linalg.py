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
        return dict(vars(self))


def _eigh_descending(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors as columns, ordered by descending eigenvalue; raises on non-finite output."""
    _, vecs = torch.linalg.eigh(matrix)
    if not bool(torch.isfinite(vecs).all()):
        raise torch.linalg.LinAlgError("eigh returned non-finite eigenvectors")
    return torch.flip(vecs, dims=[1])


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
    On failure the old basis is returned with order None (nothing to permute).
    """
    try:
        fq = factor @ basis
        est_eig = (basis * fq).sum(dim=0)  # diag(Q^T F Q) without forming Q^T F Q
        order = torch.argsort(est_eig, descending=True)
        new_basis, _ = torch.linalg.qr(fq[:, order])
        if not bool(torch.isfinite(new_basis).all()):
            raise torch.linalg.LinAlgError("QR refresh produced non-finite values")
        return new_basis, order
    except (RuntimeError, torch.linalg.LinAlgError):
        counters.qr_failures += 1
        return basis, None
