"""Robust linear algebra for basis computation: eigh with fallbacks and the QR refresh."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinalgCounters:
    """Counts of numerical fallbacks and of refreshes, surfaced in the optimizer's stats."""

    eigh_fp64_retries: int = 0
    eigh_failures: int = 0  # both precisions failed: previous basis kept
    qr_failures: int = 0  # QR refresh failed or was non-finite: previous basis kept
    refreshes_done: int = 0  # bases (one side of one block) recomputed by a refresh
    refreshes_skipped: int = 0  # scheduled refreshes skipped: basis within refresh_tolerance

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The counters' names, in a fixed order."""
        return tuple(cls.__dataclass_fields__)

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return dict(vars(self))


def null_tolerance(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues at or below this are rounding noise of zero (n * eps * largest)."""
    eps = torch.finfo(values.dtype).eps
    return values.abs().max() * (values.numel() * eps * 10.0)


_PROBES: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def orthonormal_factor(x: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of ``x`` (batched), without forming R.

    Householder QR then the product of its reflectors, skipping the triangular copy of R that
    ``torch.linalg.qr`` makes and the refresh discards (about a sixth of a 512 x 512 QR on
    CPU). On CPU (LAPACK geqrf/orgqr) bitwise the Q of ``torch.linalg.qr`` (tested); on CUDA
    the same factorisation, equal to rounding where torch picks another solver for it.
    """
    reflectors, tau = torch.geqrf(x)
    return torch.linalg.householder_product(reflectors, tau)


def null_probe(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed n x n matrix whose projections define canonical null bases (cached per device).

    Drawn once per (n, dtype, device) from a seeded host generator in float64 and kept on the
    device, so the refresh never draws or copies it again.
    """
    key = (n, dtype, str(device))
    probe = _PROBES.get(key)
    if probe is None or probe.device != device:
        gen = torch.Generator(device="cpu").manual_seed(n * 7919)
        probe = torch.randn(n, n, generator=gen, dtype=torch.float64)
        probe = probe.to(device=device, dtype=dtype)
        _PROBES[key] = probe
    return probe


def canonical_null_columns(bases: torch.Tensor, null: int) -> torch.Tensor:
    """Canonical orthonormal basis [G, n, k] of the span of the last ``null`` = k columns.

    ``bases``: [G, n, n] orthonormal bases whose last k columns span a numerically-null
    eigenspace. The result is the QR factor with positive diagonal of P_k projected onto that
    span (P_k: the first k columns of :func:`null_probe`), which depends only on the span.
    Computed the cheaper of two equal ways: from the null columns N (k <= n - k:
    N^T P_k = Q_c R_c, result N Q_c; about 4 n k^2 flops) or by projecting out the kept
    columns K (k > n - k: QR of P_k - K K^T P_k, twice projected; about 8 n (n - k) k).
    Batched over G blocks, each block's columns equal those computed alone to rounding
    (tests/test_linalg.py); bitwise only where the BLAS is batch-invariant for the shape, and
    always for k = 1 (computed elementwise).
    """
    g, n = bases.shape[0], bases.shape[-1]
    kept = n - null
    if null == 1:
        # One column: the definition is N sign(<N, p>), exact up to that sign. Elementwise
        # product and a per-block sum (no matrix-vector product), so a block's result does
        # not depend on the blocks computed with it.
        column = bases[..., kept:].contiguous()
        first = null_probe(n, bases.dtype, bases.device)[:, 0]
        sign = torch.where((column[..., 0] * first).sum(-1) < 0, -1.0, 1.0)
        return column * sign.to(column.dtype)[:, None, None]
    probe = null_probe(n, bases.dtype, bases.device)[:, :null].expand(g, n, null)
    # Row-major copies: the BLAS rounds differently for a column-major operand (how QR and
    # eigh return their bases) than for a row-major one (a copy of it).
    if null <= kept:
        columns = bases[..., kept:].contiguous()
        q, r = torch.linalg.qr(torch.matmul(columns.transpose(-2, -1), probe))
        out = torch.matmul(columns, q)
    else:
        k_cols = bases[..., :kept].contiguous()
        k_t = k_cols.transpose(-2, -1)
        projected = probe - torch.matmul(k_cols, torch.matmul(k_t, probe))
        projected = projected - torch.matmul(k_cols, torch.matmul(k_t, projected))
        out, r = torch.linalg.qr(projected)
    # Householder QR leaves the sign of each R_jj to the data: fixing R_jj > 0 makes the
    # factorisation unique, so the columns depend on the span only (multiplying by -1 is exact).
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(out.dtype)
    return out * signs[:, None, :]


def canonical_null_basis(basis: torch.Tensor, rank: int) -> torch.Tensor:
    """Replace columns rank.. (a numerically-null eigenspace) by a canonical basis of it.

    Inside a degenerate eigenspace any orthonormal basis is an eigenbasis, and eigh picks one
    from rounding noise, so two runs whose factors differ in the last bit (e.g. a different
    data-parallel reduction order) would rotate those coordinates arbitrarily. The canonical
    basis (:func:`canonical_null_columns`) depends only on the space itself, continuously.
    Tall and wide gradients make this case the common one.
    """
    m = basis.shape[0]
    if rank >= m:
        return basis
    null = canonical_null_columns(basis[None], m - rank)[0]
    return torch.cat([basis[:, :rank], null], dim=1)


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


def diag_in_basis(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """diag(Q^T F Q) without forming Q^T F Q: [..., n] for [..., n, n] (batched or not)."""
    return (basis * torch.matmul(factor, basis)).sum(dim=-2)


def off_diagonal_share(factor: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """Share of ||Q^T F Q||_F^2 off the diagonal, given ``est`` = diag(Q^T F Q) (batched).

    For orthogonal Q, ||Q^T F Q||_F = ||F||_F, so the share is 1 - ||est||^2 / ||F||^2:
    never Q^T F Q (the engines track ``est``, ``soap.update_factors``). 0 for a zero factor, NaN
    for a non-finite one. ``factor`` [..., n, n], ``est`` [..., n]; result [...].
    """
    total = torch.linalg.vector_norm(factor, dim=(-2, -1))
    ratio = torch.linalg.vector_norm(est, dim=-1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return (1.0 - ratio.square()).clamp_min(0.0)


def estimate_aligned(factor: torch.Tensor, est: torch.Tensor, tolerance: float) -> bool:
    """Whether Q^T F Q's off-diagonal share is at most ``tolerance`` (False when tolerance 0).

    ``est`` = diag(Q^T F Q), tracked by the caller. A non-finite factor is never aligned, so
    its refresh runs and counts the failure.
    """
    if tolerance <= 0.0:
        return False
    return bool(off_diagonal_share(factor, est) <= tolerance)


def power_step_matrix(fq: torch.Tensor, basis: torch.Tensor, est: torch.Tensor) -> torch.Tensor:
    """The matrix whose QR is the refreshed basis: F Q with its null columns replaced by Q's.

    ``fq`` = F Q and ``basis`` = Q with their columns sorted by the estimates ``est`` =
    diag(Q^T F Q) (descending, noise-level ones set to exactly 0), batched or not ([..., n, n],
    [..., n]). A column with a zero estimate has F q = 0 up to rounding (F is PSD), so its
    F q is noise and QR would turn it into an arbitrary direction of the null space. Instead
    the old column q, scaled to the largest estimate (so Householder's normwise error bound
    is relative to the kept columns' scale), enters the QR: Householder's column j depends
    only on columns 1..j, so the kept columns come out as from F Q alone, and the null columns
    are the old ones made orthogonal to them, a continuous function of F and Q. That is the
    power step on F + c P_null, and costs nothing beyond the one QR (the canonical completion
    it replaced, :func:`canonical_null_columns`, was a second QR-sized factorisation).
    """
    top = est.amax(dim=-1, keepdim=True)
    scale = torch.where(top > 0, top, torch.ones_like(top))
    kept = (est > 0).unsqueeze(-2)
    # Scaled after the choice (a kept column's factor is exactly 1): no stack-sized scaled copy
    # of Q beside F Q, Q and the result.
    column_scale = torch.where(kept, torch.ones_like(scale).unsqueeze(-1), scale.unsqueeze(-1))
    return torch.where(kept, fq, basis).mul_(column_scale)


def qr_refresh_basis(
    factor: torch.Tensor, basis: torch.Tensor, counters: LinalgCounters
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One power-iteration step + QR on a previous basis (SOAP's cheap refresh).

    Null columns (zero estimates) keep the old basis's directions (:func:`power_step_matrix`).
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
        new_basis = orthonormal_factor(
            power_step_matrix(fq[:, order], basis[:, order], est_eig[order])
        )
        if not bool(torch.isfinite(new_basis).all()):
            raise torch.linalg.LinAlgError("QR refresh produced non-finite values")
        return new_basis, order
    except (RuntimeError, torch.linalg.LinAlgError):
        counters.qr_failures += 1
        return basis, None
