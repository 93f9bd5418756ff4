"""Does Megatron's SOAP move its eigenbases? KL-Shampoo on (its default) and off, digits main job.

Trains the digits main job (DP=2, the demo's model, data, schedule, clipping and weight decay,
``by-modality`` layout, global batch 32) with Megatron 0.19's ``--optimizer soap``
(``get_megatron_optimizer``, emerging-optimizers 0.3.0) twice: as shipped
(``soap_use_kl_shampoo=True``) and with Shampoo's factors (``False``). After chosen steps it
reads every SOAP matrix's state on rank 0 (the optimizer is replicated over DP) and prints:

* ``top-k kept``: ||Q(t)[:, :k]^T Q(2)[:, :k]||_F^2 / k, how much of the top-k eigen-subspace
  of step 2 the basis still spans (1: unchanged; about k/n for an unrelated basis), median and
  minimum over the matrices' left and right bases;
* ``max|L|``: the largest entry of any left factor.

Why (read from emerging-optimizers 0.3.0, ``update_kronecker_factors_kl_shampoo``): the
factors start at zero, so the first step's KL-Shampoo increment divides by the eigenvalue
estimates clamped at eps (1e-8): a factor of ~1e8 / n over the later increments, which scale as
g^2 / (g^2 1e8). With the bias-corrected shampoo beta the first increment is the whole factor,
and the later ones stay below its rounding until beta^t has eaten ~16 orders of magnitude:
about 700 steps at beta 0.95. Until then the bases are the first step's.

``--synthetic`` runs emerging-optimizers' SOAP alone on one 64 x 32 matrix whose gradients
come from a covariance that turns slowly (G = U D U^T X, U = exp(0.01 t A), A skew, X
Gaussian), 1000 steps, and prints the same share for the top 4 and how much of the current
covariance's top-4 span the basis holds.

Run from the repository root in the peers venv (``make setup-peers``)::

    .venv-peers/bin/python -m benchmarks.megatron_soap_bases            # 100 steps
    .venv-peers/bin/python -m benchmarks.megatron_soap_bases --steps 300 --lr 5e-3
    .venv-peers/bin/python -m benchmarks.megatron_soap_bases --synthetic
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import log, machine_facts, package_version

CHECKPOINTS = (2, 5, 10, 25, 50, 100, 200, 300, 500, 700, 1000)


def soap_states(optimizer: Any) -> list[dict[str, torch.Tensor]]:
    """The emerging SOAP's per-matrix states inside a Megatron (chained) optimizer."""
    found: list[dict[str, torch.Tensor]] = []
    stack = [optimizer]
    while stack:
        obj = stack.pop()
        stack.extend(getattr(obj, "chained_optimizers", []) or [])
        inner = vars(obj).get("optimizer")  # ChainedOptimizer's property asserts one optimizer
        if isinstance(inner, torch.optim.Optimizer):
            stack.append(inner)
        if isinstance(obj, torch.optim.Optimizer):
            found.extend(s for s in obj.state.values() if "Q_L" in s)
    return found


def kept(now: torch.Tensor, then: torch.Tensor, k: int) -> float:
    """||now[:, :k]^T then[:, :k]||_F^2 / k: the share of then's top-k span that now keeps."""
    k = min(k, now.shape[1])
    return float(torch.linalg.matrix_norm(now[:, :k].T @ then[:, :k]) ** 2 / k)


def probe(spec: Any, k: int) -> list[dict[str, Any]] | None:
    """One rank: train ``spec``; rank 0 returns a row per checkpoint step."""
    import torch.distributed as dist

    from examples.digits.train import run_step, setup_run

    run = setup_run(spec)
    rows: list[dict[str, Any]] = []
    first: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(spec.steps):
        metrics = run_step(run, step)
        states = soap_states(run.optimizer)
        if step + 1 == 2:
            first = [(s["Q_L"].clone(), s["Q_R"].clone()) for s in states]
        if step + 1 in CHECKPOINTS and first:
            shares = [
                kept(s[key], old, k)
                for s, pair in zip(states, first)
                for key, old in zip(("Q_L", "Q_R"), pair)
            ]
            rows.append(
                {
                    "step": step + 1,
                    "median": float(torch.tensor(shares).median()),
                    "min": min(shares),
                    "max_L": max(float(s["L"].abs().max()) for s in states),
                    "objective": 0.5 * (metrics["image_loss"] + metrics["text_loss"]),
                    "matrices": len(states),
                }
            )
    return rows if dist.get_rank() == 0 else None


def synthetic(steps: int = 1000, top: int = 4) -> None:
    """emerging-optimizers' SOAP on one matrix with a slowly turning gradient covariance."""
    from emerging_optimizers.soap.soap import SOAP

    print(f"| step | KL on: kept since step 2 / of the current top-{top}, max abs L | KL off |")
    print("|---|---|---|")
    lines: dict[int, list[str]] = {}
    for kl in (True, False):
        gen = torch.Generator().manual_seed(1)
        weight = torch.nn.Parameter(torch.randn(64, 32, generator=gen) * 0.1)
        opt = SOAP([weight], lr=1e-3, use_kl_shampoo=kl, weight_decay=0.0)
        a = torch.randn(64, 64, generator=gen)
        skew = (a - a.T) / 16
        spectrum = torch.diag(torch.linspace(2.0, 0.1, 64))
        first = None
        for t in range(steps):
            turn = torch.linalg.matrix_exp(0.01 * t * skew)
            weight.grad = turn @ spectrum @ turn.T @ torch.randn(64, 32, generator=gen)
            opt.step()
            state = opt.state[weight]
            if t + 1 == 2:
                first = state["Q_L"].clone()
            if first is not None and t + 1 in CHECKPOINTS:
                q = state["Q_L"]
                cell = (
                    f"{kept(q, first, top):.3f} / {kept(q, turn, top):.3f}, "
                    f"{float(state['L'].abs().max()):.2e}"
                )
                lines.setdefault(t + 1, []).append(cell)
    for step, cells in lines.items():
        print(f"| {step} | {' | '.join(cells)} |")


def main(argv: Sequence[str] | None = None) -> None:
    """Both runs side by side, one table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-3, help="Megatron SOAP's lr on the main job")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--layout", default="by-modality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=8, help="k of the top-k subspace")
    ap.add_argument("--out", default="runs/megatron-soap-bases")
    ap.add_argument("--synthetic", action="store_true", help="one matrix, 1000 steps")
    args = ap.parse_args(argv)
    if args.synthetic:
        synthetic()
        return

    from examples.digits.optimizers import entry
    from examples.digits.spec import RunSpec
    from mlfop_megatron.runtime.spawn import run_distributed

    reason = entry("megatron-soap").missing()
    if reason is not None:
        raise SystemExit(reason)
    nproc = 2
    threads = max(1, (os.cpu_count() or 1) // nproc)
    print(
        machine_facts(
            f"megatron-core {package_version('megatron-core')}",
            f"emerging-optimizers {package_version('emerging-optimizers')}",
        )
    )
    results = {}
    for kl in (True, False):
        spec = RunSpec(
            optimizer="megatron-soap",
            out=str(Path(args.out) / f"kl-{kl}"),
            steps=args.steps,
            global_batch=args.batch,
            micro_batch=4,
            lr=args.lr,
            seed=args.seed,
            diag_every=0,
            threads=threads,
            log_every=max(1, args.steps // 4),
            layout=args.layout,
            megatron_options=(("soap_use_kl_shampoo", kl),),
        )
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        log(f"soap_use_kl_shampoo={kl}: {args.steps} steps")
        results[kl] = run_distributed(
            probe, nproc, spec, args.top, timeout=7200.0, threads=threads
        )[0]
    print(f"\ntop-{args.top} kept since step 2 (median / min over matrices), max|L|, objective")
    print("| step | KL on (Megatron's default) | KL off |")
    print("|---|---|---|")
    for on, off in zip(results[True], results[False]):
        cells = [
            f"{r['median']:.3f} / {r['min']:.3f}, {r['max_L']:.2e}, {r['objective']:.3f}"
            for r in (on, off)
        ]
        print(f"| {on['step']} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
