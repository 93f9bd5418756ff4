"""The window's SOAP metric is computed at its first read (``folding.WindowMetric``).

sqrt(v_hat) + eps of the window's start state (S bytes per rank) is read by the folds and by
the grad-group diagnostics, all before the optimizer step. A window that never folds (folding
off, the default) and arms no diagnostics must never compute it, and computing it later than
at the window's start must not change a bit: every run here is compared with a twin that reads
the metric right after the window's first micro-step (where the folder computed it before),
on both engines (batched and per-block) of MLFOPSOAP and of ShardedSOAP. The counts wrap the
real methods on the real objects: ``BatchedBlocks.metric_diags`` of the engine, and
``soap.metric_diag`` as the per-block folder calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.core import folding
from mlfop_megatron.core.batched_folding import BatchedWindowFolder
from mlfop_megatron.core.folding import WindowFolder, WindowMetric
from mlfop_megatron.distributed.sharded_soap import ShardedSOAP
from mlfop_megatron.optim import MLFOPSOAP

K = 4
SHAPES = [(12, 10), (12, 10), (10, 12), (6, 10)]  # two shapes share a class
FOLDING = {
    "off": {},
    "chain": {"enabled": True},
    "tree_eta": {"enabled": True, "structure": "tree", "step_size": "eta_star"},
}


class Calls:
    """Counts the calls of a real function or bound method it wraps."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.count = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.fn(*args, **kwargs)


def _grads(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _read_metric(folder: WindowFolder | BatchedWindowFolder) -> None:
    """What the folder did at its creation before the metric became lazy."""
    if isinstance(folder, BatchedWindowFolder):
        assert folder.class_diags is not None
    else:
        list(folder.metric_diags)


class OptimizerRun:
    """MLFOPSOAP on four matrix params (grads set by hand)."""

    def __init__(self, batched: bool, options: dict[str, Any]) -> None:
        torch.manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        self.opt = MLFOPSOAP(
            self.params, accumulation_steps=K, batched=batched, precondition_frequency=2, **options
        )

    def window(
        self, gen: torch.Generator, eager: bool, groups: tuple[int, ...] | None = None
    ) -> WindowFolder | BatchedWindowFolder:
        if groups is not None:
            self.opt.request_grad_diagnostics(groups)
        folder = None
        for m in range(K):
            for p, g in zip(self.params, _grads(gen)):
                p.grad = g
            self.opt.accumulate()
            if m == 0:
                folder = self.opt._folder
                assert folder is not None
                if eager:
                    _read_metric(folder)
        self.opt.step()
        assert folder is not None
        return folder

    def engine_calls(self) -> Calls:
        """Wrap the batched engine's ``metric_diags`` (the engine lives across windows)."""
        engine = self.opt._engine
        assert engine is not None
        calls = Calls(engine.metric_diags)
        engine.metric_diags = calls  # type: ignore[method-assign]
        return calls

    def result(self) -> dict[str, Any]:
        stats = self.opt.stats()
        return {
            "params": [p.detach().clone() for p in self.params],
            "state": [dict(self.opt.state[p]) for p in self.params],
            "levels": stats["levels"],
            "grad": stats.get("grad"),
            "rows": self.opt.last_grad_rows,
            "eta": self.opt.last_eta,
        }


class ShardedRun:
    """ShardedSOAP (one rank: owns every block) fed DP-reduced level gradients."""

    def __init__(self, batched: bool, options: dict[str, Any]) -> None:
        torch.manual_seed(0)
        self.params = [torch.randn(s) for s in SHAPES]
        cfg = MLFOPConfig.from_kwargs(
            accumulation_steps=K, batched=batched, precondition_frequency=2, **options
        )
        names = [f"p{i}" for i in range(len(SHAPES))]
        self.engine = ShardedSOAP(self.params, names, cfg, block_size=6)

    def window(
        self, gen: torch.Generator, eager: bool, groups: tuple[int, ...] | None = None
    ) -> WindowFolder | BatchedWindowFolder:
        schedule = self.engine.schedule
        if groups is not None:  # one level (folding off): its first half is a segment
            assert schedule.num_levels == 1
            self.engine.arm_grad_diagnostics(groups)
            self.engine.add_reduced_segment(_grads(gen), end=K // 2, scale=float(K // 2))
        folder = None
        for level in range(schedule.num_levels):
            self.engine.fold_reduced_level(level, _grads(gen), scale=0.5)
            if level == 0:
                folder = self.engine._folder
                assert folder is not None
                if eager:
                    _read_metric(folder)
        self.engine.step(lr=0.01, weight_decay=0.05)
        assert folder is not None
        return folder

    def engine_calls(self) -> Calls:
        engine = self.engine.batched_engine()
        calls = Calls(engine.metric_diags)
        engine.metric_diags = calls  # type: ignore[method-assign]
        return calls

    def result(self) -> dict[str, Any]:
        return {
            "params": [p.clone() for p in self.params],
            "state": [dict(o.state) for o in self.engine.owned],
            "levels": [d.summary() for d in self.engine.last_diagnostics],
            "rows": self.engine.last_grad_rows,
            "eta": self.engine.last_eta,
        }


RUNS = {"optimizer": OptimizerRun, "sharded": ShardedRun}


def _assert_bitwise(a: Any, b: Any, what: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            _assert_bitwise(a[key], b[key], f"{what}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise(x, y, f"{what}[{i}]")
    elif isinstance(a, float) and a != a:  # NaN summaries
        assert b != b, what
    else:
        assert a == b, what


def _twin_runs(
    kind: str,
    batched: bool,
    options: dict[str, Any],
    groups: tuple[int, ...] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
    """Per tracked window: metric computations of the lazy run; both runs' results.

    Two warm-up windows (SOAP's statistics-only first step, then the first update: from the
    third window on the metric is not I), then three tracked windows, the last armed with
    ``groups``.
    """
    results, counts = [], []
    for eager in (False, True):
        run = RUNS[kind](batched, options)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            run.window(gen, eager=False)
        if batched:
            calls = run.engine_calls()
        else:
            calls = Calls(folding.metric_diag)
            monkeypatch.setattr(folding, "metric_diag", calls)
        for w in range(3):
            before = calls.count
            folder = run.window(gen, eager, groups if w == 2 else None)
            if not batched:
                assert isinstance(folder.metric_diags, WindowMetric)
            if not eager:
                # per block: one metric_diag per block; batched: one metric_diags per window
                per_read = 1 if batched else len(folder.metric_diags)
                assert (calls.count - before) % per_read == 0
                counts.append((calls.count - before) // per_read)
        results.append(run.result())
        monkeypatch.undo()
    return counts, results[0], results[1]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_block"])
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_folding_off_without_diagnostics_never_computes_the_metric(kind, batched, monkeypatch):
    counts, lazy, eager = _twin_runs(kind, batched, FOLDING["off"], None, monkeypatch)
    assert counts == [0, 0, 0]
    _assert_bitwise(lazy, eager)


@pytest.mark.parametrize("folding_mode", ["chain", "tree_eta"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_block"])
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_folding_computes_the_start_metric_once_per_window(
    kind, batched, folding_mode, monkeypatch
):
    """Folding on: batched folds never compute it, the per-block folder once per window.

    The batched chains make the metric from v; the per-block folder caches it across its
    folds. Bitwise as before either way.
    """
    counts, lazy, eager = _twin_runs(kind, batched, FOLDING[folding_mode], None, monkeypatch)
    assert counts == ([0, 0, 0] if batched else [1, 1, 1])
    assert lazy["levels"]
    _assert_bitwise(lazy, eager)


# ShardedSOAP's diagnostics segments with several levels are driven by the Megatron optimizer
# (tests/test_megatron_dp.py); here its one-level window.
@pytest.mark.parametrize(
    "kind, folding_mode", [("optimizer", "off"), ("optimizer", "chain"), ("sharded", "off")]
)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_block"])
def test_grad_diagnostics_read_the_start_metric_before_the_step(
    kind, folding_mode, batched, monkeypatch
):
    """Armed diagnostics compute the metric (once) before the step: rows bitwise as before."""
    counts, lazy, eager = _twin_runs(
        kind, batched, FOLDING[folding_mode], (0, 0, 1, 1), monkeypatch
    )
    # the batched folds make the metric in their chains: only the armed window reads it
    assert counts == ([0, 0, 1] if folding_mode == "off" or batched else [1, 1, 1])
    assert lazy["rows"] is not None
    _assert_bitwise(lazy, eager)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_block"])
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_metric_first_read_after_the_step_is_refused(kind, batched):
    """The step changes v and the step count: a first read after it is an error.

    A read before the step caches the start metric: a later read returns those tensors.
    """
    run = RUNS[kind](batched, FOLDING["off"])
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        run.window(gen, eager=False)
    unread = run.window(gen, eager=False)
    read = run.window(gen, eager=True)
    name = "class_diags" if batched else "metric_diags"
    with pytest.raises(RuntimeError, match="after an optimizer step"):
        list(getattr(unread, name))
    cached = list(getattr(read, name))
    assert all(torch.is_tensor(x) for x in cached)
    assert all(x is y for x, y in zip(getattr(read, name), cached))


def test_window_metric_len_reads_no_state():
    calls = Calls(lambda: [None, None])
    metric = WindowMetric(calls, lambda: 0, 2)
    assert len(metric) == 2 and not metric.computed and calls.count == 0
    assert metric[1] is None and list(metric) == [None, None] and calls.count == 1
    wrong = WindowMetric(lambda: [None], lambda: 0, 2)
    with pytest.raises(ValueError, match="expected 2 metric diagonals"):
        wrong.values()
