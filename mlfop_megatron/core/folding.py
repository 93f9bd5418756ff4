"""Multi-level folding of one accumulation window (K micro-steps) into a single gradient.

Level 0 is micro-step 1; level j >= 1 covers micro-steps L_{j-1}+1 .. L_j. Its mean gradient
h_j is folded into the running estimate z by FOP with weights (L_{j-1}, L_j - L_{j-1}).
The metric (and basis) is the one from the previous optimizer step, fixed for the window.
With folding off there is a single level and the result is the plain mean, bitwise.
This module knows nothing about torch.distributed: callers pass level means that are already
reduced across data-parallel ranks, and a ``reduce_fn`` for tensor-parallel inner products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mlfop_megatron.config import FoldingConfig
from mlfop_megatron.core.fop import (
    AA,
    AD,
    DD,
    FoldCoefficients,
    ReduceFn,
    apply_fold,
    fold_coefficients,
)
from mlfop_megatron.core.levels import LevelSchedule

RotateFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LevelDiagnostics:
    """Per-block scalars of one fold (tensors of length num_blocks)."""

    level: int
    n_z: int
    n_h: int
    s: torch.Tensor
    beta: torch.Tensor
    sums: torch.Tensor

    def totals(self) -> torch.Tensor:
        """Additive totals [aa, ad, dd, sum s, sum beta, blocks] (sum these across ranks)."""
        total = self.sums.sum(dim=0)
        return torch.stack(
            [
                total[AA],
                total[AD],
                total[DD],
                self.s.sum(),
                self.beta.sum(),
                torch.tensor(float(self.s.numel()), dtype=total.dtype, device=total.device),
            ]
        )

    def summary(self) -> dict[str, float]:
        return summarize_level(self.level, self.totals(), self.n_z, self.n_h)


def summarize_level(level: int, totals: torch.Tensor, n_z: int, n_h: int) -> dict[str, float]:
    """Diagnostics of one fold over all blocks, as if they were one concatenated vector.

    cosine_before: cos(z, h), the two estimates being folded (with modality-ordered
    micro-batches, the inter-modality gradient cosine); cosine_after: cos(a, d_perp) after the
    projection; ratio: ||d|| / ||a||; s_mean and beta_mean: means over blocks.
    """
    aa, ad, dd, s_sum, beta_sum, blocks = (float(x) for x in totals)
    wz, wh = n_z / (n_z + n_h), n_h / (n_z + n_h)
    zh = aa + (wh - wz) * ad - wz * wh * dd
    zz = aa + 2 * wh * ad + wh * wh * dd
    hh = aa - 2 * wz * ad + wz * wz * dd
    s_mean = s_sum / max(blocks, 1.0)
    a_dp = ad - s_mean * aa  # <a, d - s a> with the mean s (exact when one block)
    dp_dp = max(dd - 2 * s_mean * ad + s_mean * s_mean * aa, 0.0)
    return {
        "level": float(level),
        "s_mean": s_mean,
        "beta_mean": beta_sum / max(blocks, 1.0),
        "ratio": (dd / aa) ** 0.5 if aa > 0 else float("inf"),
        "cosine_before": zh / max((zz * hh) ** 0.5, 1e-300),
        "cosine_after": a_dp / max((aa * dp_dp) ** 0.5, 1e-300),
    }


@dataclass
class WindowFolder:
    """Accumulates and folds the micro-step gradients of one window for a list of blocks."""

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

    def __post_init__(self) -> None:
        n = len(self.rotate_fns)
        if len(self.metric_diags) != n:
            raise ValueError("WindowFolder needs one metric diagonal per block")
        self.level_sums = [None] * n
        self.estimate = [None] * n
        self.estimate_rot = [None] * n

    @property
    def num_blocks(self) -> int:
        return len(self.rotate_fns)

    @property
    def complete(self) -> bool:
        return self.micro_steps == self.schedule.accumulation_steps

    def add_micro_step(self, grads: Sequence[torch.Tensor]) -> None:
        """Add one micro-step's gradients (one per block); folds when a level ends."""
        if len(grads) != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} gradients, got {len(grads)}")
        if self.complete:
            raise ValueError(
                f"more than accumulation_steps={self.schedule.accumulation_steps} micro-steps "
                "in one window; call step() after the last micro-step"
            )
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
            means = []
            for i in range(self.num_blocks):
                mean = self.level_sums[i]
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
        last = level == self.schedule.num_levels - 1
        if level == 0:
            for i, mean in enumerate(level_means):
                self.estimate[i] = mean
                if not last:
                    rotated = self.rotate_fns[i](mean)
                    # An identity rotation returns its input; the two estimates must not alias.
                    self.estimate_rot[i] = rotated.clone() if rotated is mean else rotated
            return
        n_z, n_h = self.schedule.fold_weights(level)
        h_rot = [rot(h) for rot, h in zip(self.rotate_fns, level_means)]
        coef: FoldCoefficients = fold_coefficients(
            self.estimate_rot, h_rot, self.metric_diags, n_z, n_h, self.cfg, self.reduce_fn
        )
        for i, h in enumerate(level_means):
            apply_fold(self.estimate[i], h, coef.cz[i], coef.ch[i])
            apply_fold(self.estimate_rot[i], h_rot[i], coef.cz[i], coef.ch[i])
        if self.cfg.diagnostics:
            self.diagnostics.append(LevelDiagnostics(level, n_z, n_h, coef.s, coef.beta, coef.sums))

    def result(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The folded gradient per block and its rotated form (None where not computed)."""
        if not self.complete:
            raise ValueError(
                f"the window has {self.micro_steps} micro-steps but accumulation_steps="
                f"{self.schedule.accumulation_steps}; call accumulate() once per micro-batch"
            )
        return list(self.estimate), list(self.estimate_rot)
