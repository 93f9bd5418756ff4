"""Parameter all-gathers left in flight after the step, waited before the params are read.

With ``CommConfig.overlap_param_gather`` the optimizers launch their parameter all-gathers
asynchronously at the end of the step and register them here; a forward pre-hook on every
module that owns parameters waits for the gathers covering that module's own parameters
before its forward runs (Megatron's ``overlap_param_gather`` does the same per bucket group).
Everything else that reads or writes the parameters between the step and the next forward
(checkpoint save and load, ``reload_model_params``, the next step) calls ``finish_all``
first. No collectives here: the callers hand in the functions that wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class PendingParamGathers:
    """The in-flight parameter all-gathers of one model chunk and the hooks that wait."""

    def __init__(self) -> None:
        self._pending: list[tuple[frozenset[int], Callable[[], None]]] = []
        self._hooks: list[Any] = []

    @property
    def installed(self) -> bool:
        """Whether the forward pre-hooks are registered."""
        return bool(self._hooks)

    def install(self, module: torch.nn.Module) -> None:
        """Register a forward pre-hook on every submodule that owns parameters (idempotent)."""
        if self._hooks:
            return
        for m in module.modules():
            if next(m.parameters(recurse=False), None) is not None:
                self._hooks.append(m.register_forward_pre_hook(self._pre_hook))

    def add(self, params: Iterable[torch.Tensor], finish: Callable[[], None]) -> None:
        """Register an in-flight gather that writes ``params``; ``finish()`` waits for it."""
        self._pending.append((frozenset(id(p) for p in params), finish))

    def __len__(self) -> int:
        return len(self._pending)

    def finish_for(self, params: Iterable[torch.Tensor]) -> None:
        """Wait for every in-flight gather that writes one of ``params`` (launch order)."""
        ids = {id(p) for p in params}
        if not self._pending or not ids:
            return
        keep = []
        for covered, finish in self._pending:
            if covered & ids:
                finish()
            else:
                keep.append((covered, finish))
        self._pending = keep

    def finish_all(self) -> None:
        """Wait for every in-flight gather (before anything reads or writes the params)."""
        pending, self._pending = self._pending, []
        for _, finish in pending:
            finish()

    def _pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        if self._pending:
            self.finish_for(module.parameters(recurse=False))
