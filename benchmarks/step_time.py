"""Optimizer step time on CPU: ML-FOP-SOAP vs AdamW and the SOAP implementations on PyPI.

Times ``optimizer.step()`` alone (gradients are assigned to ``p.grad``, no forward/backward) on
the fp32 shapes of one GPT block (QKV 3h x h, proj h x h, fc1 4h x h, fc2 h x 4h, norm h).
All contenders run side by side in one process, interleaved step by step (the order rotates
every round), so machine noise hits them alike and the ours/peer ratios are like-for-like.

Sections of the output:
  1. equal-math check: same init and gradients, parameter drift of each peer vs ours;
  2. step time: amortized mean over whole refresh periods, plain-step and refresh-step medians;
  3. achieved GFLOP/s of our per-step matmuls vs the same matmuls run alone (matmul peak);
     the basis refresh alone, ours vs pytorch_optimizer on the same state (paired repeats);
  4. fold cost: accumulate() with folding vs plain sum, in units of one basis rotation.

    python -m benchmarks.step_time             # hidden 256 and 512: ~2 min on 2 idle cores
    python -m benchmarks.step_time --quick     # smoke test, < 30 s, does not touch RESULTS.md
    python -m benchmarks.step_time --hidden 256 512 1024   # adds h=1024: ~15 min
    python -m benchmarks.step_time --profile 512   # op tables only (torch.profiler)

Requires the bench extra (``pip install -e '.[bench]'``): heavyball and pytorch_optimizer.
A peer that is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    elapsed,
    log,
    machine_facts,
    package_version,
    replace_section,
    timed,
)
from mlfop_megatron.core.linalg import LinalgCounters
from mlfop_megatron.core.soap import refresh_bases, rotate
from mlfop_megatron.optim import MLFOPSOAP

FREQ = 10  # precondition_frequency for every SOAP
LR, BETAS, EPS, WD = 3e-3, (0.95, 0.95), 1e-8, 0.01  # SOAP reference defaults
SECTION = "## Optimizer step time (CPU)"

Shape = tuple[int, ...]


def block_shapes(hidden: int) -> list[tuple[str, Shape]]:
    """Parameter shapes of one GPT block at this hidden size (fp32, no biases)."""
    h = hidden
    return [
        ("qkv", (3 * h, h)),
        ("proj", (h, h)),
        ("fc1", (4 * h, h)),
        ("fc2", (h, 4 * h)),
        ("norm", (h,)),
    ]


def matrix_shapes(shapes: Sequence[tuple[str, Shape]]) -> list[tuple[int, int]]:
    """The 2-D (preconditioned) shapes."""
    return [(s[0], s[1]) for _, s in shapes if len(s) == 2]


def step_flops(shapes: Sequence[tuple[str, Shape]], rotations: int) -> float:
    """Per-step matmul FLOPs: each rotation and the factor update cost 2mn(m+n) per m x n."""
    return sum((rotations + 1) * 2.0 * m * n * (m + n) for m, n in matrix_shapes(shapes))


def rotation_flops(shapes: Sequence[tuple[str, Shape]]) -> float:
    """FLOPs of rot(X) = QL^T X QR over the block."""
    return sum(2.0 * m * n * (m + n) for m, n in matrix_shapes(shapes))


def our_refresh_flops(shapes: Sequence[tuple[str, Shape]]) -> float:
    """Matmul FLOPs of our refresh (QR excluded): F Q, Q_new^T Q_old, re-expressing m."""
    total = 0.0
    for m, n in matrix_shapes(shapes):
        for d, k in ((m, n), (n, m)):
            total += 2.0 * d**3 + 2.0 * d**3 + 2.0 * d * d * k
    return total


def make_params(shapes: Sequence[tuple[str, Shape]], seed: int) -> list[torch.Tensor]:
    """Deterministic fp32 parameters for one block."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * 0.02 for _, s in shapes]


def make_grads(
    shapes: Sequence[tuple[str, Shape]], count: int, seed: int
) -> list[list[torch.Tensor]]:
    """``count`` distinct gradient sets (one tensor per parameter)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 1e-2 for _, s in shapes] for _ in range(count)]


# ------------------------------------------------------------------ contenders
@dataclass
class Contender:
    """One optimizer under test, with a probe telling whether the last step refreshed bases."""

    name: str
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer | None
    refreshed: Callable[[], bool]
    rotations: int  # rotations per step in its algorithm (for the FLOP model)
    config: str
    notes: str = ""
    step_fn: Callable[[], None] | None = None  # overrides opt.step (matmul-peak entry)
    times: list[float] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)

    def step(self) -> None:
        """One optimizer step."""
        if self.step_fn is not None:
            self.step_fn()
        else:
            self.opt.step()


def _our_probe(opt: MLFOPSOAP) -> Callable[[], bool]:
    """Refresh happened on the last step iff the moment count moved onto a multiple of f."""
    last = {"t": 0}

    def probe() -> bool:
        ts = [s["step"] for s in opt.state.values() if isinstance(s, dict) and "QL" in s]
        t = max(ts, default=0)
        moved = t != last["t"]
        last["t"] = t
        return moved and t > 0 and t % FREQ == 0

    return probe


def make_ours(params: list[torch.Tensor], **extra: object) -> Contender:
    """ML-FOP-SOAP with K=1 (plain SOAP step; folding does not run)."""
    opt = MLFOPSOAP(
        params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, precondition_frequency=FREQ, **extra
    )
    cfg = opt.config.soap
    return Contender(
        "ours (MLFOPSOAP)",
        params,
        opt,
        _our_probe(opt),
        rotations=2,
        config=(
            f"lr={cfg.lr}, betas={cfg.betas}, shampoo_beta=beta2, eps={cfg.eps}, "
            f"wd={cfg.weight_decay}, f={cfg.precondition_frequency}, "
            f"max_precond_dim={cfg.max_precond_dim}, merge_dims=off, precondition_1d="
            f"{cfg.precondition_1d}, refresh={cfg.refresh_method}, accumulation_steps=1"
        ),
        notes="m kept in the rotated basis: 2 rotations/step (rot G, unrot update) + factors",
    )


def make_adamw(params: list[torch.Tensor]) -> Contender:
    """torch.optim.AdamW with its CPU defaults (single-tensor loop)."""
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    d = opt.defaults
    return Contender(
        "torch.optim.AdamW",
        params,
        opt,
        lambda: False,
        rotations=-1,
        config=f"lr={LR}, betas={BETAS}, eps={EPS}, wd={WD}, foreach={d['foreach']}, "
        f"fused={d['fused']} (torch defaults: the single-tensor loop on CPU)",
    )


def make_pytorch_optimizer(params: list[torch.Tensor]) -> Contender | None:
    """pytorch_optimizer.SOAP (a port of the SOAP reference implementation)."""
    try:
        from pytorch_optimizer import SOAP
    except ImportError:
        return None
    opt = SOAP(
        params,
        lr=LR,
        betas=BETAS,
        shampoo_beta=None,
        weight_decay=WD,
        precondition_frequency=FREQ,
        max_precondition_dim=10000,
        merge_dims=False,
        precondition_1d=False,
        correct_bias=True,
        normalize_gradient=False,
        eps=EPS,
    )

    def probe() -> bool:
        step = opt.param_groups[0].get("step", 0) - 1  # its refresh test uses step = calls-1
        return step > 0 and step % FREQ == 0

    return Contender(
        f"pytorch_optimizer.SOAP {package_version('pytorch_optimizer')}",
        params,
        opt,
        probe,
        rotations=3,
        config=(
            f"lr={LR}, betas={BETAS}, shampoo_beta=None(=beta2), eps={EPS}, wd={WD}, "
            f"precondition_frequency={FREQ}, max_precondition_dim=10000, merge_dims=False, "
            "precondition_1d=False, correct_bias=True, normalize_gradient=False"
        ),
        notes=(
            "same math as the reference (m kept in the original basis: 3 rotations/step, "
            "QR refresh in fp32, eigh(F + 1e-30 I)); same refresh schedule as ours"
        ),
    )


def make_heavyball(params: list[torch.Tensor], compile_step: bool) -> Contender | None:
    """heavyball.SOAP configured to SOAP reference defaults as far as its API allows."""
    try:
        import heavyball
    except ImportError:
        return None
    if not compile_step:
        heavyball.utils.compile_mode = None  # eager; torch.compile/inductor autotune takes minutes
    opt = heavyball.SOAP(
        params,
        lr=LR,
        betas=BETAS,
        shampoo_beta=BETAS[1],
        eps=EPS,
        weight_decay=WD,
        precondition_frequency=FREQ,
        max_precond_dim=10000,
        merge_dims=False,
        precondition_1d=False,
        warmup_steps=0,
        use_precond_schedule=False,
        storage_dtype="float32",
    )
    return Contender(
        f"heavyball.SOAP {package_version('heavyball')}",
        params,
        opt,
        lambda: bool(opt._is_preconditioning),
        rotations=3,
        config=(
            f"lr={LR}, betas={BETAS}, shampoo_beta={BETAS[1]}, eps={EPS}, wd={WD}, "
            f"precondition_frequency={FREQ} (use_precond_schedule=False), max_precond_dim=10000"
            " (default 2048), merge_dims=False (default True), precondition_1d=False, "
            "warmup_steps=0, storage_dtype=float32, multi_tensor=True, "
            f"compile={'on' if compile_step else 'off (heavyball.utils.compile_mode=None)'}"
        ),
        notes=(
            "differs: shampoo_beta is bias-corrected (beta_debias), m kept in the original "
            "basis (3 rotations/step), refresh via a cumulative float probability 1/f (drifts: "
            "calls 11, 20, 30, ...), QR refresh adds a spectral lift and sign fix"
        ),
    )


def make_matmul_peak(shapes: Sequence[tuple[str, Shape]]) -> Contender:
    """The exact matmuls of our per-step path (2 rotations + 2 factor products), nothing else."""
    gen = torch.Generator().manual_seed(7)
    work = []
    for m, n in matrix_shapes(shapes):
        ql = torch.linalg.qr(torch.randn(m, m, generator=gen))[0]
        qr = torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
        g = torch.randn(m, n, generator=gen)
        bufs = [torch.empty(m, n) for _ in range(4)] + [torch.empty(m, m), torch.empty(n, n)]
        work.append((ql, qr, g, bufs))

    def run() -> None:
        for ql, qr, g, (b1, b2, b3, b4, ll, rr) in work:
            torch.matmul(ql.T, g, out=b1)
            torch.matmul(b1, qr, out=b2)
            torch.matmul(ql, b2, out=b3)
            torch.matmul(b3, qr.T, out=b4)
            torch.mm(g, g.T, out=ll)
            torch.mm(g.T, g, out=rr)

    return Contender(
        "matmul peak (our 6 matmuls alone)",
        [],
        None,
        lambda: False,
        rotations=2,
        config="torch.matmul with out=, same shapes and threads, no elementwise work",
        step_fn=run,
    )


# --------------------------------------------------------------------- stats
@dataclass
class Summary:
    """Steady-state statistics of one contender (seconds)."""

    mean: float  # amortized mean over whole periods (refresh included)
    period_lo: float  # min/max of per-period means
    period_hi: float
    plain_median: float
    plain_p25: float
    plain_p75: float
    plain_min: float
    refresh_median: float | None
    refreshes: int


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(c: Contender, period: int) -> Summary:
    """Statistics over the measured window (a whole number of periods)."""
    times, flags = c.times, c.flags
    periods = [statistics.fmean(times[i : i + period]) for i in range(0, len(times), period)]
    plain = [t for t, f in zip(times, flags) if not f]
    refresh = [t for t, f in zip(times, flags) if f]
    return Summary(
        statistics.fmean(times),
        min(periods),
        max(periods),
        statistics.median(plain),
        quantile(plain, 0.25),
        quantile(plain, 0.75),
        min(plain),
        statistics.median(refresh) if refresh else None,
        len(refresh),
    )


def paired(a: Contender, b: Contender) -> list[float]:
    """Per-round a/b over the rounds where neither refreshed (back-to-back samples)."""
    return [x / y for x, y, fx, fy in zip(a.times, b.times, a.flags, b.flags) if not fx and not fy]


def spread(xs: Sequence[float]) -> str:
    """'median [p25-p75]' of ratios."""
    return f"{statistics.median(xs):.2f} [{quantile(xs, 0.25):.2f}-{quantile(xs, 0.75):.2f}]"


def ms(x: float | None) -> str:
    """Seconds to a millisecond string."""
    return "-" if x is None else f"{1e3 * x:.1f}"


# ---------------------------------------------------------------- benchmarks
class LoadGate:
    """Holds a timed round back (bounded) while other processes load the CPU.

    A fixed small matmul probe is compared with its best time at start; while it runs more
    than 1.5x slower the round waits. Each wait is capped, and so is the total.
    """

    def __init__(self, max_wait: float, budget: float) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(384, 384, generator=gen)
        self.b = torch.randn(384, 384, generator=gen)
        self.max_wait, self.budget = max_wait, budget
        self.base = min(self.probe() for _ in range(10))
        self.waited = 0.0
        self.loaded_rounds = 0
        self.rounds = 0

    def probe(self) -> float:
        """Time of the fixed probe workload."""
        return timed(lambda: [self.a @ self.b for _ in range(4)])

    def wait(self) -> None:
        """Wait until the probe is back near its best time (or the caps are hit)."""
        self.rounds += 1
        t0 = time.perf_counter()
        while self.probe() > 1.5 * self.base:
            spent = time.perf_counter() - t0
            if spent > self.max_wait or self.waited + spent > self.budget:
                self.loaded_rounds += 1
                break
            time.sleep(0.2)
        self.waited += time.perf_counter() - t0

    def summary(self) -> str:
        """One line for the report."""
        return (
            f"load gate: waited {self.waited:.0f} s in total before timed rounds; "
            f"{self.loaded_rounds}/{self.rounds} rounds still ran under load "
            f"(probe > 1.5x its best after a {self.max_wait:g} s cap, total cap "
            f"{self.budget:g} s)"
        )


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """Assign fresh copies (an optimizer may modify p.grad in place)."""
    for p, g in zip(params, grads):
        p.grad = g.clone()


def build_contenders(
    shapes: Sequence[tuple[str, Shape]], args: argparse.Namespace, seed: int
) -> tuple[list[Contender], list[str]]:
    """Our optimizer, the peers that are installed, and the matmul-peak entry."""
    skipped = []
    out = [make_ours([p.requires_grad_() for p in make_params(shapes, seed)])]
    out.append(make_adamw([p.requires_grad_() for p in make_params(shapes, seed)]))
    peer = make_pytorch_optimizer([p.requires_grad_() for p in make_params(shapes, seed)])
    if peer is None:
        skipped.append("pytorch_optimizer (not installed)")
    else:
        out.append(peer)
    peer = make_heavyball(
        [p.requires_grad_() for p in make_params(shapes, seed)], args.heavyball_compile
    )
    if peer is None:
        skipped.append("heavyball (not installed)")
    else:
        out.append(peer)
    out.append(make_matmul_peak(shapes))
    return out, skipped


def bench_steps(
    hidden: int, args: argparse.Namespace, gate: LoadGate
) -> tuple[list[Contender], list[str]]:
    """Interleaved step timing of every contender on one block."""
    shapes = block_shapes(hidden)
    contenders, skipped = build_contenders(shapes, args, seed=hidden)
    grads = make_grads(shapes, 3, seed=1000 + hidden)
    warmup = 1 + args.warmup + (FREQ if args.heavyball_compile else 0)
    measured = args.periods * FREQ
    total = warmup + measured
    log(f"h={hidden}: {len(contenders)} contenders, {warmup} warmup + {measured} timed steps")
    for i in range(total):
        gc.collect()
        if i >= warmup:
            gate.wait()
        k = i % len(contenders)
        last: dict[str, float] = {}
        for c in contenders[k:] + contenders[:k]:  # rotate the order every round
            set_grads(c.params, grads[i % len(grads)])
            last[c.name] = timed(c.step)
            flag = c.refreshed()
            if i >= warmup:
                c.times.append(last[c.name])
                c.flags.append(flag)
        if i < warmup or (i - warmup) % max(1, args.progress) == 0 or i == total - 1:
            tag = f"warmup {i + 1}/{warmup}" if i < warmup else f"step {i - warmup + 1}/{measured}"
            line = ", ".join(f"{c.name.split()[0]} {ms(last[c.name])}" for c in contenders)
            log(f"h={hidden} {tag} (ms): {line}")
    return contenders, skipped


def bench_fold(hidden: int, args: argparse.Namespace, gate: LoadGate) -> dict[str, float]:
    """accumulate() cost of K=8 with folding vs folding disabled, in units of rot(X)."""
    k_steps = args.accumulation_steps
    shapes = block_shapes(hidden)
    opts = {}
    params = {}
    for name, enabled in (("fold", True), ("plain", False)):
        params[name] = [p.requires_grad_() for p in make_params(shapes, hidden)]
        opts[name] = MLFOPSOAP(
            params[name],
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=WD,
            precondition_frequency=FREQ,
            accumulation_steps=k_steps,
            enabled=enabled,
        )
    levels = opts["fold"].schedule.boundaries
    folds = len(levels) - 1
    grads = make_grads(shapes, k_steps, seed=2000 + hidden)
    acc: dict[str, list[float]] = {"fold": [], "plain": []}
    step: dict[str, list[float]] = {"fold": [], "plain": []}
    micro: dict[str, list[list[float]]] = {"fold": [], "plain": []}
    rot_times: list[float] = []
    warm = 2  # window 1: statistics-only first step; window 2: first metric
    windows = warm + args.fold_windows
    log(f"h={hidden} fold: K={k_steps}, levels {levels} -> {folds} folds, {windows} windows")
    for w in range(windows):
        gc.collect()
        if w >= warm:
            gate.wait()
        order = ["fold", "plain"] if w % 2 == 0 else ["plain", "fold"]
        for name in order:
            opt, ps = opts[name], params[name]
            per = []
            for k in range(k_steps):
                for p, g in zip(ps, grads[k]):
                    p.grad = g.clone()
                per.append(timed(opt.accumulate))
            st = timed(opt.step)
            if w >= warm:
                acc[name].append(sum(per))
                micro[name].append(per)
                step[name].append(st)
        if w >= warm:
            states = [opts["fold"].state[p] for p in params["fold"] if p.dim() == 2]
            xs = [g for g, (_, s) in zip(grads[0], shapes) if len(s) == 2]
            pairs = list(zip(xs, states))
            rot_times.append(timed(lambda pairs=pairs: [rotate(x, s) for x, s in pairs]))
            log(
                f"h={hidden} fold window {w - warm + 1}/{args.fold_windows}: accumulate x{k_steps}"
                f" fold {ms(acc['fold'][-1])} ms, plain {ms(acc['plain'][-1])} ms; "
                f"rot(X) {ms(rot_times[-1])} ms"
            )
        else:
            log(f"h={hidden} fold warmup window {w + 1}/{warm}")
    t_rot = statistics.median(rot_times)
    a_f, a_p = statistics.median(acc["fold"]), statistics.median(acc["plain"])
    win_f = statistics.median([a + s for a, s in zip(acc["fold"], step["fold"])])
    win_p = statistics.median([a + s for a, s in zip(acc["plain"], step["plain"])])
    micro_f = [statistics.median(col) for col in zip(*micro["fold"])]
    micro_p = [statistics.median(col) for col in zip(*micro["plain"])]
    # Paired per window (same window, back to back): robust to slowly varying machine load.
    acc_rot = [(af - ap) / folds / r for af, ap, r in zip(acc["fold"], acc["plain"], rot_times)]
    win_rot = [
        (af + sf - ap - sp) / folds / r
        for af, sf, ap, sp, r in zip(
            acc["fold"], step["fold"], acc["plain"], step["plain"], rot_times
        )
    ]
    return {
        "hidden": hidden,
        "K": k_steps,
        "folds": folds,
        "levels": levels,
        "acc_fold": a_f,
        "acc_plain": a_p,
        "step_fold": statistics.median(step["fold"]),
        "step_plain": statistics.median(step["plain"]),
        "win_fold": win_f,
        "win_plain": win_p,
        "rot": t_rot,
        "micro_fold": micro_f,
        "micro_plain": micro_p,
        "acc_rot": statistics.median(acc_rot),
        "win_rot": statistics.median(win_rot),
        "win_rot_lo": min(win_rot),
        "win_rot_hi": max(win_rot),
    }


def bench_refresh(
    hidden: int, contenders: list[Contender], reps: int, gate: LoadGate
) -> dict[str, object] | None:
    """Basis refresh alone, repeated on the same state snapshot: ours vs pytorch_optimizer.

    Both optimizers saw the same gradients (equal math), so their factors agree to rounding.
    Refreshes run on shallow state copies (neither mutates tensors in place).
    """
    ours = contenders[0]
    peer = next((c for c in contenders if c.name.startswith("pytorch_optimizer")), None)
    if peer is None:
        return None
    cfg = ours.opt.config.soap
    o_states = [ours.opt.state[p] for p in ours.params if p.dim() == 2]
    p_states = [peer.opt.state[p] for p in peer.params if p.dim() == 2]
    fq = [s[f] @ s[b] for s in o_states for f, b in (("L", "QL"), ("R", "QR")) if f in s]

    def run_ours() -> None:
        for st in o_states:
            refresh_bases(dict(st), cfg.refresh_method, LinalgCounters())

    def run_peer() -> None:
        for st in p_states:
            peer.opt.get_orthogonal_matrix_qr(dict(st), 10000, False)

    def run_qr() -> None:
        for x in fq:
            torch.linalg.qr(x)

    times: dict[str, list[float]] = {"ours": [], "peer": [], "qr": []}
    log(f"h={hidden} refresh alone: {reps} paired repetitions")
    for _ in range(reps):
        gate.wait()
        for name, fn in (("ours", run_ours), ("peer", run_peer), ("qr", run_qr)):
            times[name].append(timed(fn))
    return {
        "hidden": hidden,
        "peer": peer.name,
        "ours": statistics.median(times["ours"]),
        "peer_t": statistics.median(times["peer"]),
        "qr": statistics.median(times["qr"]),
        "ours_min": min(times["ours"]),
        "peer_min": min(times["peer"]),
        "ratio": [a / b for a, b in zip(times["ours"], times["peer"])],
        "flops": our_refresh_flops(block_shapes(hidden)),
    }


def equal_math_check(steps: int) -> list[tuple[str, float, str]]:
    """Same init + gradients for ``steps`` calls; max |p_peer - p_ours| / max |p_ours - p0|.

    Square matrices only, so the first factors are full rank and eigh has a unique basis.
    """
    shapes = [("a", (48, 48)), ("b", (64, 64)), ("norm", (64,))]
    grads = make_grads(shapes, steps, seed=3)
    runs: list[tuple[str, list[torch.Tensor]]] = []
    for make in (
        make_ours,
        make_pytorch_optimizer,
        lambda ps: make_heavyball(ps, compile_step=False),
    ):
        ps = [p.requires_grad_() for p in make_params(shapes, 11)]
        c = make(ps)
        if c is None:
            continue
        for i in range(steps):
            set_grads(ps, grads[i])
            c.step()
        runs.append((c.name, [p.detach().clone() for p in ps]))
    p0 = make_params(shapes, 11)
    ours = runs[0][1]
    scale = max(float((a - b).abs().max()) for a, b in zip(ours, p0))
    out = []
    for name, ps in runs[1:]:
        diff = max(float((a - b).abs().max()) for a, b in zip(ps, ours))
        rel = diff / scale
        verdict = "equal math (fp32 rounding)" if rel < 1e-3 else "differs (see notes)"
        out.append((name, rel, verdict))
    return out


def _op_table(fn: Callable[[], object], rows: int) -> str:
    """torch.profiler table (by self CPU time) of one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def profile_ours(hidden: int, rows: int, k_steps: int) -> str:
    """Op tables: plain and refresh step of ours and pytorch_optimizer, one folding window."""
    shapes = block_shapes(hidden)
    grads = make_grads(shapes, max(2, k_steps), seed=5)
    out = []
    for make in (make_ours, make_pytorch_optimizer):
        c = make([p.requires_grad_() for p in make_params(shapes, hidden)])
        if c is None:
            continue
        for i in range(FREQ + 1):
            set_grads(c.params, grads[i % 2])
            if i in (2, FREQ):  # call 3: plain step; call 11: moment count 10 -> refresh
                kind = "plain step" if i == 2 else "refresh step"
                out.append(f"--- {c.name}, h={hidden}, {kind} ---\n{_op_table(c.step, rows)}")
            else:
                c.step()
    params = [p.requires_grad_() for p in make_params(shapes, hidden)]
    opt = MLFOPSOAP(params, precondition_frequency=FREQ, accumulation_steps=k_steps, enabled=True)

    def window() -> None:
        for k in range(k_steps):
            set_grads(params, grads[k])
            opt.accumulate()

    for _ in range(2):  # statistics-only first step, then a step that gives the metric
        window()
        opt.step()
    out.append(f"--- ours, h={hidden}, accumulate() x{k_steps} with folding ---")
    out.append(_op_table(window, rows))
    return "\n".join(out)


# -------------------------------------------------------------------- report
def gemm_rate(n: int = 2048, repeats: int = 3) -> float:
    """Best-of GFLOP/s of one n x n fp32 matmul: a machine-load indicator."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2.0 * n**3 / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def machine_line(threads: int) -> str:
    """Machine facts for the report."""
    return machine_facts(
        f"torch.set_num_threads({threads}) -> {torch.get_num_threads()} threads",
        f"heavyball {package_version('heavyball')}",
        f"pytorch_optimizer {package_version('pytorch_optimizer')}",
        f"2048^3 GEMM {gemm_rate():.0f} GFLOP/s",
    )


def step_table(results: dict[int, list[Contender]]) -> list[str]:
    """Markdown table of step times and ours/peer ratios."""
    lines = [
        "| hidden | optimizer | mean ms/step (amortized) | period means min-max | "
        "plain-step median [p25-p75] (min) | refresh-step median | refreshes | "
        "ours/peer mean | ours/peer plain, paired median [p25-p75] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for hidden, contenders in results.items():
        sums = {c.name: summarize(c, FREQ) for c in contenders}
        ours = sums[contenders[0].name]
        for c in contenders:
            s = sums[c.name]
            is_ours = c is contenders[0]
            r_mean = "1" if is_ours else f"{ours.mean / s.mean:.2f}"
            pr = paired(contenders[0], c)
            r_plain = "1" if is_ours else spread(pr)
            lines.append(
                f"| {hidden} | {c.name} | {ms(s.mean)} | {ms(s.period_lo)}-{ms(s.period_hi)} | "
                f"{ms(s.plain_median)} [{ms(s.plain_p25)}-{ms(s.plain_p75)}] ({ms(s.plain_min)}) | "
                f"{ms(s.refresh_median)} | {s.refreshes} | {r_mean} | {r_plain} |"
            )
    return lines


def flops_table(results: dict[int, list[Contender]]) -> list[str]:
    """Achieved GFLOP/s of the per-step matmuls vs the matmul peak, plus the refresh."""
    lines = [
        "| hidden | optimizer | per-step matmul GFLOP (its algorithm) | plain-step GFLOP/s | "
        "fraction of matmul peak, paired median [p25-p75] | refresh extra ms | "
        "refresh matmul GFLOP (ours) | refresh amortized ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for hidden, contenders in results.items():
        shapes = block_shapes(hidden)
        peak_c = contenders[-1]
        base = step_flops(shapes, 2)
        peak_rate = base / summarize(peak_c, FREQ).plain_median
        lines.append(
            f"| {hidden} | {peak_c.name} | {base / 1e9:.2f} | {peak_rate / 1e9:.1f} | 1 | - | - | "
            "- |"
        )
        for c in contenders[:-1]:
            if c.rotations < 0:
                continue
            s = summarize(c, FREQ)
            flops = step_flops(shapes, c.rotations)
            frac = [flops / base * r for r in paired(peak_c, c)]
            extra = None if s.refresh_median is None else s.refresh_median - s.plain_median
            ref_f = f"{our_refresh_flops(shapes) / 1e9:.2f}" if c is contenders[0] else "-"
            amort = "-" if extra is None else f"{1e3 * extra / FREQ:.1f}"
            lines.append(
                f"| {hidden} | {c.name} | {flops / 1e9:.2f} | "
                f"{flops / s.plain_median / 1e9:.1f} | {spread(frac)} | {ms(extra)} | "
                f"{ref_f} | {amort} |"
            )
    return lines


def fold_table(folds: list[dict[str, float]]) -> list[str]:
    """Markdown table of the fold cost (extra per fold: paired per-window medians)."""
    lines = [
        "| hidden | K (levels) | accumulate x K: folding / plain (ms) | step(): folding / plain "
        "(ms) | rot(X) (ms) | extra per fold, accumulate only (rotations) | "
        "extra per fold, whole window (rotations) [min-max] | <= 1 rotation per fold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in folds:
        lines.append(
            f"| {f['hidden']} | {f['K']} {tuple(f['levels'])} | {ms(f['acc_fold'])} / "
            f"{ms(f['acc_plain'])} | {ms(f['step_fold'])} / {ms(f['step_plain'])} | "
            f"{ms(f['rot'])} | {f['acc_rot']:.2f} | {f['win_rot']:.2f} "
            f"[{f['win_rot_lo']:.2f}-{f['win_rot_hi']:.2f}] | "
            f"{'yes' if f['win_rot'] <= 1.0 else 'no'} |"
        )
    return lines


def refresh_table(rows: list[dict[str, object]]) -> list[str]:
    """Markdown table of the refresh-alone benchmark."""
    lines = [
        "| hidden | ours refresh median (min) ms | pytorch_optimizer refresh median (min) ms | "
        "ours/peer paired median [p25-p75] | of which QR alone (ms) | ours refresh matmul "
        "GFLOP (QR excluded) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {ms(r['ours'])} ({ms(r['ours_min'])}) | {ms(r['peer_t'])} "
            f"({ms(r['peer_min'])}) | {spread(r['ratio'])} | {ms(r['qr'])} | "
            f"{r['flops'] / 1e9:.1f} |"
        )
    return lines


def write_results(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, keeping the others."""
    replace_section(path, SECTION, body)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 512], help="GPT block sizes")
    ap.add_argument("--periods", type=int, default=3, help="timed refresh periods (f=10 steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the init step")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--refresh-reps", type=int, default=5, help="refresh-alone repetitions")
    ap.add_argument("--accumulation-steps", type=int, default=8, help="K of the fold benchmark")
    ap.add_argument("--fold-windows", type=int, default=6, help="timed accumulation windows")
    ap.add_argument("--fold-hidden", type=int, nargs="*", default=None, help="default: --hidden")
    ap.add_argument("--check-steps", type=int, default=25, help="steps of the equal-math check")
    ap.add_argument("--progress", type=int, default=5, help="print every N timed steps")
    ap.add_argument("--max-wait", type=float, default=2.0, help="load gate: s per round")
    ap.add_argument("--wait-budget", type=float, default=60.0, help="load gate: s in total")
    ap.add_argument("--heavyball-compile", action="store_true", help="keep heavyball compile on")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="H", help="only print op tables at hidden H"
    )
    ap.add_argument("--quick", action="store_true", help="smoke mode (< 30 s), no RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS, help="RESULTS.md to update")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.periods, args.warmup = [128], 1, 1
        args.fold_windows, args.check_steps, args.progress = 3, 12, 5
        args.max_wait, args.wait_budget, args.refresh_reps = 0.5, 3.0, 2
        args.no_write = True
    if args.fold_hidden is None:
        args.fold_hidden = args.hidden
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every section, print the report, update RESULTS.md."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.step_time " + " ".join(
        sys.argv[1:] if argv is None else list(argv)
    )
    machine_start = machine_line(args.threads)
    log(f"machine: {machine_start}")
    if args.profile:
        print(profile_ours(args.profile, 14, args.accumulation_steps))
        return 0

    log(f"equal-math check: {args.check_steps} steps on 48x48, 64x64, 64 (fp32)")
    check = equal_math_check(args.check_steps)

    results: dict[int, list[Contender]] = {}
    skipped: list[str] = []
    gate = LoadGate(args.max_wait, args.wait_budget)
    for hidden in args.hidden:
        results[hidden], skipped = bench_steps(hidden, args, gate)
    refresh = [
        r
        for h, cs in results.items()
        if (r := bench_refresh(h, cs, args.refresh_reps, gate)) is not None
    ]
    folds = [bench_fold(h, args, gate) for h in args.fold_hidden]
    log(gate.summary())
    runtime = elapsed()

    contenders = next(iter(results.values()))
    out = [SECTION, ""]
    out.append(f"Command: `{command.strip()}` (total runtime {runtime:.0f} s)")
    out.append("")
    start_load = machine_start.split("load average ")[-1]
    out.append(f"Machine: {machine_line(args.threads)} (at start: load average {start_load})")
    out.append("")
    out.append(f"Other load: {gate.summary()}")
    out.append("")
    out.append(
        "Method: `step()` alone (gradients assigned to `p.grad`), fp32, one GPT block per hidden "
        "size h: QKV (3h x h), proj (h x h), fc1 (4h x h), fc2 (h x 4h), norm weight (h). "
        f"All optimizers run side by side in one process, interleaved step by step with the "
        f"order rotated each round. precondition_frequency f={FREQ} for every SOAP; the init "
        f"step and {args.warmup} more warmup steps are excluded; {args.periods} whole refresh "
        f"periods ({args.periods * FREQ} steps) are timed. 'mean' is the amortized mean over "
        "those periods (refresh included); the spread is the min-max of per-period means; "
        "'plain' steps are those without a basis refresh. ours/peer < 1 means ours is faster."
    )
    out.append("")
    out += step_table(results)
    out.append("")
    out.append(
        "Achieved GFLOP/s of the per-step matmuls (FLOP model: 2mn(m+n) per rotation and per "
        "factor pair, per m x n matrix; ours 6mn(m+n), the reference-style peers 8mn(m+n)) on "
        "plain steps, against the matmul peak: our exact 6 per-step matmuls run alone on the "
        "same shapes and threads, interleaved with the optimizers. Refresh: median refresh "
        "step minus median plain step; our refresh matmul FLOP model 4d^3 + 2d^2 k per side "
        "(power step F Q, change of basis Q_new^T Q_old, re-expressing m), QR not counted."
    )
    out.append("")
    out += flops_table(results)
    out.append("")
    if refresh:
        out.append(
            f"Basis refresh alone ({args.refresh_reps} paired repetitions on the state snapshot "
            "after the timed steps; ours `refresh_bases` vs pytorch_optimizer "
            "`get_orthogonal_matrix_qr`, same factors): ours additionally re-expresses m in the "
            "new basis (Q_new^T Q_old, then a product with m), the peer keeps m unrotated and "
            "pays a third rotation every step instead."
        )
        out.append("")
        out += refresh_table(refresh)
        out.append("")
    out.append(
        f"Fold cost (ML-FOP-SOAP, accumulation_steps K={args.accumulation_steps}, "
        f"{args.fold_windows} timed windows after 2 warmup windows, medians): `accumulate()` "
        "with folding vs folding disabled (plain sum), and the whole window (K x accumulate + "
        "step). The unit is one basis rotation rot(X) = QL^T X QR of all block matrices. With "
        "folding, level 0 rotates its mean and every fold rotates the new level mean; step() "
        "then reuses the folded rotated gradient, so the whole-window column is the net cost."
    )
    out.append("")
    out += fold_table(folds)
    out.append("")
    for f in folds:
        pairs = zip(f["micro_fold"], f["micro_plain"])
        per = ", ".join(f"{i + 1}: {ms(a)}/{ms(b)}" for i, (a, b) in enumerate(pairs))
        out.append(f"- h={f['hidden']} per-micro-step accumulate ms (folding/plain): {per}")
    out.append("")
    out.append(
        f"Equal-math check ({args.check_steps} steps, square 48x48 and 64x64 + a 1-D param, "
        "fp32, same init and gradients): max |p_peer - p_ours| / max |p_ours - p_0|."
    )
    out.append("")
    out.append("| peer | relative difference | verdict |")
    out.append("|---|---|---|")
    for name, rel, verdict in check:
        out.append(f"| {name} | {rel:.2e} | {verdict} |")
    out.append("")
    out.append("Configurations:")
    out.append("")
    for c in contenders:
        out.append(f"- {c.name}: {c.config}" + (f". {c.notes}" if c.notes else ""))
    for s in skipped:
        out.append(f"- skipped: {s}")
    body = "\n".join(out) + "\n"
    print()
    print(body)
    if not args.no_write:
        write_results(args.results, body)
        log(f"wrote section '{SECTION}' to {args.results}")
    log(f"done in {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
