"""Batched block engine: SOAP blocks of equal shape stacked into shape classes.

Blocks whose state has the same matrix shape, rotated sides, dtype, device, main-weight flag,
step count and config form a *shape class*. Each state field of a class lives in one stacked
tensor [B, ...]; every block's state dict holds views of those stacks (``stack[j]``), so
per-block state stays addressable (checkpoints, tests) while the math runs as one batched op
per class: rotations are ``matmul`` on [B, r, c], the factor update is ``baddbmm``, moments and
the fold are elementwise on the stacks, the FOP inner products are per-block reductions of the
stacks, and the refresh is one batched ``eigh`` or QR per class and side.

Only the parameters themselves are not stacked (a block is a region of a parameter): their
update is one ``torch._foreach_*`` call per class.

Host syncs: none in the fold; the basis computation (first step and refresh) reads one flag
tensor per step for all classes together (finiteness and numerical rank of every new basis),
and with ``refresh_tolerance`` one more before the refresh (which blocks' bases drifted).
The drift gate and KL-Shampoo read the tracked estimates DL, DR (``core/soap.py``), updated
from the rotated gradient the step uses anyway: no product with a factor on a step that
refreshes nothing.
Blocks whose batched decomposition failed or was non-finite are redone one at a time by the
per-block routines of ``core/linalg.py`` (fp64 retry, keep the previous basis, counted), so the
fallback behaves exactly as in the per-block engine.

Numerics versus the per-block engine (``core/soap.py``): elementwise ops (moments, the fold
itself, the update) are the same ops on the same values; batched matmul / baddbmm / eigh / QR
may round differently from their unbatched forms (different blocking inside the BLAS/LAPACK
kernels, on GPU a different eigh algorithm for small matrices), and in float32 the FOP inner
products are reduced in a different order than ``torch.dot``. Results agree to rounding, not
bitwise (on CPU, one window from the same state: ~1e-15 in float64, ~1e-5 in float32; see
tests/test_batched_engine.py). Whether a block's result depends on which blocks share its
class is up to the BLAS: batched matmul is batch-invariant on CPU for some shapes and not
others (measured with MKL, one thread: [B, 32, 32] products are, float64 [B, 33, 33] and
[B, 5, 48] @ [B, 48, 5] are not; matrix-vector shapes such as [B, 31, 32] @ [B, 32, 1] are
not). So an owner-sharded run (classes of the blocks one rank owns) equals a replicated one
(classes of all blocks) to rounding in general and bitwise for the shapes the tests use
(tests/test_batched_engine.py::test_block_result_does_not_depend_on_its_class_mates).
Matrix-vector shapes (a rotated single-column block; a canonical null basis with one kept
column) are never batched: such a block is a class of its own or is computed alone; a single
null column is canonicalised elementwise.

Whoever changes a block's state tensors from outside (loading a checkpoint) must rebuild the
engine; :meth:`BatchedBlocks.matches` tells whether the states still hold the engine's views.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from mlfop_megatron.config import SOAPConfig
from mlfop_megatron.core import fused
from mlfop_megatron.core.linalg import (
    LinalgCounters,
    canonical_null_columns,
    diag_in_basis,
    off_diagonal_share,
    orthonormal_factor,
    power_step_matrix,
    qr_refresh_basis,
    robust_eigh_basis,
)
from mlfop_megatron.core.refresh_budget import (
    BalanceFn,
    balanced_refreshes,
    budget_cap,
    demand,
    is_drifted,
    side_cost,
)
from mlfop_megatron.core.soap import (
    State,
    adam_moments_update,
    ema_update,
    ensure_estimates,
    estimate_increments,
    floored_estimate,
    reexpress_moment,
)

FIELDS = ("exp_avg", "exp_avg_sq", "L", "R", "QL", "QR", "DL", "DR", "master")
SIDES = (("L", "QL", 0), ("R", "QR", 1))
ESTIMATE = {"L": "DL", "R": "DR"}  # a factor's tracked diag(Q^T F Q)


def _bt(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _on(values: list, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device`` (one host-to-device copy, async on CUDA)."""
    host = torch.as_tensor(values)
    if device.type == "cuda":  # pinned: the copy does not wait for the device's queue
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def all_finite(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every element of ``stacks`` is finite (0-d bool tensor, no host sync).

    One ``aminmax`` pass per stack: NaN propagates into both extremes and an infinity shows in
    one of them, so this equals ``isfinite(x).all()`` (which costs about five passes plus two
    temporaries per stack: measured 30-60x slower on CPU).
    """
    ends = [end for x in stacks if x.numel() for end in torch.aminmax(x)]
    if not ends:
        device = stacks[0].device if stacks else None
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack(ends)).all()


def finite_blocks(x: torch.Tensor) -> torch.Tensor:
    """Per block of a [B, r, c] stack, whether all its elements are finite ([B] bool)."""
    dims = (-2, -1)
    return torch.isfinite(x.amax(dim=dims)) & torch.isfinite(x.amin(dim=dims))


@dataclass
class ShapeClass:
    """Blocks of one shape (and dtype, device, step, config): stacked state, block views."""

    positions: list[int]  # the blocks' indices in the engine's block order
    index: torch.Tensor  # the same, as a long tensor on the class device
    states: list[State]
    params: list[torch.Tensor]  # each block's matrix region of its parameter (views)
    cfg: SOAPConfig
    tensors: dict[str, torch.Tensor]  # stacked state fields [B, ...]
    views: dict[str, list[torch.Tensor]]  # views[f][j] is states[j][f]
    step: int
    initialized: bool

    @property
    def size(self) -> int:
        """Number of blocks in the class."""
        return len(self.positions)

    @property
    def dtype(self) -> torch.dtype:
        """State dtype of the class."""
        return self.tensors["exp_avg"].dtype

    @property
    def device(self) -> torch.device:
        """Device of the class's state."""
        return self.tensors["exp_avg"].device

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """QL^T X QR per block of a [B, r, c] stack (identity on a side without a basis)."""
        if "QL" in self.tensors:
            x = torch.matmul(_bt(self.tensors["QL"]), x)
        if "QR" in self.tensors:
            x = torch.matmul(x, self.tensors["QR"])
        return x

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """QL X QR^T per block."""
        if "QL" in self.tensors:
            x = torch.matmul(self.tensors["QL"], x)
        if "QR" in self.tensors:
            x = torch.matmul(x, _bt(self.tensors["QR"]))
        return x

    def metric_source(self) -> tuple[torch.Tensor | None, float, float]:
        """(v, bias, eps): the metric is sqrt(v / bias) + eps (``fused.metric``); v None: I."""
        if not self.initialized or self.step == 0:
            return None, 1.0, self.cfg.eps
        return self.tensors["exp_avg_sq"], 1.0 - self.cfg.betas[1] ** self.step, self.cfg.eps

    def metric_diag(self) -> torch.Tensor | None:
        """sqrt(v_hat) + eps of every block [B, r, c]; None while the metric is I."""
        return fused.metric(*self.metric_source())

    def stack(self, per_block: Sequence[torch.Tensor]) -> torch.Tensor:
        """A [B, r, c] stack (a new tensor, class dtype) of this class's entries of a list.

        Entries of another dtype (bf16 gradients of fp32 state) are converted once per class.
        """
        x = torch.stack([per_block[i] for i in self.positions])
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def add_into(self, acc: torch.Tensor, per_block: Sequence[torch.Tensor]) -> None:
        """acc[j] += this class's entry j of a per-block list (one ``_foreach_add_``).

        Elementwise the same sums as ``acc += stack(per_block)``, without the stacked copy.
        """
        torch._foreach_add_(list(acc.unbind(0)), [per_block[i] for i in self.positions])

    def _kl_increments(
        self, grad: torch.Tensor, first: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``soap.kl_factor_increments`` for every block ([B, r, r], [B, c, c] or None)."""
        st = self.tensors
        rows, cols = grad.shape[-2:]
        inc_l = inc_r = None
        if first:  # no estimate yet: both factors count as rms(G) I
            c = grad.flatten(1).norm(dim=1).div_(math.sqrt(rows * cols)).clamp_min_(self.cfg.eps)
            if "L" in st:
                inc_l = torch.matmul(grad, _bt(grad)).div_(c[:, None, None] * cols)
            if "R" in st:
                inc_r = torch.matmul(_bt(grad), grad).div_(c[:, None, None] * rows)
            return inc_l, inc_r
        # From the factors and bases before either side changes.
        if "L" in st:
            if "R" in st:
                p = torch.matmul(grad, st["QR"])
                inc_l = torch.matmul(p / floored_estimate(st["DR"], self.cfg)[:, None, :], _bt(p))
            else:
                inc_l = torch.matmul(grad, _bt(grad))
            inc_l.div_(cols)
        if "R" in st:
            if "L" in st:
                p = torch.matmul(_bt(st["QL"]), grad)
                inc_r = torch.matmul(_bt(p / floored_estimate(st["DL"], self.cfg)[:, :, None]), p)
            else:
                inc_r = torch.matmul(_bt(grad), grad)
            inc_r.div_(rows)
        return inc_l, inc_r

    def update_factors(
        self, grad: torch.Tensor, count: int, rotated: torch.Tensor | None = None
    ) -> None:
        """``soap.update_factors`` for every block: the ``count``-th update of L and R.

        Once the bases exist, the estimates DL, DR follow from ``rotated`` (the stack rotated
        in the current bases; rotated here when None).
        """
        st = self.tensors
        beta = self.cfg.factor_beta_at(count)
        first = count == 1
        est_l = est_r = None
        if self.initialized and ("DL" in st or "DR" in st):
            est_l, est_r = estimate_increments(
                st, self.rotate(grad) if rotated is None else rotated, self.cfg, first
            )
        if self.cfg.factor_estimator != "kl":  # fused, as the per-block engine
            if "L" in st:
                st["L"].mul_(beta).baddbmm_(grad, _bt(grad), alpha=1.0 - beta)
            if "R" in st:
                st["R"].mul_(beta).baddbmm_(_bt(grad), grad, alpha=1.0 - beta)
        else:
            inc_l, inc_r = self._kl_increments(grad, first=first)
            ema_update(st, beta, {"L": inc_l, "R": inc_r})
        ema_update(st, beta, {"DL": est_l, "DR": est_r})

    def write_scalars(self) -> None:
        """Mirror the class's step and initialized flag into every block's state dict."""
        for s in self.states:
            s["step"] = self.step
            s["initialized"] = self.initialized


def _class_key(state: State, cfg: SOAPConfig, extra: Hashable, position: int) -> tuple:
    """Blocks with equal keys share a class; a rotated single-column block is its own class.

    A rotated [n, 1] block's rotation ``QL^T x`` is a matrix-vector product, which batched
    matmul does not compute batch-invariantly (see :func:`_canonicalize`): such a block is
    never stacked with others, so its result does not depend on the other blocks.
    """
    ea = state["exp_avg"]
    solo = position if ea.shape[-1] == 1 and "QL" in state else None
    present = tuple(f in state for f in FIELDS)
    master_dtype = state["master"].dtype if "master" in state else None
    return (
        tuple(ea.shape),
        ea.dtype,
        str(ea.device),
        present,
        master_dtype,
        int(state["step"]),
        bool(state["initialized"]),
        cfg,
        extra,
        solo,
    )


# ----------------------------------------------------------------------------- bases
@dataclass
class _SideJob:
    """A batched basis computation of one side of one class, waiting for the host flags."""

    tensors: dict[str, torch.Tensor]  # a wave chunk's views of the class's stacks, or copies
    factor_key: str
    basis_key: str
    dim: int
    method: str  # "eigh" or "qr"
    new: torch.Tensor | None  # [B, n, n]; None when the batched call raised
    order: torch.Tensor | None  # qr: [B, n] column order
    flags: torch.Tensor | None  # [2, B]: ok (0/1) and numerical rank
    rank_cols: int = 0


def _null_tol(values: torch.Tensor) -> torch.Tensor:
    """``linalg.null_tolerance`` per row of a [B, n] tensor ([B, 1])."""
    eps = torch.finfo(values.dtype).eps
    return values.abs().amax(dim=-1, keepdim=True) * (values.shape[-1] * eps * 10.0)


def _start_eigh(st: dict[str, torch.Tensor], factor_key: str, basis_key: str, dim: int) -> _SideJob:
    factors = st[factor_key]
    n = factors.shape[-1]
    finite_in = finite_blocks(factors)
    eye = torch.eye(n, dtype=factors.dtype, device=factors.device)
    safe = torch.where(finite_in[:, None, None], factors, eye)
    try:
        values, vecs = torch.linalg.eigh(safe)
    except (RuntimeError, torch.linalg.LinAlgError):
        return _SideJob(st, factor_key, basis_key, dim, "eigh", None, None, None)
    values, vecs = torch.flip(values, dims=[-1]), torch.flip(vecs, dims=[-1])
    rank = (values > _null_tol(values)).sum(dim=-1)
    ok = finite_in & finite_blocks(vecs)
    flags = torch.stack([ok.to(rank.dtype), rank])
    return _SideJob(st, factor_key, basis_key, dim, "eigh", vecs, None, flags)


def _start_qr(st: dict[str, torch.Tensor], factor_key: str, basis_key: str, dim: int) -> _SideJob:
    """``linalg.qr_refresh_basis`` batched over a class side's stacks.

    Each intermediate is dropped as soon as the next one exists, so a block holds at most three
    n x n temporaries at once here (``F Q`` sorted, Q sorted, the QR's input; then its
    reflectors and the new basis): what :func:`refresh_waves` budgets for.
    """
    factors, basis = st[factor_key], st[basis_key]
    try:
        fq = torch.matmul(factors, basis)
        est = (basis * fq).sum(dim=-2)  # diag(Q^T F Q) per block [B, n]
        est = torch.where(est > _null_tol(est), est, torch.zeros_like(est))
        order = torch.argsort(est, dim=-1, descending=True, stable=True)
        index = order[:, None, :].expand_as(fq)
        sorted_est = torch.gather(est, 1, order)
        sorted_fq = torch.gather(fq, 2, index)
        del fq
        x = power_step_matrix(sorted_fq, torch.gather(basis, 2, index), sorted_est)
        del sorted_fq
        new = orthonormal_factor(x)
        del x
    except (RuntimeError, torch.linalg.LinAlgError):
        return _SideJob(st, factor_key, basis_key, dim, "qr", None, None, None)
    rank = (est > 0).sum(dim=-1)
    ok = finite_blocks(new) & finite_blocks(factors)
    flags = torch.stack([ok.to(rank.dtype), rank])
    return _SideJob(st, factor_key, basis_key, dim, "qr", new, order, flags)


def _canonicalize(new: torch.Tensor, ranks: list[int], usable: list[bool]) -> None:
    """``canonical_null_basis`` in place: batched over the blocks with the same null dimension.

    One :func:`linalg.canonical_null_columns` call per distinct null dimension k in the class
    (the usual refresh has few), not per block. Batched, a block's columns equal its columns
    computed alone to rounding (bitwise where the BLAS is batch-invariant for the shape: see
    the module docstring; always with one null column, computed elementwise); where one kept
    column is left (matrix-vector products) the block is computed alone.
    """
    n = new.shape[-1]
    groups: dict[int, list[int]] = {}
    for j, (r, good) in enumerate(zip(ranks, usable)):
        if good and r < n:
            groups.setdefault(n - r, []).append(j)
    for null, members in groups.items():
        if null > 1 and n - null == 1:  # vector-shaped products: one block at a time
            for j in members:
                new[j, :, n - null :] = canonical_null_columns(new[j : j + 1], null)[0]
            continue
        if len(members) == new.shape[0]:
            new[..., n - null :] = canonical_null_columns(new, null)
            continue
        index = _on(members, new.device)
        sub = new.index_select(0, index)
        sub[..., n - null :] = canonical_null_columns(sub, null)
        new.index_copy_(0, index, sub)


def _finish(job: _SideJob, host: list[list[int]] | None, counters: LinalgCounters) -> None:
    """Apply a side's new bases: fix-ups per failed block, then rotate m, permute v."""
    st = job.tensors
    old = st[job.basis_key]
    b, n = old.shape[0], old.shape[-1]
    if job.new is None:  # the batched call raised: the per-block routines redo every block
        ok, ranks = [False] * b, [n] * b
        new = old.clone()
        order = None if job.method == "eigh" else torch.arange(n, device=old.device).repeat(b, 1)
    else:
        assert host is not None  # compute_bases passes the flags of every computed job
        ok, ranks = [bool(x) for x in host[0]], host[1]
        new, order = job.new, job.order
    if job.method == "eigh":  # the QR refresh keeps the old null directions (power_step_matrix)
        _canonicalize(new, ranks, ok)
    kept_old = [False] * b  # blocks whose basis does not change (m, v stay as they are)
    for j in range(b):
        if ok[j]:
            continue
        factor, prev = st[job.factor_key][j], old[j]
        if job.method == "eigh":
            basis = robust_eigh_basis(factor, prev, counters)
            fixed = None
        else:
            basis, fixed = qr_refresh_basis(factor, prev, counters)
        kept_old[j] = basis is prev
        new[j] = basis
        if order is not None:
            if fixed is None:
                order[j] = torch.arange(n, device=order.device)
            else:
                order[j] = fixed
    v = st["exp_avg_sq"]
    if order is not None:
        if job.dim == 0:
            v.copy_(torch.gather(v, 1, order[:, :, None].expand_as(v)))
        else:
            v.copy_(torch.gather(v, 2, order[:, None, :].expand_as(v)))
    m = st["exp_avg"]
    moved = reexpress_moment(m, old, new, job.dim)
    if any(kept_old):  # exactly the old moment where the previous basis was kept
        mask = _on(kept_old, m.device)[:, None, None]
        moved = torch.where(mask, m, moved)
    m.copy_(moved)
    old.copy_(new)
    _set_estimate(st, job.factor_key)


def _set_estimate(st: dict[str, torch.Tensor], factor_key: str) -> None:
    """Form the tracked estimate of a side anew after its bases changed (``soap.set_estimates``)."""
    est_key = ESTIMATE[factor_key]
    if est_key in st:
        st[est_key].copy_(diag_in_basis(st[factor_key], st["Q" + factor_key]))


@dataclass
class _Piece:
    """Blocks of one class side that one refresh recomputes: the whole side, or the gate's."""

    parent: dict[str, torch.Tensor]  # the class's stacks
    factor_key: str
    basis_key: str
    dim: int
    members: list[int]  # the blocks' positions in the class, ascending

    def block_bytes(self) -> int:
        """What one block of this side holds at a refresh's peak (see :func:`refresh_waves`)."""
        basis = self.parent[self.basis_key]
        moment = self.parent["exp_avg"]
        size = basis[0].numel() * basis.element_size()
        if self.contiguous(self.members):
            return 3 * size
        # gathered copies of the factor and basis, and of both moments at the finish
        return 5 * size + 2 * moment[0].numel() * moment.element_size()

    @staticmethod
    def contiguous(members: list[int]) -> bool:
        """Whether ``members`` is a run of consecutive positions (stack views, no copies)."""
        return members == list(range(members[0], members[0] + len(members)))


@dataclass
class _Chunk:
    """The blocks of a :class:`_Piece` refreshed in one wave: views of the stacks or copies."""

    piece: _Piece
    members: list[int]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None  # positions of copied blocks (None: views)

    def open(self) -> dict[str, torch.Tensor]:
        """The chunk's factor, basis and estimate (views of a run, else copies), made now."""
        p = self.piece
        keys = [k for k in (p.factor_key, p.basis_key, ESTIMATE[p.factor_key]) if k in p.parent]
        if _Piece.contiguous(self.members):
            lo, hi = self.members[0], self.members[-1] + 1
            keys += ["exp_avg", "exp_avg_sq"]  # views: the finish reads them as they are then
            self.tensors = {k: p.parent[k][lo:hi] for k in keys}
        else:
            self.index = _on(self.members, p.parent[p.factor_key].device)
            self.tensors = {k: p.parent[k].index_select(0, self.index) for k in keys}
        return self.tensors

    def load_moments(self) -> None:
        """Copies: take the blocks' moments as they are now (after the other side finished)."""
        if self.index is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                self.tensors[key] = self.piece.parent[key].index_select(0, self.index)

    def close(self) -> None:
        """Copies: put the new bases, estimates and moments into the stacks; drop the chunk's."""
        if self.index is not None:
            fk = self.piece.factor_key
            for key in ("Q" + fk, ESTIMATE[fk], "exp_avg", "exp_avg_sq"):
                if key in self.tensors:
                    self.piece.parent[key].index_copy_(0, self.index, self.tensors[key])
        self.tensors = {}


def refresh_waves(pieces: Sequence[_Piece], wave_bytes: float) -> list[list[_Chunk]]:
    """Split the refresh of ``pieces`` into waves whose temporaries fit ``wave_bytes``.

    A wave's sides are started together and finished after one host read; their new bases
    live until the finish. A block is counted at three of its side's n x n stacks (its new
    basis, and the two more temporaries the QR start holds beside it), five plus its two moments
    where the gate took part of a class (its gathered copies). Blocks are taken in order (a
    class's L side before its R side, as the moments must be re-expressed), at least one per
    wave. ``wave_bytes`` inf or a bound above everything: one wave, the one host read of an
    unbounded refresh.
    """
    waves: list[list[_Chunk]] = []
    wave: list[_Chunk] = []
    used = 0.0
    for piece in pieces:
        cost = piece.block_bytes()
        members = list(piece.members)
        while members:
            room = wave_bytes - used
            take = int(room // cost) if room < cost * len(members) else len(members)
            if take < 1:
                if wave:
                    waves.append(wave)
                    wave, used = [], 0.0
                    continue
                take = 1  # a block larger than the bound goes alone
            wave.append(_Chunk(piece, members[:take]))
            used += take * cost
            members = members[take:]
    if wave:
        waves.append(wave)
    return waves


def _drifted(
    sides: list[tuple[ShapeClass, str, str, int]],
    counters: LinalgCounters,
    balance: BalanceFn | None = None,
) -> list[_Piece]:
    """The sides (or the blocks of them) whose bases drifted past ``refresh_tolerance``.

    Sides of classes with tolerance 0 are kept whole. For the others, the off-diagonal share
    per block comes from the tracked estimate (no product with the factor) and is read for
    all of them in one host read; aligned blocks keep their bases, a side with some drifted
    blocks becomes a :class:`_Piece` of those blocks.
    ``balance`` (owner-sharded engines, ``SOAPConfig.refresh_balance``): the gated blocks
    refreshed are chosen by :func:`refresh_budget.balanced_refreshes` against the target the
    ranks agree on (a collective, called exactly once per call, also with nothing gated).
    ``SOAPConfig.refresh_budget`` below 1 caps the refreshed cost at that fraction of the gated
    sides' (``refresh_budget.budget_cap``): the most drifted first, the rest deferred.
    Returns the pieces to refresh: the ungated sides, then the gated ones, each in the order
    of ``sides`` (a class's L before its R, as the moments are re-expressed).
    """
    gated, shares = [], []
    out: list[_Piece] = []
    for cls, fk, bk, dim in sides:
        tol = cls.cfg.refresh_tolerance
        if tol <= 0.0:
            out.append(_Piece(cls.tensors, fk, bk, dim, list(range(cls.size))))
            continue
        factors, est = cls.tensors[fk], cls.tensors[ESTIMATE[fk]]
        gated.append((cls, fk, bk, dim))
        shares.append(off_diagonal_share(factors, est))
    if not gated:
        if balance is not None:
            balance(0.0, 0.0)
        return out
    share_list = torch.cat(shares).tolist()  # the gate's host read
    tolerances, costs, budgets = [], [], []
    for cls, fk, _, dim in gated:
        shape = cls.tensors["exp_avg"].shape
        n, k = (shape[-2], shape[-1]) if dim == 0 else (shape[-1], shape[-2])
        # the tolerance as the shares' dtype holds it: the comparison the per-block gate makes
        # on tensors (``linalg.estimate_aligned``), made here on the host
        tol = torch.tensor(cls.cfg.refresh_tolerance, dtype=cls.tensors[fk].dtype).item()
        tolerances += [tol] * cls.size
        costs += [side_cost(n, k)] * cls.size
        budgets += [cls.cfg.refresh_budget] * cls.size
    capped = any(b < 1.0 for b in budgets)
    cap = budget_cap(costs, budgets) if capped else math.inf
    if balance is None:
        if capped:
            take = balanced_refreshes(share_list, tolerances, costs, cap, fill=False)
        else:
            take = [is_drifted(s, t) for s, t in zip(share_list, tolerances)]
    else:
        wanted, largest = demand(share_list, tolerances, costs)
        target = min(balance(min(wanted, cap), largest), cap)
        take = balanced_refreshes(share_list, tolerances, costs, target)
    offset = 0
    for cls, fk, bk, dim in gated:
        b = cls.size
        members = [j for j in range(b) if take[offset + j]]
        offset += b
        counters.refreshes_skipped += b - len(members)
        if members:
            out.append(_Piece(cls.tensors, fk, bk, dim, members))
    return out


def compute_bases(
    classes: Sequence[ShapeClass],
    method: str,
    counters: LinalgCounters,
    first: bool,
    balance: BalanceFn | None = None,
    wave_bytes: float = math.inf,
) -> set[int]:
    """New bases of every side of ``classes``, with one host read per wave.

    ``first``: eigh of the factors; otherwise the refresh ``method``, gated per block by
    ``refresh_tolerance`` where it is set (then one more host read, before the refresh), and
    balanced over the ranks with ``balance`` (see :func:`_drifted`). ``wave_bytes``: the most
    a wave's new bases and temporaries may take (:func:`refresh_waves`; inf: one wave).
    Returns the ids of the stacks (``ShapeClass.tensors``) of the classes whose bases were
    recomputed (in part or whole): the others' rotations still hold.
    """
    sides = [(c, fk, bk, dim) for c in classes for fk, bk, dim in SIDES if fk in c.tensors]
    if first:
        pieces = [_Piece(c.tensors, fk, bk, dim, list(range(c.size))) for c, fk, bk, dim in sides]
    else:
        pieces = _drifted(sides, counters, balance)
    changed: set[int] = set()
    for wave in refresh_waves(pieces, wave_bytes):
        jobs = []
        for chunk in wave:
            p = chunk.piece
            st = chunk.open()
            if not first:
                counters.refreshes_done += len(chunk.members)
            if first or method == "eigh":
                jobs.append(_start_eigh(st, p.factor_key, p.basis_key, p.dim))
            else:
                jobs.append(_start_qr(st, p.factor_key, p.basis_key, p.dim))
        flags = [j.flags for j in jobs if j.flags is not None]
        host = torch.cat(flags, dim=1).tolist() if flags else [[], []]  # the wave's host read
        offset = 0
        for chunk, job in zip(wave, jobs):
            changed.add(id(chunk.piece.parent))
            # Copies re-express the moments as the class's other side left them (L, then R).
            chunk.load_moments()  # into chunk.tensors, the job's dict
            if job.flags is None:
                _finish(job, None, counters)
            else:
                width = job.flags.shape[1]
                host_part = [host[0][offset : offset + width], host[1][offset : offset + width]]
                offset += width
                if first:  # the first bases replace the identity: no moment to re-express
                    _finish_first(job, host_part, counters)
                else:
                    _finish(job, host_part, counters)
            chunk.close()
            job.new = job.order = job.flags = None  # the new basis is in the stacks now
    return changed


def _finish_first(job: _SideJob, host: list[list[int]], counters: LinalgCounters) -> None:
    """First bases (``soap.init_bases``): the eigenbasis, per-block fallback where it failed."""
    st = job.tensors
    ok, ranks = [bool(x) for x in host[0]], host[1]
    new = job.new
    assert new is not None  # only jobs whose batched call succeeded have flags
    _canonicalize(new, ranks, ok)
    for j in range(new.shape[0]):
        if not ok[j]:
            new[j] = robust_eigh_basis(st[job.factor_key][j], st[job.basis_key][j], counters)
    st[job.basis_key].copy_(new)
    _set_estimate(st, job.factor_key)


def refresh_wave_bytes(classes: Sequence[ShapeClass]) -> float:
    """The bound on a refresh wave (:func:`refresh_waves`) of an engine's classes.

    ``SOAPConfig.refresh_wave`` times the largest class's gradient stack (bytes of its first
    moment, [B, r, c]); the smallest positive setting among the classes counts; 0 everywhere:
    inf (one wave).
    """
    settings = [c.cfg.refresh_wave for c in classes if c.cfg.refresh_wave > 0]
    if not settings:
        return math.inf
    stacks = [c.tensors["exp_avg"] for c in classes]
    largest = max(x.numel() * x.element_size() for x in stacks)
    return min(settings) * largest


# ----------------------------------------------------------------------------- engine
class BatchedBlocks:
    """The shape classes of a list of block states (see the module docstring).

    ``states[i]``: block i's SOAP state (its tensors are replaced by views of the stacks);
    ``params[i]``: block i's matrix region of its parameter; ``cfgs[i]``: its SOAP config;
    ``extras[i]``: anything else that must separate classes (e.g. a param group index).
    """

    def __init__(
        self,
        states: Sequence[State],
        params: Sequence[torch.Tensor],
        cfgs: Sequence[SOAPConfig],
        extras: Sequence[Hashable] | None = None,
    ) -> None:
        if not (len(states) == len(params) == len(cfgs)):
            raise ValueError("BatchedBlocks needs one param and one config per block state")
        extras = [None] * len(states) if extras is None else list(extras)
        self.states = list(states)
        groups: dict[tuple, list[int]] = {}
        for s in states:  # a loaded state may lack the derived estimates
            ensure_estimates(s)
        for i, (s, cfg, extra) in enumerate(zip(states, cfgs, extras)):
            groups.setdefault(_class_key(s, cfg, extra, i), []).append(i)
        self.classes: list[ShapeClass] = []
        for positions in groups.values():
            members = [states[i] for i in positions]
            first = members[0]
            tensors, views = {}, {}
            for f in FIELDS:
                if f in first:
                    tensors[f] = torch.stack([s[f] for s in members])
                    views[f] = list(tensors[f].unbind(0))
                    for s, v in zip(members, views[f]):
                        s[f] = v
            device = first["exp_avg"].device
            self.classes.append(
                ShapeClass(
                    positions=positions,
                    index=_on(positions, device),
                    states=members,
                    params=[params[i] for i in positions],
                    cfg=cfgs[positions[0]],
                    tensors=tensors,
                    views=views,
                    step=int(first["step"]),
                    initialized=bool(first["initialized"]),
                )
            )
        self.num_blocks = len(self.states)
        order = [i for c in self.classes for i in c.positions]
        self._identity_order = order == list(range(self.num_blocks))
        if self.classes and not self._identity_order:
            device = self.classes[0].device
            inverse = [0] * self.num_blocks
            for k, i in enumerate(order):
                inverse[i] = k
            self._inverse = _on(inverse, device)
        self.wave_bytes = refresh_wave_bytes(self.classes)

    def matches(self, states: Sequence[State]) -> bool:
        """True while ``states`` are this engine's blocks and still hold its views."""
        if len(states) != self.num_blocks:
            return False
        for cls in self.classes:
            for j, i in enumerate(cls.positions):
                s = states[i]
                if s is not cls.states[j] or s["step"] != cls.step:
                    return False
                for f, vs in cls.views.items():
                    if s.get(f) is not vs[j]:
                        return False
        return True

    def to_block_order(self, per_class: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-class rows [B_c, ...] into block order [n, ...]."""
        rows = torch.cat(list(per_class))
        return rows if self._identity_order else rows.index_select(0, self._inverse)

    def stack(self, per_block: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-class [B, r, c] stacks (new tensors, class dtypes) of a per-block list."""
        return [c.stack(per_block) for c in self.classes]

    def add_into(self, stacks: Sequence[torch.Tensor], per_block: Sequence[torch.Tensor]) -> None:
        """Add a per-block list into per-class stacks in place (one op per class)."""
        for cls, acc in zip(self.classes, stacks):
            cls.add_into(acc, per_block)

    def unstack(self, per_class: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per-block views of per-class stacks (None stays None)."""
        out: list[torch.Tensor | None] = [None] * self.num_blocks
        for cls, x in zip(self.classes, per_class):
            if x is None:
                continue
            for i, v in zip(cls.positions, x.unbind(0)):
                out[i] = v
        return out

    def metric_diags(self) -> list[torch.Tensor | None]:
        """Per-class metric diagonals (None: M = I)."""
        return [c.metric_diag() for c in self.classes]

    def step(
        self,
        window: ClassWindow,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        counters: LinalgCounters,
        timings: dict[str, float] | None = None,
        params: Sequence[torch.Tensor] | None = None,
        balance: BalanceFn | None = None,
    ) -> None:
        """One SOAP step of every block (``soap.soap_step`` batched per class).

        ``lrs`` / ``weight_decays``: per block (uniform within a class by construction of the
        caller's ``extras``). The basis computations of all classes share one host read.
        ``params``: each block's matrix region as of now, for callers whose parameter storage
        is swapped between steps (FP8 shadows get new storage every step); the views given at
        construction are replaced by these before anything is written. ``balance``: the
        refresh-first drift gate's balancing over the owner ranks (``refresh_budget``), a
        collective called once on every step where some class checks its bases before the
        update; the caller guarantees that all ranks reach it on the same steps.
        """
        if params is not None:
            if len(params) != self.num_blocks:
                raise ValueError(
                    f"BatchedBlocks.step got {len(params)} param views for {self.num_blocks} blocks"
                )
            for cls in self.classes:
                cls.params = [params[i] for i in cls.positions]
        # Phase 1: what comes before the moment update (the first step's factors and bases;
        # with refresh_first, every step's factors and refresh). The statistics gradient's
        # rotation in the current bases feeds the estimates and, where no basis changes, the
        # step.
        first, early = [], []
        rotated: dict[int, torch.Tensor] = {}
        for k, cls in enumerate(self.classes):
            if not cls.initialized:
                cls.update_factors(_stats_grad(window, k), 1)
                first.append(cls)
            elif cls.cfg.refresh_first:
                rotated[k] = _stats_rotation(cls, window, k)
                count = cls.cfg.factor_count(cls.step, True)
                cls.update_factors(_stats_grad(window, k), count, rotated[k])
                if (cls.step + 1) % cls.cfg.precondition_frequency == 0:
                    early.append(cls)
        if first:
            compute_bases(first, "eigh", counters, first=True, wave_bytes=self.wave_bytes)
            for cls in first:
                cls.initialized = True
        changed = self._refresh(early, counters, timings, balance, self.wave_bytes)
        # Phase 2: the moment and parameter updates, then the reference-order refreshes.
        late = []
        first_ids = {id(c) for c in first}
        for k, cls in enumerate(self.classes):
            lr, wd = lrs[cls.positions[0]], weight_decays[cls.positions[0]]
            is_first = id(cls) in first_ids
            if is_first and not cls.cfg.first_step_update:
                continue  # the statistics-only first step
            fresh = is_first or id(cls.tensors) in changed
            factors_done = is_first or cls.cfg.refresh_first
            _class_step(
                cls, window, k, lr, wd, fresh, factors_done, None if fresh else rotated.get(k)
            )
            if not factors_done and cls.step % cls.cfg.precondition_frequency == 0:
                late.append(cls)
        self._refresh(late, counters, timings, wave_bytes=self.wave_bytes)
        for cls in self.classes:
            cls.write_scalars()

    @staticmethod
    def _refresh(
        classes: Sequence[ShapeClass],
        counters: LinalgCounters,
        timings: dict[str, float] | None,
        balance: BalanceFn | None = None,
        wave_bytes: float = math.inf,
    ) -> set[int]:
        """Refresh the bases of ``classes`` by their method (one host read per method and wave).

        Returns the ids of the stacks of the classes whose bases changed (``compute_bases``).
        """
        changed: set[int] = set()
        for method in ("qr", "eigh"):
            todo = [c for c in classes if c.cfg.refresh_method == method]
            if todo:
                t0 = time.perf_counter()
                changed |= compute_bases(todo, method, counters, False, balance, wave_bytes)
                if timings is not None:
                    timings["refresh"] = timings.get("refresh", 0.0) + time.perf_counter() - t0
        return changed


@dataclass
class ClassWindow:
    """Per-class stacked inputs of a step (``folding.WindowOutput`` per class).

    grads[k]: class k's gradient stack; grads_rot[k]: its rotation or None; stats_grads /
    stats_grads_rot: the statistics gradient (``statistics_from="mean"``) or None; eta[k]:
    class k's eta* [B] or None.
    """

    grads: list[torch.Tensor]
    grads_rot: list[torch.Tensor | None]
    stats_grads: Sequence[torch.Tensor | None] | None = None
    stats_grads_rot: Sequence[torch.Tensor | None] | None = None
    eta: Sequence[torch.Tensor | None] | None = None
    extra: dict = field(default_factory=dict)

    def scale_(self, factor: float) -> None:
        """Multiply every gradient by ``factor`` in place (gradient clipping)."""
        for group in (self.grads, self.grads_rot, self.stats_grads, self.stats_grads_rot):
            for g in group or ():
                if g is not None:
                    g.mul_(factor)


def _stats_grad(window: ClassWindow, k: int) -> torch.Tensor:
    """Class k's gradient that feeds v and the factors (the statistics gradient if any)."""
    stats = None if window.stats_grads is None else window.stats_grads[k]
    return window.grads[k] if stats is None else stats


def _stats_rotation(cls: ShapeClass, window: ClassWindow, k: int) -> torch.Tensor:
    """Class k's statistics gradient rotated in its current bases (the window's if it has it)."""
    stats = None if window.stats_grads is None else window.stats_grads[k]
    if stats is None:
        given = window.grads_rot[k]
        return cls.rotate(window.grads[k]) if given is None else given
    given = None if window.stats_grads_rot is None else window.stats_grads_rot[k]
    return cls.rotate(stats) if given is None else given


def _class_step(
    cls: ShapeClass,
    window: ClassWindow,
    k: int,
    lr: float,
    wd: float,
    fresh: bool = False,
    factors_done: bool = False,
    stats_rotated: torch.Tensor | None = None,
) -> None:
    """The moment and parameter update of one class (``soap.soap_step`` after its bases).

    ``fresh``: the bases changed since the window rotated its gradients (rotate again);
    ``factors_done``: the factors already took this step's gradient (phase 1);
    ``stats_rotated``: phase 1's rotation of the statistics gradient in the current bases.
    """
    cfg = cls.cfg
    grad, grad_rot = window.grads[k], window.grads_rot[k]
    stats_grad = None if window.stats_grads is None else window.stats_grads[k]
    stats_rot = None if window.stats_grads_rot is None else window.stats_grads_rot[k]
    if fresh:
        grad_rot = stats_rot = None
    elif stats_rotated is not None:
        if stats_grad is None:
            grad_rot = stats_rotated
        else:
            stats_rot = stats_rotated
    eta = None if window.eta is None else window.eta[k]
    stats = grad if stats_grad is None else stats_grad
    st = cls.tensors
    g_rot = cls.rotate(grad) if grad_rot is None else grad_rot
    if stats_grad is None:
        s_rot = g_rot
    else:
        s_rot = cls.rotate(stats_grad) if stats_rot is None else stats_rot
    count = cfg.factor_count(cls.step, True)
    cls.step += 1
    estimates = (st.get("DL"), st.get("DR")) if cls.initialized else (None, None)
    normalized, step_size = adam_moments_update(
        st["exp_avg"], st["exp_avg_sq"], g_rot, s_rot, cls.step, lr, cfg, estimates
    )
    direction = cls.unrotate(normalized)
    if eta is not None:
        direction.mul_(eta.to(direction.dtype)[:, None, None])
    if "master" in st:
        target = st["master"]
        target.add_(direction.to(target.dtype), alpha=-step_size)
        if wd > 0.0:
            target.add_(target, alpha=-lr * wd)
        torch._foreach_copy_(cls.params, list(target.unbind(0)))
    else:
        targets = cls.params
        pdtype = targets[0].dtype
        torch._foreach_add_(targets, list(direction.to(pdtype).unbind(0)), alpha=-step_size)
        if wd > 0.0:
            torch._foreach_add_(targets, targets, alpha=-lr * wd)
    if not factors_done:
        cls.update_factors(stats, count, s_rot)
