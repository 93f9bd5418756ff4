"""Megatron-LM entry point: ``--optimizer mlfop_soap``, ``--mlfop-*`` flags, runtime install.

``arguments`` is pure argparse (no Megatron-LM import); ``install`` wraps Megatron-LM's
training setup and imports ``megatron.training`` only when called.
"""

from mlfop_megatron.megatron_lm.arguments import (
    OPTIMIZER_NAME,
    add_mlfop_args,
    chain_args_providers,
    mlfop_config_from_args,
    validate_megatron_args,
)
from mlfop_megatron.megatron_lm.install import (
    SUPPORTED_MEGATRON_LM,
    install,
    is_installed,
    pretrain,
)

__all__ = [
    "OPTIMIZER_NAME",
    "SUPPORTED_MEGATRON_LM",
    "add_mlfop_args",
    "chain_args_providers",
    "install",
    "is_installed",
    "mlfop_config_from_args",
    "pretrain",
    "validate_megatron_args",
]
