"""Count the collectives a run really launches, at the torch.distributed boundary.

``count_collectives()`` wraps the public torch.distributed collectives for the duration of a
``with`` block; every outermost call (a deprecated alias that forwards to its replacement
counts once) adds one launch and its bytes to the counter of its kind. Bytes are what one rank
sends with ring algorithms, the usual NCCL cost model: all-reduce 2(n-1)/n x size,
reduce-scatter and all-to-all (n-1)/n x input (uneven all-to-alls and
per-rank lists: all but this rank's own piece), all-gather (n-1)/n x output, broadcast the
size (each non-root receives it once), where n is the group size and size is in bytes.
Calls on a group of one rank (e.g. Megatron's vocab-parallel cross entropy at TP=1) move
nothing and are counted apart, in ``trivial``. Works with any backend; nothing is estimated
from a formula of the model.

Modules that bound a collective to a name of their own at import are not seen through
``torch.distributed``: megatron-core's DDP buffers call ``dist_all_gather_func`` /
``dist_reduce_scatter_func`` (``param_and_grad_buffer``, the param all-gathers and grad
reduce-scatters of its DistributedOptimizer and LayerWiseDistributedOptimizer layouts), and its
tensor-parallel mappings do the same. ``count_collectives(rebind_in=MEGATRON_IMPORT_BINDINGS)``
counts those too: inside the block, every attribute of those modules that *is* one of the
wrapped collectives is replaced by its counted version. ``observe`` sees every counted launch
(kind, bytes, args, kwargs), e.g. to attribute launches to a buffer or a phase.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

_LOCAL = threading.local()


def _numel_bytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_numel_bytes(x) for x in t)
    return 0


def _group_size(kwargs: dict[str, Any], args: tuple, position: int) -> int:
    group = kwargs.get("group", args[position] if len(args) > position else None)
    return dist.get_world_size(group)


# name -> (kind, bytes sent by one rank given (args, kwargs))
def _ring(
    factor: float, tensor_pos: int, group_pos: int
) -> Callable[[tuple, dict], tuple[int, int]]:
    def sent(args: tuple, kwargs: dict) -> tuple[int, int]:
        n = _group_size(kwargs, args, group_pos)
        tensors = args[tensor_pos] if len(args) > tensor_pos else None
        if n > 1 and factor == 1.0 and isinstance(tensors, (list, tuple)) and len(tensors) == n:
            # a list per rank (possibly uneven): every rank's piece but this rank's own
            group = kwargs.get("group", args[group_pos] if len(args) > group_pos else None)
            return n, _numel_bytes(tensors) - _numel_bytes(tensors[dist.get_rank(group)])
        size = _numel_bytes(tensors) if tensors is not None else 0
        return n, int(factor * (n - 1) * size / n) if n > 1 else 0

    return sent


def _all_to_all_single(args: tuple, kwargs: dict) -> tuple[int, int]:
    """Even splits: (n-1)/n x input; uneven (``input_split_sizes``): all but this rank's split."""
    splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
    if not splits:
        return _ring(1.0, 1, 4)(args, kwargs)
    group = kwargs.get("group", args[4] if len(args) > 4 else None)
    n = dist.get_world_size(group)
    inp = kwargs.get("input", args[1] if len(args) > 1 else None)
    assert isinstance(inp, torch.Tensor)
    per_elem = inp.element_size() * (inp[0].numel() if inp.dim() > 1 else 1)
    mine = int(splits[dist.get_rank(group)])
    return n, (int(sum(splits)) - mine) * per_elem if n > 1 else 0


def _broadcast(args: tuple, kwargs: dict) -> tuple[int, int]:
    n = _group_size(kwargs, args, 2)
    return n, _numel_bytes(args[0]) if n > 1 else 0


_WRAPPED: dict[str, tuple[str, Callable[[tuple, dict], tuple[int, int]]]] = {
    "all_reduce": ("all_reduce", _ring(2.0, 0, 2)),
    "reduce_scatter_tensor": ("reduce_scatter", _ring(1.0, 1, 3)),
    "reduce_scatter_single": ("reduce_scatter", _ring(1.0, 1, 3)),
    "reduce_scatter": ("reduce_scatter", _ring(1.0, 1, 3)),
    "all_gather_into_tensor": ("all_gather", _ring(1.0, 0, 2)),
    "all_gather_single": ("all_gather", _ring(1.0, 0, 2)),
    "all_gather": ("all_gather", _ring(1.0, 0, 2)),
    "all_to_all_single": ("all_to_all", _all_to_all_single),
    "broadcast": ("broadcast", _broadcast),
}


# Modules of megatron-core (0.16-0.19) that bind torch.distributed collectives at import.
MEGATRON_IMPORT_BINDINGS = (
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.mappings",
)

# (kind, bytes sent, args, kwargs) of one counted launch
Observer = Callable[[str, int, tuple, dict], None]


@dataclass
class CollectiveCounts:
    """Launches and bytes sent by this rank, per collective kind."""

    launches: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    trivial: int = 0  # calls on one-rank groups (not in launches)

    def add(self, kind: str, sent: int) -> None:
        """Record one launch of ``kind`` that sent ``sent`` bytes."""
        self.launches[kind] = self.launches.get(kind, 0) + 1
        self.bytes[kind] = self.bytes.get(kind, 0) + sent

    @property
    def total_launches(self) -> int:
        """Launches of every kind."""
        return sum(self.launches.values())

    @property
    def total_bytes(self) -> int:
        """Bytes sent by every kind."""
        return sum(self.bytes.values())


@contextmanager
def count_collectives(
    observe: Observer | None = None, rebind_in: Sequence[str] = ()
) -> Iterator[CollectiveCounts]:
    """Count every collective launched inside the block on this rank (see module).

    ``observe(kind, sent, args, kwargs)`` is called for every counted launch (not for calls on
    one-rank groups). ``rebind_in``: names of modules whose import-time bindings of the
    collectives are counted too (loaded ones only; see ``MEGATRON_IMPORT_BINDINGS``).
    """
    counts = CollectiveCounts()
    originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        kind, sent = _WRAPPED[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            if getattr(_LOCAL, "depth", 0):
                return fn(*args, **kwargs)
            n, sent_bytes = sent(args, kwargs)
            if n > 1:
                counts.add(kind, sent_bytes)
                if observe is not None:
                    observe(kind, sent_bytes, args, kwargs)
            else:
                counts.trivial += 1
            _LOCAL.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                _LOCAL.depth = 0

        return counted

    wrapped = {name: wrap(name, fn) for name, fn in originals.items()}
    by_id = {id(fn): wrapped[name] for name, fn in originals.items()}
    rebound: list[tuple[Any, str, Any]] = []  # (module, attribute, original)
    for module_name in rebind_in:
        module = sys.modules.get(module_name)
        for attr, value in list(vars(module).items()) if module is not None else ():
            if id(value) in by_id and not attr.startswith("__"):
                rebound.append((module, attr, value))
                setattr(module, attr, by_id[id(value)])
    for name in originals:
        setattr(dist, name, wrapped[name])
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for module, attr, value in rebound:
            setattr(module, attr, value)
