"""The demo's loss is the same modality-balanced objective in every micro-batch layout.

``L = L_image / 2 + L_text / 2`` with each term the token mean of its modality over the global
batch. Summing what Megatron's schedule and DDP make of every micro-batch loss (each divided
by K micro-steps and averaged over dp ranks) must give exactly that, for ``mixed`` and
``by-modality`` layouts and any micro-batch x DP split, computed here from the global batch
directly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from examples.digits.data import DigitsData  # noqa: E402
from examples.digits.spec import RunSpec  # noqa: E402
from examples.digits.steps import loss_func, objective_weights  # noqa: E402


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return DigitsData()


def _balanced_reference(batch: dict, per_token: torch.Tensor) -> torch.Tensor:
    img, txt = batch["image_loss_mask"], batch["text_loss_mask"]
    return 0.5 * (per_token * img).sum() / img.sum() + 0.5 * (per_token * txt).sum() / txt.sum()


@pytest.mark.parametrize("layout", ["mixed", "by-modality"])
@pytest.mark.parametrize(("micro", "dp"), [(2, 1), (2, 2), (4, 2), (1, 4)])
def test_schedule_sum_of_micro_losses_is_the_balanced_objective(data, layout, micro, dp) -> None:
    g, step = 16, 3
    spec = RunSpec(
        optimizer="soap", out="", steps=10, global_batch=g, micro_batch=micro, lr=1e-3, seed=0
    )
    spec = type(spec)(**{**spec.__dict__, "layout": layout})
    k = g // (micro * dp)
    weights = objective_weights(data, spec, step, dp)
    gen = torch.Generator().manual_seed(0)
    total, rows = torch.zeros((), dtype=torch.float64), []
    for rank in range(dp):
        for i in range(k):
            batch = data.micro_batch(step, g, micro, i, rank, dp, layout=layout)
            per_token = torch.rand(batch["tokens"].shape, generator=gen, dtype=torch.float64)
            rows.append((batch, per_token))
            loss, _ = loss_func(weights, batch, per_token)
            total += loss / k / dp  # schedule: / num_microbatches; DDP: mean over dp
    whole = {
        name: torch.cat([b[name] for b, _ in rows])
        for name in ("image_loss_mask", "text_loss_mask")
    }
    per_token = torch.cat([p for _, p in rows])
    expected = _balanced_reference(whole, per_token)
    torch.testing.assert_close(
        total, expected.to(total.dtype), rtol=1e-6, atol=0
    )  # loss_func sums in fp32


def test_image_tokens_dominate_the_token_mean(data) -> None:
    """Why the objective is balanced: a token mean of a 50/50 batch is mostly image tokens."""
    image, text = data.token_counts(0, 16)
    assert image / (image + text) > 0.9
