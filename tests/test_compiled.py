"""The fused fold and step chains (core/fused.py): eager bits, fold scratch, compiled kernels.

Tolerances of the compiled path (``SOAPConfig.compile``), and why: inductor fuses each chain
into one loop nest and adds a block's products in its own order (vectorised partial sums),
so a per-block sum differs from eager by reassociation, a few float32 ulps relative to the
sum of |terms| (measured 2.6e-6 relative on the sums of random stacks); the fold scalars
built from them, then Adam's m / (sqrt(v) + eps), carry that into the parameters. End to end
the tests compare in float64 (4 folding windows: measured 3e-11 relative, bound 1e-9): in
float32 the same run differs by 3.4e-3 relative (measured), because in the first steps
m / (sqrt(v) + eps) maps an ulp of a tiny gradient entry to a step of order lr, which says
nothing about the kernels. The bitwise
equalities of the eager path (sharded == replicated, DP=2 == DP=1) rest on each block being
reduced alone; compiled, a block's sums are the same bits in a class of 8 and of 3 blocks on
this CPU (inductor parallelises over blocks), but inductor may split one long reduction
across threads when a class has fewer blocks than threads, and then owner-sharded and
replicated runs agree to the compiled-vs-eager tolerance only.
"""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.core import fused
from mlfop_megatron.core.batched_folding import BatchedWindowFolder
from mlfop_megatron.launch.plan import memory
from mlfop_megatron.optim import MLFOPSOAP
from tests.support.live_bytes import LiveBytes

# Compiled vs eager, relative to the largest entry: per-block sums (float32, 1.5k terms per
# block) and float64 parameters after four folding windows (see the module docstring).
SUMS_RTOL = 1e-5
PARAM_RTOL = 1e-9
EPS = 1e-8  # the metric's eps in the chains' calls: sqrt(v / bias) + eps


def _stacks(blocks: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    z, h = (torch.randn(blocks, 32, 48, generator=gen) for _ in range(2))
    diag = torch.rand(blocks, 32, 48, generator=gen) + 0.1
    s = torch.randn(blocks, generator=gen)
    return z, h, diag, s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_memory_model_knows_the_chunk_threshold():
    """launch/plan/memory.py (torch-free) models the eager fold with the same threshold."""
    assert memory.FOLD_CHUNK_BYTES == fused.EAGER_CHUNK_BYTES


def test_chunked_eager_sums_are_the_bits_of_one_call(monkeypatch):
    """A class above EAGER_CHUNK_BYTES runs in quarter chunks: every block's sums unchanged."""
    z, h, diag, s = _stacks(9)
    calls = [
        (fused.fold_phase1_sums, (z, h, diag, 0.9, EPS, 0.25, 0.75, True)),
        (fused.fold_phase2_sums, (z, h, diag, 0.9, EPS, s, 0.25, 0.75, True)),
        (fused.fold_phase2_sums, (z, h, None, 1.0, EPS, s, 0.5, 0.5, False)),
        (fused.eta_sums, (z, h, diag, 0.9, EPS)),
    ]
    whole = [fused.per_block_sums(fn, False, *args) for fn, args in calls]
    monkeypatch.setattr(fused, "EAGER_CHUNK_BYTES", 0)
    chunked = [fused.per_block_sums(fn, False, *args) for fn, args in calls]
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_fold_keeps_no_scratch_and_its_transient_is_one_class_stack(monkeypatch):
    """A fold allocates at most one class stack while it runs and keeps nothing after it.

    One class of 8 blocks, chunked (threshold 0): four live chunk temporaries of 2 blocks =
    one class stack. The old per-window workspace (a and d per class plus three stacks of the
    largest class, kept between folds) fails both bounds.
    """
    monkeypatch.setattr(fused, "EAGER_CHUNK_BYTES", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16, bias=False) for _ in range(8)])
    opt = MLFOPSOAP(model.parameters(), accumulation_steps=4, enabled=True, step_size="eta_star")
    stack_bytes = 8 * 16 * 16 * 4
    seen: list[tuple[int, int]] = []
    metric_held: list[bool] = []
    original = BatchedWindowFolder._fold_pair

    def tracked(self, z, h, with_eta):
        with LiveBytes() as mem:
            coef = original(self, z, h, with_eta)
        seen.append((mem.peak, mem.live))
        metric_held.append(self._metric.computed)
        return coef

    monkeypatch.setattr(BatchedWindowFolder, "_fold_pair", tracked)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for _ in range(4):
            model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
        opt.zero_grad()
    assert len(seen) == 6  # two folds a window
    # The folds made the metric inside their chains: the window never held it (S bytes).
    assert metric_held == [False] * 6
    small = 4096  # per-block scalars ([B, 5] sums, coefficients): not stack-sized
    for peak, live in seen:
        assert peak <= stack_bytes + small, (peak, stack_bytes)
        assert live <= small, live  # what outlives the fold: its scalars only


def _model() -> torch.nn.Module:
    """Two shape classes ([8, 8] twice, [4, 8] once), no biases, float64: few kernels."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 4, bias=False)).double()


def _windows(compile: bool, windows: int, k: int = 4) -> tuple[torch.nn.Module, MLFOPSOAP]:
    model = _model()
    opt = MLFOPSOAP(
        model.parameters(),
        accumulation_steps=k,
        enabled=True,
        step_size="eta_star",
        compile=compile,
        precondition_frequency=2,  # steps with and without a refresh
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(windows):
        for _ in range(k):
            model(torch.randn(16, 8, generator=gen, dtype=torch.float64)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_compiled_run_matches_eager_and_compiles_once_per_class():
    """Compiled chains are taken (compiles > 0), bounded, and agree with eager to PARAM_RTOL.

    Per class: phase 1, phase 2 and eta*'s sums each with the metric I (the first window,
    before any basis) and with the SOAP metric, the fold and Adam's chain: 8 kernels per
    shape class, however many windows run; and Dynamo compiled exactly as many graphs as the
    cache counts (no hidden recompile or fallback).
    """
    from torch._dynamo.utils import counters

    fused.KERNELS.clear()
    graphs = counters["stats"]["unique_graphs"]
    model_c, opt_c = _windows(True, 4)
    compiles = fused.KERNELS.compiles
    assert opt_c.stats()["compiled_kernels"] == compiles
    assert compiles == 8 * 2
    assert counters["stats"]["unique_graphs"] - graphs == compiles
    assert fused.KERNELS.compile_seconds > 0
    model_e, _ = _windows(False, 4)
    for pc, pe in zip(model_c.parameters(), model_e.parameters()):
        assert _rel(pc.detach(), pe.detach()) <= PARAM_RTOL
    _windows(True, 2)  # the same shapes again: no compile
    assert fused.KERNELS.compiles == compiles
    assert counters["stats"]["unique_graphs"] - graphs == compiles


@pytest.mark.parametrize("with_diag", [True, False])
def test_compiled_sums_match_eager_and_do_not_depend_on_class_mates(with_diag):
    """Per-block sums compiled vs eager within SUMS_RTOL; a block's bits alike in 8 and 3."""
    z, h, diag, s = _stacks(8)
    m = diag if with_diag else None
    for fn, args in (
        (fused.fold_phase1_sums, (z, h, m, 0.9, EPS, 0.25, 0.75, True)),
        (fused.fold_phase2_sums, (z, h, m, 0.9, EPS, s, 0.25, 0.75, True)),
    ):
        eager = fused.per_block_sums(fn, False, *args)
        compiled = fused.per_block_sums(fn, True, *args)
        assert _rel(compiled, eager) <= SUMS_RTOL
        first3 = [x[:3].clone() if isinstance(x, torch.Tensor) else x for x in args]
        assert torch.equal(fused.per_block_sums(fn, True, *first3), compiled[:3])


def test_a_checkpoint_without_the_compile_option_loads_with_the_default():
    """Param groups saved before ``compile`` existed take the optimizer's default."""
    model = _model()
    opt = MLFOPSOAP(model.parameters())
    model(torch.ones(2, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["compile"]
    fresh = MLFOPSOAP(model.parameters())
    fresh.load_state_dict(saved)
    assert all(g["compile"] is False for g in fresh.param_groups)
    fresh.step()  # reads every option of the group


@pytest.mark.parametrize("nesterov", [False, True])
def test_compiled_sign_direction_is_eager_bits(nesterov):
    """The step's chain with sign normalisation: compiled gives eager's signs.

    The moments agree to rounding (inductor's C++ may contract a multiply and an add into
    one FMA: seen, a last-bit difference); the signs, here, bitwise (no entry of m is within
    rounding of 0).
    """
    gen = torch.Generator().manual_seed(7)
    shape = (3, 16, 8)
    m, v, g = (torch.randn(shape, generator=gen) for _ in range(3))
    v = v.abs()
    args = (0.9, 0.95, 1e-8, nesterov, True)
    eager_m, eager_v = m.clone(), v.clone()
    want = fused.adam_direction(False, eager_m, eager_v, g, g, *args)
    got_m, got_v = m.clone(), v.clone()
    got = fused.adam_direction(True, got_m, got_v, g, g, *args)
    assert set(want.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(got, want)
    torch.testing.assert_close(got_m, eager_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_v, eager_v, rtol=1e-6, atol=1e-6)
