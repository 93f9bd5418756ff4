"""Validated configuration dataclasses for ML-FOP-SOAP.

Every invalid value raises ``ValueError`` naming the option, the allowed range and the value
seen, so a bad launch flag fails at construction instead of corrupting a run.

Each field's ``metadata`` is the source of its command-line flag
(:mod:`mlfop_megatron.megatron_lm.arguments` generates the ``--mlfop-*`` flags from it):
``help`` (the flag's help text), ``flag`` (the flag name after ``--mlfop-`` when it is not the
field name with dashes; ``None``: no flag, the value comes from elsewhere), ``choices`` and,
for a pair, ``pair`` ((flag, help) of each element). A bool field that defaults to True gets a
switch that turns it off; one that defaults to False, a switch that turns it on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mlfop_megatron.policies import POSITION_EMBEDDINGS


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its default and its flag metadata (see the module docstring)."""
    return field(default=default, metadata={"help": help, **metadata})


NO_FLAG: dict[str, Any] = {"flag": None}

# The step's normalisation in the eigenbasis: Adam's m / (sqrt(v) + eps), or sign(m) (SPlus).
NORMALIZATIONS = ("adam", "sign")
# Basis refresh: one power-iteration step + QR, or a full eigendecomposition.
REFRESH_METHODS = ("qr", "eigh")
# Kronecker factor estimation: Shampoo's second moments, or KL-Shampoo's (Lin et al. 2025).
FACTOR_ESTIMATORS = ("shampoo", "kl")
# How tensor-parallel shards are preconditioned: each shard on its own, or whole matrices.
TP_MODES = ("blockwise", "full")


def _fail(option: str, allowed: str, value: Any) -> None:
    raise ValueError(f"ML-FOP-SOAP option '{option}' must be {allowed} (got {value!r})")


def _check_real(option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(option, "a real number", value)
    return float(value)


def check_range(
    option: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate that a number lies in [low, high] (or open ends) and return it as float."""
    v = _check_real(option, value)
    lo_txt = "-inf" if low is None else f"{low:g}"
    hi_txt = "inf" if high is None else f"{high:g}"
    allowed = f"in {'(' if low_open or low is None else '['}{lo_txt}, {hi_txt}" + (
        ")" if high_open or high is None else "]"
    )
    if low is not None and (v < low or (low_open and v == low)):
        _fail(option, allowed, value)
    if high is not None and (v > high or (high_open and v == high)):
        _fail(option, allowed, value)
    if math.isinf(v):
        _fail(option, "finite", value)
    return v


def check_int(option: str, value: Any, low: int) -> int:
    """Validate an integer >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(option, f"an integer >= {low}", value)
    return value


# The 2024 SOAP reference implementation's choices where our defaults differ (ablations,
# tests that compare with the reference's published behaviour).
REFERENCE_SOAP: dict[str, Any] = {
    "betas": (0.95, 0.95),
    "precondition_frequency": 10,
    "refresh_first": False,
    "refresh_tolerance": 0.0,
    "shampoo_beta": None,  # the factors' EMA is beta2's
    "update_rms": 0.0,  # Adam's own update scale
    "refresh_budget": 1.0,  # (acts with the drift gate only) no cap
}


@dataclass(frozen=True)
class SOAPConfig:
    """SOAP hyperparameters; defaults chosen by measurement (benchmarks/RESULTS.md).

    Against the 2024 SOAP reference's defaults (``REFERENCE_SOAP``: refresh every 10 steps,
    after the moment update), these check the bases every step, before the moment update, so
    the step's gradient is rotated by bases whose factors include it, as Megatron 0.19's SOAP
    does; a basis is refreshed only where it has drifted (``refresh_tolerance``: the share of
    Q^T F Q off its diagonal above 0.03, read from the tracked estimates diag(Q^T F Q): no
    product with a factor on a step that refreshes nothing); beta1 is 0.9 (the reference:
    0.95); the Kronecker factors' EMA is 0.8 (``shampoo_beta``; the reference: beta2's 0.95),
    chosen on seed 0 of the by-modality layout over 0.6/0.8/0.9/0.95/0.99, so the bases
    follow the current gradient geometry more closely; each block's update is scaled to RMS
    1 before lr (``update_rms``, Muon's update scale; the reference: Adam's own scale, whose
    best lr sits higher). On the digits main job (``benchmarks/peers.py``, each setting its
    own lr on seed 0, held-out seeds 1-3, both layouts) these defaults end at 0.516-0.520
    (batch 32) and 0.426-0.432 (batch 128), against Megatron's Muon at 0.57-0.58 and
    0.439-0.441 and its SOAP at 0.60-0.63 and 0.46-0.47, reaching Muon's final objective in
    0.72-0.96x its steps in all four cells (Megatron's SOAP with ``--no-soap-use-kl-shampoo``
    ends at 0.50-0.53 and 0.42, ahead of them per step in three cells of four: RESULTS);
    they take about 1.3-1.4x Muon's CPU step time at batch 32 (1.1x at 128; timed with the
    update scale off), mostly the refreshes. On
    DP-sharded blocks the gate's refreshes are balanced over the owner ranks
    (``refresh_balance``), so a step waits for the ranks' mean refresh work. The first step
    still only collects statistics: updating from it (Megatron's choice,
    ``first_step_update``) made the refresh-first order diverge on small batches.
    """

    lr: float = field(default=3e-3, metadata=NO_FLAG)  # Megatron's --lr and scheduler
    betas: tuple[float, float] = field(
        default=(0.9, 0.95),
        metadata={
            "pair": (
                (
                    "beta1",
                    "EMA coefficient of the first moment (in the preconditioner's eigenbasis)",
                ),
                ("beta2", "EMA coefficient of the second moment"),
            )
        },
    )
    shampoo_beta: float | None = option(
        0.8, "EMA coefficient of the Kronecker factors (none: --mlfop-beta2's; the reference)"
    )
    eps: float = option(1e-8, "denominator epsilon of the Adam step in the eigenbasis")
    weight_decay: float = field(default=0.01, metadata=NO_FLAG)  # Megatron's --weight-decay
    precondition_frequency: int = option(
        1, "refresh the eigenbases every this many optimizer steps (the reference: 10)"
    )
    refresh_tolerance: float = option(
        0.03,
        "at a scheduled refresh, refresh a basis only where it has drifted: the share of "
        "||Q^T F Q||_F^2 off the diagonal exceeds this (0: refresh every scheduled time, as "
        "the SOAP reference)",
    )
    refresh_budget: float = option(
        1.0,
        "with the drift gate: the most refresh work a step does, as a fraction of refreshing "
        "every gated side at once (flop cost): the most drifted sides first, the rest deferred "
        "to the next check, where their drift ranks them again (1: every drifted side; "
        "batched engine)",
    )
    refresh_balance: bool = option(
        True,
        "with the drift gate on DP-sharded blocks: give each rank the same refresh work per "
        "step (the mean of what the gate asks of the ranks: a rank over it defers its "
        "least-drifted sides to the next check, one under it refreshes its nearly-drifted "
        "ones), so that the parameter all-gather waits for the mean rank, not the unluckiest "
        "(off: every drifted side at once; batched engine, refresh before the update)",
        flag="no-refresh-balance",
    )
    refresh_wave: float = option(
        1.0,
        "memory of a basis refresh: refresh the sides in waves whose new bases and QR "
        "temporaries fit this multiple of the largest shape class's gradient stack, one host "
        "read per wave, at least one block each (0: every side at once, one host read; "
        "batched engine)",
    )
    max_precond_dim: int = option(
        10000, "dimensions larger than this get no rotation (identity basis)"
    )
    precondition_1d: bool = option(False, "also precondition vectors (their one factor)")
    correct_bias: bool = option(True, "turn off Adam bias correction", flag="no-bias-correction")
    normalization: str = option(
        "adam",
        "the step's normalisation in the eigenbasis: adam, m / (sqrt(v) + eps) (SOAP); sign, "
        "sign(m) at the step size lr (SPlus's instant sign normalisation, Frans et al. 2025)",
        choices=NORMALIZATIONS,
    )
    update_rms: float = option(
        1.0,
        "scale each block's preconditioned update to this RMS before the step size lr, as "
        "Muon's spectral scale makes an orthogonal update's RMS 1 (0: off, Adam's own scale)",
    )
    nesterov: bool = option(
        False,
        "Nesterov's momentum in the eigenbasis (Dozat 2016, NAdam; as Muon's default): the step "
        "takes beta1 m + (1 - beta1) rot(G) in place of m",
    )
    refresh_method: str = option(
        "qr",
        "basis refresh: one power-iteration step + QR (qr) or a full eigh",
        choices=REFRESH_METHODS,
    )
    factor_estimator: str = option(
        "shampoo",
        "Kronecker factor estimate: Shampoo's L = E[G G^T], R = E[G^T G] (shampoo) or "
        "KL-Shampoo's L = E[G R^-1 G^T]/n, R = E[G^T L^-1 G]/m (kl; Lin et al. 2025), the "
        "inverses from the current bases and diag(Q^T F Q) floored by kl_damping",
        choices=FACTOR_ESTIMATORS,
    )
    kl_damping: float = option(
        1e-5,
        "KL-Shampoo: eigenvalue estimates below this fraction of the largest (or below eps) "
        "are raised to it before inverting; 0 clamps at eps only, as emerging-optimizers does",
    )
    correct_factor_bias: bool = option(
        False,
        "bias-correct the factors' EMA (factor beta 1-(1-b)/(1-b^k) at the k-th update); "
        "scales Shampoo's factors only, changes KL-Shampoo's weighting",
    )
    first_step_update: bool = option(
        False,
        "update the weights at the first step too (its bases from that step's factors), as "
        "Megatron's SOAP, instead of a statistics-only first step (unstable with "
        "refresh_first on small batches: see README)",
    )
    refresh_first: bool = option(
        True,
        "refresh the bases after the step's moment update, as the SOAP reference (default: "
        "update the factors and refresh before it, so the step's gradient is rotated by bases "
        "that include it, as Megatron's SOAP; one more rotation on refresh steps)",
        flag="no-refresh-first",
    )
    # Engine, not math: True runs blocks of equal shape as stacked batches (core/batched.py),
    # False one block at a time (core/soap.py); same results to rounding (owner-sharded ==
    # replicated and resume stay bitwise: tests/test_megatron_dp.py, tests/test_resume.py).
    batched: bool = option(
        True,
        "run SOAP blocks one at a time (core/soap.py) instead of as stacked batches of equal "
        "shape (same results to rounding)",
        flag="no-batched",
    )

    # Engine, not math: the fold's and the step's elementwise chains as torch.compile'd kernels
    # (core/fused.py); results agree with the eager chains to rounding (tests/test_compiled.py).
    compile: bool = option(
        False,
        "run the fold's and the step's elementwise chains as torch.compile'd kernels (inductor: "
        "C++/OpenMP on CPU, Triton on GPUs; one compile per shape class and chain, seconds each) "
        "instead of eager ops (same results to rounding)",
    )

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0.0)
        if not isinstance(self.betas, Sequence) or len(self.betas) != 2:
            _fail("betas", "a pair (beta1, beta2)", self.betas)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        check_range("betas[0]", self.betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", self.betas[1], 0.0, 1.0, high_open=True)
        if self.shampoo_beta is not None:
            check_range("shampoo_beta", self.shampoo_beta, 0.0, 1.0, high_open=True)
        check_range("eps", self.eps, 0.0, low_open=True)
        check_range("update_rms", self.update_rms, 0.0)  # refuses inf and nan too
        check_range("weight_decay", self.weight_decay, 0.0)
        check_int("precondition_frequency", self.precondition_frequency, 1)
        check_range("refresh_tolerance", self.refresh_tolerance, 0.0, 1.0, high_open=True)
        check_range("refresh_budget", self.refresh_budget, 0.0, 1.0, low_open=True)
        check_range("refresh_wave", self.refresh_wave, 0.0)
        check_int("max_precond_dim", self.max_precond_dim, 1)
        for name in (
            "precondition_1d",
            "correct_bias",
            "nesterov",
            "batched",
            "compile",
            "correct_factor_bias",
            "first_step_update",
            "refresh_first",
            "refresh_balance",
        ):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if self.normalization not in NORMALIZATIONS:
            _fail("normalization", f"one of {NORMALIZATIONS}", self.normalization)
        if self.refresh_method not in REFRESH_METHODS:
            _fail("refresh_method", f"one of {REFRESH_METHODS}", self.refresh_method)
        check_range("kl_damping", self.kl_damping, 0.0, 1.0)
        if self.factor_estimator not in FACTOR_ESTIMATORS:
            _fail("factor_estimator", f"one of {FACTOR_ESTIMATORS}", self.factor_estimator)
        if self.refresh_budget < 1.0 and self.refresh_tolerance <= 0.0:
            _fail(
                "refresh_budget",
                "1 without the drift gate (it caps the gate's refreshes: set "
                "refresh_tolerance > 0, or leave refresh_budget at 1)",
                self.refresh_budget,
            )
        if self.refresh_budget < 1.0 and not self.batched:
            _fail(
                "refresh_budget",
                "1 with the per-block engine (it ranks the sides of every block at once: "
                "use batched=True, or leave refresh_budget at 1)",
                self.refresh_budget,
            )

    @property
    def factor_beta(self) -> float:
        """EMA coefficient of the Kronecker factors (shampoo_beta, defaulting to beta2)."""
        return self.betas[1] if self.shampoo_beta is None else float(self.shampoo_beta)

    def factor_beta_at(self, count: int) -> float:
        """EMA coefficient of the ``count``-th factor update (1-based), bias-corrected if asked."""
        beta = self.factor_beta
        if not self.correct_factor_bias:
            return beta
        return 1.0 - (1.0 - beta) / (1.0 - beta**count)

    def factor_count(self, step: int, initialized: bool) -> int:
        """1-based index of the factor update of the step that starts from this state.

        Every step updates the factors once; the statistics-only first step
        (``first_step_update=False``) leaves ``step`` at 0, the updating one counts as 1.
        """
        if not initialized:
            return 1
        return step + (1 if self.first_step_update else 2)


FOLD_STRUCTURES = ("chain", "tree", "last")
STEP_SIZES = ("none", "eta_star")
STATISTICS_SOURCES = ("folded", "mean")


@dataclass(frozen=True)
class FoldingConfig:
    """Multi-level gradient folding with Fisher-orthogonal projection (FOP) between levels.

    ``accumulation_steps`` is K, the number of micro-steps per optimizer step. A *level* is a
    run of consecutive micro-steps whose DP-reduced mean gradient enters the folding as one
    estimate; level ends are the gradient sync points. ``enabled=False`` (the default) gives
    the plain mean of the K micro-gradients (plain SOAP): on the digits main job folding added
    nothing beyond the seed spread over the same SOAP in any cell measured, at +19% step time
    (``benchmarks/RESULTS.md``), so it is opt-in: ``enabled=True`` (``--mlfop-folding``). The
    options below take effect only with ``enabled=True``.

    One fold of two estimates z (earlier micro-steps, n_z of them) and h (later, n_h) under
    the SOAP metric M (``core/fop.py``): a = (n_z z + n_h h)/(n_z + n_h), d = z - h,
    s = <d, M a>/(<a, M a> + fop_eps), d_perp = d - s a,
    beta = <a, M^-1 d_perp>/(<d_perp, M^-1 d_perp> + fop_eps), result a + beta d_perp.
    ``a`` is FOP's g_avg of that fold: the count-weighted plain mean of the two estimates.

    ``structure`` (which estimates are folded):
      * ``"chain"`` (default, the first version): z_0 = level 0, z_j = FOP(z_{j-1}, h_j)
        over the levels given by ``boundaries`` (None: dyadic 1, 2, 4, ..., K; cumulative
        counts, starting at 1). log2(K)+1 sync points.
      * ``"tree"``: balanced binary folding of the levels (the leaves). Every micro-step is a
        leaf unless ``boundaries`` (any strictly increasing counts ending at K) coarsen them.
        Leaves are pushed on a stack; whenever the two top estimates cover equally many
        micro-steps they are folded (a binary counter), and the last leaf folds the rest
        from the top down. For K = 2^n leaves of equal size every fold joins two equal halves
        folded at the same depth and the last fold is FOP's own half-vs-half split; at most
        log2(K)+1 estimates are live. K sync points (one per leaf).
      * ``"last"``: FOP proper, one fold of the plain means of micro-steps 1..floor(K/2) and
        floor(K/2)+1..K; 2 sync points. ``boundaries`` must be None.
      At K=2 all three are the same single fold.

    ``step_size``: ``"none"`` (default) or ``"eta_star"``, FOP's per-block step size (Eqs.
    17-18) eta* = <g_avg, M^-1 g_comb>/<g_comb, M^-1 g_comb>, multiplying the block's
    preconditioned update direction unrot(m/(sqrt(v)+eps)) (not its weight decay). g_comb is
    the window's folded gradient; g_avg is the plain mean of the whole window, and M the
    window's fold metric (the previous step's). eta* is computed once, after the final fold,
    not per fold: with one fold (``"last"``, or any structure at K=2) g_avg is that fold's
    ``a`` and eta* comes from the fold's inner products; with several folds (chain, tree) it
    is taken against a running plain mean, the least-squares scale that best matches the
    update to the plain-mean natural-gradient step (one extra buffer per block, rotated
    coordinates). A block with <g_comb, M^-1 g_comb> = 0 keeps eta* = 1; a window without a
    fold (K=1) is not scaled.

    ``statistics_from``: ``"folded"`` (default, the first version: the folded gradient feeds
    all of SOAP's state) or ``"mean"``: SOAP's second moment v and Kronecker factors L, R
    (hence the bases) are fed the plain window mean, while the first moment m takes the
    folded gradient. In FOP the curvature F (damped KFAC factors; here L, R and v) never sees
    g_comb, and g_comb enters only the update; SOAP's update direction is m/(sqrt(v)+eps), so
    m is part of the update: fed the plain mean, the FOP combination would not reach the
    update at all. Costs two extra buffers per block (plain mean, original and rotated).

    ``beta_max``: clip |beta| <= beta_max; None or inf: no clipping (as published).
    ``parallel_tol``: when |d_perp|_{M^-1} <= parallel_tol |d|_{M^-1} (d numerically parallel
    to a, so d_perp is rounding noise) beta is set to 0; None: 10 sqrt(eps of the dtype);
    0: only an exactly-zero d_perp (the published formula).
    ``fop_eps``: added to the denominators of s and beta.
    """

    enabled: bool = option(
        False,
        "multi-level FOP folding of the accumulated micro-batch gradients (off by default: "
        "plain SOAP on the mean gradient; folding added nothing measured on the digits main "
        "job, benchmarks/RESULTS.md)",
        flag="folding",
    )
    accumulation_steps: int = field(default=1, metadata=NO_FLAG)  # Megatron: micro-batches
    boundaries: tuple[int, ...] | None = option(
        None,
        "level boundaries in micro-batches, e.g. 1,2,4,8; must end at the number of "
        "micro-batches per step (default: dyadic 1,2,4,...)",
        flag="levels",
    )
    structure: str = option(
        "chain",
        "chain: fold each level into the running estimate; tree: balanced binary folds of "
        "equal halves; last: one half-vs-half fold (FOP as published)",
        flag="fold-structure",
        choices=FOLD_STRUCTURES,
    )
    step_size: str = option(
        "none",
        "eta_star: FOP's per-block step size <g_avg, M^-1 g_comb>/<g_comb, M^-1 g_comb> on the "
        "preconditioned direction; none: no scaling",
        choices=STEP_SIZES,
    )
    statistics_from: str = option(
        "folded",
        "which gradient feeds SOAP's second moment and Kronecker factors: the folded one, or "
        "the plain window mean (FOP: the curvature never sees g_comb)",
        choices=STATISTICS_SOURCES,
    )
    project: bool = option(
        True, "ablation: fold without the Fisher-orthogonal projection", flag="no-projection"
    )
    fixed_beta: float | None = option(
        None, "ablation: use this fold coefficient instead of the adaptive one"
    )
    beta_max: float | None = option(1.0, "clip |beta| to this value ('none' disables the clip)")
    fop_eps: float = option(1e-30, "added to the denominators of the FOP coefficients")
    parallel_tol: float | None = option(
        None, "beta = 0 when |d_perp| <= tol |d| in the M^-1 norm ('none': dtype-based)"
    )
    diagnostics: bool = option(
        True,
        "skip the per-level fold diagnostics (and their 3 inner products per fold)",
        flag="no-diagnostics",
    )

    def __post_init__(self) -> None:
        for name in ("enabled", "project", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        k = check_int("accumulation_steps", self.accumulation_steps, 1)
        for name, allowed in (
            ("structure", FOLD_STRUCTURES),
            ("step_size", STEP_SIZES),
            ("statistics_from", STATISTICS_SOURCES),
        ):
            if getattr(self, name) not in allowed:
                _fail(name, f"one of {allowed}", getattr(self, name))
        if self.boundaries is not None:
            b = tuple(self.boundaries)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in b) or not b:
                _fail("boundaries", "a non-empty sequence of integers", self.boundaries)
            if self.structure == "last":
                _fail("boundaries", "None with structure='last' (halves K/2, K)", b)
            if self.structure == "chain" and b[0] != 1:
                _fail("boundaries", "a sequence starting at 1 (the first micro-step)", b)
            if b[0] < 1:
                _fail("boundaries", "a sequence of counts >= 1", b)
            if any(y <= x for x, y in zip(b, b[1:])):
                _fail("boundaries", "strictly increasing", b)
            if b[-1] != k:
                _fail("boundaries", f"a sequence ending at accumulation_steps={k}", b)
            object.__setattr__(self, "boundaries", b)
        if self.fixed_beta is not None:
            check_range("fixed_beta", self.fixed_beta)
        if self.beta_max is not None:
            bm = _check_real("beta_max", self.beta_max)
            if math.isinf(bm) and bm > 0:
                object.__setattr__(self, "beta_max", None)  # inf: no clipping
            else:
                check_range("beta_max", self.beta_max, 0.0, low_open=True)
        check_range("fop_eps", self.fop_eps, 0.0)
        if self.parallel_tol is not None:
            check_range("parallel_tol", self.parallel_tol, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ShardingConfig:
    """Where SOAP state lives: the layout options of ``get_mlfop_optimizer``."""

    sharded: bool = option(
        True,
        "keep the full SOAP state on every data-parallel rank instead of sharding it",
        flag="replicated-state",
    )
    block_size: int | None = option(
        None, "split matrices into blocks of at most this many rows/cols (default: whole matrices)"
    )
    tp_mode: str = option(
        "blockwise",
        "blockwise: precondition each TP shard; full: gather whole matrices",
        choices=TP_MODES,
    )
    shard_adam: bool = option(
        True,
        "keep the AdamW state and fp32 main weights of the non-matrix params (embeddings, "
        "output layer, norms, biases) on every data-parallel rank instead of sharding them "
        "(ZeRO-1)",
        flag="replicated-adam",
    )
    position_embeddings: str = option(
        "adam",
        "learned absolute position embeddings: 'adam', or 'soap' as Megatron's SOAP and Muon "
        "take them (every 2-D param but the word embeddings and the output layer)",
        choices=POSITION_EMBEDDINGS,
    )

    def __post_init__(self) -> None:
        for name in ("sharded", "shard_adam"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if self.position_embeddings not in POSITION_EMBEDDINGS:
            _fail("position_embeddings", f"one of {POSITION_EMBEDDINGS}", self.position_embeddings)
        if self.block_size is not None:
            check_int("block_size", self.block_size, 1)
        if self.tp_mode not in TP_MODES:
            _fail("tp_mode", f"one of {TP_MODES}", self.tp_mode)


@dataclass(frozen=True)
class MLFOPConfig:
    """Complete optimizer configuration: SOAP preconditioner + folding."""

    soap: SOAPConfig = field(default_factory=SOAPConfig)
    folding: FoldingConfig = field(default_factory=FoldingConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.soap, SOAPConfig):
            _fail("soap", "a SOAPConfig", self.soap)
        if not isinstance(self.folding, FoldingConfig):
            _fail("folding", "a FoldingConfig", self.folding)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> MLFOPConfig:
        """Build from flat keyword arguments (SOAP and folding names); unknown names fail."""
        soap_names = {f.name for f in fields(SOAPConfig)}
        fold_names = {f.name for f in fields(FoldingConfig)}
        unknown = set(kwargs) - soap_names - fold_names
        if unknown:
            raise ValueError(
                f"unknown ML-FOP-SOAP option(s) {sorted(unknown)}; known options are "
                f"{sorted(soap_names | fold_names)}"
            )
        soap = SOAPConfig(**{k: v for k, v in kwargs.items() if k in soap_names})
        fold = FoldingConfig(**{k: v for k, v in kwargs.items() if k in fold_names})
        return cls(soap=soap, folding=fold)

    def with_soap(self, **changes: Any) -> MLFOPConfig:
        """Return a copy with SOAP options replaced (validated)."""
        return replace(self, soap=replace(self.soap, **changes))
