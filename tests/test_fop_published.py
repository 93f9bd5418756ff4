"""FOP as published, as options: eta*, statistics source, fold structures, beta clipping.

Every option is checked against a dense, obviously-correct implementation written here from
the equations (FoldingConfig docstring; FOP Eqs. 3-6, 16-18): gradients are flattened, the
SOAP metric is an explicit matrix M = Q diag(sqrt(v_hat)+eps) Q^T with Q = QL (x) QR (and M^-1
likewise), and the fold structures are written recursively from their definitions, not as the
package's stack machine.

Tolerances: one window against the package's own metric (fp64) agrees to rtol 1e-9 (only
summation order differs); multi-step training in fp64 against ReferenceSOAP-based runs uses
rel 1e-5 of the weights, as tests/test_folding.py does (the QR basis refresh amplifies
last-bit differences). Megatron tests follow tests/test_megatron_dp.py: sharded vs replicated
bitwise in fp32, DP=2 vs DP=1 at rtol 1e-5 in fp64 with the rotation off.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlfop_megatron.config import FoldingConfig, MLFOPConfig
from mlfop_megatron.core.folding import WindowFolder
from mlfop_megatron.core.levels import LevelSchedule, dyadic_boundaries
from tests.support.order import reference_order_soap as MLFOPSOAP  # noqa: N812 (see order.py)
from tests.support.reference_soap import ReferenceSOAP, scaled_to_rms

WINDOW_TOL = {"rtol": 1e-9, "atol": 1e-12}
EPS = 1e-30  # fop_eps


# --------------------------------------------------------------- dense reference
def dense_metric(ql, qr, v, t, b2=0.95, eps=1e-8):
    """The SOAP metric M and its inverse as explicit matrices.

    (M, M^-1) as explicit matrices on row-major flattened gradients; identity before the
    first basis (t == 0). rot(X) = QL^T X QR  <=>  vec(rot X) = (QL (x) QR)^T vec(X).
    """
    n = v.numel()
    if t == 0:
        eye = torch.eye(n, dtype=v.dtype)
        return eye, eye
    q = torch.kron(ql.contiguous(), qr.contiguous())
    dvec = ((v / (1 - b2**t)).sqrt() + eps).reshape(-1)
    return q @ torch.diag(dvec) @ q.T, q @ torch.diag(1 / dvec) @ q.T


def package_metric(state, shape):
    """Dense metric of a package block state (QL / QR absent on a side without rotation)."""
    rows, cols = state["exp_avg"].shape
    ql = state.get("QL", torch.eye(rows, dtype=torch.float64))
    qr = state.get("QR", torch.eye(cols, dtype=torch.float64))
    t = state["step"] if state["initialized"] else 0
    return dense_metric(ql, qr, state["exp_avg_sq"], t)


def fop(z, h, nz, nh, metric, beta_max=1.0):
    """FOP's fold of two estimates, as published.

    FOP_accum(z, h): a = weighted mean, d = z - h, s (Eq. 4), d_perp (Eq. 5), beta (Eq. 16),
    optionally clipped; returns (a + beta d_perp, beta).
    """
    m, minv = metric
    a = (nz * z + nh * h) / (nz + nh)
    d = z - h
    s = (d @ m @ a) / (a @ m @ a + EPS)
    d_perp = d - s * a
    beta = (a @ minv @ d_perp) / (d_perp @ minv @ d_perp + EPS)
    if beta_max is not None:
        beta = beta.clamp(-beta_max, beta_max)
    return a + beta * d_perp, beta


def mean(gs):
    return torch.stack(gs).mean(0)


def fold_chain(gs, metric, beta_max, betas):
    bounds = dyadic_boundaries(len(gs))
    z = gs[0]
    for j in range(1, len(bounds)):
        h = mean(gs[bounds[j - 1] : bounds[j]])
        z, beta = fop(z, h, bounds[j - 1], bounds[j] - bounds[j - 1], metric, beta_max)
        betas.append(beta)
    return z


def fold_tree(gs, metric, beta_max, betas):
    """FOP's balanced binary tree over micro-steps.

    Balanced binary tree over micro-steps: the left part is the largest power of two below
    n (so K = 2^k splits in equal halves at every depth).
    """
    if len(gs) == 1:
        return gs[0]
    p = 1 << (len(gs) - 1).bit_length() - 1
    left = fold_tree(gs[:p], metric, beta_max, betas)
    right = fold_tree(gs[p:], metric, beta_max, betas)
    z, beta = fop(left, right, p, len(gs) - p, metric, beta_max)
    betas.append(beta)
    return z


def fold_last(gs, metric, beta_max, betas):
    half = len(gs) // 2
    z, beta = fop(mean(gs[:half]), mean(gs[half:]), half, len(gs) - half, metric, beta_max)
    betas.append(beta)
    return z


FOLDS = {"chain": fold_chain, "tree": fold_tree, "last": fold_last}


def dense_eta(g_avg, g_comb, metric):
    """eta* = <g_avg, M^-1 g_comb> / <g_comb, M^-1 g_comb> (FOP Eqs. 17-18)."""
    minv = metric[1]
    return (g_avg @ minv @ g_comb) / (g_comb @ minv @ g_comb)


class PublishedSOAP(ReferenceSOAP):
    """ReferenceSOAP with FOP's options.

    ReferenceSOAP with FOP's options: the first moment takes ``grad`` (the update
    direction), the second moment and the factors take ``stats_grad`` (default ``grad``),
    and the preconditioned direction is multiplied by ``eta``.
    """

    def step(self, grad, stats_grad=None, eta=1.0):
        g = grad.reshape(self.rows, self.cols)
        sg = g if stats_grad is None else stats_grad.reshape(self.rows, self.cols)
        if not self.started:
            self._factors(sg)
            if self.left:
                self.QL = torch.linalg.eigh(self.L)[1].flip(1)
            if self.right:
                self.QR = torch.linalg.eigh(self.R)[1].flip(1)
            self.started = True
            return
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * self.rot(sg) ** 2
        size = self.lr * math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        w = self.w.reshape(self.rows, self.cols)
        u = self.unrot(self.rot(self.m) / (self.v.sqrt() + self.eps))
        if self.update_rms > 0:  # the update's RMS set to update_rms before eta, step size lr
            u, size = scaled_to_rms(u, self.update_rms), self.lr
        w = w - size * eta * u
        w = w - self.lr * self.wd * w
        self.w = w.reshape(self.w.shape)
        self._factors(sg)
        if self.t % self.f == 0:
            self._refresh()

    def metric(self):
        return dense_metric(self.QL, self.QR, self.v, self.t if self.started else 0)


# --------------------------------------------------------------------- data
def make_grads(shape, steps, k, seed=0, dtype=torch.float64):
    """Gradients of two 'modalities' that differ between window halves.

    Two 'modalities': the first half of each window and the second half have different
    signals (with per-micro-step noise), so the folds see a real difference.
    """
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, dtype=dtype, generator=gen)
    grads = []
    for _ in range(steps):
        sig_a = torch.randn(shape, dtype=dtype, generator=gen)
        sig_b = 0.5 * sig_a + torch.randn(shape, dtype=dtype, generator=gen)
        grads.append(
            [
                (sig_a if i < k // 2 else sig_b)
                + 0.5 * torch.randn(shape, dtype=dtype, generator=gen)
                for i in range(k)
            ]
        )
    return w0, grads


def accumulate(opt, params, micro_grads):
    for gs in micro_grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.accumulate()


# ------------------------------------------------------- one window, exact metric
def warmed_optimizer(shapes, k, steps=3, seed=0, **opts):
    """An optimizer with a non-trivial basis and second moment, and the next window's grads."""
    params, per_param = [], []
    for i, shape in enumerate(shapes):
        w0, grads = make_grads(shape, steps + 1, k, seed=seed + i)
        params.append(torch.nn.Parameter(w0.clone()))
        per_param.append(grads)
    opt = MLFOPSOAP(
        params, lr=1e-2, precondition_frequency=2, accumulation_steps=k, enabled=True, **opts
    )
    for step in range(steps):
        accumulate(opt, params, zip(*[g[step] for g in per_param]))
        opt.step()
    window = [g[steps] for g in per_param]  # [param][micro-step]
    return opt, params, window


@pytest.mark.parametrize("structure", ["chain", "tree", "last"])
@pytest.mark.parametrize("k", [2, 4, 6, 8])
@pytest.mark.parametrize("beta_max", [1.0, None])
def test_window_fold_structures_match_dense(structure, k, beta_max):
    opt, params, window = warmed_optimizer(
        [(6, 5)], k, structure=structure, beta_max=beta_max, step_size="eta_star"
    )
    p = params[0]
    accumulate(opt, params, zip(window[0]))
    out = opt._folder.output()
    metric = package_metric(opt.state[p], p.shape)
    flat = [g.reshape(-1) for g in window[0]]
    betas = []
    want = FOLDS[structure](flat, metric, beta_max, betas)
    assert torch.allclose(out.grads[0].reshape(-1), want, **WINDOW_TOL)
    assert any(abs(b) > 1e-3 for b in betas), "folding never changed the mean: weak test"
    # eta* against the plain mean of the whole window (at one fold: that fold's a).
    eta = dense_eta(mean(flat), want, metric)
    assert torch.allclose(out.eta[0], eta, **WINDOW_TOL)
    if beta_max is None and len(betas) == 1:
        assert 1 / 3 - 1e-12 <= eta <= 1 + 1e-12  # FOP: unclipped beta* puts eta* in [1/3, 1]
    assert len(opt._folder.diagnostics) == len(betas)
    # The recursion's post-order is the package's fold order (a binary counter).
    got_betas = torch.stack([d.beta[0] for d in opt._folder.diagnostics])
    assert torch.allclose(got_betas, torch.stack(betas), **WINDOW_TOL)


def test_structures_coincide_at_k2_and_schedules_have_the_documented_sync_points():
    outs = {}
    for structure in ("chain", "tree", "last"):
        opt, params, window = warmed_optimizer([(6, 5)], 2, structure=structure)
        accumulate(opt, params, zip(window[0]))
        outs[structure] = opt._folder.output().grads[0]
    assert torch.equal(outs["chain"], outs["tree"]) and torch.equal(outs["chain"], outs["last"])

    def sched(**kw):
        return LevelSchedule.from_config(FoldingConfig(**{"enabled": True, **kw}))

    assert sched(accumulation_steps=8, structure="last").boundaries == (4, 8)
    assert sched(accumulation_steps=7, structure="last").boundaries == (3, 7)
    assert sched(accumulation_steps=1, structure="last").boundaries == (1,)
    tree8 = sched(accumulation_steps=8, structure="tree")
    assert tree8.boundaries == tuple(range(1, 9))
    assert [(f.level, f.n_z, f.n_h) for f in tree8.folds] == [
        (1, 1, 1),
        (3, 1, 1),
        (3, 2, 2),
        (5, 1, 1),
        (7, 1, 1),
        (7, 2, 2),
        (7, 4, 4),
    ]
    tree6 = sched(accumulation_steps=6, structure="tree")
    assert [(f.n_z, f.n_h) for f in tree6.folds][-1] == (4, 2)
    # Coarser tree leaves through boundaries: 4 leaves of 2 micro-steps, 4 sync points.
    leaves = sched(accumulation_steps=8, structure="tree", boundaries=(2, 4, 6, 8))
    assert [(f.n_z, f.n_h) for f in leaves.folds] == [(2, 2), (2, 2), (4, 4)]
    chain = sched(accumulation_steps=8)
    assert chain.boundaries == (1, 2, 4, 8) and chain.fold_weights(3) == (4, 4)
    assert sched(accumulation_steps=8, enabled=False, structure="tree").boundaries == (8,)


def test_eta_star_on_several_blocks_and_summed_over_shards():
    """eta* per block, also for TP-split matrices.

    eta* per block for blocks of different shapes (1-D included); and with a reduce_fn that
    sums over shards, each shard gets the eta* of the whole matrix (tensor parallelism).
    """
    shapes = [(6, 5), (4, 7), (9,)]
    for k in (2, 4):  # one fold (eta* from the fold's sums), several folds (from the mean)
        opt, params, window = warmed_optimizer(shapes, k, step_size="eta_star")
        accumulate(opt, params, zip(*window))
        out = opt._folder.output()
        for i, p in enumerate(params):
            metric = package_metric(opt.state[p], p.shape)
            flat = [g.reshape(-1) for g in window[i]]
            want = fold_chain(flat, metric, 1.0, [])
            assert torch.allclose(out.grads[i].reshape(-1), want, **WINDOW_TOL)
            assert torch.allclose(out.eta[i], dense_eta(mean(flat), want, metric), **WINDOW_TOL)
        assert len({round(float(e), 12) for e in out.eta}) == 3  # really per block

    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(4, 6, dtype=torch.float64, generator=gen) for _ in range(4)]
    diag = torch.rand(4, 6, dtype=torch.float64, generator=gen) + 0.2
    for k, structure in ((2, "chain"), (4, "tree")):
        cfg = FoldingConfig(
            enabled=True, accumulation_steps=k, structure=structure, step_size="eta_star"
        )
        schedule = LevelSchedule.from_config(cfg)

        def sum_shards(t):
            return t.sum(0, keepdim=True).expand_as(t).clone()

        sharded = WindowFolder(
            schedule, cfg, [lambda x: x] * 2, [diag[:, :3], diag[:, 3:]], sum_shards
        )
        whole = WindowFolder(schedule, cfg, [lambda x: x], [diag])
        for g in full[:k]:
            sharded.add_micro_step([g[:, :3], g[:, 3:]])
            whole.add_micro_step([g])
        metric = (torch.diag(diag.reshape(-1)), torch.diag(1 / diag.reshape(-1)))
        flat = [g.reshape(-1) for g in full[:k]]
        want = FOLDS[structure](flat, metric, 1.0, [])
        assert torch.allclose(whole.output().grads[0].reshape(-1), want, **WINDOW_TOL)
        eta = dense_eta(mean(flat), want, metric)
        assert torch.allclose(whole.eta[0], eta, **WINDOW_TOL)
        assert torch.allclose(sharded.eta, torch.stack([eta, eta]), **WINDOW_TOL)
        joined = torch.cat(sharded.output().grads, dim=1)
        assert torch.allclose(joined.reshape(-1), want, **WINDOW_TOL)


def test_beta_clipping_options_and_parallel_tolerance():
    assert FoldingConfig(beta_max=math.inf).beta_max is None  # inf: no clipping
    for bad in (0.0, -1.0, -math.inf):
        with pytest.raises(ValueError, match="beta_max"):
            FoldingConfig(beta_max=bad)
    with pytest.raises(ValueError, match="structure"):
        FoldingConfig(structure="ring")
    with pytest.raises(ValueError, match="step_size"):
        FoldingConfig(step_size="eta")
    with pytest.raises(ValueError, match="statistics_from"):
        FoldingConfig(statistics_from="plain")
    with pytest.raises(ValueError, match="structure='last'"):
        FoldingConfig(accumulation_steps=4, structure="last", boundaries=(2, 4))
    with pytest.raises(ValueError, match="starting at 1"):
        FoldingConfig(accumulation_steps=4, boundaries=(2, 4))
    # Clipping on/off against the dense fold (one window, K=2 with a large beta).
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(12, dtype=torch.float64, generator=gen)
    h = 2.0 * z + 0.3 * torch.randn(12, dtype=torch.float64, generator=gen)
    diag = torch.rand(3, 4, dtype=torch.float64, generator=gen) * 10 + 0.01  # anisotropic M
    metric = (torch.diag(diag.reshape(-1)), torch.diag(1 / diag.reshape(-1)))
    results = {}
    for beta_max in (None, math.inf, 1.0, 0.05):
        cfg = FoldingConfig(enabled=True, accumulation_steps=2, beta_max=beta_max)
        folder = WindowFolder(LevelSchedule.from_config(cfg), cfg, [lambda x: x], [diag])
        folder.add_micro_step([z.reshape(3, 4)])
        folder.add_micro_step([h.reshape(3, 4)])
        want, beta = fop(z, h, 1, 1, metric, None if beta_max == math.inf else beta_max)
        assert torch.allclose(folder.result()[0][0].reshape(-1), want, **WINDOW_TOL)
        results[beta_max] = folder.diagnostics[0].beta[0]
    assert abs(results[None]) > 1.0  # a case where clipping at 1 matters
    assert results[None] == results[math.inf] and results[1.0] == 1.0 * torch.sign(results[None])
    assert abs(results[0.05]) == 0.05
    # Parallel tolerance: d nearly parallel to a (relative d_perp ~ 1e-5).
    nearly = 2.0 * h + 1e-5 * torch.randn(12, dtype=torch.float64, generator=gen)
    for tol, zeroed in ((1e-3, True), (None, False), (0.0, False)):
        cfg = FoldingConfig(enabled=True, accumulation_steps=2, beta_max=None, parallel_tol=tol)
        folder = WindowFolder(LevelSchedule.from_config(cfg), cfg, [lambda x: x], [diag])
        folder.add_micro_step([nearly.reshape(3, 4)])
        folder.add_micro_step([h.reshape(3, 4)])
        beta = folder.diagnostics[0].beta[0]
        if zeroed:
            assert beta == 0.0
        else:
            _, want = fop(nearly, h, 1, 1, metric, None)
            assert torch.allclose(beta, want, rtol=1e-6) and abs(beta) > 1.0


# ------------------------------------------------------------ whole training runs
OPTION_SETS = {
    "defaults": {},
    "eta": {"step_size": "eta_star"},
    "mean_stats": {"statistics_from": "mean"},
    "published": {"step_size": "eta_star", "statistics_from": "mean", "beta_max": None},
}


@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize(
    "structure,k",
    [("chain", 4), ("chain", 8), ("tree", 2), ("tree", 4), ("tree", 8), ("last", 4), ("last", 5)],
)
def test_training_matches_dense_reference(structure, k, options):
    opts = OPTION_SETS[options]
    beta_max = opts.get("beta_max", 1.0)
    w0, grads = make_grads((6, 5), steps=16, k=k, seed=k)
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP(
        [p],
        lr=1e-2,
        precondition_frequency=4,
        accumulation_steps=k,
        enabled=True,
        structure=structure,
        **opts,
    )
    ref = PublishedSOAP(w0, lr=1e-2, precondition_frequency=4, refresh_tolerance=0.0)
    etas = []
    for step, micro in enumerate(grads):
        accumulate(opt, [p], ([g] for g in micro))
        opt.step()
        flat = [g.reshape(-1) for g in micro]
        metric = ref.metric()
        g_comb = FOLDS[structure](flat, metric, beta_max, [])
        g_mean = mean(flat)
        eta = dense_eta(g_mean, g_comb, metric) if opts.get("step_size") == "eta_star" else 1.0
        stats = g_mean if opts.get("statistics_from") == "mean" else None
        ref.step(g_comb, stats_grad=stats, eta=eta)
        etas.append(float(eta))
        if step == 0:
            ref.adopt_initial_bases(opt.state[p].get("QL"), opt.state[p].get("QR"))
    rel = ((p.detach() - ref.w).abs().max() / ref.w.abs().max()).item()
    assert rel < 1e-5, rel
    if opts.get("step_size") == "eta_star":
        assert min(etas[1:]) < 0.99  # eta* did scale some steps
        assert torch.allclose(opt.last_eta[0], torch.tensor(etas[-1], dtype=torch.float64))


def test_statistics_from_mean_equals_plain_soap_statistics():
    """statistics_from='mean' feeds the curvature the plain mean.

    v, L, R (and the bases) are those of plain SOAP on the window mean; m and the weights
    take the FOP combination.
    """
    k = 4
    w0, grads = make_grads((6, 5), steps=12, k=k, seed=1)
    p = torch.nn.Parameter(w0.clone())
    opt = MLFOPSOAP(
        [p], accumulation_steps=k, enabled=True, statistics_from="mean", precondition_frequency=3
    )
    q = torch.nn.Parameter(w0.clone())
    plain = MLFOPSOAP([q], precondition_frequency=3)
    for micro in grads:
        accumulate(opt, [p], ([g] for g in micro))
        opt.step()
        q.grad = mean(micro)
        plain.step()
    a, b = opt.state[p], plain.state[q]
    for key in ("L", "R", "QL", "QR", "exp_avg_sq"):
        assert torch.allclose(a[key], b[key], rtol=1e-9, atol=1e-12), key
    assert not torch.allclose(a["exp_avg"], b["exp_avg"], rtol=1e-3)
    assert not torch.allclose(p, q, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 4])
def test_folding_off_with_every_option_equals_plain_soap_bitwise(k):
    """enabled=False (or K=1) ignores structure, eta* and the statistics source: plain SOAP."""
    w0, grads = make_grads((9, 7), steps=10, k=k, dtype=torch.float32)
    published = dict(structure="tree", step_size="eta_star", statistics_from="mean", beta_max=None)
    for enabled in (False, True) if k == 1 else (False,):
        p = torch.nn.Parameter(w0.clone())
        opt = MLFOPSOAP(
            [p], accumulation_steps=k, enabled=enabled, precondition_frequency=3, **published
        )
        q = torch.nn.Parameter(w0.clone())
        plain = MLFOPSOAP([q], precondition_frequency=3)
        for micro in grads:
            accumulate(opt, [p], ([g] for g in micro))
            opt.step()
            total = micro[0].clone()
            for g in micro[1:]:
                total += g
            q.grad = total / k
            plain.step()
        assert torch.equal(p, q)
        assert opt.last_eta is None and opt.stats()["levels"] == []


def test_config_round_trip_through_kwargs():
    cfg = MLFOPConfig.from_kwargs(
        enabled=True,
        accumulation_steps=8,
        structure="tree",
        step_size="eta_star",
        statistics_from="mean",
    )
    assert cfg.folding.enabled
    assert (cfg.folding.structure, cfg.folding.step_size, cfg.folding.statistics_from) == (
        "tree",
        "eta_star",
        "mean",
    )
    default = FoldingConfig()
    assert (default.structure, default.step_size, default.statistics_from) == (
        "chain",
        "none",
        "folded",
    )
    assert default.beta_max == 1.0 and not default.enabled  # folding is opt-in


# ------------------------------------------------------------------ Megatron path
MEGATRON_VARIANTS = {
    "tree_published": {
        "structure": "tree",
        "step_size": "eta_star",
        "statistics_from": "mean",
        "beta_max": None,
    },
    "last_eta": {"structure": "last", "step_size": "eta_star"},
}


def _assert_params(a, b, what, exact):
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), f"{what}: {name} differs"
        else:
            assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), f"{what}: {name}"


@pytest.mark.distributed
@pytest.mark.parametrize("variant", list(MEGATRON_VARIANTS))
def test_megatron_structures_sharded_equal_replicated_and_dp2_equals_dp1(variant):
    pytest.importorskip("megatron.core")
    from mlfop_megatron.runtime.spawn import run_distributed
    from tests.support.mlfop_runs import run_tiny_gpt

    folding = MEGATRON_VARIANTS[variant]
    base = dict(iters=6, microbatches=4, global_micro=2, folding=folding)
    sharded = run_distributed(run_tiny_gpt, 2, dict(base, sharded=True))
    replicated = run_distributed(run_tiny_gpt, 2, dict(base, sharded=False))
    for r in (0, 1):
        _assert_params(sharded[r]["params"], replicated[r]["params"], "sharded vs repl", True)
    assert sharded[0]["losses"][-1] < sharded[0]["losses"][0]
    folds = 3 if folding["structure"] == "tree" else 1  # K=4: tree 3 folds, last 1
    levels = sharded[0]["stats"]["levels"]
    assert len(levels) == folds and all("fold" in lvl for lvl in levels)
    fp64 = dict(base, dtype=torch.float64, max_precond_dim=1)
    dp1 = run_distributed(run_tiny_gpt, 1, fp64)[0]
    dp2 = run_distributed(run_tiny_gpt, 2, dict(fp64, sharded=True))
    for r in (0, 1):
        _assert_params(dp2[r]["params"], dp1["params"], "DP=2 vs DP=1", False)
    # The variant changed the training: not the default chain.
    chain = run_distributed(run_tiny_gpt, 1, dict(fp64, folding={}))[0]
    assert any(not torch.allclose(chain["params"][n], dp1["params"][n]) for n in dp1["params"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation only")
@pytest.mark.parametrize("structure", ["chain", "tree", "last"])
def test_published_options_are_device_clean_and_sync_free(structure):
    """The FOP paths run under strict device checks without host syncs.

    Under the strict CPU emulation of a GPU: no host/device mixing anywhere, and no host
    sync in accumulate() (the per-micro-step fold path, eta* and the plain mean included).
    """
    pytest.importorskip("megatron.core")
    from mlfop_megatron.runtime.cpu_emulation import cpu_emulation, is_cpu_emulation_installed
    from mlfop_megatron.runtime.strict_device import forbid_host_sync

    if is_cpu_emulation_installed():
        pytest.skip("an emulation is already installed in this process")
    with cpu_emulation(with_megatron=False, strict=True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
        ).cuda()
        opt = MLFOPSOAP(
            model.parameters(),
            lr=1e-2,
            accumulation_steps=4,
            enabled=True,
            precondition_frequency=2,
            structure=structure,
            step_size="eta_star",
            statistics_from="mean",
            beta_max=None,
        )
        for _ in range(3):
            for _ in range(4):
                x, y = torch.randn(5, 8).cuda(), torch.randn(5, 2).cuda()
                ((model(x) - y) ** 2).mean().backward()
                with forbid_host_sync():
                    opt.accumulate()
            opt.step()
        assert opt.last_eta is not None and all(e.is_cuda for e in opt.last_eta)
        for p in model.parameters():
            assert p.is_cuda and torch.isfinite(p).all()
        assert len(opt.stats()["levels"]) == {"chain": 2, "tree": 3, "last": 1}[structure]


@pytest.mark.distributed
def test_megatron_tp2_blockwise_sums_eta_over_shards():
    """eta* and plain-mean statistics are TP-layout independent.

    TP=2 blockwise with the rotation off equals TP=1 (tolerances of test_megatron_tp_pp):
    eta* and the plain-mean statistics of a TP-split weight use whole-matrix inner products.
    """
    pytest.importorskip("megatron.core")
    from mlfop_megatron.runtime.spawn import run_distributed
    from tests.support.mlfop_runs import run_tiny_gpt

    folding = MEGATRON_VARIANTS["tree_published"]
    base = dict(iters=6, microbatches=4, global_micro=2, dtype=torch.float64, max_precond_dim=1)
    base["soap"] = {"update_rms": 0.0}  # per-shard RMS under TP blockwise: test_megatron_tp_pp
    tp1 = run_distributed(run_tiny_gpt, 1, dict(base, folding=folding))[0]
    tp2 = run_distributed(run_tiny_gpt, 2, dict(base, tp=2, folding=folding))
    for name in tp1["params"]:
        pieces = [r["params"][name] for r in tp2]
        dim = tp2[0]["partition_dims"].get(name)
        full = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
        assert torch.allclose(full, tp1["params"][name], rtol=1e-4, atol=2e-5), name


def test_tree_fold_diagnostics_are_logged_per_fold():
    from mlfop_megatron.megatron.diagnostics_logging import flatten_stats

    opt, params, window = warmed_optimizer([(6, 5)], 4, structure="tree")
    flat = flatten_stats(opt.stats())
    # K=4 tree: fold 0 ends at level 1, folds 1 and 2 both at level 3.
    assert "mlfop/level1/beta_mean" in flat
    assert "mlfop/level3_fold1/beta_mean" in flat and "mlfop/level3_fold2/beta_mean" in flat
    assert not any(tag.endswith("/fold") for tag in flat)
