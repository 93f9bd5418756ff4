"""Fisher-Orthogonal Projection (FOP) between two gradient estimates.

All inner products are taken in the rotated (eigen) coordinates of the SOAP preconditioner,
where the metric is diagonal: M = diag(D) with D = sqrt(v_hat) + eps, or M = I (D is None)
before the first basis exists. For two estimates z, h with weights wz + wh = 1:

    a = wz z + wh h,  d = z - h
    s = <d, M a> / (<a, M a> + eps);          d_perp = d - s a
    beta = <a, M^-1 d_perp> / (<d_perp, M^-1 d_perp> + eps)
    FOP_accum(z, h) = a + beta d_perp = cz z + ch h

FOP's per-block step size (Eqs. 17-18) for a fold whose ``a`` is the plain mean g_avg, with
g_comb = a + beta d_perp, from the same inner products (no extra pass over the data):

    eta* = <a, M^-1 g_comb> / <g_comb, M^-1 g_comb>
         = (<a,M^-1 a> + beta <a,M^-1 d_perp>)
           / (<a,M^-1 a> + 2 beta <a,M^-1 d_perp> + beta^2 <d_perp,M^-1 d_perp>)

(1 where the denominator is not positive). With the unclipped beta* it lies in [1/3, 1].

Because the result is a linear combination of z and h with scalar coefficients, the caller can
update both the original-space and the rotated-space estimate without extra rotations.
Scalars stay as tensors (no host sync) and are computed for many blocks at once; an optional
``reduce_fn`` sums the partial inner products across ranks (tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mlfop_megatron.config import FoldingConfig

ReduceFn = Callable[[torch.Tensor], torch.Tensor]

# Column indices of the phase-1 and phase-2 partial sums.
AMA, DMA, AA, AD, DD = range(5)
A_MI_DP, DP_MI_DP, D_MI_D, A_MI_A = range(4)


@dataclass
class FoldCoefficients:
    """Per-block results of one fold: z_new = cz z + ch h, plus diagnostics."""

    cz: torch.Tensor
    ch: torch.Tensor
    s: torch.Tensor
    beta: torch.Tensor
    sums: torch.Tensor  # phase-1 sums [n, 5]: the diagnostics (cosine, ratio) derive from them
    eta: torch.Tensor | None = None  # eta* per block when asked for (a taken as g_avg)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x.reshape(-1), y.reshape(-1))


def phase1_sums(
    a: torch.Tensor, d: torch.Tensor, diag: torch.Tensor | None, euclidean: bool = True
) -> torch.Tensor:
    """[<a,Ma>, <d,Ma>, <a,a>, <a,d>, <d,d>] for one block in rotated coordinates.

    The Euclidean three feed only the fold diagnostics: ``euclidean=False`` leaves them 0.
    """
    ma = a if diag is None else a * diag
    if not euclidean:
        zero = ma.new_zeros(())
        return torch.stack([_dot(a, ma), _dot(d, ma), zero, zero, zero])
    return torch.stack([_dot(a, ma), _dot(d, ma), _dot(a, a), _dot(a, d), _dot(d, d)])


def phase2_sums(
    a: torch.Tensor,
    d: torch.Tensor,
    diag: torch.Tensor | None,
    s: torch.Tensor,
    with_ama: bool = False,
) -> torch.Tensor:
    """[<a,M^-1 d_perp>, <d_perp,M^-1 d_perp>, <d,M^-1 d>] with d_perp = d - s a.

    <a,M^-1 a> comes as a fourth entry when ``with_ama`` (needed for eta*).
    """
    d_perp = d - s * a
    mi_dp = d_perp if diag is None else d_perp / diag
    mi_d = d if diag is None else d / diag
    out = [_dot(a, mi_dp), _dot(d_perp, mi_dp), _dot(d, mi_d)]
    if with_ama:
        out.append(_dot(a, a if diag is None else a / diag))
    return torch.stack(out)


def eta_star(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den per block, 1 where den <= 0 (a zero combined gradient keeps the step)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.ones_like(num))


def default_parallel_tol(dtype: torch.dtype) -> float:
    """Relative size below which d_perp is rounding noise: 10 sqrt(machine eps)."""
    return 10.0 * float(torch.finfo(dtype).eps) ** 0.5


def fold_coefficients(
    z_rot: Sequence[torch.Tensor],
    h_rot: Sequence[torch.Tensor],
    diags: Sequence[torch.Tensor | None],
    n_z: int,
    n_h: int,
    cfg: FoldingConfig,
    reduce_fn: ReduceFn | None = None,
    with_eta: bool = False,
) -> FoldCoefficients:
    """FOP coefficients for a batch of blocks (rotated estimates z, h; metric diagonals).

    ``with_eta``: also eta* of each block with this fold's ``a`` as g_avg (see module doc).
    """
    if not (len(z_rot) == len(h_rot) == len(diags)) or not z_rot:
        raise ValueError("fold_coefficients needs equally many (>0) z, h and metric blocks")
    wz, wh = n_z / (n_z + n_h), n_h / (n_z + n_h)
    acc_dtype = torch.float64
    a_list = [wz * z + wh * h for z, h in zip(z_rot, h_rot)]
    d_list = [z - h for z, h in zip(z_rot, h_rot)]

    def phase1() -> torch.Tensor:
        return torch.stack(
            [
                phase1_sums(a, d, m, cfg.diagnostics).to(acc_dtype)
                for a, d, m in zip(a_list, d_list, diags)
            ]
        )

    def phase2(s: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [
                phase2_sums(a, d, m, s_i.to(a.dtype), with_eta).to(acc_dtype)
                for a, d, m, s_i in zip(a_list, d_list, diags, s)
            ]
        )

    return coefficients_from_sums(
        phase1, phase2, z_rot[0].dtype, n_z, n_h, cfg, reduce_fn, with_eta
    )


def coefficients_from_sums(
    phase1: Callable[[], torch.Tensor],
    phase2: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
    n_z: int,
    n_h: int,
    cfg: FoldingConfig,
    reduce_fn: ReduceFn | None = None,
    with_eta: bool = False,
) -> FoldCoefficients:
    """The FOP scalars of every block from its partial sums.

    ``phase1()`` gives the [n, 5] phase-1 sums, ``phase2(s)`` the [n, 3 or 4] phase-2 sums
    for the projection s (fp64, block order); ``reduce_fn`` sums each across ranks.
    ``dtype``: the estimates' dtype.
    """
    wz, wh = n_z / (n_z + n_h), n_h / (n_z + n_h)
    sums1 = phase1()
    if reduce_fn is not None:
        sums1 = reduce_fn(sums1)
    eps = cfg.fop_eps
    if cfg.project:
        s = sums1[:, DMA] / (sums1[:, AMA] + eps)
    else:
        s = torch.zeros_like(sums1[:, DMA])
    sums2 = None
    if cfg.fixed_beta is None or with_eta:
        sums2 = phase2(s)
        if reduce_fn is not None:
            sums2 = reduce_fn(sums2)
    if cfg.fixed_beta is not None:
        beta = torch.full_like(s, cfg.fixed_beta)
    else:
        tol = cfg.parallel_tol
        if tol is None:
            tol = default_parallel_tol(dtype)
        assert sums2 is not None  # computed above whenever beta is not fixed
        beta = sums2[:, A_MI_DP] / (sums2[:, DP_MI_DP] + eps)
        parallel = sums2[:, DP_MI_DP] <= (tol * tol) * sums2[:, D_MI_D]
        beta = torch.where(parallel, torch.zeros_like(beta), beta)
        if cfg.beta_max is not None:
            beta = beta.clamp(-cfg.beta_max, cfg.beta_max)
    keep = 1.0 - beta * s
    cz = keep * wz + beta
    ch = keep * wh - beta
    eta = None
    if with_eta:
        assert sums2 is not None  # computed above whenever with_eta
        ama, amidp = sums2[:, A_MI_A], sums2[:, A_MI_DP]
        num = ama + beta * amidp
        eta = eta_star(num, num + beta * amidp + beta * beta * sums2[:, DP_MI_DP])
    return FoldCoefficients(cz, ch, s, beta, sums1, eta)


def apply_fold(
    z: torch.Tensor, h: torch.Tensor, cz: torch.Tensor, ch: torch.Tensor
) -> torch.Tensor:
    """In place z <- cz z + ch h (0-d tensor coefficients, no host sync)."""
    return z.mul_(cz.to(z.dtype)).addcmul_(h, ch.to(z.dtype))


def fop_accum(
    z: torch.Tensor,
    h: torch.Tensor,
    n_z: int,
    n_h: int,
    cfg: FoldingConfig,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    diag: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FoldCoefficients]:
    """FOP_accum(z, h) for one block in original coordinates (convenience, not the hot path)."""
    rot = rotate if rotate is not None else (lambda x: x)
    coef = fold_coefficients([rot(z)], [rot(h)], [diag], n_z, n_h, cfg)
    return apply_fold(z.clone(), h, coef.cz[0], coef.ch[0]), coef
