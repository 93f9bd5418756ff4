"""Where the demo's tensors live: a real GPU, the strict CPU emulation of one, or the CPU."""

from __future__ import annotations

import os
from typing import Any

import torch

Batch = dict[str, Any]


# ----------------------------------------------------------------------------------- devices
def use_cuda() -> bool:
    """Whether this process trains on a GPU."""
    return torch.cuda.is_available()


def on_accelerator() -> bool:
    """Whether model and batches go to "cuda": a real GPU, or the strict CPU emulation.

    Strict mode (``MLFOP_STRICT_DEVICE=1``, see mlfop_megatron/runtime/strict_device.py) tags
    what is created for "cuda" and fails on host/device mixing, so the demo's GPU data path
    runs on a CPU machine and device bugs show there. Kernel choices (TE, NCCL, the attention
    mask) still follow use_cuda().
    """
    if use_cuda():
        return True
    from mlfop_megatron.runtime.strict_device import is_strict_installed

    return is_strict_installed()


def device() -> torch.device:
    """The device of this rank (its local GPU, else CPU; "cuda" under strict emulation)."""
    if on_accelerator():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: Batch) -> Batch:
    """Move a collated batch to this rank's device."""
    dev = device()
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


def torchrun_env() -> bool:
    """Launched by torchrun / srun (RANK and WORLD_SIZE set by the launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
