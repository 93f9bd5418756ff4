"""Multi-level folding of one window on shape-class stacks (``folding.WindowFolder`` batched).

Same schedule, same estimates and the same FOP scalars as :class:`WindowFolder`, but every
estimate is a list of per-class [B, r, c] stacks of a :class:`BatchedBlocks` engine: a level
costs one rotation (batched matmul) per class, the FOP inner products are per-block reductions
of the stacks (elementwise product summed per block: each block reduced alone), and the fold is
two elementwise ops per class. The FOP's intermediates (a, d, d_perp, products) live in scratch
stacks kept for the window, so a fold allocates nothing stack-sized. The scalars (s, beta, cz,
ch, eta*, diagnostics) are vectors in block order, reduced across ranks by ``reduce_fn`` in one
call per phase, exactly as in the per-block folder. Nothing here reads a device value on the
host.

Per-block views (``metric_diags``, ``rotate_fns``, ``estimate_rot``, ``output()``) exist for
the grad-group diagnostics and the callers that take per-block lists. The SOAP metric per
class (``class_diags``, S bytes per rank) is computed at its first read, by a fold or the
diagnostics (``folding.WindowMetric``): a window that never folds (folding off) and arms no
diagnostics never holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from mlfop_megatron.config import FoldingConfig
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
Scratch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (t, u, prod), see _Workspace


def bdot(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """<x_b, y_b> for every block b of two [B, r, c] stacks ([B]).

    The elementwise product summed per block (the same ops, hence bits, as ``linalg.vecdot``):
    each block is reduced alone, so a block's sums do not depend on which blocks share its
    class (a batched matrix-vector product does: its kernel choice follows the batch size),
    which keeps owner-sharded runs bitwise equal to replicated ones. ``scratch``: a buffer of
    the stacks' shape for the product (a fresh stack-sized temporary per inner product costs a
    page-faulting allocation on CPU: measured 5x the product itself at 44 MB).
    """
    prod = torch.mul(x, y) if scratch is None else torch.mul(x, y, out=scratch)
    return prod.flatten(1).sum(-1)


class _Workspace:
    """Scratch stacks of one fold: a and d per class, three shared buffers per dtype/device.

    The shared buffers are sized for the largest class of their dtype and device. Kept while
    the window folds (its folds reuse them, so a fold allocates nothing stack-sized) and
    dropped after its last fold, before the step and its refresh.
    """

    def __init__(self, like: Stacks) -> None:
        self.a = [torch.empty_like(x) for x in like]
        self.d = [torch.empty_like(x) for x in like]
        largest: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        for x in like:
            key = (x.dtype, x.device)
            if key not in largest or x.numel() > largest[key].numel():
                largest[key] = x
        # new_empty: allocated like the stacks themselves (their device, as they were made)
        self._flat = {key: [x.new_empty(x.numel()) for _ in range(3)] for key, x in largest.items()}

    def shared(self, x: torch.Tensor) -> Scratch:
        """Three scratch stacks of ``x``'s shape, dtype and device (views of shared buffers)."""
        n = x.numel()
        t, u, prod = (f[:n].view(x.shape) for f in self._flat[(x.dtype, x.device)])
        return t, u, prod


def batched_phase1(
    a: torch.Tensor,
    d: torch.Tensor,
    diag: torch.Tensor | None,
    ws: Scratch,
    euclidean: bool = True,
) -> torch.Tensor:
    """``fop.phase1_sums`` of every block of a stack ([B, 5]); ``ws``: (t, u, prod) scratch."""
    t, _, prod = ws
    ma = a if diag is None else torch.mul(a, diag, out=t)
    sums = [bdot(a, ma, prod), bdot(d, ma, prod)]
    if euclidean:
        sums += [bdot(a, a, prod), bdot(a, d, prod), bdot(d, d, prod)]
    else:  # diagnostics only: left 0 (``fop.phase1_sums``)
        sums += [sums[0].new_zeros(sums[0].shape)] * 3
    return torch.stack(sums, dim=1)


def batched_phase2(
    a: torch.Tensor,
    d: torch.Tensor,
    diag: torch.Tensor | None,
    s: torch.Tensor,
    with_ama: bool,
    ws: Scratch,
) -> torch.Tensor:
    """``fop.phase2_sums`` of every block of a stack (``s``: [B] in the stack's dtype).

    The same ops as ``fop.phase2_sums``, written into the scratch ``ws`` = (t, u, prod); u is
    reused once the term that read it is summed.
    """
    t, u, prod = ws
    d_perp = torch.sub(d, torch.mul(a, s[:, None, None], out=t), out=t)
    mi_dp = d_perp if diag is None else torch.div(d_perp, diag, out=u)
    out = [bdot(a, mi_dp, prod), bdot(d_perp, mi_dp, prod)]
    mi_d = d if diag is None else torch.div(d, diag, out=u)
    out.append(bdot(d, mi_d, prod))
    if with_ama:
        out.append(bdot(a, a if diag is None else torch.div(a, diag, out=u), prod))
    return torch.stack(out, dim=1)


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
        self._ws: _Workspace | None = None  # the folds' scratch stacks (built at the first)
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
    def _fold(self, level: int, means: Stacks) -> None:
        if not self.num_blocks:
            return
        rotate_fns = [cls.rotate for cls in self.engine.classes]
        top = self._push_level(level, list(means), rotate_fns)
        if top is not None:
            self._estimate = top
            self._finish_window()
            self._ws = None  # the folds' scratch dies with the window's last fold

    def _fold_pair(self, z: StackEntry, h: StackEntry, with_eta: bool) -> FoldCoefficients:
        """Fold ``h`` into ``z`` in place (both forms, every class); the fold's coefficients."""
        coef = self._coefficients(z, h, with_eta)
        # Folds exist only when num_folds > 0, so every rotated form was computed.
        z_rot, h_rot = cast(Stacks, z.rot), cast(Stacks, h.rot)
        for cls, zg, hg, zr, hr in zip(self.engine.classes, z.grads, h.grads, z_rot, h_rot):
            cz = coef.cz.index_select(0, cls.index).to(zg.dtype)[:, None, None]
            ch = coef.ch.index_select(0, cls.index).to(zg.dtype)[:, None, None]
            zg.mul_(cz).addcmul_(hg, ch)
            zr.mul_(cz).addcmul_(hr, ch)
        return coef

    def _coefficients(self, z: StackEntry, h: StackEntry, with_eta: bool) -> FoldCoefficients:
        wz, wh = z.size / (z.size + h.size), h.size / (z.size + h.size)
        z_rot, h_rot = cast(Stacks, z.rot), cast(Stacks, h.rot)  # folds: rotated forms exist
        if self._ws is None:
            self._ws = _Workspace(z_rot)
        ws = self._ws
        for a, d, zr, hr in zip(ws.a, ws.d, z_rot, h_rot):  # a = wz z + wh h, d = z - h
            t = ws.shared(a)[0]
            torch.mul(zr, wz, out=a).add_(torch.mul(hr, wh, out=t))
            torch.sub(zr, hr, out=d)
        f64 = torch.float64

        def phase1() -> torch.Tensor:
            return self.engine.to_block_order(
                [
                    batched_phase1(a, d, m, ws.shared(a), self.cfg.diagnostics).to(f64)
                    for a, d, m in zip(ws.a, ws.d, self.class_diags)
                ]
            )

        def phase2(s: torch.Tensor) -> torch.Tensor:
            rows = []
            for cls, a, d, m in zip(self.engine.classes, ws.a, ws.d, self.class_diags):
                s_c = s.index_select(0, cls.index).to(a.dtype)
                rows.append(batched_phase2(a, d, m, s_c, with_eta, ws.shared(a)).to(f64))
            return self.engine.to_block_order(rows)

        dtype = self.engine.classes[0].dtype
        return coefficients_from_sums(
            phase1, phase2, dtype, z.size, h.size, self.cfg, self.reduce_fn, with_eta
        )

    def _eta_against_plain_mean(self) -> torch.Tensor:
        # Called after the last fold with several folds: both are set.
        assert self._plain_r is not None and self._estimate is not None
        comb_rots = cast(Stacks, self._estimate.rot)
        rows = []
        for mean_r, comb_r, diag in zip(self._plain_r, comb_rots, self.class_diags):
            mi_comb = comb_r if diag is None else comb_r / diag
            rows.append(torch.stack([bdot(mean_r, mi_comb), bdot(comb_r, mi_comb)], 1))
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
