"""Batched vs per-block SOAP engine, and the PyPI SOAPs, side by side on CPU (issue 14).

Cases (fp32; every SOAP sees the same list of block-shaped tensors: the PyPI SOAPs have no
blocking, and a blocked layer given to them as one parameter per block is the same
block-diagonal SOAP, so all contenders run the same math on the same shapes):
  * ``layer-b512``:  one Llama-like layer (kv = h/4, ffn = 3.5h; q, k, v, o, gate, up, down)
    at h = 512, cut into blocks of at most 512 x 512;
  * ``layer-b1024``: the same at h = 1024, blocks of at most 1024 x 1024;
  * ``model-b64``:   a small 4-layer Llama-like model, h = 256, blocks of 64 x 64 (832
    blocks: the launch-bound regime).
Widths are reduced from Llama-3-8B's (h = 4096) so that the run fits a shared 2-core CPU.

Per case, in one process with the contenders interleaved step by step (order rotated each
round): plain-step time (median of steps without a basis refresh), refresh time (median
refresh step minus median plain step), and for our two engines the fold cost: the extra
wall time of a K = 4 chain window (levels 1, 2, 4: two folds) over the same window without
folding, per fold, in units of one rotation rot(X) = QL^T X QR of all blocks by that engine.

Launches: aten ops per step counted with torch.profiler (leaf ``aten::`` events, views and
allocations excluded; a proxy for GPU kernel launches) on a 32-layer Llama-3-8B-shaped model
at block 1024 scaled down 16x (h = 256, kv = 64, ffn = 896, block 64: the same 6656 blocks
and shape classes as h = 4096 at block 1024; the op count does not depend on the width).

    python -m benchmarks.batched_engine            # ~8 min on 2 busy cores; writes RESULTS.md
    python -m benchmarks.batched_engine --quick    # reduced sizes (h 64, blocks 32/16)
    python -m benchmarks.batched_engine --quick --write   # ... and write RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import step_time as peers
from benchmarks.common import cpu_model, replace_section
from mlfop_megatron.optim import MLFOPSOAP

SECTION = "## Batched block engine (CPU, issue 14)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
LR, BETAS, EPS, WD = 3e-3, (0.95, 0.95), 1e-8, 0.01
VIEW_OPS = {
    "aten::view",
    "aten::alias",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::unbind",
    "aten::transpose",
    "aten::t",
    "aten::expand",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::permute",
    "aten::squeeze",
    "aten::unsqueeze",
    "aten::flatten",
    "aten::detach",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::narrow",
    "aten::split",
    "aten::chunk",
    "aten::diagonal",
    "aten::_unsafe_view",
    "aten::set_",
    "aten::result_type",
    "aten::to",  # a real conversion shows as its child aten::_to_copy / copy_; alone a no-op
}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Print ``msg`` with the seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


def split(n: int, b: int) -> list[int]:
    """Sizes of the chunks of at most ``b`` that ``n`` splits into."""
    return [min(b, n - i) for i in range(0, n, b)]


def llama_blocks(hidden: int, layers: int, block: int) -> list[tuple[int, int]]:
    """Block shapes of ``layers`` Llama-like layers (kv = h/4, ffn = 3.5h) cut at ``block``."""
    h, kv, ffn = hidden, hidden // 4, int(3.5 * hidden)
    mats = [(h, h), (kv, h), (kv, h), (h, h), (ffn, h), (ffn, h), (h, ffn)]
    out = []
    for _ in range(layers):
        for rows, cols in mats:
            out += [(r, c) for r in split(rows, block) for c in split(cols, block)]
    return out


@dataclass
class Runner:
    """One contender: its params, how to take a step, and whether the last step refreshed."""

    name: str
    params: list[torch.Tensor]
    step: Callable[[], None]
    refreshed: Callable[[], bool]
    opt: object = None
    times: list[float] = field(default_factory=list)
    flags: list[bool] = field(default_factory=list)


def ours(params: list[torch.Tensor], batched: bool, freq: int, **extra: object) -> Runner:
    """An MLFOPSOAP runner over ``params`` (batched or per-block engine)."""
    for p in params:
        p.requires_grad_(True)  # MLFOPSOAP steps trainable params only
    opt = MLFOPSOAP(
        params,
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WD,
        precondition_frequency=freq,
        batched=batched,
        **extra,
    )
    first = params[0]

    def refreshed() -> bool:
        t = opt.state[first]["step"] if opt.state[first] else 0
        return t > 0 and t % freq == 0

    name = "ours batched" if batched else "ours per-block"
    return Runner(name, params, opt.step, refreshed, opt)


def contenders(shapes: Sequence[tuple[int, int]], freq: int, with_peers: bool) -> list[Runner]:
    """The runners compared on ``shapes``, each from the same initial params."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    runners = [
        ours([p.clone() for p in init], True, freq),
        ours([p.clone() for p in init], False, freq),
    ]
    if with_peers:
        peers.FREQ = freq
        for make in (peers.make_pytorch_optimizer, lambda ps: peers.make_heavyball(ps, False)):
            c = make([p.clone() for p in init])
            if c is not None:
                runners.append(Runner(c.name, c.params, c.opt.step, c.refreshed, c.opt))
    return runners


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn`` (garbage collection off)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def bench_steps(runners: list[Runner], shapes, steps: int) -> None:
    """Interleaved steps; the first (statistics-only / init) step is not timed."""
    gen = torch.Generator().manual_seed(1)
    for i in range(steps + 1):
        grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
        order = runners[i % len(runners) :] + runners[: i % len(runners)]
        for r in order:
            for p, g in zip(r.params, grads):
                p.grad = g.clone()
            t = timed(r.step)
            if i > 0:
                r.times.append(t)
                r.flags.append(r.refreshed())


def summary(r: Runner) -> tuple[float, float | None]:
    """Median plain step time, and the median extra time of refresh steps (None: none ran)."""
    plain = [t for t, f in zip(r.times, r.flags) if not f]
    fresh = [t for t, f in zip(r.times, r.flags) if f]
    p = statistics.median(plain)
    return p, (statistics.median(fresh) - p) if fresh else None


def rotation_time(opt: MLFOPSOAP, batched: bool, shapes, repeats: int) -> float:
    """Median wall time of rot(X) over all blocks with that engine's own rotation."""
    from mlfop_megatron.core.soap import rotate

    xs = [torch.randn(s) for s in shapes]
    params = [p for g in opt.param_groups for p in g["params"]]
    if batched:
        engine = opt._batched_engine(params)
        stacks = engine.stack(xs)

        def run() -> None:
            for cls, x in zip(engine.classes, stacks):
                cls.rotate(x)

    else:
        states = [opt.state[p] for p in params]

        def run() -> None:
            for s, x in zip(states, xs):
                rotate(x, s)

    return statistics.median(timed(run) for _ in range(repeats))


def bench_fold(shapes, windows: int, freq: int) -> dict[str, tuple[float, float]]:
    """Per engine: (extra seconds per fold, rotation seconds)."""
    k = 4
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    runs = {}
    for batched in (True, False):
        for enabled in (True, False):
            params = [p.clone() for p in init]
            r = ours(params, batched, freq, accumulation_steps=k, enabled=enabled)
            runs[(batched, enabled)] = r
    micro = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(k)]
    window_times: dict[tuple[bool, bool], list[float]] = {key: [] for key in runs}
    for w in range(windows + 2):  # two warmup windows: the init step and one plain step
        for key, r in runs.items():

            def window(r: Runner = r) -> None:
                for g in micro:
                    for p, x in zip(r.params, g):
                        p.grad = x.clone()
                    r.opt.accumulate()
                r.opt.step()

            t = timed(window)
            if w >= 2:
                window_times[key].append(t)
    out = {}
    for batched in (True, False):
        fold = statistics.median(window_times[(batched, True)])
        plain = statistics.median(window_times[(batched, False)])
        rot = rotation_time(runs[(batched, True)].opt, batched, shapes, 5)
        out["ours batched" if batched else "ours per-block"] = ((fold - plain) / 2, rot)
    return out


def count_launches(shapes, freq: int, with_peers: bool) -> dict[str, dict[str, int]]:
    """Leaf aten ops (no views/allocations) per plain step, refresh step and K=4 window."""
    from torch.profiler import ProfilerActivity, profile

    def count(fn: Callable[[], None]) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        n = 0
        for e in prof.events():
            if not e.name.startswith("aten::") or e.name in VIEW_OPS:
                continue
            if e.name.startswith("aten::_foreach_"):
                n += 1  # one multi-tensor kernel on GPU; its CPU fallback loops per tensor
                continue
            if any(c.name.startswith("aten::") for c in e.cpu_children):
                continue
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::_foreach_"):
                parent = parent.cpu_parent
            n += parent is None
        return n

    out: dict[str, dict[str, int]] = {}
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    runners = contenders(shapes, freq, with_peers)
    for r in runners:
        for p, src in zip(r.params, init):
            p.data.copy_(src)

        def step(r: Runner = r) -> None:
            for p, g in zip(r.params, grads):
                p.grad = g
            r.step()

        row = {}
        for t in range(freq + 1):  # the init step, plain steps, then a refresh step
            if t == 1:
                row["plain step"] = count(step)
            elif t == freq:
                row["refresh step"] = count(step)
            else:
                step()
        out[r.name] = row
        log(f"  launches {r.name}: {row}")
    for batched in (True, False):
        params = [p.clone() for p in init]
        r = ours(params, batched, freq, accumulation_steps=4)

        def window(r: Runner = r) -> None:
            for _ in range(4):
                for p, g in zip(r.params, grads):
                    p.grad = g
                r.opt.accumulate()
            r.opt.step()

        window()
        window()
        out[r.name]["K=4 window (3 levels, 2 folds)"] = count(window)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its RESULTS.md section (written unless --quick alone)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a loaded CPU)")
    ap.add_argument("--write", action="store_true", help="with --quick: write RESULTS.md too")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.quick:
        cases = [
            ("layer-b32 (h=64)", llama_blocks(64, 1, 32), 4, 9),
            ("model-b16 (2 layers, h=64)", llama_blocks(64, 2, 16), 4, 9),
        ]
        launch = ("4 layers, h=64, block 16", llama_blocks(64, 4, 16))
    else:
        cases = [
            ("layer-b512 (h=512)", llama_blocks(512, 1, 512), 4, 9),
            ("layer-b1024 (h=1024)", llama_blocks(1024, 1, 1024), 2, 5),
            ("model-b64 (4 layers, h=256)", llama_blocks(256, 4, 64), 4, 9),
        ]
        launch = (
            "32 layers, h=256, block 64 (= h 4096 at block 1024, scaled 1/16)",
            llama_blocks(256, 32, 64),
        )
    step_rows, fold_rows = [], []
    for name, shapes, freq, steps in cases:
        classes = len(set(shapes))
        log(f"{name}: {len(shapes)} blocks, {classes} shape classes, f={freq}, {steps} steps")
        runners = contenders(shapes, freq, True)
        bench_steps(runners, shapes, steps)
        results = {r.name: summary(r) for r in runners}
        peer_plain = [p for n, (p, _) in results.items() if not n.startswith("ours")]
        peer_fresh = [f for n, (_, f) in results.items() if not n.startswith("ours") and f]
        for r in runners:
            plain, fresh = results[r.name]
            step_rows.append(
                (
                    name,
                    len(shapes),
                    classes,
                    r.name,
                    plain,
                    fresh,
                    plain / min(peer_plain) if peer_plain else None,
                    fresh / min(peer_fresh) if peer_fresh and fresh else None,
                )
            )
            log(f"  {r.name}: plain {1e3 * plain:.1f} ms, refresh +{1e3 * (fresh or 0):.1f} ms")
        del runners
        gc.collect()
        for engine, (extra, rot) in bench_fold(shapes, 3, freq).items():
            fold_rows.append((name, engine, extra, rot))
            log(f"  fold {engine}: +{1e3 * extra:.1f} ms per fold, rotation {1e3 * rot:.1f} ms")
        gc.collect()
    launch_name, launch_shapes = launch
    log(f"launches: {launch_name}: {len(launch_shapes)} blocks, {len(set(launch_shapes))} classes")
    launches = count_launches(launch_shapes, 2, True)
    total = time.perf_counter() - start
    command = "python -m benchmarks.batched_engine" + (" --quick --write" if args.quick else "")
    body = report(step_rows, fold_rows, launch_name, launch_shapes, launches, total, command)
    print(body)
    if not args.quick or args.write:
        replace_section(RESULTS, SECTION, body)
        log(f"wrote {RESULTS}")
    return 0


def fmt(x: float | None, scale: float = 1e3, digits: int = 1) -> str:
    """``x * scale`` with ``digits`` decimals; ``-`` for None."""
    return "-" if x is None else f"{x * scale:.{digits}f}"


def report(step_rows, fold_rows, launch_name, launch_shapes, launches, total, command) -> str:
    """The RESULTS.md section of the measured rows."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (total runtime {total:.0f} s)",
        "",
        f"Machine: {cpu_model()}, nproc={os.cpu_count()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}, "
        f"pytorch_optimizer {peers.version('pytorch_optimizer')}, heavyball "
        f"{peers.version('heavyball')}, load average at the end {load} (the CPU was shared "
        "with other jobs: absolute times are noisy, the side-by-side ratios less so)",
        "",
        "Method: see the docstring of benchmarks/batched_engine.py. Every contender gets the "
        "same block-shaped fp32 tensors (PyPI SOAPs have no blocking; one parameter per block "
        "is the same block-diagonal SOAP), same gradients, steps interleaved. plain = median "
        "step without a basis refresh; refresh = median refresh step minus plain; ratios are "
        "against the fastest PyPI SOAP of the case (< 1: ours faster).",
        "",
        "| case | blocks | shape classes | optimizer | plain step ms | refresh extra ms | "
        "plain / fastest peer | refresh / fastest peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, n, c, name, plain, fresh, rp, rf in step_rows:
        lines.append(
            f"| {case} | {n} | {c} | {name} | {fmt(plain)} | {fmt(fresh)} | "
            f"{fmt(rp, 1, 2)} | {fmt(rf, 1, 2)} |"
        )
    lines += [
        "",
        "Fold cost (ours, K=4 chain window, levels 1, 2, 4: two folds; 3 timed windows after "
        "2 warmup, medians): extra wall time of the window with folding over the same window "
        "without folding, per fold, in units of that engine's rotation of all blocks "
        "(target <= 1).",
        "",
        "| case | engine | extra ms per fold | rotation ms | folds cost (rotations) |",
        "|---|---|---|---|---|",
    ]
    for case, engine, extra, rot in fold_rows:
        lines.append(f"| {case} | {engine} | {fmt(extra)} | {fmt(rot)} | {extra / rot:.2f} |")
    lines += [
        "",
        f"Launches per step (torch.profiler, leaf aten ops without views/allocations, a "
        f"``_foreach_`` op counted once: a proxy for GPU kernel launches) on {launch_name}: "
        f"{len(launch_shapes)} blocks in {len(set(launch_shapes))} shape class(es).",
        "",
    ]
    cols = sorted({k for row in launches.values() for k in row})
    lines.append("| optimizer | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---|" * len(cols))
    for name, row in launches.items():
        lines.append(f"| {name} | " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
