"""Sums of squares in fp64 without an fp64 copy of the tensor: chunk by chunk."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Elements per chunk: the fp64 temporaries of one chunk are 2 x 32 MiB.
CHUNK = 1 << 22


def sum_of_squares(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum(x^2) over every element of ``tensors``, accumulated in fp64 (a 0-d tensor on device).

    Each tensor is squared and summed in fp64 ``CHUNK`` elements at a time, so the largest
    temporary is two fp64 chunks however large the tensor (``x.double().pow(2).sum()`` holds
    two full fp64 copies: 16 bytes per element). Deterministic: the same tensor always sums in
    the same order.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x in tensors:
        flat = x.reshape(-1)
        for chunk in flat.split(CHUNK):
            total = total + chunk.double().pow(2).sum().to(device)
    return total
