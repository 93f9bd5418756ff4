"""The basis refresh in waves (``SOAPConfig.refresh_wave``, ``batched.refresh_waves``).

A wave's sides start together and finish after one host read; its new bases and QR
temporaries are what the refresh holds at once. Waves change when a block's basis is made,
not how: a run with a bound equals the one-wave run bitwise (CPU: the batched QR, eigh and
matmuls of a block are the same bits whichever blocks share the call, for these shapes; see
``core/batched.py``'s docstring), and the refresh's peak live bytes stay within the bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlfop_megatron.config import SOAPConfig
from mlfop_megatron.core import batched
from mlfop_megatron.optim import MLFOPSOAP
from tests.support.live_bytes import LiveBytes

SHAPES = [(32, 32)] * 4 + [(48, 16)] * 3 + [(16, 40)] * 2


def _run(
    refresh_wave: float,
    method: str,
    tolerance: float,
    steps: int = 10,
    shapes=SHAPES,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[torch.Tensor], list[dict], MLFOPSOAP]:
    """``steps`` steps of MLFOPSOAP on slowly drifting gradients; params and states after.

    The drift (an AR(1) walk) is slow enough that the gate keeps some bases and refreshes others.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]
    opt = MLFOPSOAP(
        params,
        lr=0.01,
        refresh_wave=refresh_wave,
        refresh_method=method,
        refresh_tolerance=tolerance,
    )
    walk = [torch.randn(s, generator=gen) for s in shapes]
    for _ in range(steps):
        for p, w in zip(params, walk):
            w.mul_(0.99).add_(torch.randn(w.shape, generator=gen), alpha=0.1)
            p.grad = w.to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], [opt.state[p] for p in params], opt


def _recorder(monkeypatch) -> tuple[list[int], list[bool]]:
    """Record the wave count of every refresh and whether a chunk copied gated blocks."""
    waves: list[int] = []
    gathered: list[bool] = []
    original = batched.refresh_waves

    def recorded(pieces, wave_bytes):
        out = original(pieces, wave_bytes)
        waves.append(len(out))
        gathered.extend(not batched._Piece.contiguous(c.members) for w in out for c in w)
        return out

    monkeypatch.setattr(batched, "refresh_waves", recorded)
    return waves, gathered


@pytest.mark.parametrize("tolerance", [0.0, 0.03])
def test_waves_give_the_one_wave_qr_refresh_bitwise(monkeypatch, tolerance):
    """Bounded waves (several per step, gated parts split) equal one wave, every bit (QR)."""
    waves, gathered = _recorder(monkeypatch)
    want_params, want_states, _ = _run(0.0, "qr", tolerance)
    assert max(waves) == 1  # 0: one wave
    waves.clear()
    for bound in (0.5, 1.0, 3.0):
        got_params, got_states, opt = _run(bound, "qr", tolerance)
        assert max(waves) > 1, bound  # the bound split the refresh
        for got, want in zip(got_params, want_params):
            assert torch.equal(got, want), bound
        for got, want in zip(got_states, want_states):
            for key, value in want.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got[key], value), (bound, key)
        if tolerance > 0:
            assert opt.counters.refreshes_skipped > 0
    if tolerance > 0:
        assert any(gathered)  # the gate's parts were split into copied chunks too


def test_waves_give_the_one_wave_eigh_refresh_to_rounding(monkeypatch):
    """eigh: equal to rounding (float64, 1e-10 relative), not bitwise.

    Blocks with rank-deficient factors (the early steps here) get their canonical null basis
    from one batched QR per null dimension over the blocks that share it
    (``batched._canonicalize``); which blocks share that call changes with the waves, and the
    null-basis QR of these [G, n, k] shapes is not batch-invariant on CPU.
    """
    waves, _ = _recorder(monkeypatch)
    want_params, want_states, _ = _run(0.0, "eigh", 0.0, dtype=torch.float64)
    waves.clear()
    got_params, got_states, _ = _run(1.0, "eigh", 0.0, dtype=torch.float64)
    assert max(waves) > 1
    for got, want in zip(got_params, want_params):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    for got, want in zip(got_states, want_states):
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-10, atol=1e-14)


def test_refresh_peak_stays_within_the_wave_bound(monkeypatch):
    """The refresh's live bytes peak at most at the bound; one wave holds several times it.

    Eight 32 x 32 blocks in one class (32 KiB gradient stack), both sides rotated, every basis
    refreshed every step (tolerance 0): a block's side holds three 4 KiB stacks at the peak,
    so a bound of one class stack takes two blocks per wave. One wave holds every new basis
    (16 x 4 KiB) beside the last side's temporaries.
    """
    peaks: list[int] = []
    original = batched.compute_bases

    def tracked(*args, **kwargs):
        with LiveBytes() as mem:
            out = original(*args, **kwargs)
        peaks.append(mem.peak)
        return out

    monkeypatch.setattr(batched, "compute_bases", tracked)
    shapes = [(32, 32)] * 8
    stack = 8 * 32 * 32 * 4
    _run(1.0, "qr", 0.0, steps=4, shapes=shapes)
    bounded = max(peaks[1:])  # refreshes (the first call is the first step's eigh)
    first_bounded = peaks[0]
    peaks.clear()
    _run(0.0, "qr", 0.0, steps=4, shapes=shapes)
    unbounded = max(peaks[1:])
    small = 8 * 1024  # per-block vectors (estimates, orders, flags) and scalars
    assert bounded <= stack + small, (bounded, stack)
    assert first_bounded <= stack + small, (first_bounded, stack)
    assert unbounded > 2 * stack, unbounded  # what the bound removes


def test_a_block_larger_than_the_bound_goes_alone(monkeypatch):
    """At least one block per wave: a bound below one block's cost still refreshes everything."""
    shapes = [(64, 8)] * 3  # a 64 x 64 basis per block: 8x the 64 x 8 gradient block
    waves, _ = _recorder(monkeypatch)
    want_params, _, want_opt = _run(0.0, "qr", 0.0, steps=3, shapes=shapes)
    waves.clear()
    got_params, _, opt = _run(0.1, "qr", 0.0, steps=3, shapes=shapes)
    # the bound (0.1 x 6 KiB) is below one block's side (3 x 16 KiB left, 3 x 256 B right):
    # every side of every block alone, 3 blocks x 2 sides
    assert max(waves) == 6
    assert opt.counters.refreshes_done == want_opt.counters.refreshes_done > 0
    for got, want in zip(got_params, want_params):
        assert torch.equal(got, want)


def test_refresh_wave_option_is_validated():
    """A negative or non-finite bound names the option."""
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="refresh_wave"):
            SOAPConfig(refresh_wave=bad)
    assert batched.refresh_wave_bytes([]) == math.inf
