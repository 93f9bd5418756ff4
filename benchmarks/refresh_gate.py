"""Cost of the drift-gated refresh (``SOAPConfig.refresh_tolerance``) in the batched engine.

The gate reads the tracked estimates diag(Q^T F Q) (``DL``, ``DR``: no product with the
factor; before they were tracked it formed F Q per side, 0.12-0.20x a full refresh) and which
blocks drifted in one host read; the estimates' upkeep is an elementwise pass over the
rotated gradient at each factor update, and a refreshed side forms its estimate anew. Per case,
on the block shapes of ``benchmarks/batched_engine.py`` (fp32, one thread, the batched
engine's own classes after three warm-up steps), the median wall time of:

* ``refresh``: ``compute_bases`` with tolerance 0 (every side refreshed, today's f=1 cost);
* ``gate only``: tolerance just below 1 (every side checked, none refreshed);
* ``upkeep``: the estimates' update of one step (``soap.estimate_increments`` and the EMA);
* ``gate + half``: tolerance at the median off-diagonal share (about half the sides refreshed,
  as parts of their classes: copies in, new bases and moments written back);
* ``rotation``: rot(X) = QL^T X QR of every block (the unit of ``batched_engine.py``).

    python -m benchmarks.refresh_gate            # every case; --write puts it in RESULTS.md
    python -m benchmarks.refresh_gate --quick    # small shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable, Sequence

import torch

from benchmarks.batched_engine import llama_blocks
from benchmarks.common import RESULTS, cpu_model, log, replace_section, timed
from mlfop_megatron.core.batched import BatchedBlocks, compute_bases
from mlfop_megatron.core.linalg import LinalgCounters, diag_in_basis, off_diagonal_share
from mlfop_megatron.core.soap import ema_update, estimate_increments
from mlfop_megatron.optim import MLFOPSOAP

SECTION = "## Drift-gated refresh: what the gate costs (batched engine, CPU)"
CASES: dict[str, Callable[[], list[tuple[int, int]]]] = {
    "layer-b512": lambda: llama_blocks(512, 1, 512),
    "layer-b1024": lambda: llama_blocks(1024, 1, 1024),
    "model-b64": lambda: llama_blocks(256, 4, 64),
}
QUICK: dict[str, Callable[[], list[tuple[int, int]]]] = {
    "layer-b128": lambda: llama_blocks(128, 1, 128),
    "model-b16": lambda: llama_blocks(64, 2, 16),
}


def engine_of(shapes: Sequence[tuple[int, int]]) -> BatchedBlocks:
    """A batched MLFOPSOAP on ``shapes`` after three steps (bases built, refreshed once)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    opt = MLFOPSOAP(params, precondition_frequency=1, refresh_first=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    engine = opt._engine
    assert engine is not None
    return engine


def set_tolerance(engine: BatchedBlocks, tolerance: float) -> None:
    """Give every class of ``engine`` this refresh tolerance."""
    for cls in engine.classes:
        cls.cfg = dataclasses.replace(cls.cfg, refresh_tolerance=tolerance)


def shares(engine: BatchedBlocks) -> list[float]:
    """Off-diagonal share of Q^T F Q of every side of every block."""
    out: list[float] = []
    for cls in engine.classes:
        for f, q in (("L", "QL"), ("R", "QR")):
            if f in cls.tensors:
                est = diag_in_basis(cls.tensors[f], cls.tensors[q])
                out += off_diagonal_share(cls.tensors[f], est).tolist()
    return out


def median_time(
    fn: Callable[[], object], repeats: int, setup: Callable[[], object] = lambda: None
) -> float:
    """Median seconds of ``repeats`` calls after one untimed call, ``setup`` before each."""
    times = []
    for i in range(repeats + 1):
        setup()
        t = timed(fn)
        if i:
            times.append(t)
    return statistics.median(times)


def snapshot(engine: BatchedBlocks) -> Callable[[], None]:
    """A function that puts every class's stacks back as they are now."""
    saved = [{k: t.clone() for k, t in c.tensors.items()} for c in engine.classes]

    def restore() -> None:
        for c, tensors in zip(engine.classes, saved):
            for k, t in tensors.items():
                c.tensors[k].copy_(t)

    return restore


def run_case(name: str, shapes: list[tuple[int, int]], repeats: int) -> list[object]:
    """One table row: blocks, classes, refresh, gate only, gate + half, rotation (seconds)."""
    engine = engine_of(shapes)
    restore = snapshot(engine)  # every timed refresh starts from the same drifted bases
    counters = LinalgCounters()

    def refresh() -> None:
        compute_bases(engine.classes, "qr", counters, first=False)

    set_tolerance(engine, 0.0)
    full = median_time(refresh, repeats, restore)
    set_tolerance(engine, 1.0 - 1e-9)
    gate = median_time(refresh, repeats, restore)
    set_tolerance(engine, statistics.median(shares(engine)))
    before = counters.refreshes_done, counters.refreshes_skipped
    half = median_time(refresh, repeats, restore)
    done = counters.refreshes_done - before[0]
    fraction = done / max(1, done + counters.refreshes_skipped - before[1])
    xs = [torch.randn(c.tensors["exp_avg"].shape) for c in engine.classes]
    rot = median_time(lambda: [c.rotate(x) for c, x in zip(engine.classes, xs)], repeats)

    def upkeep() -> None:
        for c, x in zip(engine.classes, xs):
            est_l, est_r = estimate_increments(c.tensors, x, c.cfg)
            ema_update(c.tensors, 0.95, {"DL": est_l, "DR": est_r})

    keep = median_time(upkeep, repeats, restore)
    log(
        f"{name}: refresh {1e3 * full:.1f} ms, gate only {1e3 * gate:.1f} ms "
        f"({gate / full:.3f}x), upkeep {1e3 * keep:.2f} ms, gate + {fraction:.0%} refreshed "
        f"{1e3 * half:.1f} ms, rotation {1e3 * rot:.1f} ms"
    )
    return [name, len(shapes), len(engine.classes), full, gate, keep, half, fraction, rot]


def table(rows: Sequence[Sequence[object]]) -> str:
    """Markdown table of the case rows."""
    out = [
        "| case | blocks | classes | refresh (ms) | gate only (ms) | gate / refresh "
        "| estimate upkeep (ms) | gate + part refreshed (ms) | sides refreshed "
        "| rotation (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, blocks, classes, full, gate, keep, half, fraction, rot in rows:  # type: ignore[misc]
        out.append(
            f"| {name} | {blocks} | {classes} | {1e3 * full:.1f} | {1e3 * gate:.2f} | "
            f"{gate / full:.3f} | {1e3 * keep:.2f} | {1e3 * half:.1f} | {fraction:.0%} | "
            f"{1e3 * rot:.1f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the cases; print (and with --write record) the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = QUICK if args.quick else CASES
    rows = [run_case(name, make(), args.repeats) for name, make in cases.items()]
    body = table(rows)
    print(body)
    if args.write:
        note = (
            f"`python -m benchmarks.refresh_gate` on {cpu_model()}, one thread, fp32, "
            f"torch {torch.__version__}. Refresh: QR refresh of every side of every block "
            "(tolerance 0), each refreshed side's estimate formed anew; gate only: the drift "
            "check from the tracked estimates with no side refreshed; estimate upkeep: their "
            "update at one step from the rotated gradient; gate + part: the tolerance at the "
            "median share, so about half the sides refresh as parts of their classes. Before "
            "the estimates were tracked the gate formed F Q per side: gate only 115.7, 768.2 "
            "and 24.2 ms (0.20x, 0.17x, 0.12x a refresh of 590.5, 4522.0, 209.4 ms) in the "
            "three cases, same machine, commit 8629508."
        )
        replace_section(RESULTS, SECTION, f"{SECTION}\n\n{note}\n\n{body}\n")


if __name__ == "__main__":
    main()
