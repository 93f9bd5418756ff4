"""Backend routing by device: per-device backend strings ("cpu:gloo,cuda:nccl") included."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.distributed.collective_device import backend_of


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("nccl", "cuda", "nccl"),
        ("nccl", "cpu", "nccl"),
        ("gloo", "cpu", "gloo"),
        ("cpu:gloo,cuda:nccl", "cuda", "nccl"),  # was taken for gloo: "!= 'nccl'"
        ("cpu:gloo,cuda:nccl", "cpu", "gloo"),
        ("cuda:nccl,cpu:gloo", "cuda", "nccl"),
    ],
)
def test_backend_of_a_per_device_backend_string(name, device, expected):
    assert backend_of(name, device) == expected


def _per_device_group(spec):
    import torch.distributed as dist

    from mlfop_megatron.distributed.collective_device import collective_device, group_backend
    from mlfop_megatron.distributed.owner_buffer import all_gather_uneven

    group = dist.new_group(backend="cpu:gloo")  # the per-device form of a backend string
    rank = dist.get_rank()
    sizes = [3, 5]
    out = torch.empty(sum(sizes))
    all_gather_uneven(out, torch.full((sizes[rank],), float(rank + 1)), sizes, group, False)
    return {
        "name": str(dist.get_backend(group)),
        "backend": group_backend(group, torch.device("cpu")),
        "device": str(collective_device(group)),
        "out": out,
    }


@pytest.mark.distributed
def test_a_real_per_device_group_routes_cpu_tensors_to_gloo():
    from mlfop_megatron.runtime.spawn import run_distributed

    for r in run_distributed(_per_device_group, 2, {}):
        assert r["backend"] == "gloo" and r["device"] == "cpu", r
        assert torch.equal(r["out"], torch.tensor([1.0] * 3 + [2.0] * 5))
