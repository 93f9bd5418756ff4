"""Validated configuration dataclasses for ML-FOP-SOAP.

Every invalid value raises ``ValueError`` naming the option, the allowed range and the value
seen, so a bad launch flag fails at construction instead of corrupting a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

REFRESH_METHODS = ("qr", "eigh")


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


@dataclass(frozen=True)
class SOAPConfig:
    """SOAP hyperparameters; defaults follow the SOAP reference implementation."""

    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.95)
    shampoo_beta: float | None = None  # None: use betas[1]
    eps: float = 1e-8
    weight_decay: float = 0.01
    precondition_frequency: int = 10
    max_precond_dim: int = 10000
    precondition_1d: bool = False
    correct_bias: bool = True
    refresh_method: str = "qr"  # "qr": one power-iteration step + QR; "eigh": full eigh

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
        check_range("weight_decay", self.weight_decay, 0.0)
        check_int("precondition_frequency", self.precondition_frequency, 1)
        check_int("max_precond_dim", self.max_precond_dim, 1)
        for name in ("precondition_1d", "correct_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if self.refresh_method not in REFRESH_METHODS:
            _fail("refresh_method", f"one of {REFRESH_METHODS}", self.refresh_method)

    @property
    def factor_beta(self) -> float:
        """EMA coefficient of the Kronecker factors (shampoo_beta, defaulting to beta2)."""
        return self.betas[1] if self.shampoo_beta is None else float(self.shampoo_beta)


@dataclass(frozen=True)
class FoldingConfig:
    """Multi-level gradient folding with Fisher-orthogonal projection (FOP) between levels.

    ``accumulation_steps`` is K, the number of micro-steps per optimizer step. ``boundaries``
    are the cumulative micro-step counts L_0=1 < L_1 < ... < L_J=K; None means dyadic.
    ``enabled=False`` gives the plain mean of the K micro-gradients (plain SOAP).
    """

    enabled: bool = True
    accumulation_steps: int = 1
    boundaries: tuple[int, ...] | None = None
    project: bool = True  # ablation switch: False skips the orthogonalisation (s = 0)
    fixed_beta: float | None = None  # ablation switch: use this beta instead of the adaptive one
    beta_max: float | None = 1.0  # clip |beta| <= beta_max; None disables clipping
    fop_eps: float = 1e-30  # added to the denominators of s and beta
    parallel_tol: float | None = None  # |d_perp| <= tol |d| counts as parallel; None: dtype-based
    diagnostics: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "project", "diagnostics"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        k = check_int("accumulation_steps", self.accumulation_steps, 1)
        if self.boundaries is not None:
            b = tuple(self.boundaries)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in b) or not b:
                _fail("boundaries", "a non-empty sequence of integers", self.boundaries)
            if b[0] != 1:
                _fail("boundaries", "a sequence starting at 1 (the first micro-step)", b)
            if any(y <= x for x, y in zip(b, b[1:])):
                _fail("boundaries", "strictly increasing", b)
            if b[-1] != k:
                _fail("boundaries", f"a sequence ending at accumulation_steps={k}", b)
            object.__setattr__(self, "boundaries", b)
        if self.fixed_beta is not None:
            check_range("fixed_beta", self.fixed_beta)
        if self.beta_max is not None:
            check_range("beta_max", self.beta_max, 0.0, low_open=True)
        check_range("fop_eps", self.fop_eps, 0.0)
        if self.parallel_tol is not None:
            check_range("parallel_tol", self.parallel_tol, 0.0, 1.0, high_open=True)


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
