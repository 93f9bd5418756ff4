"""Part (c) of the folding benchmark: two regression tasks with a controlled gradient conflict.

One shared matrix W (d x d) serves two linear-regression tasks, task A and task B, with inputs
x = Q S^(1/2) z (S diagonal, eigenvalues log-spaced over ``condition``: preconditioning matters;
Q a random orthogonal matrix, so the curvature Sigma = Q S Q^T is not axis-aligned) and
targets y = A_t x + noise. The targets are A_t = B_t Sigma^-1 with |B_A| = |B_B| = ``scale`` and
angle(B_A, B_B) = theta, so at W = 0 the two tasks' expected gradients (W - A_t) Sigma = -B_t
meet at exactly the angle theta (0: aligned, 90: orthogonal, 170: almost opposed). The
objective is L = (L_A + L_B) / 2, minimised at W* = (A_A + A_B) / 2; the excess L(W) - L(W*) and
each task's loss are exact (closed form from Sigma), so the curves carry no evaluation noise.

``curvature="axis-aligned"`` (Q = I) is the control: there AdamW's diagonal preconditioner is
already exact, which hides what a rotation-aware optimizer adds; "rotated" is the default.

Every optimizer sees the same samples: a global batch of G (half per task) split into K
micro-steps, in the ``by-modality`` layout (first K/2 micro-steps task A, the rest task B: the
final fold of every structure joins A with B) or ``mixed`` (tasks shuffled over the batch).
Optimizers: AdamW (torch), SOAP (MLFOPSOAP, folding off), ML-FOP-SOAP in each FOLD_VARIANT,
PCGrad + AdamW (each task's global-batch gradient projected off the other's on conflict) and,
where emerging-optimizers is installed (``make setup-peers``), its Muon with its own defaults
(what Megatron's ``--optimizer muon`` runs per matrix).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.conflict import FOLD_VARIANTS, VARIANTS_BY_LABEL, mean_std, pcgrad_combine
from examples.digits.spec import lr_at
from mlfop_megatron.config import REFERENCE_SOAP

CURVATURES = ("rotated", "axis-aligned")


def muon_available() -> bool:
    """Whether emerging-optimizers' Muon imports here (the peers venv)."""
    try:
        from emerging_optimizers.orthogonalized_optimizers import Muon  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or its imports fail on this Python
        return False
    return True


BASE_OPTIMIZERS = ("adamw", "soap", "pcgrad") + (("muon",) if muon_available() else ())


@dataclass(frozen=True)
class SyntheticPlan:
    """Sizes of part (c)."""

    dim: int = 16
    condition: float = 100.0
    curvature: str = "rotated"  # or "axis-aligned": the control (see the module docstring)
    noise: float = 0.5
    scale: float = 10.0  # |B_A| = |B_B| = scale (Frobenius)
    angles: tuple[float, ...] = (0.0, 90.0, 150.0)
    layouts: tuple[str, ...] = ("by-modality", "mixed")
    steps: int = 160  # base batch; the large batch takes steps / large_factor
    global_batch: int = 32
    micro_steps: int = 8
    large_factor: int = 8  # large batch: large_factor x the micro-steps, same micro size
    lr_grid: tuple[float, ...] = (1e-2, 3e-2, 1e-1, 3e-1)
    seeds: tuple[int, ...] = (0, 1, 2)
    optimizers: tuple[str, ...] = BASE_OPTIMIZERS + tuple(v.label for v in FOLD_VARIANTS)
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1


SMOKE_SYNTHETIC = SyntheticPlan(
    dim=8,
    angles=(0.0, 150.0),
    layouts=("by-modality",),
    steps=32,
    global_batch=16,
    micro_steps=4,
    large_factor=2,
    lr_grid=(1e-2, 3e-2),
    seeds=(0, 1),
    optimizers=("adamw", "soap", "pcgrad", "fop-chain-noeta-folded", "fop-last-eta-mean"),
)


@dataclass
class Problem:
    """One two-task regression instance (float64, CPU: a small host-side benchmark)."""

    sqrt_cov: torch.Tensor  # C = Q S^(1/2): x = C z, Sigma = C C^T
    targets: tuple[torch.Tensor, torch.Tensor]  # A_A, A_B
    noise: float
    optimum: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        """W* of the balanced objective (both tasks share Sigma)."""
        self.optimum = 0.5 * (self.targets[0] + self.targets[1])

    @property
    def cov(self) -> torch.Tensor:
        """Sigma = C C^T, the input covariance (the loss's curvature)."""
        return self.sqrt_cov @ self.sqrt_cov.T

    def task_loss(self, w: torch.Tensor, t: int) -> float:
        """Expected loss of task t: 1/2 tr((W - A) Sigma (W - A)^T) + 1/2 d noise^2."""
        diff = (w - self.targets[t]) @ self.sqrt_cov
        return 0.5 * float((diff * diff).sum()) + 0.5 * w.shape[0] * self.noise**2

    def excess(self, w: torch.Tensor) -> float:
        """L(W) - L(W*) of the balanced objective."""
        opt = self.optimum
        total = sum(self.task_loss(w, t) - self.task_loss(opt, t) for t in (0, 1))
        return 0.5 * total

    def sample(self, t: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """N samples (x [n, d], y [n, d]) of task t."""
        d = self.sqrt_cov.shape[0]
        x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ self.sqrt_cov.T
        y = x @ self.targets[t].T + self.noise * torch.randn(n, d, generator=gen, dtype=x.dtype)
        return x, y


def make_problem(plan: SyntheticPlan, angle_deg: float, seed: int = 1234) -> Problem:
    """Targets with angle(B_A, B_B) = angle_deg (so the tasks' gradients at W = 0 meet at it)."""
    if plan.curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES} (got {plan.curvature!r})")
    gen = torch.Generator().manual_seed(seed)
    d = plan.dim
    s = torch.logspace(0.0, math.log10(plan.condition), d, dtype=torch.float64)
    u = torch.randn(d, d, generator=gen, dtype=torch.float64)
    v = torch.randn(d, d, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    v = v - (v * u).sum() * u
    v = v / v.norm()
    half = math.radians(angle_deg) / 2
    b = (math.cos(half) * u + math.sin(half) * v, math.cos(half) * u - math.sin(half) * v)
    b = (plan.scale * b[0], plan.scale * b[1])
    q = torch.eye(d, dtype=torch.float64)
    if plan.curvature == "rotated":  # a Haar-random orthogonal Q (QR of a Gaussian, signs fixed)
        q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))[None, :]
    # The expected gradient of task t is (W - A_t) Sigma; A_t = B_t Sigma^-1 makes it -B_t at 0.
    cov_inv = (q / s[None, :]) @ q.T
    targets = (b[0] @ cov_inv, b[1] @ cov_inv)
    return Problem(q * s.sqrt()[None, :], targets, plan.noise)


def init_gradient_cosine(problem: Problem) -> float:
    """Cosine of the two tasks' expected gradients at W = 0 (equals cos(theta) by design)."""
    ga, gb = ((-a @ problem.cov).reshape(-1) for a in problem.targets)
    return float(ga @ gb / (ga.norm() * gb.norm()))


@dataclass(frozen=True)
class Schedule:
    """What lr_at needs (the demo's warmup + cosine schedule)."""

    lr: float
    steps: int
    warmup_frac: float
    min_lr_frac: float


def batch_tasks(layout: str, g: int, step: int, seed: int) -> torch.Tensor:
    """Task of each of the G samples of a step (half each), in micro-step order."""
    tasks = torch.arange(g) >= g // 2  # by-modality: first half A (0), second half B (1)
    if layout == "mixed":
        gen = torch.Generator().manual_seed(10_000 * seed + step)
        tasks = tasks[torch.randperm(g, generator=gen)]
    return tasks.long()


def grad_of(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the sample-mean loss 1/2 |W x - y|^2 over the rows of x (closed form)."""
    return (x @ w.T - y).T @ x / x.shape[0]


class Fp32Muon:
    """emerging-optimizers' Muon on an fp32 copy of the fp64 matrix (its Newton-Schulz is fp32).

    ``step`` hands it ``w.grad`` in fp32 and copies the updated matrix back into ``w``.
    """

    def __init__(self, w: torch.nn.Parameter, lr: float) -> None:
        from emerging_optimizers.orthogonalized_optimizers import Muon

        self.w = w
        self.shadow = torch.nn.Parameter(w.detach().float())
        self.inner = Muon([self.shadow], lr=lr, weight_decay=0.0)
        self.param_groups = self.inner.param_groups

    def step(self) -> None:
        """One Muon step from ``w.grad``."""
        assert self.w.grad is not None
        self.shadow.grad = self.w.grad.float()
        self.inner.step()
        with torch.no_grad():
            self.w.copy_(self.shadow)


def make_optimizer(name: str, w: torch.nn.Parameter, lr: float, k: int) -> Any:
    """AdamW / PCGrad (AdamW underneath) / SOAP / an ML-FOP-SOAP variant on the one matrix.

    ``soap`` and the fold variants run the SOAP these results were measured with
    (``REFERENCE_SOAP``); ``soap-default`` / ``mlfop-default`` the package's SOAPConfig and
    FoldingConfig defaults (folding off / on).
    """
    if name in ("adamw", "pcgrad"):
        return torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if name == "muon":  # emerging-optimizers' Muon, its own defaults (Megatron's muon per matrix)
        return Fp32Muon(w, lr)
    from mlfop_megatron.optim.mlfop_soap import MLFOPSOAP

    if name in ("soap-default", "mlfop-default"):  # the package's defaults as they are now
        return MLFOPSOAP(
            [w], lr=lr, weight_decay=0.0, accumulation_steps=k, enabled=name == "mlfop-default"
        )
    folding = {} if name == "soap" else VARIANTS_BY_LABEL[name].kwargs()
    return MLFOPSOAP(
        [w],
        lr=lr,
        weight_decay=0.0,
        accumulation_steps=k,
        **REFERENCE_SOAP,  # the SOAP these results were measured with (RESULTS.md), its betas too
        enabled=name != "soap",
        **folding,
    )


@dataclass(frozen=True)
class SynthRun:
    """One training run of part (c)."""

    optimizer: str
    angle: float
    layout: str
    batch: str  # "base" | "large"
    lr: float
    seed: int


def train(plan: SyntheticPlan, run: SynthRun, problem: Problem) -> dict[str, Any]:
    """Train one run; returns per-step excess and task losses (exact)."""
    factor = plan.large_factor if run.batch == "large" else 1
    k, g = plan.micro_steps * factor, plan.global_batch * factor
    steps = plan.steps // factor
    micro = g // k
    w = torch.nn.Parameter(torch.zeros(plan.dim, plan.dim, dtype=torch.float64))
    opt = make_optimizer(run.optimizer, w, run.lr, k)
    sched = Schedule(run.lr, steps, plan.warmup_frac, plan.min_lr_frac)
    data_gen = torch.Generator().manual_seed(7919 * run.seed + 1)
    excess, loss_a, loss_b, conflicts = [], [], [], 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, sched)
        tasks = batch_tasks(run.layout, g, step, run.seed)
        xs = torch.empty(g, plan.dim, dtype=torch.float64)
        ys = torch.empty(g, plan.dim, dtype=torch.float64)
        for t in (0, 1):
            sel = tasks == t
            xs[sel], ys[sel] = problem.sample(t, int(sel.sum()), data_gen)
        if run.optimizer in ("adamw", "pcgrad", "muon"):
            if run.optimizer in ("adamw", "muon"):
                w.grad = grad_of(w.data, xs, ys)
            else:
                ga = grad_of(w.data, xs[tasks == 0], ys[tasks == 0]).reshape(-1)
                gb = grad_of(w.data, xs[tasks == 1], ys[tasks == 1]).reshape(-1)
                combined, hit = pcgrad_combine(ga, gb)
                conflicts += int(hit)
                w.grad = combined.reshape(w.shape)
        else:
            for i in range(k):
                sl = slice(i * micro, (i + 1) * micro)
                w.grad = grad_of(w.data, xs[sl], ys[sl])
                opt.accumulate()
        opt.step()
        excess.append(problem.excess(w.data))
        loss_a.append(problem.task_loss(w.data, 0))
        loss_b.append(problem.task_loss(w.data, 1))
    return {
        **run.__dict__,
        "steps": steps,
        "samples_per_step": g,
        "excess": excess,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "pcgrad_conflict_steps": conflicts,
    }


def first_reach(curve: Sequence[float], target: float) -> int | None:
    """1-based first step with curve <= target, else None."""
    for i, v in enumerate(curve):
        if v <= target:
            return i + 1
    return None


def summarize_runs(plan: SyntheticPlan, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (angle, layout, batch): chosen lr per optimizer, final excess, sample efficiency.

    lr: the grid point with the lowest final excess on seed 0 (mean of the last 10% of steps).
    Sample efficiency vs AdamW per seed: AdamW's steps to reach its own final excess / the
    optimizer's steps to reach it (never reached: counted at the last step, marked '+').
    """
    out: dict[str, Any] = {}
    keys = sorted({(r["angle"], r["layout"], r["batch"]) for r in runs})
    for angle, layout, batch in keys:
        cell = [r for r in runs if (r["angle"], r["layout"], r["batch"]) == (angle, layout, batch)]
        entry: dict[str, Any] = {}
        finals = {}
        for name in plan.optimizers:
            grid = [r for r in cell if r["optimizer"] == name and r["seed"] == plan.seeds[0]]
            if not grid:
                continue
            best = min(grid, key=lambda r: _final(r["excess"]))
            chosen = [r for r in cell if r["optimizer"] == name and r["lr"] == best["lr"]]
            finals[name] = {r["seed"]: r for r in chosen}
            entry[name] = {
                "lr": best["lr"],
                "final_excess": mean_std([_final(r["excess"]) for r in chosen]),
                "final_loss_a": mean_std([_final(r["loss_a"]) for r in chosen]),
                "final_loss_b": mean_std([_final(r["loss_b"]) for r in chosen]),
                "seeds": len(chosen),
            }
        ref = finals.get("adamw", {})
        for name, by_seed in finals.items():
            ratios, unreached = [], 0
            for seed, r in by_seed.items():
                if seed not in ref:
                    continue
                target = _final(ref[seed]["excess"])
                a_steps = first_reach(ref[seed]["excess"], target) or len(ref[seed]["excess"])
                o_steps = first_reach(r["excess"], target)
                unreached += o_steps is None
                ratios.append(a_steps / (o_steps or len(r["excess"])))
            entry[name]["ratio_vs_adamw"] = mean_std(ratios)
            entry[name]["unreached"] = unreached
        out[f"{angle:g}|{layout}|{batch}"] = entry
    return out


def _final(curve: Sequence[float]) -> float:
    tail = curve[-max(1, len(curve) // 10) :]
    return sum(tail) / len(tail)


def run_synthetic(plan: SyntheticPlan, log: Any = print) -> dict[str, Any]:
    """All runs of part (c): lr grid on seed 0, then the other seeds at the chosen lr."""
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    cosines = {}
    for angle in plan.angles:
        problem = make_problem(plan, angle)
        cosines[f"{angle:g}"] = init_gradient_cosine(problem)
        for layout in plan.layouts:
            for batch in ("base", "large"):
                for name in plan.optimizers:
                    first = plan.seeds[0]
                    grid = [
                        train(plan, SynthRun(name, angle, layout, batch, lr, first), problem)
                        for lr in plan.lr_grid
                    ]
                    runs += grid
                    best = min(grid, key=lambda r: _final(r["excess"]))["lr"]
                    for seed in plan.seeds[1:]:
                        runs.append(
                            train(plan, SynthRun(name, angle, layout, batch, best, seed), problem)
                        )
            log(f"synthetic angle {angle:g}: {len(runs)} runs, {time.perf_counter() - t0:.0f} s")
    return {
        "plan": {k: v for k, v in plan.__dict__.items()},
        "init_cosines": cosines,
        "summary": summarize_runs(plan, runs),
        "runs": len(runs),
        "wall_s": time.perf_counter() - t0,
    }


def synthetic_table(result: dict[str, Any], optimizers: Sequence[str]) -> list[str]:
    """Markdown rows: per cell, each optimizer's lr, final excess and ratio vs AdamW."""
    lines = [
        "| angle | layout | batch | optimizer | lr | final excess (mean ± std) "
        "| task A loss | task B loss | sample eff. vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in result["summary"].items():
        angle, layout, batch = key.split("|")
        for name in optimizers:
            if name not in entry:
                continue
            e = entry[name]
            ratio, spread = e["ratio_vs_adamw"]
            mark = f" ({e['unreached']} unreached: upper bound)" if e["unreached"] else ""
            lines.append(
                f"| {angle} | {layout} | {batch} | {name} | {e['lr']:g} "
                f"| {e['final_excess'][0]:.4g} ± {e['final_excess'][1]:.2g} "
                f"| {e['final_loss_a'][0]:.4g} | {e['final_loss_b'][0]:.4g} "
                f"| {ratio:.2f} ± {spread:.2f}{mark} |"
            )
    return lines


__all__ = [
    "SMOKE_SYNTHETIC",
    "SyntheticPlan",
    "make_problem",
    "run_synthetic",
    "synthetic_table",
]
