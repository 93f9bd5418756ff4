"""How the ML-FOP-SOAP gradient and parameter collectives run (a validated config)."""

from __future__ import annotations

from dataclasses import dataclass

from mlfop_megatron.config import option

LEVEL_REDUCE = ("reduce_scatter", "all_reduce")
GRAD_WIRE_DTYPES = ("fp32", "bf16")
PARAM_SYNC = ("all_gather", "broadcast")
SEGMENTS = ("padded", "exact")


@dataclass(frozen=True)
class CommConfig:
    """Collectives of the folding levels and of the parameter sync.

    ``level_reduce``: "reduce_scatter" (default) packs the SOAP blocks' level sums into an
    owner-ordered buffer and reduce-scatters it, so each owner receives only its own blocks,
    and the non-SOAP (Adam) gradients are all-reduced once per step; "all_reduce" is the first
    version, kept for comparison: Megatron's buckets all-reduce the whole gradient buffer at
    every level boundary. ``grad_wire_dtype``: "bf16" sends the level sums in bf16 and sums
    them in fp32 on the owner (an all-to-all, then a local fp32 sum in rank order); only with
    level_reduce="reduce_scatter". ``param_sync``: "all_gather" (one all-gather of the
    owner-ordered parameter buffer per engine) or "broadcast" (one broadcast per owner rank,
    the first version). ``segments``: "padded" (default) pads every owner's segment of the
    level reduce-scatters and of the parameter all-gather to the longest one (equal-size
    collectives); "exact" sends no padding (uneven collectives: a reduce-scatter of unequal
    pieces, which NCCL runs as one reduce per rank coalesced into one group, and an uneven
    all-gather). The math is the same; only the collectives differ. ``fold_stream``: fold
    each level on a side CUDA stream, overlapping the next micro-step (off by default: it
    changes the kernel order on GPU, not the math; a no-op on CPU).
    """

    level_reduce: str = option(
        "reduce_scatter",
        "folding level reductions: reduce_scatter (each owner receives the level sums of its "
        "SOAP blocks; Adam grads all-reduced once per step) or all_reduce (Megatron's buckets "
        "all-reduce every grad at every level: the first version, for comparison)",
        choices=LEVEL_REDUCE,
    )
    grad_wire_dtype: str = option(
        "fp32",
        "dtype of the level sums on the wire: bf16 halves the bytes (all-to-all, then fp32 "
        "sums on the owner; needs --mlfop-level-reduce reduce_scatter)",
        choices=GRAD_WIRE_DTYPES,
    )
    param_sync: str = option(
        "all_gather",
        "parameter sync after the step: one all_gather of the owner-ordered params, or one "
        "broadcast per owner rank (the first version)",
        choices=PARAM_SYNC,
    )

    segments: str = option(
        "padded",
        "owner segments of the level reduce-scatters and of the parameter all-gather: padded "
        "to the longest (equal-size collectives) or exact (no padding: uneven collectives)",
        choices=SEGMENTS,
    )

    fold_stream: bool = option(
        False,
        "run each level's fold on a side CUDA stream so it overlaps the next micro-step "
        "(events make it safe; no effect on CPU; see distributed/fold_stream.py)",
    )

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("level_reduce", self.level_reduce, LEVEL_REDUCE),
            ("grad_wire_dtype", self.grad_wire_dtype, GRAD_WIRE_DTYPES),
            ("param_sync", self.param_sync, PARAM_SYNC),
            ("segments", self.segments, SEGMENTS),
        ):
            if value not in allowed:
                raise ValueError(f"CommConfig.{name} must be one of {allowed} (got {value!r})")
        if self.grad_wire_dtype == "bf16" and self.level_reduce != "reduce_scatter":
            raise ValueError(
                "CommConfig.grad_wire_dtype='bf16' needs level_reduce='reduce_scatter' (the "
                "all_reduce path reduces Megatron's fp32 buckets); set grad_wire_dtype='fp32'"
            )

    @property
    def owner_reduce(self) -> bool:
        """Whether the level sums go to their owners only (the folding glue reduces them)."""
        return self.level_reduce == "reduce_scatter"
