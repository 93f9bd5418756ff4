"""SOAP on one matrix block: Adam in the eigenbasis of Shampoo's Kronecker factors.

State of a block (a plain dict so torch's optimizer state_dict can carry it):
  step         number of moment updates done so far (t)
  initialized  True once the first (statistics-only) step has run
  L, R         Kronecker factors (absent on a side that is not rotated)
  QL, QR       orthogonal bases, eigenvectors by descending eigenvalue (identity until the
               first step; absent on a side that is not rotated)
  exp_avg      first moment, in rotated coordinates
  exp_avg_sq   second moment, in rotated coordinates
  DL, DR       diag(QL^T L QL) and diag(QR^T R QR): the factors' eigenvalue estimates in the
               current bases, kept up to date from the rotated gradient at every factor
               update (see :func:`update_factors`) and formed again only when a basis changes;
               derived state (recomputed when a loaded state lacks it: :func:`ensure_estimates`)
  master       fp32 main weights of a bf16/fp16 param block (absent for fp32/fp64 params)
A block whose sides are both identity is plain AdamW (used for 1-D params).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from mlfop_megatron.config import SOAPConfig
from mlfop_megatron.core import fused
from mlfop_megatron.core.linalg import (
    LinalgCounters,
    diag_in_basis,
    estimate_aligned,
    qr_refresh_basis,
    robust_eigh_basis,
)
from mlfop_megatron.policies import rotates

State = dict


@dataclass(frozen=True)
class BlockLayout:
    """How a parameter is viewed as a matrix and which sides get a rotation."""

    rows: int
    cols: int
    rotate_rows: bool
    rotate_cols: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the matrix view."""
        return (self.rows, self.cols)


def block_layout(shape: torch.Size | tuple[int, ...], cfg: SOAPConfig) -> BlockLayout:
    """Matrix view of a parameter: n-D tensors merge to (dim0, prod(rest)); 1-D -> (1, n)."""
    if len(shape) == 0:
        return BlockLayout(1, 1, False, False)
    if len(shape) == 1:
        n = int(shape[0])
        return BlockLayout(1, n, False, cfg.precondition_1d and rotates(n, cfg.max_precond_dim))
    rows = int(shape[0])
    cols = math.prod(int(s) for s in shape[1:])
    return BlockLayout(
        rows, cols, rotates(rows, cfg.max_precond_dim), rotates(cols, cfg.max_precond_dim)
    )


def needs_master(param_dtype: torch.dtype) -> bool:
    """Low-precision params keep fp32 main weights in the optimizer state."""
    return param_dtype in (torch.bfloat16, torch.float16)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state precision: fp64 for fp64 params, fp32 otherwise (bf16/fp16 included)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def init_state(
    layout: BlockLayout,
    dtype: torch.dtype,
    device: torch.device,
    master: torch.Tensor | None = None,
) -> State:
    """Zero state for a block.

    ``master``: fp32 copy of a low-precision (bf16) param block, which then receives the
    updates and is copied into the param after each step.
    """
    state: State = {
        "step": 0,
        "initialized": False,
        "exp_avg": torch.zeros(layout.shape, dtype=dtype, device=device),
        "exp_avg_sq": torch.zeros(layout.shape, dtype=dtype, device=device),
    }
    # Bases start as the identity (exact, and the metric is I until the first step anyway) so
    # that the state's structure never changes: checkpoint templates can be built up front.
    if master is not None:
        state["master"] = master.detach().to(dtype=dtype, copy=True).reshape(layout.shape)
    if layout.rotate_rows:
        state["L"] = torch.zeros(layout.rows, layout.rows, dtype=dtype, device=device)
        state["QL"] = torch.eye(layout.rows, dtype=dtype, device=device)
        state["DL"] = torch.zeros(layout.rows, dtype=dtype, device=device)
    if layout.rotate_cols:
        state["R"] = torch.zeros(layout.cols, layout.cols, dtype=dtype, device=device)
        state["QR"] = torch.eye(layout.cols, dtype=dtype, device=device)
        state["DR"] = torch.zeros(layout.cols, dtype=dtype, device=device)
    return state


SIDE_KEYS = (("L", "QL", "DL", 0), ("R", "QR", "DR", 1))  # factor, basis, estimate, matrix dim


def ensure_estimates(state: State) -> None:
    """Form diag(Q^T F Q) of every side whose estimate is missing (a state saved without it)."""
    for factor_key, basis_key, est_key, _ in SIDE_KEYS:
        if factor_key in state and est_key not in state:
            state[est_key] = diag_in_basis(state[factor_key], state[basis_key])


def rotate(x: torch.Tensor, state: State) -> torch.Tensor:
    """rot(X) = QL^T X QR (identity on a side without a basis)."""
    if "QL" in state:
        x = state["QL"].T @ x
    if "QR" in state:
        x = x @ state["QR"]
    return x


def unrotate(x: torch.Tensor, state: State) -> torch.Tensor:
    """unrot(X) = QL X QR^T."""
    if "QL" in state:
        x = state["QL"] @ x
    if "QR" in state:
        x = x @ state["QR"].T
    return x


def metric_diag(state: State, cfg: SOAPConfig) -> torch.Tensor | None:
    """Diagonal of the SOAP metric in rotated coordinates, sqrt(v_hat)+eps; None means M = I."""
    t = state.get("step", 0)
    if not state.get("initialized", False) or t == 0:
        return None
    v_hat = state["exp_avg_sq"] / (1.0 - cfg.betas[1] ** t)
    return v_hat.sqrt_().add_(cfg.eps)


def floored_estimate(est: torch.Tensor, cfg: SOAPConfig) -> torch.Tensor:
    """diag(Q^T F Q) [..., n] floored at max(eps, kl_damping * its largest): what KL inverts.

    The relative floor bounds the dynamic range a rank-deficient factor would otherwise give
    the other side (1/eps on its null space), which amplifies rounding without limit.
    """
    floor = (est.amax(dim=-1, keepdim=True) * cfg.kl_damping).clamp_min(cfg.eps)
    return torch.maximum(est, floor)


def kl_factor_increments(
    state: State, grad: torch.Tensor, cfg: SOAPConfig, first: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """KL-Shampoo's new terms of L and R for gradient G (None for a side without a factor).

    G R^-1 G^T / n and G^T L^-1 G / m (Lin et al. 2025) with F^-1 = Q diag(1/lam) Q^T,
    lam = diag(Q^T F Q) floored (:func:`floored_estimate` of the tracked DL, DR), from the
    factors and bases before this update. A side without a factor counts as F = I. At the
    ``first`` update, when no estimate exists yet, both factors count as c I with
    c = rms(G): the first L (x) R then has the trace of vec(G) vec(G)^T, split evenly (an eps
    floor there would scale both by 1/eps and leave the pair ~1e16 out of balance for
    hundreds of steps).
    """
    rows, cols = grad.shape
    inc_l = inc_r = None
    if first:
        c = (grad.norm() / math.sqrt(rows * cols)).clamp_min(cfg.eps)
        if "L" in state:
            inc_l = grad @ grad.T / (cols * c)
        if "R" in state:
            inc_r = grad.T @ grad / (rows * c)
        return inc_l, inc_r
    if "L" in state:
        if "R" in state:  # G R^-1 G^T = (G QR) diag(1/lam_R) (G QR)^T
            p = grad @ state["QR"]
            inc_l = (p / floored_estimate(state["DR"], cfg)) @ p.T / cols
        else:
            inc_l = grad @ grad.T / cols
    if "R" in state:
        if "L" in state:  # G^T L^-1 G = (QL^T G)^T diag(1/lam_L) (QL^T G)
            p = state["QL"].T @ grad
            inc_r = (p / floored_estimate(state["DL"], cfg)[:, None]).T @ p / rows
        else:
            inc_r = grad.T @ grad / rows
    return inc_l, inc_r


def estimate_increments(
    state: State, rotated: torch.Tensor, cfg: SOAPConfig, first: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """diag(Q^T inc Q) of each side's factor increment, from rot(G) = QL^T G QR alone.

    For orthogonal QL, QR, diag(QL^T G G^T QL) is the row sums of rot(G)^2 and
    diag(QR^T G^T G QR) its column sums, so the estimates follow a factor update without a
    product with the factor. Shampoo: those sums. KL-Shampoo
    (:func:`kl_factor_increments`): QL^T (G QR) diag(1/lam_R) (G QR)^T QL has the diagonal
    sum_j rot(G)_ij^2 / lam_R,j, divided by n as the increment is (and likewise for R);
    ``first``: the rms(G) scaling of the first update. ``rotated`` is [..., r, c].
    """
    has_l, has_r = "DL" in state, "DR" in state
    sq = rotated.square()  # one class-stack temporary, both sides summed from it
    if cfg.factor_estimator != "kl":
        return (sq.sum(dim=-1) if has_l else None, sq.sum(dim=-2) if has_r else None)
    rows, cols = rotated.shape[-2:]
    if first:
        c = (sq.sum(dim=(-2, -1)).sqrt() / math.sqrt(rows * cols)).clamp_min(cfg.eps)
        c = c[..., None]
        inc_l = sq.sum(dim=-1) / (cols * c) if has_l else None
        inc_r = sq.sum(dim=-2) / (rows * c) if has_r else None
        return inc_l, inc_r
    inc_l = inc_r = None
    if has_l:
        weighted = sq / floored_estimate(state["DR"], cfg)[..., None, :] if has_r else sq
        inc_l = weighted.sum(dim=-1) / cols
    if has_r:
        weighted = sq / floored_estimate(state["DL"], cfg)[..., :, None] if has_l else sq
        inc_r = weighted.sum(dim=-2) / rows
    return inc_l, inc_r


def ema_update(state: State, beta: float, increments: dict[str, torch.Tensor | None]) -> None:
    """state[key] <- beta state[key] + (1-beta) inc, for every key with an increment."""
    for key, inc in increments.items():
        if inc is not None:
            state[key].mul_(beta).add_(inc, alpha=1.0 - beta)


def update_factors(
    state: State,
    grad: torch.Tensor,
    cfg: SOAPConfig,
    count: int,
    rotated: torch.Tensor | None = None,
) -> None:
    """L <- b L + (1-b) inc_L and R likewise; b the factor beta of the ``count``-th update.

    Shampoo's increments are G G^T and G^T G (fused into the update), KL-Shampoo's those of
    :func:`kl_factor_increments`. Once the bases exist (``initialized``) the estimates DL, DR
    take the same EMA of diag(Q^T inc Q) (:func:`estimate_increments`), from ``rotated`` =
    rot(grad) in the current bases (rotated here when None); before, the first bases form
    them (:func:`init_bases`).
    """
    beta = cfg.factor_beta_at(count)
    first = count == 1
    track = bool(state["initialized"]) and ("DL" in state or "DR" in state)
    est_l = est_r = None
    if track:
        est_l, est_r = estimate_increments(
            state, rotate(grad, state) if rotated is None else rotated, cfg, first
        )
    if cfg.factor_estimator != "kl":  # fused: the rounding of the reference's update
        if "L" in state:
            state["L"].mul_(beta).addmm_(grad, grad.T, alpha=1.0 - beta)
        if "R" in state:
            state["R"].mul_(beta).addmm_(grad.T, grad, alpha=1.0 - beta)
    else:
        inc_l, inc_r = kl_factor_increments(state, grad, cfg, first=first)
        ema_update(state, beta, {"L": inc_l, "R": inc_r})
    ema_update(state, beta, {"DL": est_l, "DR": est_r})


def set_estimates(state: State, side: str | None = None) -> None:
    """Form DL = diag(QL^T L QL) (and DR) anew: after a basis changed (``side``: "L" or "R")."""
    for factor_key, basis_key, est_key, _ in SIDE_KEYS:
        if factor_key in state and side in (None, factor_key):
            state[est_key] = diag_in_basis(state[factor_key], state[basis_key])


def init_bases(state: State, counters: LinalgCounters) -> None:
    """First bases from a full eigendecomposition of the factors."""
    if "L" in state:
        state["QL"] = robust_eigh_basis(state["L"], state.get("QL"), counters)
    if "R" in state:
        state["QR"] = robust_eigh_basis(state["R"], state.get("QR"), counters)
    set_estimates(state)
    state["initialized"] = True


def refresh_bases(
    state: State, method: str, counters: LinalgCounters, tolerance: float = 0.0
) -> bool:
    """Refresh the bases; permute v with the basis, re-express m exactly in the new basis.

    ``tolerance`` > 0: a side whose basis is still aligned with its factor (off-diagonal share
    of Q^T F Q at most ``tolerance``, from the tracked estimate: ``linalg.off_diagonal_share``)
    keeps it. A refreshed side's estimate is formed anew. Returns whether any basis changed.
    """
    changed = False
    for factor_key, basis_key, est_key, dim in SIDE_KEYS:
        if factor_key not in state:
            continue
        old = state[basis_key]
        if estimate_aligned(state[factor_key], state[est_key], tolerance):
            counters.refreshes_skipped += 1
            continue
        counters.refreshes_done += 1
        if method == "qr":
            new, order = qr_refresh_basis(state[factor_key], old, counters)
            if order is not None:
                state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
        else:
            new = robust_eigh_basis(state[factor_key], old, counters)
        if new is old:
            continue
        state["exp_avg"] = reexpress_moment(state["exp_avg"], old, new, dim)
        state[basis_key] = new
        set_estimates(state, factor_key)
        changed = True
    return changed


def reexpress_moment(
    m: torch.Tensor, old: torch.Tensor, new: torch.Tensor, dim: int
) -> torch.Tensor:
    """The first moment in rotated coordinates of basis ``old`` re-expressed in ``new``.

    Side ``dim`` 0 (L): new^T old m; 1 (R): m old^T new ([..., r, c], batched or not). With k
    the other side's size and n this one's, (new^T old) m costs n^3 + n^2 k multiply-adds and
    new^T (old m) 2 n^2 k: the cheaper order is taken (the same values to rounding).
    """
    n, k = (m.shape[-2], m.shape[-1]) if dim == 0 else (m.shape[-1], m.shape[-2])
    if dim == 0:
        if k < n:
            return torch.matmul(new.transpose(-2, -1), torch.matmul(old, m))
        return torch.matmul(torch.matmul(new.transpose(-2, -1), old), m)
    if k < n:
        return torch.matmul(torch.matmul(m, old.transpose(-2, -1)), new)
    return torch.matmul(m, torch.matmul(old.transpose(-2, -1), new))


# A factor's eigen-direction whose estimate is at or below this many u x the largest is null
# (sign normalisation takes no step in it): see zero_null_directions_.
SIGNAL_FLOOR = 4.0


def zero_null_directions_(
    direction: torch.Tensor, est_left: torch.Tensor | None, est_right: torch.Tensor | None
) -> None:
    """Zero, in place, the rotated coordinates [..., r, c] that lie in a factor's null space.

    ``est_left`` [..., r] and ``est_right`` [..., c] are diag(Q^T F Q) (one block or a stack;
    None: that side is not rotated). An estimate at or below ``SIGNAL_FLOOR`` u x its side's
    largest (per block) marks a direction in which F, and so every gradient of its window,
    has no energy above rounding: the rotated first moment holds only rounding noise there.
    The floor is the estimates' own rounding (eigh's and the refresh's estimates err by
    about u x the largest; the tracked ones of a null direction are squares of rounding,
    u^2), not the refresh's null test (n eps 10 x the largest: 6e-4 at n = 512 in fp32),
    which would silence real directions: on the digits main job (by-modality, batch 128,
    seed 0) masking at the refresh's test gave 0.729, at 4 sqrt(n) u 0.497, at 4 u 0.455,
    and no mask 0.448. All zero (no statistics yet): no coordinate is masked. Each side
    multiplies by its 0/1 row or column, broadcast: no [..., r, c] mask is formed.
    """
    for est, dim in ((est_left, -1), (est_right, -2)):
        if est is None:
            continue
        top = est.abs().amax(dim=-1, keepdim=True)
        tol = top * (SIGNAL_FLOOR * torch.finfo(est.dtype).eps)
        kept = (est > tol) | (top == 0)
        direction.mul_(kept.to(direction.dtype).unsqueeze(dim))


def adam_moments_update(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    g_rot: torch.Tensor,
    s_rot: torch.Tensor,
    step: int,
    lr: float,
    cfg: SOAPConfig,
    estimates: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor, float]:
    """Adam's moment update in the eigenbasis (in place) and its normalised direction.

    The first moment takes ``g_rot``, the second ``s_rot`` (both rotated). Returns
    m / (sqrt(v) + eps) (with ``cfg.nesterov``, beta1 m + (1 - beta1) g_rot in place of m) in
    rotated coordinates and the step size: ``lr``, bias-corrected for
    ``step`` (the step count after this update) when ``cfg.correct_bias``. With
    ``cfg.normalization == "sign"`` the direction is sign(m) (the same m) and the step size
    ``lr``: a sign is the same for any positive rescaling of m, so bias correction is moot.
    Its zeros: coordinates in a factor's null space (:func:`zero_null_directions_` of
    ``estimates``, the tracked DL, DR), where sign() would turn m's rounding noise into full
    steps.
    With ``cfg.update_rms`` > 0 each block's direction is scaled to that RMS
    (:func:`scale_blocks_to_rms_`, Muon's update scale) and the step size is ``lr``.
    The elementwise chain is ``fused.adam_direction_`` (one compiled kernel with
    ``cfg.compile``).
    """
    beta1, beta2 = cfg.betas
    sign = cfg.normalization == "sign"
    direction = fused.adam_direction(
        cfg.compile, exp_avg, exp_avg_sq, g_rot, s_rot, beta1, beta2, cfg.eps, cfg.nesterov, sign
    )
    if sign:
        zero_null_directions_(direction, *estimates)
    if cfg.update_rms > 0.0:
        scale_blocks_to_rms_(direction, cfg.update_rms)
    if sign or cfg.update_rms > 0.0:  # scale-free directions: bias correction would cancel
        return direction, lr
    weight = 1.0 - beta1**step  # the first moment's weights sum to this
    if cfg.nesterov:  # beta1 m_t + (1 - beta1) g_t, whose weights sum to 1 - beta1^(t+1)
        weight = 1.0 - beta1 ** (step + 1)
    step_size = lr
    if cfg.correct_bias:
        step_size = lr * math.sqrt(1.0 - beta2**step) / weight
    return direction, step_size


def scale_blocks_to_rms_(direction: torch.Tensor, rms: float) -> None:
    """Scale each block of ``direction`` ([r, c], or [B, r, c] stacked) to RMS ``rms``, in place.

    The direction is in rotated coordinates; the bases are orthogonal, so a block's RMS is the
    same as its update's in the weights' coordinates. The norm is reduced per block in fp32 at
    least (one pass, no squared temporary); a zero block stays zero.
    """
    dtype = torch.promote_types(direction.dtype, torch.float32)
    norm = torch.linalg.vector_norm(direction, dim=(-2, -1), keepdim=True, dtype=dtype)
    count = direction.shape[-2] * direction.shape[-1]
    scale = (rms * math.sqrt(count)) / norm.clamp_min(torch.finfo(dtype).tiny)
    direction.mul_(scale.to(direction.dtype))


def soap_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    cfg: SOAPConfig,
    counters: LinalgCounters,
    lr: float,
    weight_decay: float,
    grad_rot: torch.Tensor | None = None,
    timings: dict[str, float] | None = None,
    stats_grad: torch.Tensor | None = None,
    stats_grad_rot: torch.Tensor | None = None,
    direction_scale: torch.Tensor | None = None,
) -> bool:
    """One SOAP step on a matrix view ``param`` with gradient ``grad`` (same 2-D shape).

    ``grad_rot`` may pass rot(grad) when the caller already has it (folding computes it);
    ``timings`` (optional) accumulates the refresh wall time under "refresh".
    ``stats_grad`` (and its rotation ``stats_grad_rot``, computed here when None): the
    gradient that feeds the second moment v and the factors L, R instead of ``grad``, which
    then feeds only the first moment m (folding's ``statistics_from="mean"``).
    ``direction_scale``: a 0-d tensor multiplying the preconditioned direction (FOP's eta*;
    decoupled weight decay is not scaled).
    The first step builds the bases (eigh) and, unless ``cfg.first_step_update``, changes no
    parameter; ``cfg.refresh_first`` updates the factors and refreshes before the moments.
    Returns False on a statistics-only first step, True when the parameter was updated.
    """
    ensure_estimates(state)
    stats = grad if stats_grad is None else stats_grad
    fresh_rotation = False  # the bases change before the moment update: rotate again
    factors_done = cfg.refresh_first  # this step's factor update comes before the moments
    if not state["initialized"]:
        factors_done = True
        update_factors(state, stats, cfg, 1)
        init_bases(state, counters)
        if not cfg.first_step_update:
            return False
        fresh_rotation = True
    elif cfg.refresh_first:
        # The rotations in the current bases feed the estimates' update and, where no basis
        # changes, the step itself.
        grad_rot = rotate(grad, state) if grad_rot is None else grad_rot
        if stats_grad is not None and stats_grad_rot is None:
            stats_grad_rot = rotate(stats_grad, state)
        stats_rot = grad_rot if stats_grad is None else stats_grad_rot
        update_factors(state, stats, cfg, cfg.factor_count(state["step"], True), stats_rot)
        if (state["step"] + 1) % cfg.precondition_frequency == 0:
            fresh_rotation = _timed_refresh(state, cfg, counters, timings)
    if fresh_rotation:
        grad_rot = stats_grad_rot = None
    g_rot = rotate(grad, state) if grad_rot is None else grad_rot
    if stats_grad is None:
        s_rot = g_rot
    else:
        s_rot = rotate(stats_grad, state) if stats_grad_rot is None else stats_grad_rot
    count = cfg.factor_count(state["step"], True)
    state["step"] += 1
    t = state["step"]
    estimates = (state.get("DL"), state.get("DR")) if state["initialized"] else (None, None)
    normalized, step_size = adam_moments_update(
        state["exp_avg"], state["exp_avg_sq"], g_rot, s_rot, t, lr, cfg, estimates
    )
    direction = unrotate(normalized, state)
    if direction_scale is not None:
        direction.mul_(direction_scale.to(direction.dtype))
    target = state.get("master", param)  # fp32 main weights for low-precision params
    target.add_(direction.to(target.dtype), alpha=-step_size)
    if weight_decay > 0.0:
        target.add_(target, alpha=-lr * weight_decay)
    if target is not param:
        param.copy_(target)
    if not factors_done:
        update_factors(state, stats, cfg, count, s_rot)
        if t % cfg.precondition_frequency == 0:
            _timed_refresh(state, cfg, counters, timings)
    return True


def _timed_refresh(
    state: State, cfg: SOAPConfig, counters: LinalgCounters, timings: dict[str, float] | None
) -> bool:
    start = time.perf_counter()
    changed = refresh_bases(state, cfg.refresh_method, counters, cfg.refresh_tolerance)
    if timings is not None:
        timings["refresh"] = timings.get("refresh", 0.0) + time.perf_counter() - start
    return changed
