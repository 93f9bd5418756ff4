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

Run from the repository root in the peers venv (``make setup-peers``)::

    .venv-peers/bin/python -m benchmarks.megatron_soap_bases            # 100 steps
    .venv-peers/bin/python -m benchmarks.megatron_soap_bases --steps 300 --lr 5e-3
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
    args = ap.parse_args(argv)

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
