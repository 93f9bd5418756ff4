"""The fold's and the step's elementwise chains as small pure functions, eager or compiled.

Each chain reads its stacks once and either returns per-block sums (the FOP inner products of
both phases: [B, k]) or updates its stacks in place (the fold, Adam's moments). The same
function runs both ways (``SOAPConfig.compile``):

* eager (the default): the function as written; a class stack above ``EAGER_CHUNK_BYTES``
  runs in chunks of a quarter of its blocks (:func:`per_block_sums`), so the temporaries (at
  most four chunk-sized stacks live at once) stay within one class stack for classes of four
  blocks or more (four blocks' worth below; four small stacks, at most 4 x 4 MiB, for a class
  below the threshold, which runs whole: launches stay O(shape classes)). Every block is
  reduced alone (``flatten(1).sum(-1)`` per row), so a block's sums do
  not depend on its chunk or class mates: the same bits as before chunking, and owner-sharded
  runs stay bitwise equal to replicated ones.
* compiled: ``torch.compile(fn, dynamic=False, fullgraph=True)`` of the whole class stack
  (inductor: C++/OpenMP on CPU, Triton on GPUs), one kernel per chain with no stack-sized
  temporary. One compile per distinct (function, shapes, dtypes, devices, flags): a shape
  class compiles each chain it runs once, and never again (each key has its own copy of the
  function's code, so Dynamo's per-code recompile limit is never reached and no key can
  evict another). :data:`KERNELS` counts the compiles and their seconds. Fused reductions add
  in another order than eager, so compiled results agree with eager to rounding only (see
  tests/test_compiled.py for the tolerances).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

Fn = Callable[..., Any]
# Live chunk-sized temporaries of the eager sum chains at their peak (see per_block_sums).
EAGER_TEMPORARIES = 4
# Eager: a class stack above this many bytes runs in chunks (below, whole: fewer launches).
EAGER_CHUNK_BYTES = 4 << 20
# Inductor: recompute a reused pointwise value of up to 16 reads rather than store it (its
# default, 4, stores the fold's M a = (wz z + wh h) * metric: one more stack written and read
# back; these chains are memory-bound, so recomputing is the cheaper side).
OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"realize_reads_threshold": 16}


def _bsum(x: torch.Tensor) -> torch.Tensor:
    """Sum of every block of a [B, r, c] stack ([B]): each block reduced alone."""
    return x.flatten(1).sum(-1)


def weighted_pair(
    z: torch.Tensor, h: torch.Tensor, wz: float | torch.Tensor, wh: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, d) = (wz z + wh h, z - h): the fold's weighted mean and difference."""
    return z * wz + h * wh, z - h


def metric(
    v: torch.Tensor | None, bias: float | torch.Tensor, eps: float | torch.Tensor
) -> torch.Tensor | None:
    """The SOAP metric sqrt(v / bias) + eps (``ShapeClass.metric_diag`` calls it); None: M = I.

    The fold chains take the second moment ``v`` of the window's start state and make the
    metric inside, so no metric stack is kept through the window (S bytes per rank).
    """
    return None if v is None else (v / bias).sqrt_().add_(eps)


def _inner(x: torch.Tensor, diag: torch.Tensor | None) -> torch.Tensor:
    """<x, M^-1 x> of every block ([B]), one stack-sized temporary."""
    return _bsum(x * x) if diag is None else _bsum((x / diag).mul_(x))


def fold_phase1_sums(
    z: torch.Tensor,
    h: torch.Tensor,
    v: torch.Tensor | None,
    bias: float | torch.Tensor,
    eps: float | torch.Tensor,
    wz: float | torch.Tensor,
    wh: float | torch.Tensor,
    euclidean: bool,
) -> torch.Tensor:
    """``fop.phase1_sums`` of every block, from z, h and the metric of v ([B, 5], z's dtype).

    At most four stacks live at once (a, d, the metric, then M a in its place, a product).
    """
    a, d = weighted_pair(z, h, wz, wh)
    diag = metric(v, bias, eps)
    ma = a if diag is None else a * diag
    del diag
    sums = [_bsum(a * ma), _bsum(d * ma)]
    if euclidean:
        sums += [_bsum(a * a), _bsum(a * d), _bsum(d * d)]
    else:  # diagnostics only: left 0 (``fop.phase1_sums``)
        sums += [torch.zeros_like(sums[0])] * 3
    return torch.stack(sums, dim=1)


def fold_phase2_sums(
    z: torch.Tensor,
    h: torch.Tensor,
    v: torch.Tensor | None,
    bias: float | torch.Tensor,
    eps: float | torch.Tensor,
    s: torch.Tensor,
    wz: float | torch.Tensor,
    wh: float | torch.Tensor,
    with_ama: bool,
) -> torch.Tensor:
    """``fop.phase2_sums`` of every block (``s``: [B], z's dtype): [B, 3] or [B, 4].

    Ordered so that at most four stacks are live at once (a, d, the metric, one product):
    <d, M^-1 d> and <a, M^-1 a> before d_perp = d - s a replaces d in place.
    """
    a, d = weighted_pair(z, h, wz, wh)
    diag = metric(v, bias, eps)

    d_mi_d = _inner(d, diag)
    a_mi_a = _inner(a, diag) if with_ama else None
    d_perp = d.sub_(a * s[:, None, None])
    mi_dp = d_perp if diag is None else d_perp / diag
    del diag
    out = [_bsum(a * mi_dp), _bsum(d_perp * mi_dp), d_mi_d]
    if a_mi_a is not None:
        out.append(a_mi_a)
    return torch.stack(out, dim=1)


def eta_sums(
    mean: torch.Tensor,
    comb: torch.Tensor,
    v: torch.Tensor | None,
    bias: float | torch.Tensor,
    eps: float | torch.Tensor,
) -> torch.Tensor:
    """[<mean, M^-1 comb>, <comb, M^-1 comb>] of every block ([B, 2]): eta*'s terms."""
    diag = metric(v, bias, eps)
    mi_comb = comb if diag is None else comb / diag
    del diag
    return torch.stack([_bsum(mean * mi_comb), _bsum(comb * mi_comb)], dim=1)


def fold_update_(
    zg: torch.Tensor,
    hg: torch.Tensor,
    zr: torch.Tensor,
    hr: torch.Tensor,
    cz: torch.Tensor,
    ch: torch.Tensor,
) -> None:
    """In place z <- cz z + ch h of both forms (original ``zg`` and rotated ``zr``).

    ``cz``, ``ch``: [B, 1, 1] per-block coefficients in the stacks' dtype.
    """
    zg.mul_(cz).addcmul_(hg, ch)
    zr.mul_(cz).addcmul_(hr, ch)


def adam_direction_(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    g_rot: torch.Tensor,
    s_rot: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    nesterov: bool,
    sign: bool = False,
) -> torch.Tensor:
    """Adam's moments updated in place; m / (sqrt(v) + eps) (Nesterov: its look-ahead m).

    ``sign``: sign(m) instead (v is still kept: the FOP metric reads it).
    """
    exp_avg.mul_(beta1).add_(g_rot, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(s_rot, s_rot, value=1.0 - beta2)
    m = g_rot.lerp(exp_avg, beta1) if nesterov else exp_avg  # beta1 m_t + (1 - beta1) g_t
    if sign:
        return m.sign()
    denominator = exp_avg_sq.sqrt().add_(eps)
    return m / denominator if not nesterov else m.div_(denominator)


def _arg_key(x: object) -> Hashable:
    """What a compiled kernel is specialised on for one argument."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device))
    return ("V", type(x).__name__, x)


def _aliases(args: tuple[Any, ...]) -> tuple[int, ...]:
    """For each argument, the index of the first argument sharing its storage (-1: none)."""
    ptrs = [x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) else None for x in args]
    return tuple(-1 if p is None else ptrs.index(p) for p in ptrs)


def _fresh_copy(fn: Fn) -> Fn:
    """``fn`` with its own code object: Dynamo's cache (and recompile limit) is per code."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@dataclass
class CompiledKernels:
    """``torch.compile``d chains, one per (function, argument shapes and flags); counted."""

    compiles: int = 0  # kernels compiled (first calls of a key)
    compile_seconds: float = 0.0  # wall time of those first calls (trace + compile + run)
    calls: int = 0  # calls of compiled kernels, first calls included
    _cache: dict[Hashable, Fn] = field(default_factory=dict, repr=False)

    def run(self, fn: Fn, *args: Any) -> Any:
        """``fn(*args)`` through its compiled kernel for these shapes (compiled at first use).

        The key holds what Dynamo guards on: shapes, strides, dtypes, devices, flags, grad
        mode and which arguments alias (Adam's chain gets its gradient twice or a second
        one), so a key never recompiles.
        """
        key = (fn.__qualname__, torch.is_grad_enabled(), _aliases(args), *map(_arg_key, args))
        self.calls += 1
        kernel = self._cache.get(key)
        if kernel is not None:
            return kernel(*args)
        kernel = torch.compile(_fresh_copy(fn), dynamic=False, fullgraph=True, options=OPTIONS)
        start = time.perf_counter()
        out = kernel(*args)
        self.compile_seconds += time.perf_counter() - start
        self.compiles += 1
        self._cache[key] = kernel
        return out

    def stats(self) -> dict[str, float]:
        """{"compiles", "compile_seconds", "calls", "graphs"} so far (logs, benchmarks).

        ``graphs``: the graphs Dynamo compiled in this process (any caller's): equal to
        ``compiles`` when nothing else compiles and no key recompiled.
        """
        graphs = 0
        if self.compiles:  # Dynamo is imported by then
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
        return {
            "compiles": self.compiles,
            "compile_seconds": self.compile_seconds,
            "calls": self.calls,
            "graphs": graphs,
        }

    def clear(self) -> None:
        """Forget every kernel and zero the counts (tests; a later call compiles again)."""
        self._cache.clear()
        self.compiles, self.compile_seconds, self.calls = 0, 0.0, 0


KERNELS = CompiledKernels()


def _weight(w: float, like: torch.Tensor) -> torch.Tensor:
    """A fold weight as a 0-d tensor: a compiled kernel then serves every weight."""
    return torch.tensor(w, dtype=like.dtype, device=like.device)


def _chunk(x: Any, start: int, stop: int) -> Any:
    """Blocks start:stop of a stack; any other argument as it is."""
    return x[start:stop] if isinstance(x, torch.Tensor) and x.dim() > 0 else x


def per_block_sums(fn: Fn, compiled: bool, *args: Any) -> torch.Tensor:
    """``fn(*args)`` for a chain returning [B, k] per-block sums, eager or compiled.

    Every tensor argument of at least one dimension is a stack over the same B blocks (dim
    0). Eager: a stack above ``EAGER_CHUNK_BYTES`` runs in chunks of ``B //
    EAGER_TEMPORARIES`` blocks (at least one), so the temporaries stay within one class stack;
    each block's sums are the bits of an unchunked call. Compiled: the fold weights (floats)
    become 0-d tensors and the whole stack runs as one kernel.
    """
    stack = next(x for x in args if isinstance(x, torch.Tensor))
    if compiled:
        wargs = [_weight(x, stack) if isinstance(x, float) else x for x in args]
        return KERNELS.run(fn, *wargs)
    blocks = stack.shape[0]
    small = stack.numel() * stack.element_size() <= EAGER_CHUNK_BYTES
    step = blocks if small else max(1, blocks // EAGER_TEMPORARIES)
    if step >= blocks:
        return fn(*args)
    parts = [fn(*(_chunk(x, i, i + step) for x in args)) for i in range(0, blocks, step)]
    return torch.cat(parts)


def fold_update(compiled: bool, *args: torch.Tensor) -> None:
    """:func:`fold_update_` eager or compiled."""
    if compiled:
        KERNELS.run(fold_update_, *args)
    else:
        fold_update_(*args)


def adam_direction(compiled: bool, *args: Any) -> torch.Tensor:
    """:func:`adam_direction_` eager or compiled (betas, eps: constants of the kernel)."""
    return KERNELS.run(adam_direction_, *args) if compiled else adam_direction_(*args)
