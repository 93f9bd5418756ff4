"""Ranks on real GPUs start by 'spawn': never forked from a server that imported TE."""

from __future__ import annotations

import sys

import pytest

from mlfop_megatron.runtime import spawn


def test_ranks_on_real_gpus_are_spawned_not_forked_from_the_preloaded_server(monkeypatch):
    monkeypatch.delenv("MLFOP_MP_START_METHOD", raising=False)
    assert spawn.default_start_method(real_cuda=True) == "spawn"
    assert spawn.default_start_method(real_cuda=False) in ("forkserver", "spawn")
    # The server's preload imports megatron's GPT model, hence TransformerEngine where it is
    # installed (which initialises CUDA with flash-attn): what GPU ranks must not inherit.
    assert "megatron.core.models.gpt" in spawn.FORKSERVER_PRELOAD
    monkeypatch.setenv("MLFOP_MP_START_METHOD", "forkserver")
    assert spawn.default_start_method(real_cuda=True) == "forkserver"  # explicit choice wins


def _imported(spec):
    return {m: m in sys.modules for m in spec["modules"]}


@pytest.mark.distributed
def test_a_spawned_rank_starts_without_the_preloaded_megatron_model():
    pytest.importorskip("megatron.core")
    mods = ["megatron.core.models.gpt"]
    (spawned,) = spawn.run_distributed(
        _imported, 1, {"modules": mods}, start_method="spawn", emulate_cuda=False
    )
    assert spawned == {mods[0]: False}
