"""The batched block engine (core/batched.py) against the per-block engine (core/soap.py).

Tolerances: both engines run the same elementwise ops on the same values, but batched
matmul/baddbmm and the batched FOP reductions (an elementwise product summed per block
instead of ``torch.dot``) round differently, so the two trajectories agree to rounding,
not bitwise. In float64 the models below stay within 1e-9 relative after several refreshes; in
float32 within 1e-4 (rounding differences amplified by the 1/(sqrt(v)+eps) division over a few
steps, the same order as the per-block engine's own run-to-run change under a different BLAS
thread count).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core.batched import BatchedBlocks, all_finite, finite_blocks
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
from mlfop_megatron.optim import MLFOPSOAP as _MLFOPSOAP
from tests.support.order import reference_order_soap as MLFOPSOAP  # noqa: N812 (see order.py)

TOL64 = 1e-6  # relative, multi-window float64 (see test_trajectory_matches_per_block_float64)


def stack_model(seed: int, dtype: torch.dtype, inp: int = 7, out: int = 5) -> torch.nn.Module:
    """Three equal-shape hidden layers (one shape class) plus the ends and biases."""
    torch.manual_seed(seed)
    mods = [torch.nn.Linear(inp, 12), torch.nn.Tanh()]
    for _ in range(3):
        mods += [torch.nn.Linear(12, 12), torch.nn.Tanh()]
    mods.append(torch.nn.Linear(12, out))
    return torch.nn.Sequential(*mods).to(dtype)


def train(model, opt, steps: int, k: int, seed: int, batch: int = 16) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    inp = model[0].in_features
    for _ in range(steps):
        for _ in range(k):
            x = torch.randn(batch, inp, generator=gen).to(dtype)
            model(x).pow(2).mean().backward()
            opt.accumulate() if k > 1 else None
        opt.step()
        opt.zero_grad()


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    scale = b.detach().abs().max().clamp_min(1e-30)
    err = float((a.detach() - b.detach()).abs().max() / scale)
    assert err <= tol, f"{what}: relative difference {err:.2e} > {tol:.0e}"


def unrotated_momentum(state) -> torch.Tensor:
    """QL m QR^T: the first moment in parameter coordinates (basis-independent)."""
    m = state["exp_avg"]
    if "QL" in state:
        m = state["QL"] @ m
    if "QR" in state:
        m = m @ state["QR"].T
    return m


def max_errors(opt_a, opt_b, model_a, model_b) -> dict[str, float]:
    """Largest relative difference of the params and of the basis-independent state.

    The state compared: factors, main weights, the first moment in parameter coordinates.
    Bases and the second moment are
    not compared entry by entry: inside a cluster of nearly equal eigenvalues a basis may turn
    by rounding / gap, which moves v's entries between coordinates without changing the step.
    """
    errors = {"param": 0.0, "state": 0.0}

    def rel(a, b):
        scale = b.detach().abs().max().clamp_min(1e-30)
        return float((a.detach() - b.detach()).abs().max() / scale)

    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        errors["param"] = max(errors["param"], rel(pa, pb))
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        assert (sa["step"], sa["initialized"]) == (sb["step"], sb["initialized"])
        for key in ("L", "R", "master"):
            if key in sa:
                errors["state"] = max(errors["state"], rel(sa[key], sb[key]))
        errors["state"] = max(errors["state"], rel(unrotated_momentum(sa), unrotated_momentum(sb)))
    return errors


def assert_levels_close(levels_a, levels_b, rel: float) -> None:
    assert len(levels_a) == len(levels_b)
    for la, lb in zip(levels_a, levels_b):
        for key in la:
            assert la[key] == pytest.approx(lb[key], rel=rel, abs=1e-12), key


def assert_close_states(opt_a, opt_b, model_a, model_b, tol) -> None:
    errors = max_errors(opt_a, opt_b, model_a, model_b)
    assert max(errors.values()) <= tol, errors


OPTIONS = [
    dict(accumulation_steps=4, enabled=True, precondition_frequency=2),
    dict(accumulation_steps=4, enabled=True, precondition_frequency=3, refresh_method="eigh"),
    dict(
        accumulation_steps=4,
        enabled=True,
        structure="tree",
        step_size="eta_star",
        precondition_frequency=2,
    ),
    dict(
        accumulation_steps=4,
        enabled=True,
        structure="last",
        step_size="eta_star",
        statistics_from="mean",
    ),
    # 1-D params get a rank-1-per-step factor; a QR refresh of a rank-deficient factor is
    # discontinuous in rounding (in either engine), the eigh refresh is not.
    dict(accumulation_steps=1, precondition_1d=True, refresh_method="eigh"),
    # Megatron-like SOAP: KL-Shampoo, bias-corrected factors, update from the first step, the
    # step's gradient in bases refreshed (every step) with it. The end layers' factors stay
    # rank-deficient for steps, refreshed at every one: eigh (see the 1-D case above).
    dict(
        accumulation_steps=4,
        enabled=True,
        precondition_frequency=1,
        refresh_method="eigh",
        factor_estimator="kl",
        correct_factor_bias=True,
        first_step_update=True,
        refresh_first=True,
    ),
    dict(
        accumulation_steps=2,
        enabled=True,
        precondition_frequency=2,
        refresh_first=True,
        structure="tree",
    ),
]


def _kl_tol(options, tol: float) -> float:
    """KL-Shampoo divides by eigenvalue estimates down to kl_damping (1e-5) of the largest.

    The rounding of the small ones is amplified up to 1e5-fold into the other factor; refreshed
    at every step, the engines' rounding differences grow to ~1e-4 over seven fp64 windows
    (measured 1.3e-4) and to ~1e-4 in one fp32 window; the one-window fp64 check stays 1e-12.
    """
    if options.get("factor_estimator") == "kl":
        return max(tol, 1e-3) if tol > 1e-12 else tol
    return tol


def _pair(dtype, options):
    models = [stack_model(0, dtype), stack_model(0, dtype)]
    opts = [
        MLFOPSOAP(m.parameters(), batched=flag, weight_decay=0.1, **options)
        for m, flag in zip(models, (True, False))
    ]
    return models, opts


@pytest.mark.parametrize("options", OPTIONS)
def test_trajectory_matches_per_block_float64(options):
    """Seven windows (statistics step, refreshes) of both engines from the same start.

    Within 1e-6 relative: Adam's m/(sqrt(v)+eps) amplifies the rounding of the small rotated
    coordinates over the steps (the per-block engine does the same under any change of
    rounding, e.g. another BLAS).
    """
    models, opts = _pair(torch.float64, options)
    k = options["accumulation_steps"]
    for m, o in zip(models, opts):
        train(m, o, steps=7, k=k, seed=3)
    assert_close_states(opts[0], opts[1], models[0], models[1], _kl_tol(options, 1e-6))
    batched, per_block = opts[0].stats(), opts[1].stats()
    for key in ("eigh_fp64_retries", "eigh_failures", "qr_failures", "steps", "skipped_steps"):
        assert batched[key] == per_block[key], key
    # The fold inputs of the last window differ by the drift: its scalars agree to 1e-3.
    # (KL-Shampoo: the states' 1e-4 above moves the fold's ratios of small sums by ~1e-2.)
    kl = options.get("factor_estimator") == "kl"
    assert_levels_close(batched["levels"], per_block["levels"], 3e-2 if kl else 1e-3)
    # The engine really batched: the three hidden 12x12 weights form one class.
    hidden = [c for c in opts[0]._engine.classes if c.tensors["exp_avg"].shape[1:] == (12, 12)]
    assert [c.size for c in hidden] == [3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", OPTIONS)
def test_one_window_matches_per_block(dtype, options):
    """One window of each engine (fold, step and a refresh) agrees to rounding.

    From one state (five per-block windows): 1e-12 (float64) / 1e-4 (float32) relative
    (measured: 1e-15 and 3e-5 at most).
    """
    k = options["accumulation_steps"]
    options = dict(options, precondition_frequency=2)
    model = stack_model(0, dtype)
    opt = MLFOPSOAP(model.parameters(), batched=False, weight_decay=0.1, **options)
    train(model, opt, steps=5, k=k, seed=3)  # t = 4 after it: the next window refreshes
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    models, opts = [], []
    for flag in (True, False):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
        m = stack_model(1, dtype)
        m.load_state_dict(ckpt["model"])
        o = MLFOPSOAP(m.parameters(), batched=flag, weight_decay=0.1, **options)
        o.load_state_dict(ckpt["opt"])
        train(m, o, steps=2, k=k, seed=4)
        models.append(m)
        opts.append(o)
    tol = _kl_tol(options, 1e-12 if dtype == torch.float64 else 1e-4)
    assert_close_states(opts[0], opts[1], models[0], models[1], tol)
    assert_levels_close(opts[0].stats()["levels"], opts[1].stats()["levels"], tol)


def test_states_are_views_of_the_stacks_and_checkpoints_cross_engines():
    """Per-block state stays addressable; a checkpoint of either engine loads into the other."""
    model = stack_model(1, torch.float64)
    opt = MLFOPSOAP(
        model.parameters(),
        accumulation_steps=2,
        enabled=True,
        precondition_frequency=2,
        batched=True,
    )
    train(model, opt, steps=3, k=2, seed=0)
    hidden = model[2].weight
    cls = next(c for c in opt._engine.classes if c.size == 3)
    assert opt.state[hidden]["QL"].untyped_storage().data_ptr() == (
        cls.tensors["QL"].untyped_storage().data_ptr()
    )
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    results = []
    for flag in (True, False):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
        m = stack_model(9, torch.float64)
        m.load_state_dict(ckpt["model"])
        o = MLFOPSOAP(
            m.parameters(),
            accumulation_steps=2,
            enabled=True,
            precondition_frequency=2,
            batched=flag,
        )
        o.load_state_dict(ckpt["opt"])
        train(m, o, steps=4, k=2, seed=5)
        results.append((m, o))
    (ma, oa), (mb, ob) = results
    assert_close_states(oa, ob, ma, mb, TOL64)
    # And a per-block checkpoint loads into the batched engine (the other direction).
    buf2 = io.BytesIO()
    torch.save(ob.state_dict(), buf2)
    buf2.seek(0)
    m3 = copy.deepcopy(mb)
    o3 = MLFOPSOAP(
        m3.parameters(), accumulation_steps=2, enabled=True, precondition_frequency=2, batched=True
    )
    o3.load_state_dict(torch.load(buf2, weights_only=False))
    train(m3, o3, steps=2, k=2, seed=6)
    train(mb, ob, steps=2, k=2, seed=6)
    assert_close_states(o3, ob, m3, mb, TOL64)


@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_fallback_stays_per_block(method):
    """A non-finite factor in one block of a class falls back as in the per-block engine.

    That block keeps its basis and is counted exactly as in the per-block engine; its class
    mates refresh normally.
    """
    runs = []
    for flag in (True, False):
        model = stack_model(2, torch.float64)
        opt = MLFOPSOAP(
            model.parameters(), precondition_frequency=2, refresh_method=method, batched=flag
        )
        train(model, opt, steps=3, k=1, seed=1)  # bases exist, step 2 refreshed
        poisoned = model[4].weight  # the middle hidden layer
        with torch.no_grad():
            opt.state[poisoned]["L"][0, 0] = float("nan")  # in place: the batched view sees it
        basis = opt.state[poisoned]["QL"].clone()
        train(model, opt, steps=2, k=1, seed=2)  # crosses the refresh at step 4
        assert torch.equal(opt.state[poisoned]["QL"], basis)
        assert torch.isfinite(opt.state[poisoned]["exp_avg"]).all()
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    for key in ("eigh_fp64_retries", "eigh_failures", "qr_failures"):
        assert oa.stats()[key] == ob.stats()[key], key
    assert oa.stats()["qr_failures" if method == "qr" else "eigh_failures"] >= 1
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        if pa is not ma[4].weight:
            assert_rel_close(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"], 1e-6)


@pytest.mark.parametrize("structure", ["chain", "tree"])
def test_sharded_soap_batched_matches_per_block(structure):
    """Blocked params (full and edge blocks: several shape classes) in ShardedSOAP."""
    torch.manual_seed(0)
    shapes = [(24, 20), (24, 20), (20, 24), (12, 20)]
    base = [torch.randn(s, dtype=torch.float64) for s in shapes]
    engines, params = [], []
    for flag in (True, False):
        ps = [b.clone() for b in base]
        cfg = MLFOPConfig.from_kwargs(
            accumulation_steps=4,
            enabled=True,
            structure=structure,
            precondition_frequency=2,
            weight_decay=0.05,
            batched=flag,
        )
        engines.append(ShardedSOAP(ps, [f"p{i}" for i in range(4)], cfg, block_size=8))
        params.append(ps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        levels = engines[0].schedule
        grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]]
        grads += [[g * 0.5 + 0.1 for g in grads[0]] for _ in range(levels.num_levels - 1)]
        for engine in engines:
            for level in range(levels.num_levels):
                engine.fold_reduced_level(level, grads[level], scale=1.0)
            engine.step(lr=0.01, weight_decay=0.05, grad_scale=0.9)
    for pa, pb in zip(*params):
        assert_rel_close(pa, pb, TOL64)
    sa, sb = engines[0].state_dict(), engines[1].state_dict()
    for name, block in sa["blocks"].items():
        for key, value in block.items():
            if torch.is_tensor(value):
                assert_rel_close(value, sb["blocks"][name][key], TOL64, name + key)
            else:
                assert value == sb["blocks"][name][key]
    assert len(engines[0]._engine.classes) < len(engines[0].owned)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # views launch no kernel
        return func(*args, **(kwargs or {}))


def _ops_per_step(
    layers: int, batched: bool, rank: int | None = None, refresh_method: str = "qr"
) -> list[int]:
    """Aten ops of a statistics step, a plain step, a refresh step and a plain step.

    ``rank``: every gradient is a product of 16 x rank and rank x 16 Gaussians, so every
    block's factors are rank-deficient with the same null dimension (16 - 3 * rank at the
    refresh, after three gradients).
    """
    torch.manual_seed(0)
    params = [torch.randn(16, 16) for _ in range(layers)]
    cfg = MLFOPConfig.from_kwargs(
        accumulation_steps=4,
        enabled=True,
        precondition_frequency=2,
        batched=batched,
        refresh_method=refresh_method,
        refresh_wave=0.0,  # one refresh wave: the batching itself (waves: test_refresh_waves)
    )
    engine = ShardedSOAP(params, [f"w{i}" for i in range(layers)], cfg)
    gen = torch.Generator().manual_seed(0)

    def grad() -> torch.Tensor:
        if rank is None:
            return torch.randn(16, 16, generator=gen)
        return torch.randn(16, rank, generator=gen) @ torch.randn(rank, 16, generator=gen)

    counts = []
    for _ in range(4):  # statistics step, plain step, refresh step, plain step
        grads = [grad() for _ in range(layers)]
        counter = _OpCounter()
        with counter:
            for level in range(engine.schedule.num_levels):
                engine.fold_reduced_level(level, grads)
            engine.step(lr=0.01, weight_decay=0.0)
        counts.append(counter.count)
    return counts


def test_operator_count_is_independent_of_the_number_of_blocks():
    """Batched: aten ops per step do not grow with the number of equal-shape blocks.

    Views are excluded; the count is a proxy for kernel launches. Per-block: they grow
    linearly.
    """
    assert _ops_per_step(4, True)[-1] == _ops_per_step(16, True)[-1]
    assert _ops_per_step(16, False)[-1] > 3 * _ops_per_step(4, False)[-1] > 0


@pytest.mark.parametrize("refresh_method", ["qr", "eigh"])
def test_refresh_op_count_is_independent_of_rank_deficient_blocks(refresh_method):
    """Rank-deficient blocks of one null dimension get their canonical null bases batched.

    First bases (step 1) and the refresh (step 3) of 4 and of 16 rank-deficient blocks cost
    the same number of aten ops; the per-block engine grows with the blocks.
    """
    few = _ops_per_step(4, True, rank=3, refresh_method=refresh_method)
    many = _ops_per_step(16, True, rank=3, refresh_method=refresh_method)
    assert few[0] == many[0] and few[2] == many[2], (few, many)
    per_block = _ops_per_step(4, False, rank=3, refresh_method=refresh_method)
    assert _ops_per_step(16, False, rank=3, refresh_method=refresh_method)[2] > 3 * per_block[2]


def test_engine_rebuilds_when_states_are_replaced():
    model = stack_model(0, torch.float32)
    opt = MLFOPSOAP(model.parameters(), batched=True)
    train(model, opt, steps=2, k=1, seed=0)
    params = [p for p in model.parameters()]
    states = [opt.state[p] for p in params]
    engine = opt._engine
    assert engine.matches(states)
    states[2]["QL"] = states[2]["QL"].clone()  # replaced from outside: no longer a view
    assert not engine.matches(states)
    train(model, opt, steps=1, k=1, seed=1)
    assert opt._engine is not engine and opt._engine.matches(states)


def test_batched_blocks_validates_its_inputs():
    with pytest.raises(ValueError, match="one param and one config per block"):
        BatchedBlocks([{}], [], [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU emulation only")
@pytest.mark.parametrize("refresh_method", ["qr", "eigh"])
def test_batched_engine_is_device_clean_and_fold_is_sync_free(refresh_method):
    """Under the strict CPU emulation of a GPU the batched engine stays device-clean.

    No host/device mixing in the batched engine (stacking, fold, step, batched refresh) and
    no host sync in accumulate().
    """
    from mlfop_megatron.runtime.cpu_emulation import cpu_emulation, is_cpu_emulation_installed
    from mlfop_megatron.runtime.strict_device import forbid_host_sync

    if is_cpu_emulation_installed():
        pytest.skip("an emulation is already installed in this process")
    with cpu_emulation(with_megatron=False, strict=True):
        model = stack_model(0, torch.float32).cuda()
        opt = MLFOPSOAP(
            model.parameters(),
            accumulation_steps=4,
            enabled=True,
            precondition_frequency=2,
            refresh_method=refresh_method,
            refresh_tolerance=0.03,  # the drift gate (and its parts) on the device too
            step_size="eta_star",
            batched=True,
        )
        for _ in range(4):
            for _ in range(4):
                x = torch.randn(16, 7).cuda()
                model(x).pow(2).mean().backward()
                with forbid_host_sync():
                    opt.accumulate()
            opt.step()
        assert all(c.index.is_cuda for c in opt._engine.classes)
        for p in model.parameters():
            assert p.is_cuda and torch.isfinite(p).all()
            assert all(v.is_cuda for v in opt.state[p].values() if torch.is_tensor(v))


class _NullDirectionNet(torch.nn.Module):
    """Hidden 32x32 layers whose inputs miss one coordinate, plus [32, 1] gate weights.

    The input side factor R of every hidden weight has rank 31 (one null column: the
    canonical null basis is a matrix-vector projection); each gate weight is a rotated
    single-column block (its rotation is a matrix-vector product).
    """

    def __init__(self, seed: int, dtype: torch.dtype, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(7, 32)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(layers))
        self.gates = torch.nn.ModuleList(torch.nn.Linear(1, 32) for _ in range(layers))
        self.out = torch.nn.Linear(32, 5)
        mask = torch.ones(32)
        mask[5] = 0.0  # an exact zero coordinate: rank n - 1 in every dtype
        self.register_buffer("mask", mask)
        self.to(dtype)

    @property
    def in_features(self) -> int:
        return 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for layer, gate in zip(self.hidden, self.gates):
            h = h * self.mask  # no component along e_5
            h = torch.tanh(layer(h)) + torch.tanh(gate(h.mean(dim=1, keepdim=True)))
        return self.out(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refresh_method", ["qr", "eigh"])
def test_block_result_does_not_depend_on_its_class_mates(dtype, refresh_method):
    """The same blocks in one shape class vs each in a class of its own: bitwise equal.

    This is what keeps owner-sharded runs (classes of the blocks one rank owns) bitwise equal
    to replicated ones. Param groups split classes, so one optimizer stacks the three hidden
    weights (and would stack the gates) while the other gives every param a group of its own;
    the math is identical. The hidden weights' input factors have rank n - 1 (a canonical null
    basis at every basis computation) and the gates are [32, 1] rotated blocks: the two shapes
    whose batched matmul is not batch-invariant.
    """
    options = dict(
        batched=True, precondition_frequency=2, refresh_method=refresh_method, weight_decay=0.1
    )
    runs = []
    for split in (False, True):
        model = _NullDirectionNet(0, dtype)
        params = list(model.parameters())
        groups = [{"params": [p]} for p in params] if split else [{"params": params}]
        opt = MLFOPSOAP(groups, **options)
        gen = torch.Generator().manual_seed(3)
        for _ in range(7):  # first bases, then refreshes at steps 2, 4, 6
            x = torch.randn(16, 7, generator=gen).to(dtype)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = runs
    hidden = [c.size for c in opt_a._engine.classes if c.tensors["exp_avg"].shape[1:] == (32, 32)]
    assert hidden == [3]  # the hidden weights really share a class ...
    assert all(c.size == 1 for c in opt_b._engine.classes)  # ... and are alone here
    # The rank-deficient side really took the canonical null-basis path.
    r_factor = opt_a.state[model_a.hidden[0].weight]["R"]
    values = torch.linalg.eigvalsh(r_factor.double())
    tol = values[-1] * 32 * torch.finfo(dtype).eps * 10.0  # linalg.null_tolerance
    assert values[0] < tol  # numerically rank-deficient (float64: exactly one null column)
    if dtype == torch.float64:
        assert values[1] > tol
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
        for key, va in opt_a.state[pa].items():
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, opt_b.state[pb][key]), f"{name} {key}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finiteness_checks_equal_isfinite(dtype):
    """all_finite / finite_blocks (aminmax, amax/amin) flag exactly what isfinite flags."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, generator=gen).to(dtype)
    assert bool(all_finite([base, base[:1]]))
    assert finite_blocks(base).tolist() == [True, True, True]
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = base.clone()
        x[1, 2, 3] = bad
        assert not bool(all_finite([base, x])) and not bool(torch.isfinite(x).all())
        assert finite_blocks(x).tolist() == torch.isfinite(x).all(-1).all(-1).tolist()
        cols = x.transpose(-2, -1).contiguous().transpose(-2, -1)  # non-contiguous blocks
        assert finite_blocks(cols).tolist() == [True, False, True]
    assert bool(all_finite([torch.empty(0, 2, 2, dtype=dtype)]))


def test_add_into_equals_stacked_sum():
    """The accumulate path (stack, then _foreach_add_ per class) is bitwise the stacked sum."""
    states = [
        {"exp_avg": torch.zeros(s), "exp_avg_sq": torch.zeros(s), "step": 0, "initialized": False}
        for s in [(4, 3), (2, 3), (4, 3), (4, 3)]
    ]
    cfg = MLFOPConfig().soap
    engine = BatchedBlocks(states, [torch.zeros(s["exp_avg"].shape) for s in states], [cfg] * 4)
    gen = torch.Generator().manual_seed(0)
    micro = [[torch.randn(s["exp_avg"].shape, generator=gen) for s in states] for _ in range(3)]
    acc = engine.stack(micro[0])
    for grads in micro[1:]:
        engine.add_into(acc, grads)
    ref = engine.stack(micro[0])  # the previous way: stack every micro-step, add the stacks
    for grads in micro[1:]:
        for r, x in zip(ref, engine.stack(grads)):
            r.add_(x)
    assert len(acc) == len(ref) == 2 and all(torch.equal(a, r) for a, r in zip(acc, ref))
    low = [g.to(torch.bfloat16) for g in micro[0]]  # converted once per class, exactly
    assert all(x.dtype == torch.float32 for x in engine.stack(low))
    assert all(
        torch.equal(a, b) for a, b in zip(engine.stack(low), engine.stack([g.float() for g in low]))
    )


@pytest.mark.parametrize("batched", [True, False])
def test_window_with_overflowing_sum_or_nan_micro_step_is_skipped(batched):
    """A NaN in one micro-step, or finite micro-steps whose sum overflows, skip the step."""
    for poison in ("nan", "overflow"):
        model = stack_model(0, torch.float32)
        opt = MLFOPSOAP(model.parameters(), batched=batched, accumulation_steps=4, enabled=True)
        train(model, opt, steps=2, k=4, seed=0)
        before = copy.deepcopy(opt.state_dict())
        params = list(model.parameters())
        weights = [p.detach().clone() for p in params]
        for m in range(4):
            for p in params:
                p.grad = torch.full_like(p, 1e-3)
            if poison == "nan" and m == 1:
                params[2].grad[0, 0] = float("nan")
            if poison == "overflow":
                params[2].grad[0, 0] = 3e38  # finite; four of them sum beyond float32
            opt.accumulate()
        opt.step()
        if poison == "overflow" and not batched:
            continue  # the per-block engine checks micro-steps only (documented difference)
        assert opt.skipped_steps == 1, poison
        assert all(torch.equal(p, w) for p, w in zip(params, weights))
        after = opt.state_dict()
        for key, state in before["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value):
                    assert torch.equal(value, after["state"][key][name]), (poison, name)


def _top_level_aten_events(fn) -> int:
    """Count the aten ops called from Python (not their aten children), views included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def _mlfop_events(layers: int, k: int) -> int:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(layers)]
    opt = MLFOPSOAP(params, accumulation_steps=k, enabled=True, precondition_frequency=1000)
    gen = torch.Generator().manual_seed(0)

    def window() -> None:
        for _ in range(k):
            for p in params:
                p.grad = torch.randn(16, 16, generator=gen)
            if k > 1:
                opt.accumulate()
        opt.step()

    window()  # statistics step
    window()  # first plain step
    grads = [[torch.randn(16, 16, generator=gen) for _ in params] for _ in range(k)]

    def counted() -> None:
        for g in grads:
            for p, x in zip(params, g):
                p.grad = x
            if k > 1:
                opt.accumulate()
        opt.step()

    return _top_level_aten_events(counted)


@pytest.mark.parametrize("k", [1, 4])
def test_mlfop_soap_ops_per_window_do_not_grow_with_params(k):
    """MLFOPSOAP's gradient collection and step issue no per-param op (no-op views included).

    Every op the profiler sees at the top level (a ``_foreach_`` op once) is counted, so a
    per-param ``detach``/``reshape``/``to`` would make 12 params cost more than 3.
    """
    assert _mlfop_events(3, k) == _mlfop_events(12, k)


@pytest.mark.parametrize("batched", [True, False])
def test_fold_without_diagnostics_skips_only_the_diagnostic_sums(batched):
    """``diagnostics=False`` drops the Euclidean inner products, not a bit of the update.

    The fold's scalars use only <a,Ma> and <d,Ma> of phase 1 (and the phase-2 sums), so both
    runs must end bitwise equal; without diagnostics no level summary is kept.
    """
    options = dict(accumulation_steps=4, structure="tree", step_size="eta_star", enabled=True)
    runs = []
    for diagnostics in (True, False):
        model = stack_model(0, torch.float32)
        opt = MLFOPSOAP(model.parameters(), batched=batched, diagnostics=diagnostics, **options)
        train(model, opt, steps=4, k=4, seed=5)
        runs.append((model, opt))
    (model_on, opt_on), (model_off, opt_off) = runs
    for pa, pb in zip(model_on.parameters(), model_off.parameters()):
        assert torch.equal(pa, pb)
        for key, value in opt_on.state[pa].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_off.state[pb][key]), key
    assert opt_on.stats()["levels"] and not opt_off.stats()["levels"]


def test_default_order_matches_per_block_on_full_rank_factors():
    """The default order gives the same trajectory in both engines on full-rank factors.

    Update from step 1, refresh before the update, every step; square 6x6 layers with 16
    samples a micro-step. fp64, 1e-7 relative over six steps (measured 1.1e-8: the engines'
    rounding, carried by Adam's normalisation).
    """

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        layers = [torch.nn.Linear(6, 6, bias=False) for _ in range(3)]
        return torch.nn.Sequential(*layers).to(torch.float64)

    models = [model(0), model(0)]
    opts = [
        _MLFOPSOAP(
            m.parameters(), batched=flag, weight_decay=0.1, accumulation_steps=2, enabled=True
        )
        for m, flag in zip(models, (True, False))
    ]
    for m, o in zip(models, opts):
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            for _ in range(2):
                x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
                m(x).pow(2).mean().backward()
                o.accumulate()
            o.step()
            o.zero_grad()
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert_rel_close(pa.detach(), pb.detach(), 1e-7)


@pytest.mark.parametrize("refresh_method", ["qr", "eigh"])
def test_drift_gated_refresh_of_part_of_a_class_matches_per_block(refresh_method):
    """refresh_tolerance refreshes the drifted blocks of a class and leaves the others as they are.

    Four 6 x 5 blocks in one class, both sides rotated: blocks 0 and 2 hold the exact
    eigenbases of their factors (off-diagonal share ~1e-30), blocks 1 and 3 random orthogonal
    bases. The batched refresh must equal the per-block ``soap.refresh_bases`` block by block
    (fp64, 1e-12), leave the aligned blocks' bases and moments bitwise, and re-express the
    drifted blocks' first moment through both sides in turn (L, then R).
    """
    from mlfop_megatron.config import SOAPConfig
    from mlfop_megatron.core.batched import compute_bases
    from mlfop_megatron.core.linalg import LinalgCounters
    from mlfop_megatron.core.soap import block_layout, init_state, refresh_bases, set_estimates

    cfg = SOAPConfig(refresh_method=refresh_method, refresh_tolerance=1e-3)
    gen = torch.Generator().manual_seed(0)
    layout = block_layout((6, 5), cfg)
    states = []
    for j in range(4):
        st = init_state(layout, torch.float64, torch.device("cpu"))
        st.update(step=4, initialized=True)
        for f, q in (("L", "QL"), ("R", "QR")):
            n = st[f].shape[0]
            a = torch.randn(n, n, generator=gen, dtype=torch.float64)
            st[f] = a @ a.T
            st[q] = torch.linalg.eigh(st[f])[1].flip(1) if j % 2 == 0 else torch.linalg.qr(a)[0]
        set_estimates(st)  # the tracked diag(Q^T F Q) of the bases just set
        st["exp_avg"] = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        st["exp_avg_sq"] = torch.rand(6, 5, generator=gen, dtype=torch.float64)
        states.append(st)
    per_block = copy.deepcopy(states)
    before = copy.deepcopy(states)
    counters_ref = LinalgCounters()
    for st in per_block:
        refresh_bases(st, refresh_method, counters_ref, cfg.refresh_tolerance)
    params = [torch.zeros(6, 5, dtype=torch.float64) for _ in states]
    engine = BatchedBlocks(states, params, [cfg] * 4)
    assert [c.size for c in engine.classes] == [4]
    counters = LinalgCounters()
    compute_bases(engine.classes, refresh_method, counters, first=False)
    assert (counters.refreshes_done, counters.refreshes_skipped) == (4, 4)
    assert (counters_ref.refreshes_done, counters_ref.refreshes_skipped) == (4, 4)
    for j, (got, want, old) in enumerate(zip(states, per_block, before)):
        for key in ("QL", "QR", "exp_avg", "exp_avg_sq"):
            if j % 2 == 0:
                assert torch.equal(got[key], old[key]), (j, key)
            else:
                assert not torch.equal(got[key], old[key]) or key == "exp_avg_sq", (j, key)
                assert_rel_close(got[key], want[key], 1e-12, f"block {j} {key}")
        # The tracked estimates: kept where the basis is, formed anew where it changed.
        for f in ("L", "R"):
            want_est = (got["Q" + f] * (got[f] @ got["Q" + f])).sum(dim=0)
            assert_rel_close(got["D" + f], want_est, 1e-12, f"block {j} D{f}")
            assert_rel_close(want["D" + f], want_est, 1e-12, f"per-block {j} D{f}")
