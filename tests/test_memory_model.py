"""The peak-memory model (launch/plan/memory.py) against PyTorch's MemTracker on the tiny GPT.

``benchmarks.memory.measure`` runs one warm-up iteration, then one accumulation window (K=8,
four folding levels) and the optimizer step (with a basis refresh) under MemTracker on gloo
ranks, per rank by category. The model, computed from the engines' param shapes alone, must
match every category within 10% on every rank at DP=1 and DP=2.
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from benchmarks.memory import measure, modelled  # noqa: E402
from mlfop_megatron.config import FoldingConfig  # noqa: E402
from mlfop_megatron.distributed.assignment import (  # noqa: E402
    Assignment,
    Block,
    BlockingConfig,
    ParamSpec,
    make_blocks,
)
from mlfop_megatron.distributed.model_shapes import LLAMA3_8B  # noqa: E402
from mlfop_megatron.launch.plan.memory import OwnedShapes, rank_memory  # noqa: E402
from mlfop_megatron.launch.plan.model import PlanConfig, make_plan  # noqa: E402

SPEC = dict(hidden=256, layers=2, microbatches=8, precondition_frequency=1, global_micro=4)


def _pairs(run: dict, dp: int) -> list[tuple[str, int, int]]:
    m = modelled(run, dp)
    persistent, phases = run["persistent"], run["phases"]
    return [
        ("params", persistent["params"], m.params),
        ("grads", persistent["grads"], m.grads),
        ("SOAP state", persistent["SOAP state"], m.soap_state),
        ("Adam state", persistent["Adam state"], m.adam_state),
        ("null-probe cache", persistent["opt buffers"], m.probe_cache),
        ("transient fwd/bwd", phases["fwd/bwd"]["transient"], m.transient_window),
        ("transient SOAP step", phases["SOAP step"]["transient"], m.transient_step),
        ("transient peak", run["transient"], m.transient),
    ]


@pytest.mark.distributed
@pytest.mark.parametrize("dp", [1, 2])
def test_model_matches_memtracker_per_category(dp: int) -> None:
    runs = measure(dp, SPEC)
    assert all(r["ok"] for r in runs)
    for run in runs:
        assert run["persistent"]["other"] < 0.01 * run["peak_total"], run["others"]
        for label, measured, model in _pairs(run, dp):
            assert measured > 0, label
            assert abs(model - measured) <= 0.10 * measured, (
                f"rank {run['rank']} {label}: model {model} vs measured {measured} "
                f"({model / measured:.3f})"
            )


def test_owned_shapes_terms() -> None:
    blocks = [
        Block(0, "a", 0, 0, 8, 4, True, True),
        Block(1, "b", 0, 0, 8, 4, True, True),
        Block(2, "c", 0, 0, 6, 20, True, False),
    ]
    o = OwnedShapes.of(blocks)
    assert o.grads == 4 * (32 + 32 + 120)
    assert o.largest_class == 4 * 120
    assert o.bases == 4 * (2 * 64 + 2 * 16 + 36)
    assert o.largest_side == 4 * 2 * 64
    assert o.state == 4 * (2 * 184 + 2 * (2 * 64 + 2 * 16 + 36))
    assert o.probe_cache == 4 * (64 + 16 + 36)
    assert OwnedShapes.of(blocks, masters=True).state == o.state + 4 * 184


def test_rank_memory_level_buffers_and_plan() -> None:
    specs = [ParamSpec(f"w{i}", (64, 32)) for i in range(4)]
    asg = Assignment.build(make_blocks(specs, BlockingConfig()), 2)
    m = rank_memory(asg, 0, params_numel=9000, adam_numel=808, dp=2)
    seg = max(asg.numel_loads)
    assert m.level_buffers == 4 * 3 * seg
    assert rank_memory(asg, 0, 9000, 808, 2, backend="gloo").level_buffers == 4 * 5 * seg
    assert m.adam_state == 404 * 8
    assert m.optimizer_peak == m.grads + m.opt_state + m.transient
    folding = FoldingConfig(enabled=True, accumulation_steps=8)
    plan = make_plan(PlanConfig(dims=LLAMA3_8B, dp=8, micro_batches=8, folding=folding))
    peak = plan.busiest.peak_memory
    assert peak is not None and peak.soap_state > 0 and peak.transient > 0
    assert plan.busiest.distopt_adam_bytes > peak.grads
