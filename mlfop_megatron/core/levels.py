"""Level schedule of the multi-level folding.

Which micro-steps form which level, and which estimates are folded when a level ends (the
fold plan of the structure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlfop_megatron.config import FoldingConfig


def dyadic_boundaries(accumulation_steps: int) -> tuple[int, ...]:
    """Boundaries 1, 2, 4, ..., K; when K is not a power of two the last level takes the rest."""
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1 (got {accumulation_steps})")
    bounds = [1]
    while bounds[-1] * 2 < accumulation_steps:
        bounds.append(bounds[-1] * 2)
    if bounds[-1] != accumulation_steps:
        bounds.append(accumulation_steps)
    return tuple(bounds)


def structure_boundaries(cfg: FoldingConfig) -> tuple[int, ...]:
    """Level boundaries (sync points) a folding config needs.

    chain: ``cfg.boundaries`` or dyadic; tree: ``cfg.boundaries`` or every micro-step (each
    leaf is a level); last: the two halves (floor(K/2), K); folding off or K=1: (K,).
    """
    k = cfg.accumulation_steps
    if not cfg.enabled or k == 1:
        return (k,)
    if cfg.structure == "last":
        return (k // 2, k)
    if cfg.boundaries is not None:
        return cfg.boundaries
    if cfg.structure == "tree":
        return tuple(range(1, k + 1))
    return dyadic_boundaries(k)


@dataclass(frozen=True)
class Fold:
    """One fold of the plan.

    After ``level`` ends, the two top estimates of the stack (z below, covering ``n_z``
    micro-steps; h on top, ``n_h``) are replaced by FOP(z, h).
    """

    index: int
    level: int
    n_z: int
    n_h: int


def fold_plan(boundaries: tuple[int, ...], structure: str) -> tuple[Fold, ...]:
    """Folds in execution order.

    Each level's mean is pushed on a stack; chain (and last, a
    two-level chain) folds the two entries after every level >= 1; tree folds while the two
    top entries cover equally many micro-steps, and after the last level folds the rest.
    """
    sizes = [b - (boundaries[i - 1] if i else 0) for i, b in enumerate(boundaries)]
    stack: list[int] = []
    folds: list[Fold] = []
    last = len(sizes) - 1
    for level, size in enumerate(sizes):
        stack.append(size)
        while len(stack) >= 2 and (structure != "tree" or stack[-1] == stack[-2] or level == last):
            n_h, n_z = stack.pop(), stack.pop()
            folds.append(Fold(len(folds), level, n_z, n_h))
            stack.append(n_z + n_h)
    return tuple(folds)


@dataclass(frozen=True)
class LevelSchedule:
    """Cumulative level boundaries L_0 < ... < L_J=K over one accumulation window.

    Also the fold plan of the structure over those levels.
    """

    boundaries: tuple[int, ...]
    structure: str = "chain"
    folds: tuple[Fold, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folds", fold_plan(tuple(self.boundaries), self.structure))

    @classmethod
    def from_config(cls, cfg: FoldingConfig) -> LevelSchedule:
        """Schedule for a folding config; folding off means one level holding all K steps."""
        return cls(structure_boundaries(cfg), cfg.structure if cfg.enabled else "chain")

    @property
    def accumulation_steps(self) -> int:
        """Micro-steps K of the window."""
        return self.boundaries[-1]

    @property
    def num_levels(self) -> int:
        """Number of levels."""
        return len(self.boundaries)

    @property
    def num_folds(self) -> int:
        """Number of folds in the plan."""
        return len(self.folds)

    def level_size(self, level: int) -> int:
        """Number of micro-steps in a level."""
        return self.boundaries[level] - (self.boundaries[level - 1] if level > 0 else 0)

    def folds_at(self, level: int) -> tuple[Fold, ...]:
        """The folds that run when ``level`` ends (none, one, or several for tree)."""
        return tuple(f for f in self.folds if f.level == level)

    def fold_weights(self, level: int) -> tuple[int, int]:
        """FOP weights (n_z, n_h) of the one fold that runs when ``level`` >= 1 ends."""
        if level < 1:
            raise ValueError("level 0 starts the estimate and is not folded")
        at = self.folds_at(level)
        if len(at) != 1:
            raise ValueError(f"{len(at)} folds end at level {level}; use folds_at()")
        return at[0].n_z, at[0].n_h

    def level_ending_at(self, micro_step: int) -> int | None:
        """The level that ends at this (1-based) micro-step, or None inside a level."""
        try:
            return self.boundaries.index(micro_step)
        except ValueError:
            return None
