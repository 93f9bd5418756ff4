"""The param-group fields Megatron's LR scheduler and checkpoint loader read."""

from __future__ import annotations

from typing import Any


def megatron_group_fields(config: Any, wd_mult: float) -> dict[str, Any]:
    """Param-group fields of a default Megatron group; ``config`` is an OptimizerConfig."""
    return {
        "wd_mult": wd_mult,
        "lr_mult": 1.0,
        "is_expert_parallel": False,
        "is_decoupled_lr": False,
        "default_config": True,
        "max_lr": config.lr,
        "min_lr": config.min_lr,
    }
