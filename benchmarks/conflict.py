"""Shared pieces of the "when does the folding help" benchmark: optimizer variants, PCGrad, stats.

* ``FOLD_VARIANTS``: the ML-FOP-SOAP folding variants compared (FoldingConfig fields);
* ``variant_run_spec``: a digits run spec switched to one of those variants;
* ``pcgrad_combine``: the PCGrad-style positive control (Yu et al. 2020, two tasks): when the
  two task gradients conflict (negative inner product), each is projected off the other
  before they are averaged;
* ``sign_test``: exact two-sided binomial sign test of paired differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from examples.digits.spec import RunSpec


@dataclass(frozen=True)
class FoldVariant:
    """One FoldingConfig variant of ML-FOP-SOAP: structure x step size x statistics source."""

    structure: str
    step_size: str
    statistics_from: str

    @property
    def label(self) -> str:
        """Short row name, e.g. ``fop-last-eta-mean``."""
        eta = "eta" if self.step_size == "eta_star" else "noeta"
        return f"fop-{self.structure}-{eta}-{self.statistics_from}"

    def kwargs(self) -> dict[str, str]:
        """This variant's FoldingConfig options (pass ``enabled=True`` too: folding is opt-in)."""
        return {
            "structure": self.structure,
            "step_size": self.step_size,
            "statistics_from": self.statistics_from,
        }


# The default folding options first, FOP as published (one half-vs-half fold, eta*, SOAP statistics
# from the plain mean) last; the others change one or two of the three choices.
FOLD_VARIANTS: tuple[FoldVariant, ...] = (
    FoldVariant("chain", "none", "folded"),
    FoldVariant("tree", "none", "folded"),
    FoldVariant("last", "none", "folded"),
    FoldVariant("chain", "eta_star", "mean"),
    FoldVariant("last", "none", "mean"),
    FoldVariant("last", "eta_star", "mean"),
)
VARIANTS_BY_LABEL = {v.label: v for v in FOLD_VARIANTS}


def variant_run_spec(spec: RunSpec, label: str) -> RunSpec:
    """``spec`` switched to ML-FOP-SOAP with the folding variant named ``label``."""
    v = VARIANTS_BY_LABEL[label]
    return replace(
        spec,
        optimizer="mlfop",
        fold_structure=v.structure,
        step_size=v.step_size,
        statistics_from=v.statistics_from,
    )


def pcgrad_combine(g_a: torch.Tensor, g_b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(mean of the two flat task gradients after PCGrad projection, whether they conflicted).

    Both projections use the original gradients: g_a' = g_a - <g_a, g_b>/|g_b|^2 g_b when
    <g_a, g_b> < 0, and symmetrically; without conflict the plain mean is returned.
    """
    dot = torch.dot(g_a, g_b)
    conflict = bool(dot < 0)  # one host sync per step: this is a benchmark control
    if not conflict:
        return 0.5 * (g_a + g_b), False
    pa = g_a - dot / torch.dot(g_b, g_b).clamp_min(1e-30) * g_b
    pb = g_b - dot / torch.dot(g_a, g_a).clamp_min(1e-30) * g_a
    return 0.5 * (pa + pb), True


def sign_test(differences: Sequence[float]) -> dict[str, float]:
    """Exact two-sided sign test of H0 "median difference 0"; zeros are dropped.

    Returns n (non-zero pairs), positive (count > 0), negative, and p (two-sided).
    """
    pos = sum(1 for d in differences if d > 0)
    neg = sum(1 for d in differences if d < 0)
    n = pos + neg
    if n == 0:
        return {"n": 0, "positive": 0, "negative": 0, "p": 1.0}
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return {"n": n, "positive": pos, "negative": neg, "p": min(1.0, 2.0 * tail)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
