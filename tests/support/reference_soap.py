"""Dense, obviously-correct reference implementations used by the tests.

Written straight from the equations in DESIGN.md section 1, with no shared code from the
package: the first moment is kept in the ORIGINAL coordinates (the package keeps it rotated),
so agreement checks the exact re-expression of m at every basis refresh. The same LAPACK
routines (torch.linalg.eigh / qr) are used so that arbitrary choices inside degenerate
eigenspaces (a tall gradient gives a rank-deficient factor) are made identically.
"""

from __future__ import annotations

import math

import torch


def eig_desc(f: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(f)[1].flip(1)


def signal_mask(lam_left, lam_right, rows, cols, dtype):
    """Dense [rows, cols] 0/1: off both factors' null spaces (lam above 4 u x its largest).

    ``lam_left``/``lam_right``: diag(Q^T F Q) of each side, None where a side is not rotated.
    A side whose estimates are all zero (no statistics yet) masks nothing.
    """
    mask = torch.ones(rows, cols, dtype=dtype)
    for lam, dim in ((lam_left, 0), (lam_right, 1)):
        if lam is None:
            continue
        top = lam.abs().max()
        keep = ((lam > top * (4.0 * torch.finfo(lam.dtype).eps)) | (top == 0)).to(dtype)
        mask = mask * (keep[:, None] if dim == 0 else keep[None, :])
    return mask


def scaled_to_rms(u, rms):
    """``u`` scaled to RMS ``rms`` over all its entries (a zero ``u`` stays zero)."""
    norm = u.pow(2).mean().sqrt()
    return u * (rms / norm) if norm > 0 else u


class ReferenceSOAP:
    """SOAP on one parameter, straight from the equations (1-D params: plain AdamW)."""

    def __init__(
        self,
        w,
        lr=3e-3,
        betas=(0.9, 0.95),
        shampoo_beta=0.8,
        eps=1e-8,
        weight_decay=0.01,
        precondition_frequency=1,
        max_precond_dim=10000,
        precondition_1d=False,
        correct_bias=True,
        refresh_method="qr",
        factor_estimator="shampoo",
        kl_damping=1e-5,
        correct_factor_bias=False,
        first_step_update=False,
        refresh_first=True,
        refresh_tolerance=0.03,
        nesterov=False,
        normalization="adam",
        update_rms=1.0,
    ):
        self.w = w.clone()
        self.kl, self.kl_damping = factor_estimator == "kl", kl_damping
        self.correct_factor_bias = correct_factor_bias
        self.first_step_update, self.refresh_first = first_step_update, refresh_first
        self.tolerance = refresh_tolerance
        self.refreshed = self.skipped = 0  # sides refreshed / kept as aligned
        # sides ("L", "R") a refresh budget chose for this step (None: the gate decides alone)
        self.chosen: set[str] | None = None
        self.k = 0  # factor updates so far
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.bs = betas[1] if shampoo_beta is None else shampoo_beta
        self.f, self.method = precondition_frequency, refresh_method
        self.correct_bias, self.nesterov = correct_bias, nesterov
        self.sign = normalization == "sign"
        self.update_rms = update_rms
        if w.ndim == 1:
            self.rows, self.cols = 1, w.shape[0]
            self.left, self.right = False, precondition_1d and w.shape[0] <= max_precond_dim
        else:
            self.rows, self.cols = w.shape[0], math.prod(w.shape[1:])
            self.left = self.rows <= max_precond_dim
            self.right = self.cols <= max_precond_dim
        z = torch.zeros(self.rows, self.cols, dtype=w.dtype)
        self.m, self.v = z.clone(), z.clone()  # m: ORIGINAL coordinates; v: rotated
        self.L = torch.zeros(self.rows, self.rows, dtype=w.dtype)
        self.R = torch.zeros(self.cols, self.cols, dtype=w.dtype)
        self.QL = torch.eye(self.rows, dtype=w.dtype)
        self.QR = torch.eye(self.cols, dtype=w.dtype)
        self.t, self.started = 0, False

    def adopt_initial_bases(self, ql, qr):
        """Take another implementation's first bases after checking they solve L Q = Q diag.

        A rank-deficient factor (tall or wide gradient) has a degenerate zero eigenspace in
        which any orthonormal basis is a correct answer; adopting a verified one removes that
        arbitrary choice from the comparison without trusting the other implementation.
        """
        for f, q, side in ((self.L, ql, self.left), (self.R, qr, self.right)):
            if not side:
                assert q is None
                continue
            eye = torch.eye(q.shape[0], dtype=q.dtype)
            assert torch.allclose(q.T @ q, eye, atol=1e-10), "basis not orthonormal"
            lam = torch.diag(q.T @ f @ q)
            resid = (f @ q - q * lam).abs().max() / f.abs().max()
            assert resid < 1e-10, f"not an eigenbasis (residual {resid:.1e})"
            assert (lam[:-1] >= lam[1:] - 1e-12 * lam.abs().max()).all(), "not descending"
        if self.left:
            self.QL = ql.clone()
        if self.right:
            self.QR = qr.clone()

    def rot(self, x):
        return self.QL.T @ x.reshape(self.rows, self.cols) @ self.QR

    def unrot(self, x):
        return self.QL @ x @ self.QR.T

    def metric_diag(self):
        if not self.started or self.t == 0:
            return None
        return (self.v / (1 - self.b2**self.t)).sqrt() + self.eps

    def step(self, grad):
        g = grad.reshape(self.rows, self.cols)
        if not self.started:
            self._factors(g)
            if self.left:
                self.QL = eig_desc(self.L)
            if self.right:
                self.QR = eig_desc(self.R)
            self.started = True
            if self.first_step_update:  # update at once, in the bases of this gradient
                self._update(g)
            return
        if self.refresh_first:  # factors and bases first: rotate g by bases that include it
            self._factors(g)
            if (self.t + 1) % self.f == 0:
                self._refresh()
            self._update(g)
            return
        self._update(g)
        self._factors(g)
        if self.t % self.f == 0:
            self._refresh()

    def _update(self, g):
        """Adam in the eigenbasis of the current bases."""
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * self.rot(g) ** 2
        m, weight = self.m, 1 - self.b1**self.t  # m's weights sum to `weight`
        if self.nesterov:  # NAdam: the step looks one momentum step ahead
            m, weight = self.b1 * self.m + (1 - self.b1) * g, 1 - self.b1 ** (self.t + 1)
        size = self.lr
        if self.correct_bias:
            size = self.lr * math.sqrt(1 - self.b2**self.t) / weight
        w = self.w.reshape(self.rows, self.cols)
        if self.sign:  # SPlus: W - lr Q_L sign(Q_L^T M Q_R) Q_R^T (no second moment, no bias)
            u, size = self.unrot(torch.sign(self.rot(m)) * self._signal()), self.lr
        else:
            u = self.unrot(self.rot(m) / (self.v.sqrt() + self.eps))
        if self.update_rms > 0:  # Muon's scale: the update's RMS, in the weights' coordinates
            u, size = scaled_to_rms(u, self.update_rms), self.lr
        w = w - size * u
        w = w - self.lr * self.wd * w
        self.w = w.reshape(self.w.shape)

    def _signal(self):
        """1 off both factors' null spaces (:func:`signal_mask` of diag(Q^T F Q)), else 0."""
        lams = [
            torch.diag(q.T @ f @ q) if used and q is not None else None
            for f, q, used in ((self.L, self.QL, self.left), (self.R, self.QR, self.right))
        ]
        return signal_mask(*lams, self.rows, self.cols, self.w.dtype)

    def _inverse(self, f, q, used):
        """KL-Shampoo's F^-1 = Q diag(1/lam) Q^T, lam = diag(Q^T F Q) floored (I without a basis).

        The floor: max(eps, kl_damping * the largest lam).
        """
        if not used:
            return torch.eye(f.shape[0], dtype=f.dtype)
        lam = torch.diag(q.T @ f @ q)
        lam = lam.clamp(min=max(self.eps, self.kl_damping * lam.max().item()))
        return q @ torch.diag(1 / lam) @ q.T

    def _factors(self, g):
        self.k += 1
        b = self.bs
        if self.correct_factor_bias:  # EMA bias correction of the factors
            b = 1 - (1 - self.bs) / (1 - self.bs**self.k)
        if not self.kl:
            new_l, new_r = g @ g.T, g.T @ g
        elif self.k == 1:  # KL-Shampoo, no estimate yet: L = R = rms(G) I
            rms = max(g.norm().item() / math.sqrt(self.rows * self.cols), self.eps)
            new_l = g @ g.T / (self.cols * rms)
            new_r = g.T @ g / (self.rows * rms)
        else:  # KL-Shampoo (Lin et al. 2025): L = E[G R^-1 G^T]/n, R = E[G^T L^-1 G]/m
            r_inv = self._inverse(self.R, self.QR, self.right)
            l_inv = self._inverse(self.L, self.QL, self.left)
            new_l = g @ r_inv @ g.T / self.cols
            new_r = g.T @ l_inv @ g / self.rows
        self.L = b * self.L + (1 - b) * new_l
        self.R = b * self.R + (1 - b) * new_r

    def _refresh(self):
        if self.left:
            self.QL, order = self._new_basis(self.L, self.QL, "L")
            if order is not None:
                self.v = self.v[order, :]
        if self.right:
            self.QR, order = self._new_basis(self.R, self.QR, "R")
            if order is not None:
                self.v = self.v[:, order]

    def share(self, side):
        """Share of ||Q^T F Q||_F^2 off its diagonal for side "L" or "R" (dense)."""
        f, q = (self.L, self.QL) if side == "L" else (self.R, self.QR)
        d = q.T @ f @ q
        off = d - torch.diag(torch.diag(d))
        return ((off**2).sum() / (d**2).sum()).item()

    def sides(self):
        """The rotated sides with their sizes: [("L", rows, cols), ("R", cols, rows)] or fewer."""
        out = [("L", self.rows, self.cols)] if self.left else []
        return out + ([("R", self.cols, self.rows)] if self.right else [])

    def _new_basis(self, f, q, side):
        if self.chosen is not None:  # a refresh budget decided (budgeted_step)
            if side not in self.chosen:
                self.skipped += 1
                return q, None
        elif self.tolerance > 0:  # refresh only a drifted basis: Q^T F Q's off-diagonal share
            if self.share(side) <= self.tolerance:
                self.skipped += 1
                return q, None
        self.refreshed += 1
        if self.method == "eigh":
            return eig_desc(f), None
        # The power step Q <- qr(F Q), columns sorted by diag(Q^T F Q); a column whose estimate
        # is rounding noise of zero (F q = 0) keeps its old direction q instead (scaled to the
        # largest estimate), which QR makes orthogonal to the kept ones.
        d = torch.diag(q.T @ f @ q)
        noise = d.abs().max() * d.numel() * torch.finfo(d.dtype).eps * 10.0
        d = torch.where(d > noise, d, torch.zeros_like(d))
        order = torch.argsort(d, descending=True, stable=True)
        x = f @ q[:, order]
        top = d.max().item()
        for j, col in enumerate(order.tolist()):
            if d[col] == 0:
                x[:, j] = q[:, col] * (top if top > 0 else 1.0)
        return torch.linalg.qr(x)[0], order


def budgeted_step(refs, grads, budget, cost, groups=None):
    """One refresh-first step of several ReferenceSOAPs whose refreshes share a budget.

    Every ref's factors take its gradient; then, per group of refs (one owner rank each;
    default: all), the sides past their tolerance are refreshed by descending off-diagonal
    share while their summed ``cost(n, k)`` stays within ``budget`` x the cost of all the
    group's sides (the most drifted one always); then every ref takes its moment update.
    """
    if not all(r.started for r in refs):
        for r, g in zip(refs, grads):
            r.step(g)
        return
    for r, g in zip(refs, grads):
        r._factors(g.reshape(r.rows, r.cols))
        r.chosen = set()
    for group in groups or [range(len(refs))]:
        sides = [
            (refs[i].share(s), refs[i], s, cost(n, k)) for i in group for s, n, k in refs[i].sides()
        ]
        cap = budget * sum(c for _, _, _, c in sides)
        spent = 0.0
        for share, r, s, c in sorted(sides, key=lambda x: x[0], reverse=True):
            if share <= r.tolerance:
                break
            if spent == 0.0 or spent + c <= cap * (1 + 1e-9):
                r.chosen.add(s)
                spent += c
    for r, g in zip(refs, grads):
        r._refresh()
        r._update(g.reshape(r.rows, r.cols))
        r.chosen = None


def reference_fop(z, h, nz, nh, diag=None, rot=None, eps=1e-30, beta_max=None):
    """FOP_accum(z, h) with explicit dense metric matrices; returns (result, s, beta, d_perp)."""
    rot = rot or (lambda x: x)
    a = (nz * z + nh * h) / (nz + nh)
    d = z - h
    mdiag = torch.ones_like(rot(z)) if diag is None else diag

    def m_inner(x, y):
        return (rot(x) * mdiag * rot(y)).sum()

    def mi_inner(x, y):
        return (rot(x) / mdiag * rot(y)).sum()

    s = m_inner(d, a) / (m_inner(a, a) + eps)
    d_perp = d - s * a
    beta = mi_inner(a, d_perp) / (mi_inner(d_perp, d_perp) + eps)
    if beta_max is not None:
        beta = beta.clamp(-beta_max, beta_max)
    return a + beta * d_perp, s, beta, d_perp
