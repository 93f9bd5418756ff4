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

Each run stores its cases' rows in benchmarks/batched_engine.json (merged by case name) and
rebuilds the RESULTS.md section from every stored case, so the cases can run separately on a
loaded machine; every case records the load average before and after it.

    python -m benchmarks.batched_engine                      # every case; writes RESULTS.md
    python -m benchmarks.batched_engine --cases layer-b512   # one case (or a comma list)
    python -m benchmarks.batched_engine --quick              # reduced sizes, prints only
    python -m benchmarks.batched_engine --quick --write      # ... and writes RESULTS.md

Case names: layer-b512, layer-b1024, model-b64, launches, launches-batched (quick: layer-b32,
model-b16, launches-quick); a case name + ``-fold`` runs its fold part only.

``--compile`` (issue 23) adds ours batched with ``SOAPConfig.compile`` (the fold's and the
step's elementwise chains as torch.compile'd kernels, compiled in the untimed warm-up) to the
steps and the fold, and counts the bytes a fold moves, eager and compiled, against the
bandwidth bound (``fold_bytes``); its cases are stored as ``<case>+compiled``:

    python -m benchmarks.batched_engine --compile --cases layer-b512-fold,model-b64-fold
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import step_time as peers
from benchmarks.common import cpu_model, package_version, replace_section, timed
from mlfop_megatron.config import SOAPConfig
from mlfop_megatron.optim import MLFOPSOAP

SECTION = "## Batched block engine (CPU, issue 14)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
COMPILE = False  # --compile: ours batched also runs with compiled chains (SOAPConfig.compile)
WARMUP_WINDOWS = 3  # untimed windows of the fold measurement (see bench_fold)
STORE = Path(__file__).resolve().parent / "batched_engine.json"
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


def ours(
    params: list[torch.Tensor], batched: bool, freq: int, compile: bool = False, **extra: object
) -> Runner:
    """An MLFOPSOAP runner over ``params`` (batched or per-block engine; compiled chains)."""
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
        compile=compile,
        **extra,
    )
    first = params[0]

    def refreshed() -> bool:
        t = opt.state[first]["step"] if opt.state[first] else 0
        return t > 0 and t % freq == 0

    name = ("ours batched" if batched else "ours per-block") + (" compiled" if compile else "")
    return Runner(name, params, opt.step, refreshed, opt)


def contenders(shapes: Sequence[tuple[int, int]], freq: int, with_peers: bool) -> list[Runner]:
    """The runners compared on ``shapes``, each from the same initial params."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    runners = [
        ours([p.clone() for p in init], True, freq),
        ours([p.clone() for p in init], False, freq),
    ]
    if COMPILE:
        runners.insert(1, ours([p.clone() for p in init], True, freq, compile=True))
    if with_peers:
        peers.FREQ = freq
        for make in (peers.make_pytorch_optimizer, lambda ps: peers.make_heavyball(ps, False)):
            c = make([p.clone() for p in init])
            if c is not None:
                runners.append(Runner(c.name, c.params, c.opt.step, c.refreshed, c.opt))
    return runners


def bench_steps(runners: list[Runner], shapes, steps: int) -> None:
    """Interleaved steps; the first two, and any step that compiled a kernel, are not timed.

    The first two are the statistics-only init and the first update (which compiles the
    step's chain with ``--compile``); a later step compiles when a refresh hands the chain
    moments of other strides (a new kernel key).
    """
    from mlfop_megatron.core.fused import KERNELS

    gen = torch.Generator().manual_seed(1)
    for i in range(steps + 1):
        grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
        order = runners[i % len(runners) :] + runners[: i % len(runners)]
        for r in order:
            for p, g in zip(r.params, grads):
                p.grad = g.clone()
            compiles = KERNELS.compiles
            t = timed(r.step)
            if i > 1 and KERNELS.compiles == compiles:
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


def fold_engines() -> list[tuple[str, bool, bool]]:
    """(name, batched, compiled) of the engines whose fold is measured.

    ``--compile``: the batched engine eager and compiled (the per-block engine is left out to
    keep the run short on a shared machine).
    """
    if COMPILE:
        return [("ours batched", True, False), ("ours batched compiled", True, True)]
    return [("ours batched", True, False), ("ours per-block", False, False)]


def bench_fold(shapes, windows: int) -> dict[str, tuple[float, float, float]]:
    """Per engine: (extra seconds per fold, rotation seconds, FOP seconds per fold).

    No basis refresh inside the timed windows (precondition_frequency beyond the run): the
    windows with and without folding differ only by the folding. FOP seconds: the time spent
    in the folder's ``_fold_pair`` (the FOP inner products, scalars and the in-place fold of
    both forms), measured directly; the rest of the extra is the level's rotation and the
    bookkeeping around it. The three warm-up windows compile every chain (``--compile``).
    """
    from mlfop_megatron.core.batched_folding import BatchedWindowFolder
    from mlfop_megatron.core.folding import WindowFolder

    k, freq = 4, 10_000
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    engines = fold_engines()
    runs = {}
    for name, batched, compiled in engines:
        for enabled in (True, False):
            params = [p.clone() for p in init]
            r = ours(params, batched, freq, compiled, accumulation_steps=k, enabled=enabled)
            runs[(name, enabled)] = r
    micro = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(k)]
    window_times: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    fop_times: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    rot_times: dict[str, list[float]] = {name: [] for name, _, _ in engines}
    spent = [0.0]
    originals = {cls: cls._fold_pair for cls in (BatchedWindowFolder, WindowFolder)}

    def timing(original):
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0

        return wrapper

    for cls, original in originals.items():
        cls._fold_pair = timing(original)  # type: ignore[method-assign]
    try:
        # Warm-up windows: the init step, the first update (its folds still under the metric
        # I) and the first window under the SOAP metric (its folds compile that variant).
        for w in range(windows + WARMUP_WINDOWS):
            for key, r in runs.items():

                def window(r: Runner = r) -> None:
                    for g in micro:
                        for p, x in zip(r.params, g):
                            p.grad = x.clone()
                        r.opt.accumulate()
                    r.opt.step()

                spent[0] = 0.0
                t = timed(window)
                if w >= WARMUP_WINDOWS:
                    window_times[key].append(t)
                    if key[1]:
                        fop_times[key[0]].append(spent[0] / 2)
            if w >= WARMUP_WINDOWS:
                for name, batched, _ in engines:
                    rot_times[name].append(
                        rotation_time(runs[(name, True)].opt, batched, shapes, 1)
                    )
    finally:
        for cls, original in originals.items():
            cls._fold_pair = original  # type: ignore[method-assign]
    out = {}
    for name, _, _ in engines:
        # Paired: each round's window with folding minus the same round's without (the load
        # drifts between rounds), median over rounds; the rotation is timed in every round too.
        pairs = zip(window_times[(name, True)], window_times[(name, False)])
        extra = statistics.median(f - p for f, p in pairs) / 2
        rot = statistics.median(rot_times[name])
        fop = statistics.median(fop_times[name])
        out[name] = (extra, rot, fop)
    return out


class OpBytes(TorchDispatchMode):
    """Bytes the aten ops under it read and write, and how many ops ran (views excluded).

    An op reads each distinct tensor argument once and writes each output once (in place:
    its first argument): what a kernel that streams its operands moves through memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.ops += 1
            self.bytes += tensor_bytes(tree_flatten((args, kwargs))[0])
            self.bytes += tensor_bytes(tree_flatten(out)[0])
        return out


def tensor_bytes(items: Sequence[object]) -> int:
    """Bytes of the distinct tensors among ``items`` (a tensor passed twice counts once)."""
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    for t in items:
        if isinstance(t, torch.Tensor):
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
    return sum(seen.values())


# Arguments a compiled chain writes in place (``core/fused.py``), by function name.
IN_PLACE = {"fold_update_": (0, 2), "adam_direction_": (0, 1)}


def fold_bytes(shapes) -> dict[str, float]:
    """Bytes a fold moves, in units of S (the bytes of one estimate's gradient stacks).

    Eager (batched engine): every aten op inside ``_fold_pair``, counted by :class:`OpBytes`.
    Compiled: each kernel reads its tensor arguments once and writes its outputs (and the
    arguments it updates in place) once: the generated code was checked to be one loop nest
    per chain without a stack-sized buffer (``TORCH_LOGS=output_code``). Bound: read z, h
    (both forms) and the metric once, write z (both forms) once: 7 S; the two-phase floor
    (phase 2 needs s, which needs phase 1's sums reduced over the block and across ranks,
    so z, h and the metric are read twice): 12 S. Window 3 of a K = 4 chain run, two folds.
    """
    unit = sum(r * c for r, c in shapes) * 4
    out: dict[str, float] = {"S bytes": float(unit), "bound": 7.0, "two-phase floor": 12.0}
    for compiled in (False, True):
        moved, ops = _window_fold_bytes(shapes, compiled)
        tag = "compiled" if compiled else "eager"
        out[f"{tag} S"] = moved / 2 / unit
        out[f"{tag} ops"] = ops / 2
    return out


def _window_fold_bytes(shapes, compiled: bool) -> tuple[int, int]:
    """(bytes, ops or kernels) of the two folds of window 3 (see :func:`fold_bytes`)."""
    from mlfop_megatron.core import fused
    from mlfop_megatron.core.batched_folding import BatchedWindowFolder

    gen = torch.Generator().manual_seed(4)
    micro = [[torch.randn(s, generator=gen) * 1e-2 for s in shapes] for _ in range(4)]
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    r = ours(params, True, 10_000, compiled, accumulation_steps=4, enabled=True)
    count = {"bytes": 0, "ops": 0, "on": False, "inside": False}
    original_pair, original_run = BatchedWindowFolder._fold_pair, fused.CompiledKernels.run

    def counted_pair(self, *args, **kwargs):
        if not count["on"]:
            return original_pair(self, *args, **kwargs)
        count["inside"] = True
        try:
            if compiled:
                return original_pair(self, *args, **kwargs)
            with OpBytes() as ops:
                coef = original_pair(self, *args, **kwargs)
        finally:
            count["inside"] = False
        count["bytes"] += ops.bytes
        count["ops"] += ops.ops
        return coef

    def counted_run(self, fn, *args):
        result = original_run(self, fn, *args)
        if count["inside"]:
            written = [args[i] for i in IN_PLACE.get(fn.__name__, ())]
            count["bytes"] += tensor_bytes(args) + tensor_bytes([result, *written])
            count["ops"] += 1
        return result

    BatchedWindowFolder._fold_pair = counted_pair  # type: ignore[method-assign]
    fused.CompiledKernels.run = counted_run  # type: ignore[method-assign]
    try:
        for w in range(3):
            count["on"] = w == 2
            for g in micro:
                for p, x in zip(r.params, g):
                    p.grad = x.clone()
                r.opt.accumulate()
            r.opt.step()
    finally:
        BatchedWindowFolder._fold_pair = original_pair  # type: ignore[method-assign]
        fused.CompiledKernels.run = original_run  # type: ignore[method-assign]
    return count["bytes"], count["ops"]


def count_launches(
    shapes, freq: int, with_peers: bool, per_block: bool = True
) -> dict[str, dict[str, int]]:
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
    if not per_block:
        runners = [r for r in runners if r.name != "ours per-block"]
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
    for batched in (True, False) if per_block else (True,):
        params = [p.clone() for p in init]
        # A folding window (3 levels, 2 folds), no refresh in it.
        r = ours(params, batched, 10_000, accumulation_steps=4, enabled=True)

        def window(r: Runner = r) -> None:
            for _ in range(4):
                for p, g in zip(r.params, grads):
                    p.grad = g
                r.opt.accumulate()
            r.opt.step()

        window()
        window()
        out[r.name]["K=4 window (3 levels, 2 folds, no refresh)"] = count(window)
    return out


DEFAULT_FREQ = SOAPConfig().precondition_frequency
FULL_CASES = {
    "layer-b512": ("layer-b512 (h=512)", lambda: llama_blocks(512, 1, 512), 4, 9),
    "layer-b1024": ("layer-b1024 (h=1024)", lambda: llama_blocks(1024, 1, 1024), 2, 5),
    "model-b64": ("model-b64 (4 layers, h=256)", lambda: llama_blocks(256, 4, 64), 4, 9),
}
QUICK_CASES = {
    "layer-b32": ("layer-b32 (h=64)", lambda: llama_blocks(64, 1, 32), 4, 9),
    "model-b16": ("model-b16 (2 layers, h=64)", lambda: llama_blocks(64, 2, 16), 4, 9),
}
LAUNCH_CASES = {
    "launches": (
        "32 layers, h=256, block 64 (= h 4096 at block 1024, scaled 1/16)",
        lambda: llama_blocks(256, 32, 64),
    ),
    "launches-quick": ("4 layers, h=64, block 16", lambda: llama_blocks(64, 4, 16)),
    # Only the batched engine at 32 layers (the per-block engine and the peers take O(blocks)
    # profiled ops: at 6656 blocks over an hour of profiling on the loaded 2-core machine).
    "launches-batched": (
        "32 layers, h=256, block 64 (= h 4096 at block 1024, scaled 1/16), batched engine only",
        lambda: llama_blocks(256, 32, 64),
    ),
}


def run_case(key: str) -> dict:
    """Run one step/fold case (``<case>-fold``: its fold part only); its stored record."""
    fold_only = key.endswith("-fold")
    name, make, freq, steps = {**FULL_CASES, **QUICK_CASES}[key.removesuffix("-fold")]
    shapes = make()
    load_before = load_average()
    t0 = time.perf_counter()
    if fold_only:
        name += " fold only"
        fold_rows = []
        compiles = compile_stats()
        for engine, (extra, rot, fop) in bench_fold(shapes, 7).items():
            fold_rows.append([name, engine, extra, rot, fop])
            log(
                f"  fold {engine}: +{1e3 * extra:.1f} ms (FOP {1e3 * fop:.1f}), rot {1e3 * rot:.1f}"
            )
        return _steps_record(name, shapes, [], fold_rows, compiles, load_before, t0)
    classes = len(set(shapes))
    compiles = compile_stats()
    log(f"{name}: {len(shapes)} blocks, {classes} shape classes, f={freq}, {steps} steps")
    runners = contenders(shapes, freq, True)
    bench_steps(runners, shapes, steps)
    results = {r.name: summary(r) for r in runners}
    del runners
    gc.collect()
    peer_plain = [p for n, (p, _) in results.items() if not n.startswith("ours")]
    peer_fresh = [f for n, (_, f) in results.items() if not n.startswith("ours") and f]
    step_rows = []
    for rname, (plain, fresh) in results.items():
        step_rows.append(
            [
                name,
                len(shapes),
                classes,
                rname,
                plain,
                fresh,
                plain / min(peer_plain) if peer_plain else None,
                fresh / min(peer_fresh) if peer_fresh and fresh else None,
            ]
        )
        log(f"  {rname}: plain {1e3 * plain:.1f} ms, refresh +{1e3 * (fresh or 0):.1f} ms")
    fold_rows = []
    for engine, (extra, rot, fop) in bench_fold(shapes, 7).items():
        fold_rows.append([name, engine, extra, rot, fop])
        log(
            f"  fold {engine}: +{1e3 * extra:.1f} ms per fold (FOP {1e3 * fop:.1f} ms), "
            f"rotation {1e3 * rot:.1f} ms"
        )
    gc.collect()
    return _steps_record(name, shapes, step_rows, fold_rows, compiles, load_before, t0)


def _steps_record(
    name: str,
    shapes: list,
    step_rows: list,
    fold_rows: list,
    compiles: dict[str, float],
    load_before: str,
    t0: float,
) -> dict:
    """One case's record: its step and fold rows, compile counts, bytes (compiled), load."""
    record = {
        "kind": "steps",
        "name": name,
        "steps": step_rows,
        "fold": fold_rows,
        "compile": compile_stats(compiles),
    }
    if COMPILE:
        record["bytes"] = fold_bytes(shapes)
        log(f"  bytes per fold (units of S): {record['bytes']}")
    record.update(load=[load_before, load_average()], seconds=time.perf_counter() - t0)
    return record


def compile_stats(since: dict[str, float] | None = None) -> dict[str, float]:
    """The compiled kernels' counts (``fused.KERNELS``), minus ``since`` when given."""
    from mlfop_megatron.core.fused import KERNELS

    now = KERNELS.stats()
    return now if since is None else {k: v - since[k] for k, v in now.items()}


def run_launches(key: str) -> dict:
    """Count the launches of one launch model; its stored record."""
    name, make = LAUNCH_CASES[key]
    shapes = make()
    load_before = load_average()
    t0 = time.perf_counter()
    log(f"launches: {name}: {len(shapes)} blocks, {len(set(shapes))} classes")
    alone = key == "launches-batched"
    counts = count_launches(shapes, 2, not alone, per_block=not alone)
    return {
        "kind": "launches",
        "name": name,
        "blocks": len(shapes),
        "classes": len(set(shapes)),
        "counts": counts,
        "load": [load_before, load_average()],
        "seconds": time.perf_counter() - t0,
    }


@contextlib.contextmanager
def store_lock():
    """Hold the store's lock (cases may run in parallel processes)."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "mlfop_batched_engine.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def merge_store(key: str, record: dict) -> dict:
    """Add ``record`` to the stored cases; every stored case."""
    with store_lock():
        store = json.loads(STORE.read_text()) if STORE.exists() else {}
        store[key] = record
        STORE.write_text(json.dumps(store, indent=1) + "\n")
    return store


def load_average() -> str:
    """The 1/5/15-minute load averages, 'a / b / c'."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen cases, store them, and print (and write) the RESULTS.md section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a loaded CPU)")
    ap.add_argument("--write", action="store_true", help="with --quick: write RESULTS.md too")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also run ours batched with SOAPConfig.compile (cases stored as <case>+compiled)",
    )
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated case names (default: all of the chosen size; see the docstring)",
    )
    args = ap.parse_args(argv)
    global COMPILE
    COMPILE = args.compile
    torch.manual_seed(0)
    known = {**FULL_CASES, **QUICK_CASES, **LAUNCH_CASES}
    if args.cases is None:
        keys = [*QUICK_CASES, "launches-quick"] if args.quick else [*FULL_CASES, "launches"]
    else:
        keys = [k.strip() for k in args.cases.split(",") if k.strip()]
        unknown = [k for k in keys if k.removesuffix("-fold") not in known]
        if unknown:
            ap.error(f"--cases: unknown {unknown}; choose from {sorted(known)}")
    store: dict = {}
    for key in keys:
        record = run_launches(key) if key in LAUNCH_CASES else run_case(key)
        record["command"] = "python -m benchmarks.batched_engine " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"
        )
        if COMPILE:
            key += "+compiled"
        store[key] = record
        if not args.quick:
            store = merge_store(key, record)  # keep what finished
    with store_lock():
        if not args.quick:  # every stored case, those of parallel runs included
            store = json.loads(STORE.read_text())
        body = report(store)
        print(body)
        if not args.quick or args.write:
            replace_section(RESULTS, SECTION, body)
            log(f"wrote {RESULTS}")
    return 0


def fmt(x: float | None, scale: float = 1e3, digits: int = 1) -> str:
    """``x * scale`` with ``digits`` decimals; ``-`` for None."""
    return "-" if x is None else f"{x * scale:.{digits}f}"


def report(store: dict) -> str:
    """The RESULTS.md section of every stored case."""
    steps = [r for r in store.values() if r["kind"] == "steps"]
    launch = [r for r in store.values() if r["kind"] == "launches"]
    lines = [
        SECTION,
        "",
        "Commands (each case records its own command, duration and load average; cases may "
        "come from separate runs):",
        "",
    ]
    for key, r in store.items():
        compiled = r.get("compile", {}).get("compiles")
        lines.append(
            f"- `{r['command'].strip()}`: {key}, {r['seconds']:.0f} s, load average before "
            f"{r['load'][0]}, after {r['load'][1]}"
            + (
                f"; {compiled:.0f} kernels compiled in {r['compile']['compile_seconds']:.0f} s"
                if compiled
                else ""
            )
        )
    lines += [
        "",
        f"Machine: {cpu_model()}, nproc={os.cpu_count()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}, "
        f"pytorch_optimizer {package_version('pytorch_optimizer')}, heavyball "
        f"{package_version('heavyball')} (absolute times depend on the machine and its load, "
        "the side-by-side ratios less so; the notes section below reads them)",
        "",
        "Method: see the docstring of benchmarks/batched_engine.py. Every contender gets the "
        "same block-shaped fp32 tensors (PyPI SOAPs have no blocking; one parameter per block "
        "is the same block-diagonal SOAP), same gradients, steps interleaved. plain = median "
        "step without a basis refresh; refresh = median refresh step minus plain; ratios are "
        "against the fastest PyPI SOAP of the case (< 1: ours faster). The PyPI SOAPs keep "
        "the first moment m in the original coordinates and rotate it every step (three "
        "rotations per step); ours keeps m rotated (two per step) and re-expresses it in the "
        "new basis at a refresh, so part of their per-step work is in our refresh. The last "
        "two columns compare what a run pays: the mean step over a refresh period, plain + "
        f"refresh extra / f, at the default f = {DEFAULT_FREQ} (computed from the measured "
        "plain and refresh columns).",
        "",
        "| case | blocks | shape classes | optimizer | plain step ms | refresh extra ms | "
        f"plain / fastest peer | refresh / fastest peer | mean step at f={DEFAULT_FREQ} ms | "
        "mean step / fastest peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        mean = {row[3]: row[4] + (row[5] or 0.0) / DEFAULT_FREQ for row in r["steps"]}
        peer = [m for name, m in mean.items() if not name.startswith("ours")]
        for case, n, c, name, plain, fresh, rp, rf in r["steps"]:
            ratio = mean[name] / min(peer) if peer else None
            lines.append(
                f"| {case} | {n} | {c} | {name} | {fmt(plain)} | {fmt(fresh)} | "
                f"{fmt(rp, 1, 2)} | {fmt(rf, 1, 2)} | {fmt(mean[name])} | {fmt(ratio, 1, 2)} |"
            )
    lines += [
        "",
        "Fold cost (ours, K=4 chain window, levels 1, 2, 4: two folds; no basis refresh in the "
        f"timed windows; 7 timed rounds after {WARMUP_WINDOWS} warmup (2 before issue 23), "
        "medians of paired differences): extra "
        "wall time of the window with folding over the same window without folding, per fold, "
        "in units of that engine's rotation of all blocks (target <= 1). A fold needs the "
        "rotation of its new level's mean (the window without folding rotates only its mean, in"
        " the step), so the extra is one rotation plus the FOP work; the FOP column is the time"
        " measured inside the folder's `_fold_pair` (inner products, scalars, the fold of both "
        "forms).",
        "",
        "| case | engine | extra ms per fold | rotation ms | extra per fold (rotations) | "
        "FOP ms per fold | FOP per fold (rotations) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        for case, engine, extra, rot, fop in r["fold"]:
            lines.append(
                f"| {case} | {engine} | {fmt(extra)} | {fmt(rot)} | {extra / rot:.2f} | "
                f"{fmt(fop)} | {fop / rot:.2f} |"
            )
    moved = [r for r in steps if "bytes" in r]
    if moved:
        lines += [
            "",
            "Bytes a fold moves (batched engine), in units of S = the bytes of one estimate's "
            "gradient stacks (`fold_bytes`): eager = every aten op inside `_fold_pair` (each "
            "distinct operand read once, each output written once); compiled = each kernel "
            "reads its arguments and writes its outputs once (checked in the generated code: "
            "one loop nest per chain, no stack-sized buffer). Bound: read z, h (both forms) "
            "and the metric once, write z (both forms) once = 7 S; two-phase floor 12 S "
            "(phase 2 needs s from phase 1's reduced sums, so z, h and the metric are read "
            "twice).",
            "",
            "| case | S MB | eager ops | eager bytes (S) | compiled kernels | compiled bytes (S)"
            " | bound (S) | two-phase floor (S) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in moved:
            b = r["bytes"]
            lines.append(
                f"| {r['name']} | {b['S bytes'] / 1e6:.1f} | {b['eager ops']:.0f} | "
                f"{b['eager S']:.1f} | {b['compiled ops']:.0f} | {b['compiled S']:.1f} | "
                f"{b['bound']:.0f} | {b['two-phase floor']:.0f} |"
            )
    for r in launch:
        lines += [
            "",
            f"Launches per step (torch.profiler, leaf aten ops without views/allocations, a "
            f"``_foreach_`` op counted once: a proxy for GPU kernel launches) on {r['name']}: "
            f"{r['blocks']} blocks in {r['classes']} shape class(es).",
            "",
        ]
        counts = r["counts"]
        cols = sorted({k for row in counts.values() for k in row})
        lines.append("| optimizer | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for name, row in counts.items():
            lines.append(f"| {name} | " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
