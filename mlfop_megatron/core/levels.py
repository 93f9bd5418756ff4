"""Level schedule of the multi-level folding: which micro-steps form which level."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class LevelSchedule:
    """Cumulative level boundaries L_0=1 < ... < L_J=K over one accumulation window."""

    boundaries: tuple[int, ...]

    @classmethod
    def from_config(cls, cfg: FoldingConfig) -> LevelSchedule:
        """Schedule for a folding config; folding off means one level holding all K steps."""
        k = cfg.accumulation_steps
        if not cfg.enabled:
            return cls((k,))
        return cls(cfg.boundaries if cfg.boundaries is not None else dyadic_boundaries(k))

    @property
    def accumulation_steps(self) -> int:
        return self.boundaries[-1]

    @property
    def num_levels(self) -> int:
        return len(self.boundaries)

    def level_size(self, level: int) -> int:
        """Number of micro-steps in a level."""
        return self.boundaries[level] - (self.boundaries[level - 1] if level > 0 else 0)

    def fold_weights(self, level: int) -> tuple[int, int]:
        """FOP weights (n_z, n_h) when level >= 1 is folded into the running estimate."""
        if level < 1:
            raise ValueError("level 0 starts the estimate and is not folded")
        return self.boundaries[level - 1], self.level_size(level)

    def level_ending_at(self, micro_step: int) -> int | None:
        """The level that ends at this (1-based) micro-step, or None inside a level."""
        try:
            return self.boundaries.index(micro_step)
        except ValueError:
            return None
