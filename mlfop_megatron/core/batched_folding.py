"""Multi-level folding of one window on shape-class stacks (``folding.WindowFolder`` batched).

Same schedule, same estimates and the same FOP scalars as :class:`WindowFolder`, but every
estimate is a list of per-class [B, r, c] stacks of a :class:`BatchedBlocks` engine: a level
costs one rotation (batched matmul) per class, the FOP inner products are per-block reductions
of the stacks (elementwise product summed per block: each block reduced alone), and the fold is
two elementwise ops per class. The FOP's intermediates (a, d, d_perp, products) exist only
inside the fused chains of ``core/fused.py`` (eager: chunks of at most a quarter of a class;
compiled, ``SOAPConfig.compile``: one kernel per chain and class, none stack-sized): no fold
scratch lives between folds. The scalars (s, beta, cz,
ch, eta*, diagnostics) are vectors in block order, reduced across ranks by ``reduce_fn`` in one
call per phase, exactly as in the per-block folder. Nothing here reads a device value on the
host.

Per-block views (``metric_diags``, ``rotate_fns``, ``estimate_rot``, ``output()``) exist for
the grad-group diagnostics and the callers that take per-block lists. The folds never hold
the SOAP metric: each chain makes it from the second moment v of the window's start state
(``fused.metric``, chunk by chunk eager, fused compiled). The metric per class
(``class_diags``, S bytes per rank) is computed only at a read by the diagnostics
(``folding.WindowMetric``): a window that arms none never holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from mlfop_megatron.config import FoldingConfig
from mlfop_megatron.core import fused
from mlfop_megatron.core.batched import BatchedBlocks, ClassWindow, all_finite
from mlfop_megatron.core.folding import (
    FoldStack,
    LevelDiagnostics,
    StackEntry,
    WindowMetric,
    WindowOutput,
)
from mlfop_megatron.core.fop import (
    FoldCoefficients,
    ReduceFn,
    coefficients_from_sums,
    eta_star,
)
from mlfop_megatron.core.levels import LevelSchedule
from mlfop_megatron.core.norms import sum_of_squares
from mlfop_megatron.core.soap import rotate

Stacks = list[torch.Tensor]


@dataclass
class BatchedWindowFolder(FoldStack):
    """Accumulates and folds the level gradients of one window on an engine's shape classes."""

    schedule: LevelSchedule
    cfg: FoldingConfig
    engine: BatchedBlocks
    reduce_fn: ReduceFn | None = None
    micro_steps: int = 0
    diagnostics: list[LevelDiagnostics] = field(default_factory=list)
    finite: torch.Tensor | None = None
    eta: torch.Tensor | None = None  # eta* per block (block order) once folded (eta_star)

    def __post_init__(self) -> None:
        engine = self.engine
        self._metric = WindowMetric(
            lambda: engine.metric_diags(),
            lambda: tuple((c.step, c.initialized) for c in engine.classes),
            len(engine.classes),
        )
        self._level_sums: Stacks | None = None
        self._estimate: StackEntry | None = None
        self._init_stack()

    # ----------------------------------------------------------- per-block views
    @property
    def num_blocks(self) -> int:
        """Number of blocks of the engine."""
        return self.engine.num_blocks

    @property
    def class_diags(self) -> list[torch.Tensor | None]:
        """Per-class metric diagonals of the window's start state (computed at the first read)."""
        return self._metric.values()

    @property
    def metric_diags(self) -> list[torch.Tensor | None]:
        """Per-block metric diagonals (views of the class stacks)."""
        return self.engine.unstack(self.class_diags)

    @property
    def rotate_fns(self) -> list:
        """Per-block rotations (for the grad-group diagnostics)."""
        return [lambda x, s=s: rotate(x, s) for s in self.engine.states]

    @property
    def estimate_rot(self) -> list[torch.Tensor | None]:
        """Per-block rotated folded gradients (see :meth:`result`)."""
        return self.result()[1]

    # ---------------------------------------------------------------- input
    def add_micro_step(self, grads: Sequence[torch.Tensor]) -> None:
        """Add one micro-step's gradients (one per block, block order); folds at level ends.

        A level's first micro-step is stacked into new per-class buffers; the others are
        added into them (one ``_foreach_add_`` per class, no stacked copy). ``finite`` is
        checked once per window on the window's result (one ``aminmax`` per class): a
        non-finite micro-step gradient makes its level sum non-finite, and the FOP folds carry
        that into the folded estimate (its coefficients turn NaN, or c * inf stays non-finite).
        Unlike a per-micro-step check, this also refuses a window whose finite sums overflow.
        """
        self._check_micro_step(len(grads))
        if self._level_sums is None:
            self._level_sums = self.engine.stack(grads)
        else:
            self.engine.add_into(self._level_sums, grads)
        self.micro_steps += 1
        level = self.schedule.level_ending_at(self.micro_steps)
        if level is not None:
            size = self.schedule.level_size(level)
            means = self._level_sums
            if size > 1:  # x / 1 is x: a one-step level is its own mean
                for m in means:
                    m.div_(size)
            self._level_sums = None
            self._fold(level, means)
            if self.complete and self.num_blocks:
                assert self._estimate is not None  # the last level set it
                self.finite = all_finite(self._estimate.grads)

    def fold_level(self, level: int, level_means: Sequence[torch.Tensor]) -> None:
        """Fold a completed level's per-block mean gradients (stacked here)."""
        self.fold_level_stacked(level, self.engine.stack(level_means))

    def fold_level_stacked(self, level: int, stacks: Stacks) -> None:
        """Fold a completed level's mean gradients given as per-class stacks (taken over)."""
        self._fold(level, stacks)
        self.micro_steps = self.schedule.boundaries[level]

    # ----------------------------------------------------------------- fold
    def _metric_sources(self) -> list[tuple[torch.Tensor | None, float, float]]:
        """Per class (v, bias, eps) of the window's start state: the chains make the metric."""
        self._metric.check_unchanged()
        return [c.metric_source() for c in self.engine.classes]

    def _fold(self, level: int, means: Stacks) -> None:
        if not self.num_blocks:
            return
        rotate_fns = [cls.rotate for cls in self.engine.classes]
        top = self._push_level(level, list(means), rotate_fns)
        if top is not None:
            self._estimate = top
            self._finish_window()

    def _fold_pair(self, z: StackEntry, h: StackEntry, with_eta: bool) -> FoldCoefficients:
        """Fold ``h`` into ``z`` in place (both forms, every class); the fold's coefficients."""
        coef = self._coefficients(z, h, with_eta)
        # Folds exist only when num_folds > 0, so every rotated form was computed.
        z_rot, h_rot = cast(Stacks, z.rot), cast(Stacks, h.rot)
        for cls, zg, hg, zr, hr in zip(self.engine.classes, z.grads, h.grads, z_rot, h_rot):
            cz = coef.cz.index_select(0, cls.index).to(zg.dtype)[:, None, None]
            ch = coef.ch.index_select(0, cls.index).to(zg.dtype)[:, None, None]
            fused.fold_update(cls.cfg.compile, zg, hg, zr, hr, cz, ch)
        return coef

    def _coefficients(self, z: StackEntry, h: StackEntry, with_eta: bool) -> FoldCoefficients:
        """The FOP scalars of one fold, from per-block sums of z, h and the metric.

        Each phase reads the rotated stacks and the metric of a class in one chain
        (``fused.fold_phase1_sums`` / ``fold_phase2_sums``): no stack outlives its phase.
        """
        wz, wh = z.size / (z.size + h.size), h.size / (z.size + h.size)
        z_rot, h_rot = cast(Stacks, z.rot), cast(Stacks, h.rot)  # folds: rotated forms exist
        classes, metrics = self.engine.classes, self._metric_sources()
        f64 = torch.float64

        def phase1() -> torch.Tensor:
            rows = [
                fused.per_block_sums(
                    fused.fold_phase1_sums, c.cfg.compile, zr, hr, *m, wz, wh, self.cfg.diagnostics
                ).to(f64)
                for c, zr, hr, m in zip(classes, z_rot, h_rot, metrics)
            ]
            return self.engine.to_block_order(rows)

        def phase2(s: torch.Tensor) -> torch.Tensor:
            rows = []
            for c, zr, hr, m in zip(classes, z_rot, h_rot, metrics):
                s_c = s.index_select(0, c.index).to(zr.dtype)
                sums = fused.per_block_sums(
                    fused.fold_phase2_sums, c.cfg.compile, zr, hr, *m, s_c, wz, wh, with_eta
                )
                rows.append(sums.to(f64))
            return self.engine.to_block_order(rows)

        dtype = classes[0].dtype
        return coefficients_from_sums(
            phase1, phase2, dtype, z.size, h.size, self.cfg, self.reduce_fn, with_eta
        )

    def _eta_against_plain_mean(self) -> torch.Tensor:
        # Called after the last fold with several folds: both are set.
        assert self._plain_r is not None and self._estimate is not None
        comb_rots = cast(Stacks, self._estimate.rot)
        rows = [
            fused.per_block_sums(fused.eta_sums, c.cfg.compile, mean_r, comb_r, *metric)
            for c, mean_r, comb_r, metric in zip(
                self.engine.classes, self._plain_r, comb_rots, self._metric_sources()
            )
        ]
        sums = self.engine.to_block_order([r.to(torch.float64) for r in rows])
        if self.reduce_fn is not None:
            sums = self.reduce_fn(sums)
        return eta_star(sums[:, 0], sums[:, 1])

    # --------------------------------------------------------------- output
    def class_output(self) -> ClassWindow:
        """The step's inputs per class (see :class:`ClassWindow`)."""
        self._check_done()
        if not self.num_blocks:
            return ClassWindow([], [])
        top = self._estimate
        assert top is not None  # complete with blocks: the last level set it
        eta = None
        if self.eta is not None:
            eta = [self.eta.index_select(0, c.index) for c in self.engine.classes]
        if self._plain_orig and self.num_blocks:
            return ClassWindow(top.grads, top.rot, self._plain, self._plain_r, eta)
        return ClassWindow(top.grads, top.rot, eta=eta)

    def output(self) -> WindowOutput:
        """Per-block views of :meth:`class_output` (``folding.WindowOutput``)."""
        w = self.class_output()
        unstack = self.engine.unstack
        if w.stats_grads is not None:
            assert w.stats_grads_rot is not None  # class_output sets both together
            return WindowOutput(
                self._unstack_tensors(w.grads),
                unstack(w.grads_rot),
                self._unstack_tensors(w.stats_grads),
                unstack(w.stats_grads_rot),
                self.eta,
            )
        return WindowOutput(self._unstack_tensors(w.grads), unstack(w.grads_rot), eta=self.eta)

    def result(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The folded gradient per block and its rotated form (views of the class stacks)."""
        self._check_done()
        if not self.num_blocks:
            return [], []
        assert self._estimate is not None  # complete with blocks: the last level set it
        return self._unstack_tensors(self._estimate.grads), self.engine.unstack(self._estimate.rot)

    def _unstack_tensors(self, stacks: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """``engine.unstack`` of stacks that are all present (so no block view is None)."""
        return cast(list[torch.Tensor], self.engine.unstack(stacks))

    def grad_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of squares in fp64, non-finite flag) over every folded gradient."""
        self._check_done()
        grads: Stacks = []
        if self.num_blocks:
            assert self._estimate is not None  # complete with blocks: the last level set it
            grads = self._estimate.grads
        sq = sum_of_squares(grads, device)
        bad = ~all_finite(grads) if grads else torch.zeros((), dtype=torch.bool, device=device)
        return sq, bad
