"""Megatron-core glue: DDP subclass, optimizer, factory (imports megatron-core lazily)."""

from typing import Any

__all__ = [
    "FoldingDistributedDataParallel",
    "MLFOPChainedOptimizer",
    "MLFOPMegatronOptimizer",
    "get_mlfop_optimizer",
]


def __getattr__(name: str) -> Any:
    if name == "FoldingDistributedDataParallel":
        from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel

        return FoldingDistributedDataParallel
    if name in ("MLFOPChainedOptimizer", "MLFOPMegatronOptimizer"):
        from mlfop_megatron.megatron import optimizer

        return getattr(optimizer, name)
    if name == "get_mlfop_optimizer":
        from mlfop_megatron.megatron.factory import get_mlfop_optimizer

        return get_mlfop_optimizer
    raise AttributeError(name)
