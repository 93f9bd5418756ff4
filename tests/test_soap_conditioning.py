"""Why cross-layout SOAP comparisons need fp64 and identical gradients (see test_megatron_dp.py).

SOAP rotates into the eigenbasis of accumulated gradient Gram matrices. With low-rank gradients
whose spectrum spans many orders of magnitude (as in a real transformer), the eigenvectors of
the small eigenvalues are ill-conditioned, and Adam's normalisation in that basis turns a
last-bit change of the gradient into a visible change of the update. Full-rank well-spread
gradients do not show it. This pins the measured behaviour the DP tests' tolerances rest on.
"""

from __future__ import annotations

import torch

from mlfop_megatron.optim import MLFOPSOAP
from tests.support.order import REFERENCE_ORDER


def _train(rank: int, noise: float, m: int = 32, n: int = 32, steps: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    noise_gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(m, n, dtype=torch.float64, generator=gen))
    opt = MLFOPSOAP([p], lr=1e-2, precondition_frequency=3, **REFERENCE_ORDER)
    spectrum = torch.logspace(0, -6, rank, dtype=torch.float64)
    for _ in range(steps):
        left = torch.randn(m, rank, dtype=torch.float64, generator=gen) * spectrum
        right = torch.randn(rank, n, dtype=torch.float64, generator=gen)
        g = left @ right * 1e-2
        p.grad = g * (1 + noise * torch.randn(m, n, dtype=torch.float64, generator=noise_gen))
        opt.step()
    return p.detach()


def test_last_bit_gradient_noise_is_amplified_only_for_ill_conditioned_factors():
    low_rank = (_train(4, 0.0) - _train(4, 1e-15)).abs().max().item()
    full_rank = (_train(64, 0.0) - _train(64, 1e-15)).abs().max().item()
    assert low_rank > 1e-7  # measured 3.7e-5: far above fp64 rounding
    assert full_rank < 1e-9  # measured 6.8e-11
