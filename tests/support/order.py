"""The SOAP reference's step order, for the tests that compare two code paths.

The package's default order refreshes the bases before each step's moment update (and
updates from the first step). On the tiny test models, whose Kronecker factors are
rank-deficient, that rotates each step's gradient into bases whose null columns (canonical
here, arbitrary in a dense reference) later gradients see, so two code paths (engines, DP
sizes, wire dtypes, a dense reference) part by more than rounding. Those comparisons run the
reference order (statistics-only first step, refresh after the update); the default order is
checked through every feature by tests/test_trains_what_it_claims.py and against the dense
equations in tests/test_soap_reference.py (full-rank factors).
"""

from __future__ import annotations

from typing import Any

from mlfop_megatron.optim import MLFOPSOAP

# ... and the reference's unconditional refresh: a drift gate (refresh_tolerance) decides at a
# threshold that two code paths' rounding may straddle; it is tested on its own.
REFERENCE_ORDER: dict[str, Any] = {
    "first_step_update": False,
    "refresh_first": False,
    "refresh_tolerance": 0.0,
}


def reference_order_soap(params: Any, **kwargs: Any) -> MLFOPSOAP:
    """MLFOPSOAP in the reference order unless ``kwargs`` set the order."""
    return MLFOPSOAP(params, **{**REFERENCE_ORDER, **kwargs})
