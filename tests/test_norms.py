"""fp64 sums of squares chunk by chunk: the value of a full fp64 copy, not its memory."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlfop_megatron.core import norms


class LargestOutput(TorchDispatchMode):
    """Records the bytes of the largest tensor any op creates inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {
            a.untyped_storage().data_ptr()
            for a in [*args, *(kwargs or {}).values()]
            if isinstance(a, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # Views of an input (reshape, split) allocate nothing.
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_sum_of_squares_matches_fp64_and_keeps_temporaries_to_a_chunk(monkeypatch):
    monkeypatch.setattr(norms, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(37, 211, generator=gen), torch.randn(5, generator=gen).to(torch.bfloat16)]
    want = sum(x.double().pow(2).sum() for x in xs)
    with LargestOutput() as seen:
        got = norms.sum_of_squares(xs, torch.device("cpu"))
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    assert seen.largest <= 1000 * 8  # one fp64 chunk, never the 7807-element fp64 copy
    with LargestOutput() as full:
        xs[0].double().pow(2).sum()
    assert full.largest == xs[0].numel() * 8  # what the tracker sees for the old way
