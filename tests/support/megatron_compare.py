"""Test helpers shared by the Megatron layout tests: merge rank outputs, compare, catch errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def merged_params(runs: list[dict[str, Any]], tp: int = 1) -> dict[str, torch.Tensor]:
    """Full params from rank outputs (run_tiny_gpt results of the ranks of one DP replica).

    With tp > 1, TP shards are concatenated along their partition dim; a param held whole by
    several ranks (replicated, or an expert of EP=1) is taken from the first of them.
    """
    merged = {}
    for name in {n for r in runs for n in r["params"]}:
        holders = [r for r in runs if name in r["params"]]
        dim = holders[0]["partition_dims"].get(name)
        pieces = [r["params"][name] for r in holders]
        merged[name] = pieces[0] if dim is None or tp == 1 else torch.cat(pieces, dim=dim)
    return merged


def assert_params_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float, what: str
) -> None:
    """Same names and allclose values, naming the first param that differs and by how much."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=rtol, atol=atol), (
            f"{what}: {name} max diff {(a[name] - b[name]).abs().max().item():.2e}"
        )


def error_message(fn: Callable[[], Any]) -> str:
    """'ExcType: message' of what ``fn()`` raises (ValueError/TypeError/RuntimeError)."""
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"
