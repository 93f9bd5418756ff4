"""Multi-level folding of one accumulation window (K micro-steps) into a single gradient.

Level 0 covers micro-steps 1..L_0; level j >= 1 covers L_{j-1}+1 .. L_j. Each level's mean
gradient is pushed on a stack of estimates and the schedule's fold plan (``core/levels.py``:
chain, tree or last) says which two top entries are folded by FOP, weighted by how many
micro-steps each covers. Chain: the running estimate z absorbs each level h_j with weights
(L_{j-1}, L_j - L_{j-1}). The metric (and basis) is the one from the previous optimizer step,
fixed for the window; the metric is computed at its first read (:class:`WindowMetric`), so a
window that never folds (folding off) and arms no diagnostics never holds it. With folding off
there is a single level and the result is the plain mean, bitwise.

Where the options need it (``statistics_from="mean"``, or ``step_size="eta_star"`` with more
than one fold) the folder also keeps the plain window mean as a running sum of level sums, in
original and/or rotated coordinates (adds only, no extra rotation). eta* is computed once per
window after the final fold (see ``FoldingConfig``); nothing here syncs with the host.
This module knows nothing about torch.distributed: callers pass level means that are already
reduced across data-parallel ranks, and a ``reduce_fn`` for tensor-parallel inner products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypedDict, cast, overload

import torch

from mlfop_megatron.config import FoldingConfig, SOAPConfig
from mlfop_megatron.core.fop import (
    AA,
    AD,
    DD,
    FoldCoefficients,
    ReduceFn,
    apply_fold,
    eta_star,
    fold_coefficients,
)
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.core.soap import State, metric_diag

RotateFn = Callable[[torch.Tensor], torch.Tensor]

# Packing of one fold's diagnostics for cross-rank reductions (``LevelDiagnostics``):
# totals() = [aa, ad, dd, sum s, sum beta, blocks, sum cz, sum ch] (SUM-reduced),
# extremes() = [max beta, -min beta, max s, -min s] (MAX-reduced).
TOTALS_WIDTH = 8
EXTREMES_WIDTH = 4
_BLOCKS = 5  # index of the folded-block count in totals()


def empty_totals(device: torch.device) -> torch.Tensor:
    """Zero ``totals()`` of a fold (fp64), to sum ranks' and engines' totals into."""
    return torch.zeros(TOTALS_WIDTH, dtype=torch.float64, device=device)


def empty_extremes(device: torch.device) -> torch.Tensor:
    """``extremes()`` of a fold without blocks (-inf, fp64), to max-reduce into."""
    return torch.full((EXTREMES_WIDTH,), -math.inf, dtype=torch.float64, device=device)


@dataclass
class LevelDiagnostics:
    """Per-block scalars of one fold (tensors of length num_blocks)."""

    level: int
    n_z: int
    n_h: int
    s: torch.Tensor
    beta: torch.Tensor
    sums: torch.Tensor
    fold: int = 0  # index in the schedule's fold plan (tree runs several folds per level)
    cz: torch.Tensor | None = None  # fold coefficients: z_new = cz z + ch h (per block)
    ch: torch.Tensor | None = None

    def totals(self) -> torch.Tensor:
        """Additive totals [aa, ad, dd, sum s, sum beta, blocks, sum cz, sum ch].

        Sum these across ranks.
        """
        total = self.sums.sum(dim=0)
        zero = total.new_zeros(())
        return torch.stack(
            [
                total[AA],
                total[AD],
                total[DD],
                self.s.sum(),
                self.beta.sum(),
                torch.tensor(float(self.s.numel()), dtype=total.dtype, device=total.device),
                zero if self.cz is None else self.cz.sum().to(total.dtype),
                zero if self.ch is None else self.ch.sum().to(total.dtype),
            ]
        )

    def extremes(self) -> torch.Tensor:
        """[max beta, -min beta, max s, -min s] over blocks.

        Max-reduce these across ranks; -inf without blocks.
        """
        if not self.s.numel():
            return empty_extremes(self.s.device)
        beta, s = self.beta.to(torch.float64), self.s.to(torch.float64)
        return torch.stack([beta.max(), -beta.min(), s.max(), -s.min()])

    def summary(self) -> dict[str, float]:
        """``summarize_level`` of this fold plus the beta and s extremes (this rank's blocks)."""
        return summarize_fold(
            self.level, self.totals(), self.extremes(), self.n_z, self.n_h, self.fold
        )


def folded_blocks(totals: torch.Tensor) -> float:
    """How many blocks were folded, from (summed) ``LevelDiagnostics.totals()``."""
    return float(totals[_BLOCKS])


def summarize_fold(
    level: int,
    totals: torch.Tensor,
    extremes: torch.Tensor,
    n_z: int,
    n_h: int,
    fold: int | None = None,
) -> dict[str, float]:
    """``summarize_level`` of (reduced) totals plus the beta and s ranges of ``extremes``."""
    out = summarize_level(level, totals, n_z, n_h, fold)
    high_beta, low_beta, high_s, low_s = (float(x) for x in extremes)
    out.update(beta_max=high_beta, beta_min=-low_beta, s_max=high_s, s_min=-low_s)
    return out


def summarize_level(
    level: int, totals: torch.Tensor, n_z: int, n_h: int, fold: int | None = None
) -> dict[str, float]:
    """Diagnostics of one fold over all blocks, as if they were one concatenated vector.

    cosine_before: cos(z, h), the two estimates being folded (with modality-ordered
    micro-batches, the inter-modality gradient cosine); cosine_after: cos(a, d_perp) after the
    projection; ratio: ||d|| / ||a||; s_mean and beta_mean: means over blocks.
    ``totals``: ``LevelDiagnostics.totals()`` summed over blocks and ranks (the first six
    entries; cz_mean and ch_mean when the last two are present).
    """
    values = [float(x) for x in totals]
    aa, ad, dd, s_sum, beta_sum, blocks = values[:6]
    wz, wh = n_z / (n_z + n_h), n_h / (n_z + n_h)
    zh = aa + (wh - wz) * ad - wz * wh * dd
    zz = aa + 2 * wh * ad + wh * wh * dd
    hh = aa - 2 * wz * ad + wz * wz * dd
    s_mean = s_sum / max(blocks, 1.0)
    a_dp = ad - s_mean * aa  # <a, d - s a> with the mean s (exact when one block)
    dp_dp = max(dd - 2 * s_mean * ad + s_mean * s_mean * aa, 0.0)
    out = {
        "level": float(level),
        "s_mean": s_mean,
        "beta_mean": beta_sum / max(blocks, 1.0),
        "ratio": (dd / aa) ** 0.5 if aa > 0 else float("inf"),
        "cosine_before": zh / max((zz * hh) ** 0.5, 1e-300),
        "cosine_after": a_dp / max((aa * dp_dp) ** 0.5, 1e-300),
    }
    if len(values) >= 8:
        out["cz_mean"] = values[6] / max(blocks, 1.0)
        out["ch_mean"] = values[7] / max(blocks, 1.0)
    if fold is not None:
        out["fold"] = float(fold)
    return out


class BlockStepArgs(TypedDict):
    """The ``soap_step`` keyword arguments of one block beyond its gradient."""

    grad_rot: torch.Tensor | None
    stats_grad: torch.Tensor | None
    stats_grad_rot: torch.Tensor | None
    direction_scale: torch.Tensor | None


class WindowMetric(Sequence[torch.Tensor | None]):
    """The SOAP metric diagonals of a window's start state, computed at their first read.

    ``compute``: the diagonals (one per block, or per shape class) from the current state;
    ``version``: host values that change with every optimizer step of that state (step counts,
    initialized flags), taken when the window starts; ``count``: how many diagonals (``len``
    reads no tensor). The first read computes and caches them; a window that is never folded
    and arms no diagnostics never allocates them (S bytes per rank).
    """

    def __init__(
        self,
        compute: Callable[[], list[torch.Tensor | None]],
        version: Callable[[], Hashable],
        count: int,
    ) -> None:
        self._compute = compute
        self._version = version
        self._start = version()
        self._count = count
        self._value: list[torch.Tensor | None] | None = None

    @classmethod
    def of_states(cls, states: Sequence[State], cfgs: Sequence[SOAPConfig]) -> WindowMetric:
        """Per-block ``soap.metric_diag`` of ``states`` (one config each)."""
        states, cfgs = list(states), list(cfgs)

        def version() -> tuple[tuple[int, bool], ...]:
            return tuple((int(s.get("step", 0)), bool(s.get("initialized", False))) for s in states)

        return cls(lambda: [metric_diag(s, c) for s, c in zip(states, cfgs)], version, len(states))

    @property
    def computed(self) -> bool:
        """Whether the diagonals were read (hence computed) in this window."""
        return self._value is not None

    def check_unchanged(self) -> None:
        """Raise if an optimizer step changed the state since the window started."""
        # Invariant: v and step change only in the optimizer step, which follows every read.
        if self._version() != self._start:
            raise RuntimeError(
                "the window's SOAP metric was first read after an optimizer step changed "
                "the state: read it before the step (folds, grad diagnostics)"
            )

    def values(self) -> list[torch.Tensor | None]:
        """The diagonals (computed at the first call, then cached)."""
        if self._value is None:
            self.check_unchanged()
            value = self._compute()
            if len(value) != self._count:
                raise ValueError(f"expected {self._count} metric diagonals, got {len(value)}")
            self._value = value
        return self._value

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> torch.Tensor | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor | None]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | None | list[torch.Tensor | None]:
        return self.values()[i]

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter(self.values())


@dataclass
class WindowOutput:
    """What the SOAP step of each block takes from a completed window.

    grads / grads_rot: the folded gradient g_comb (rotated form None where not computed);
    stats_grads / stats_grads_rot: the plain window mean feeding v, L and R when
    ``statistics_from="mean"`` (None: the statistics take g_comb); eta: per-block eta* [n]
    when ``step_size="eta_star"`` and the window folded (None: no scaling).
    """

    grads: list[torch.Tensor]
    grads_rot: list[torch.Tensor | None]
    stats_grads: list[torch.Tensor] | None = None
    stats_grads_rot: list[torch.Tensor | None] | None = None
    eta: torch.Tensor | None = None

    def block(self, i: int) -> BlockStepArgs:
        """soap_step keyword arguments of block i (beyond grad)."""
        return {
            "grad_rot": self.grads_rot[i],
            "stats_grad": None if self.stats_grads is None else self.stats_grads[i],
            "stats_grad_rot": None if self.stats_grads_rot is None else self.stats_grads_rot[i],
            "direction_scale": None if self.eta is None else self.eta[i],
        }

    def scale_(self, factor: float) -> None:
        """Multiply every gradient by ``factor`` in place (gradient clipping).

        eta* is invariant.
        """
        for group in (self.grads, self.grads_rot, self.stats_grads, self.stats_grads_rot):
            for g in group or ():
                if g is not None:
                    g.mul_(factor)


@dataclass
class StackEntry:
    """An estimate on the fold stack: tensors (per block or per class) over ``size`` steps."""

    size: int
    grads: list[torch.Tensor]
    rot: list[torch.Tensor | None]


class FoldStack:
    """The fold stack of one window, shared by :class:`WindowFolder` and the batched folder.

    Subclasses (dataclasses) hold ``schedule``, ``cfg``, ``micro_steps``, ``diagnostics`` and
    ``eta``, call :meth:`_init_stack` from ``__post_init__``, and give ``num_blocks``,
    :meth:`_fold_pair` (the FOP fold of two entries) and :meth:`_eta_against_plain_mean`.
    An entry's tensors are whatever the subclass folds (per block or per shape class).
    """

    schedule: LevelSchedule
    cfg: FoldingConfig
    micro_steps: int
    diagnostics: list[LevelDiagnostics]
    eta: torch.Tensor | None

    def _init_stack(self) -> None:
        self._stack: list[StackEntry] = []
        folds = self.schedule.num_folds
        mean_stats = self.cfg.statistics_from == "mean" and folds > 0
        eta = self.cfg.step_size == "eta_star" and folds > 0
        self._eta_from_fold = eta and folds == 1  # that fold's a is the window mean
        self._plain_orig = mean_stats
        self._plain_rot = mean_stats or (eta and folds > 1)
        self._plain: list[torch.Tensor] | None = None
        self._plain_r: list[torch.Tensor] | None = None

    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        raise NotImplementedError

    @property
    def complete(self) -> bool:
        """Whether the window holds all its micro-steps."""
        return self.micro_steps == self.schedule.accumulation_steps

    def _check_micro_step(self, num_grads: int) -> None:
        """Refuse a micro-step with the wrong gradient count or beyond the window."""
        if num_grads != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} gradients, got {num_grads}")
        if self.complete:
            raise ValueError(
                f"more than accumulation_steps={self.schedule.accumulation_steps} micro-steps "
                "in one window; call step() after the last micro-step"
            )

    def _check_done(self) -> None:
        if not self.complete:
            raise ValueError(
                f"the window has {self.micro_steps} micro-steps but accumulation_steps="
                f"{self.schedule.accumulation_steps}; call accumulate() once per micro-batch"
            )

    def _fold_pair(self, z: StackEntry, h: StackEntry, with_eta: bool) -> FoldCoefficients:
        """Fold ``h`` into ``z`` in place (both forms); the fold's coefficients."""
        raise NotImplementedError

    def _eta_against_plain_mean(self) -> torch.Tensor:
        raise NotImplementedError

    def _push_level(
        self,
        level: int,
        means: list[torch.Tensor],
        rotate_fns: Sequence[RotateFn],
    ) -> StackEntry | None:
        """Push a level's means (taken over) and run its folds; the top entry after the last."""
        size = self.schedule.level_size(level)
        rots: list[torch.Tensor | None]
        if self.schedule.num_folds:
            rots = []
            for rot, mean in zip(rotate_fns, means):
                rotated = rot(mean)
                # An identity rotation returns its input; the two estimates must not alias.
                rots.append(rotated.clone() if rotated is mean else rotated)
        else:
            rots = [None] * len(means)
        self._add_plain(means, rots, size)
        self._stack.append(StackEntry(size, means, rots))
        for fold in self.schedule.folds_at(level):
            h, z = self._stack.pop(), self._stack.pop()
            if (z.size, h.size) != (fold.n_z, fold.n_h):  # the plan and the stack disagree
                raise RuntimeError(f"fold {fold} met estimates of {z.size} and {h.size} steps")
            with_eta = self._eta_from_fold and fold.index == self.schedule.num_folds - 1
            coef = self._fold_pair(z, h, with_eta)
            if with_eta:
                self.eta = coef.eta
            if self.cfg.diagnostics:
                self.diagnostics.append(
                    LevelDiagnostics(
                        level,
                        z.size,
                        h.size,
                        coef.s,
                        coef.beta,
                        coef.sums,
                        fold.index,
                        coef.cz,
                        coef.ch,
                    )
                )
            self._stack.append(StackEntry(z.size + h.size, z.grads, z.rot))
        if level != self.schedule.num_levels - 1:
            return None
        (top,) = self._stack
        return top

    def _finish_window(self) -> None:
        """After the last level (the estimate set): the plain mean and eta* against it."""
        self._finish_plain()
        if self.cfg.step_size == "eta_star" and self.schedule.num_folds > 1:
            self.eta = self._eta_against_plain_mean()

    def _add_plain(
        self, means: list[torch.Tensor], rots: list[torch.Tensor | None], size: int
    ) -> None:
        """Running sums of level sums (size x level mean) for the plain window mean."""
        for flag, attr, new in (
            (self._plain_orig, "_plain", means),
            # _plain_rot implies num_folds > 0: every rotated form was computed.
            (self._plain_rot, "_plain_r", cast(list[torch.Tensor], rots)),
        ):
            if not flag:
                continue
            current = getattr(self, attr)
            if current is None:
                setattr(self, attr, [x.mul(size) for x in new])
            else:
                for acc, x in zip(current, new):
                    acc.add_(x, alpha=size)

    def _finish_plain(self) -> None:
        k = self.schedule.accumulation_steps
        for sums in (self._plain, self._plain_r):
            for x in sums or ():
                x.div_(k)


@dataclass
class WindowFolder(FoldStack):
    """Accumulates and folds the micro-step gradients of one window for a list of blocks.

    ``metric_diags``: one metric diagonal per block (None: M = I), read by the folds and the
    grad-group diagnostics; a :class:`WindowMetric` computes them at the first such read.
    """

    schedule: LevelSchedule
    cfg: FoldingConfig
    rotate_fns: Sequence[RotateFn]
    metric_diags: Sequence[torch.Tensor | None]
    reduce_fn: ReduceFn | None = None
    micro_steps: int = 0
    level_sums: list[torch.Tensor | None] = field(default_factory=list)
    estimate: list[torch.Tensor | None] = field(default_factory=list)
    estimate_rot: list[torch.Tensor | None] = field(default_factory=list)
    diagnostics: list[LevelDiagnostics] = field(default_factory=list)
    finite: torch.Tensor | None = None
    eta: torch.Tensor | None = None  # eta* per block once the window is folded (eta_star)

    def __post_init__(self) -> None:
        n = len(self.rotate_fns)
        if len(self.metric_diags) != n:
            raise ValueError("WindowFolder needs one metric diagonal per block")
        self.level_sums = [None] * n
        self.estimate = [None] * n
        self.estimate_rot = [None] * n
        self._init_stack()

    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        return len(self.rotate_fns)

    def add_micro_step(self, grads: Sequence[torch.Tensor]) -> None:
        """Add one micro-step's gradients (one per block); folds when a level ends."""
        self._check_micro_step(len(grads))
        flags = []
        for i, g in enumerate(grads):
            flags.append(torch.isfinite(g).all())
            current = self.level_sums[i]
            if current is None:
                self.level_sums[i] = g.detach().clone()
            else:
                current.add_(g)
        step_finite = torch.stack(flags).all()
        self.finite = step_finite if self.finite is None else self.finite & step_finite
        self.micro_steps += 1
        level = self.schedule.level_ending_at(self.micro_steps)
        if level is not None:
            size = self.schedule.level_size(level)
            means: list[torch.Tensor] = []
            for i in range(self.num_blocks):
                mean = self.level_sums[i]
                assert mean is not None  # every block's sum was set by this micro-step
                mean.div_(size)
                means.append(mean)
                self.level_sums[i] = None
            self.fold_level(level, means)

    def fold_level(self, level: int, level_means: Sequence[torch.Tensor]) -> None:
        """Fold a completed level's mean gradients (taken over by the folder, not copied).

        Callers that reduce level sums themselves (the Megatron DDP path) call this directly;
        the window then counts the level's micro-steps as done.
        """
        self._fold(level, level_means)
        self.micro_steps = self.schedule.boundaries[level]

    def _fold(self, level: int, level_means: Sequence[torch.Tensor]) -> None:
        if not self.num_blocks:  # a rank that owns no block still walks the schedule
            return
        top = self._push_level(level, list(level_means), self.rotate_fns)
        if top is not None:
            self.estimate = cast(list[torch.Tensor | None], top.grads)
            self.estimate_rot = top.rot
            self._finish_window()

    def _fold_pair(self, z: StackEntry, h: StackEntry, with_eta: bool) -> FoldCoefficients:
        """Fold ``h`` into ``z`` in place (both forms); the fold's coefficients."""
        # Folds exist only when num_folds > 0, so every rotated form was computed.
        z_rot, h_rot = cast(list[torch.Tensor], z.rot), cast(list[torch.Tensor], h.rot)
        coef: FoldCoefficients = fold_coefficients(
            z_rot,
            h_rot,
            self.metric_diags,
            z.size,
            h.size,
            self.cfg,
            self.reduce_fn,
            with_eta=with_eta,
        )
        for i in range(self.num_blocks):
            apply_fold(z.grads[i], h.grads[i], coef.cz[i], coef.ch[i])
            apply_fold(z_rot[i], h_rot[i], coef.cz[i], coef.ch[i])
        return coef

    def _eta_against_plain_mean(self) -> torch.Tensor:
        """eta* = <g_mean, M^-1 g_comb> / <g_comb, M^-1 g_comb> per block (several folds)."""
        assert self._plain_r is not None  # kept whenever eta* needs it (several folds)
        comb_rots = cast(list[torch.Tensor], self.estimate_rot)  # set: the window folded
        rows = []
        for mean_r, comb_r, diag in zip(self._plain_r, comb_rots, self.metric_diags):
            mi_comb = comb_r if diag is None else comb_r / diag
            rows.append(
                torch.stack(
                    [
                        torch.dot(mean_r.reshape(-1), mi_comb.reshape(-1)),
                        torch.dot(comb_r.reshape(-1), mi_comb.reshape(-1)),
                    ]
                ).to(torch.float64)
            )
        sums = torch.stack(rows)
        if self.reduce_fn is not None:
            sums = self.reduce_fn(sums)
        return eta_star(sums[:, 0], sums[:, 1])

    def output(self) -> WindowOutput:
        """Everything the SOAP step takes from the window (see :class:`WindowOutput`)."""
        grads, grads_rot = self.result()
        if self._plain_orig and self.num_blocks:
            assert self._plain is not None and self._plain_r is not None  # set by every level
            return WindowOutput(grads, grads_rot, list(self._plain), list(self._plain_r), self.eta)
        return WindowOutput(grads, grads_rot, eta=self.eta)

    def result(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The folded gradient per block and its rotated form (None where not computed)."""
        self._check_done()
        # Complete: the last level set every block's estimate.
        return list(cast(list[torch.Tensor], self.estimate)), list(self.estimate_rot)
