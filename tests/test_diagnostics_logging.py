"""Optimizer stats reach a SummaryWriter-like logger as flat scalars."""

from __future__ import annotations

import argparse

import torch

from mlfop_megatron.megatron.diagnostics_logging import flatten_stats, log_optimizer_stats
from mlfop_megatron.optim import MLFOPSOAP


class RecordingWriter:
    """The add_scalar interface of torch.utils.tensorboard.SummaryWriter, recorded."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def trained_optimizer(accumulation_steps: int) -> MLFOPSOAP:
    """MLFOPSOAP on a small linear layer after 3 folded steps (fold diagnostics exist)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = MLFOPSOAP(model.parameters(), accumulation_steps=accumulation_steps, enabled=True)
    for _ in range(3):
        for _ in range(accumulation_steps):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
    return opt


def test_plain_optimizer_stats_are_logged_per_level():
    stats = trained_optimizer(4).stats()
    assert [lvl["level"] for lvl in stats["levels"]] == [1.0, 2.0]
    writer = RecordingWriter()
    count = log_optimizer_stats(stats, iteration=3, writer=writer)
    tags = {tag for tag, _, _ in writer.scalars}
    assert count == len(writer.scalars) == len(flatten_stats(stats))
    for field in ("beta_mean", "s_mean", "ratio", "cosine_before", "cosine_after"):
        assert f"mlfop/level1/{field}" in tags and f"mlfop/level2/{field}" in tags
    assert "mlfop/skipped_steps" in tags and all(step == 3 for _, _, step in writer.scalars)
    level1 = stats["levels"][0]
    assert -1.0 <= level1["cosine_before"] <= 1.0 and abs(level1["cosine_after"]) <= 1.0 + 1e-9


def test_without_a_writer_nothing_is_written():
    assert log_optimizer_stats({"skipped_steps": 0}, iteration=1) == 0


def test_megatron_lm_stats_hook_interval_line_and_writer(capsys):
    """The per-interval ML-FOP-SOAP line and scalars (Megatron-LM's training_log hook)."""
    from mlfop_megatron.megatron_lm.install import log_stats_if_due

    opt = trained_optimizer(2)
    every_2 = argparse.Namespace(mlfop_stats_interval=None, log_interval=2)
    assert log_stats_if_due(every_2, 3, opt, RecordingWriter()) is None  # not due
    off = argparse.Namespace(mlfop_stats_interval=0, log_interval=1)
    assert log_stats_if_due(off, 4, opt) is None  # 0 turns it off
    writer = RecordingWriter()
    stats = log_stats_if_due(every_2, 4, opt, writer)
    line = capsys.readouterr().out
    assert "iteration        4 | ML-FOP-SOAP | skipped 0 | eigh fallbacks 0 | L1 beta " in line
    assert stats["levels"][0]["level"] == 1.0
    tags = {(tag, step) for tag, _, step in writer.scalars}
    assert ("mlfop/level1/beta_mean", 4) in tags
    assert ("mlfop/skipped_steps", 4) in tags
    if not any(k.startswith("gpu/") for k in stats):  # no NVML here: no GPU scalars, no crash
        assert not any(tag.startswith("mlfop/gpu") for tag, _ in tags)


def test_grad_group_stats_are_flattened_and_armed_by_the_megatron_lm_hook(capsys):
    """Grad-group diagnostics of armed windows reach the writer and the printed line.

    --mlfop-grad-groups halves arms the window of every logged iteration (at the one
    before), and its grad-group diagnostics reach the writer and the printed line.
    """
    from mlfop_megatron.megatron_lm.install import log_stats_if_due

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = MLFOPSOAP(model.parameters(), accumulation_steps=4, enabled=True, structure="last")
    args = argparse.Namespace(mlfop_stats_interval=2, log_interval=1, mlfop_grad_groups="halves")
    writer = RecordingWriter()
    stats = None
    for iteration in range(1, 5):
        for i in range(4):
            model(torch.randn(8, 6) + (3.0 if i >= 2 else 0.0)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
        stats = log_stats_if_due(args, iteration, opt, writer) or stats
    assert stats["grad"]["micro_steps"] == 4 and -1 <= stats["grad"]["cos_g0_g1"] <= 1
    tags = {tag for tag, _, step in writer.scalars if step == 4}
    for name in ("cos_g0_g1", "cos_mi_g0_g1", "pred_plain_g0", "pred_folded_g1", "noise_scale"):
        assert f"mlfop/grad/{name}" in tags
    assert "mlfop/level1/cz_mean" in tags and "mlfop/level1/beta_max" in tags
    assert "cos(g0,g1)" in capsys.readouterr().out
    off = argparse.Namespace(mlfop_stats_interval=2, log_interval=1, mlfop_grad_groups="off")
    for iteration in (5, 6):
        for _ in range(4):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
        stats = log_stats_if_due(off, iteration, opt)
    assert "grad" not in stats  # nothing armed: no grad-group work at all
