"""Initialise and tear down megatron-core's parallel state in a torch.distributed world."""

from __future__ import annotations

import gc
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def init_megatron_parallel(
    tp: int = 1, pp: int = 1, seed: int = 1234, **parallel_kwargs: Any
) -> None:
    """Initialise megatron parallel_state (TP x PP x DP over the world) and seed every RNG.

    Requires an initialised torch.distributed world; DP = world_size / (tp * pp). On CPU the
    cuda emulation must be installed first (run_distributed does that) because seeding goes
    through megatron's CUDA RNG tracker.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mlfop_megatron.megatron import compat

    compat.check_megatron_core_version()
    destroy_megatron_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **parallel_kwargs
    )
    compat.reset_rng_tracker()
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def destroy_megatron_parallel() -> None:
    """Tear down megatron parallel_state and free its process groups (safe to call repeatedly).

    Megatron's ``destroy_model_parallel`` only drops its references to the groups; torch keeps
    every group in its registry, and a gloo group keeps its I/O threads, until the group is
    destroyed. A process that initialises the parallel state once per run (the digits demo
    and the sample-efficiency benchmark train dozens of runs per process) would otherwise
    accumulate thousands of gloo threads. Every group but the default one is destroyed here,
    and the garbage that still references them is collected.
    """
    if "megatron.core.parallel_state" in sys.modules:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if not dist.is_initialized():
        return
    default = c10d._get_default_group()
    for group in list(c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)
    # A finished run's model and optimizer often sit in reference cycles that still hold the
    # groups (and so their threads) until the cyclic collector runs: run it now.
    gc.collect()
