"""Optimizer stats reach a SummaryWriter-like logger as flat scalars."""

from __future__ import annotations

import torch

from mlfop_megatron.megatron.diagnostics_logging import flatten_stats, log_optimizer_stats
from mlfop_megatron.optim import MLFOPSOAP


class RecordingWriter:
    """The add_scalar interface of torch.utils.tensorboard.SummaryWriter, recorded."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_plain_optimizer_stats_are_logged_per_level():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    opt = MLFOPSOAP(model.parameters(), accumulation_steps=4)
    for _ in range(3):
        for _ in range(4):
            model(torch.randn(8, 6)).pow(2).mean().backward()
            opt.accumulate()
        opt.step()
    stats = opt.stats()
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
