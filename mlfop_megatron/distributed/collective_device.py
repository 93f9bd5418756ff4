"""Which backend runs a collective, and where a small collective's tensor must live."""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_of(name: str, device_type: str) -> str:
    """The backend of a group's backend string for tensors of ``device_type``.

    ``"nccl"`` -> "nccl" for any device; a per-device string such as
    ``"cpu:gloo,cuda:nccl"`` (``init_process_group(backend=...)`` with both) -> the entry of
    that device ("gloo" for cpu tensors, "nccl" for cuda ones); a device without an entry gets
    the whole string (no backend of that name: the caller's generic path).
    """
    if ":" not in name:
        return name
    table = dict(part.split(":", 1) for part in name.split(","))
    return table.get(device_type, name)


def group_backend(group: dist.ProcessGroup | None, device: torch.device) -> str:
    """The backend that runs ``group``'s collectives on tensors of ``device``."""
    return backend_of(str(dist.get_backend(group)), device.type)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The CPU where the group reduces host tensors, else this rank's GPU (NCCL only).

    For flags and scalars that start on the host (a signal seen, NVML readings): allocate
    them here, reduce, then read them back. A "cpu:gloo,cuda:nccl" group reduces them on the
    CPU; a pure NCCL group reduces only CUDA tensors.
    """
    if (
        dist.is_available()
        and dist.is_initialized()
        and group_backend(group, torch.device("cpu")) == "nccl"
    ):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
