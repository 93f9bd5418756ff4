"""The device a small collective's tensor must live on for the process group's backend."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """This rank's GPU for NCCL groups (NCCL reduces only CUDA tensors), else the CPU.

    For flags and scalars that start on the host (a signal seen, NVML readings): allocate
    them here, reduce, then read them back.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
