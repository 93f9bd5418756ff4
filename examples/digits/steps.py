"""Micro-batches, the forward step and Megatron's schedule for the demo.

The training objective is modality-balanced: ``L = (L_image + L_text) / 2`` where each term is
the token-mean loss of that modality over the whole global batch of the step. Every
micro-batch contributes its per-modality loss sums divided by the global token count of each
modality, so the objective does not depend on how samples are laid out in micro-batches
(``mixed`` and ``by-modality`` optimise the same function of the same samples).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from .data import TASK_GEN, TASK_UND, DigitsData, causal_attention_mask, collate, num_micro_batches
from .devices import Batch, device, to_device, use_cuda
from .spec import RunSpec


# -------------------------------------------------------------------------------------- data
def attention_mask(seq_length: int) -> torch.Tensor | None:
    """None on GPU (causal mask type); an explicit causal mask on CPU (see digits_data)."""
    return None if use_cuda() else causal_attention_mask(seq_length).to(device())


def objective_weights(data: DigitsData, spec: RunSpec, step: int, dp: int) -> tuple[float, float]:
    """Weights of a micro-batch's (image, text) loss sums in the modality-balanced objective.

    ``L = L_image / 2 + L_text / 2``, each a token mean over the global batch: a micro-batch
    contributes ``sum_image / (2 N_image) + sum_text / (2 N_text)``. Megatron's schedule
    divides each micro-batch loss by K and its DDP averages gradients over DP, so the weights
    carry a factor K * dp to undo both. Host floats from the data pipeline (no device sync).
    """
    k = num_micro_batches(spec.global_batch, spec.micro_batch, dp)
    image, text = data.token_counts(
        step, spec.global_batch, layout=spec.layout, micro_samples=spec.micro_batch * dp
    )
    scale = 0.5 * k * dp
    return scale / max(1, image), scale / max(1, text)


def train_microbatches(data: DigitsData, spec: RunSpec, step: int) -> Iterator[Batch]:
    """This DP rank's micro-batches of one step (every TP/PP rank of the replica: the same)."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    k = num_micro_batches(spec.global_batch, spec.micro_batch, dp)
    for i in range(k):
        batch = data.micro_batch(
            step, spec.global_batch, spec.micro_batch, i, rank, dp, layout=spec.layout
        )
        yield to_device(batch)


def eval_microbatches(data: DigitsData, micro_batch: int) -> list[Batch]:
    """This DP rank's share of the validation split (both tasks), padded with zero-mask rows."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    items = [(int(r), t) for t in (TASK_GEN, TASK_UND) for r in data.split_indices("val")]
    per_rank = -(-len(items) // dp)
    per_rank = -(-per_rank // micro_batch) * micro_batch  # equal micro-batch count everywhere
    mine = items[rank::dp]
    real = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine = mine + [items[0]] * (per_rank - len(mine))
    batches = []
    for k in range(0, per_rank, micro_batch):
        batch = collate([data.sample(r, t) for r, t in mine[k : k + micro_batch]])
        keep = torch.tensor(real[k : k + micro_batch], dtype=torch.float32)[:, None]
        for name in ("loss_mask", "image_loss_mask", "text_loss_mask"):
            batch[name] = batch[name] * keep
        batches.append(to_device(batch))
    return batches


# ------------------------------------------------------------------------------ forward step
def loss_func(
    weights: tuple[float, float], batch: Batch, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Weighted per-modality loss sums of one micro-batch (see objective_weights).

    Also returns the per-modality (sum, count) for logging.
    """
    per_token = output_tensor.float()
    img, txt = batch["image_loss_mask"], batch["text_loss_mask"]
    img_sum, txt_sum = (per_token * img).sum(), (per_token * txt).sum()
    loss = weights[0] * img_sum + weights[1] * txt_sum
    sums = torch.stack([img_sum, img.sum(), txt_sum, txt.sum()])
    return loss, {"sums": sums.detach().double()}


def forward_step(
    mask: torch.Tensor | None,
    weights: tuple[float, float],
    data_iterator: Iterator[Batch],
    model: Any,
) -> tuple[torch.Tensor, Any]:
    """forward_step_func for Megatron's schedules: (per-token loss, loss_func)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    return output, partial(loss_func, weights, batch)


def run_schedule(
    model: Any,
    batches: Iterator[Batch] | list[Batch],
    n: int,
    spec: RunSpec,
    seq: int,
    forward_only: bool = False,
    weights: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Forward(+backward) of ``n`` micro-batches through Megatron's schedule; global loss sums.

    ``weights``: of each micro-batch's (image, text) loss sums in the trained loss (see
    objective_weights; irrelevant when ``forward_only``).
    Returns [image loss sum, image tokens, text loss sum, text tokens] over the micro-batches
    of every DP rank, broadcast from the last pipeline stage (float64, on CPU).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=partial(forward_step, attention_mask(seq), weights),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=n,
        seq_length=seq,
        micro_batch_size=spec.micro_batch,
        decoder_seq_length=seq,
        forward_only=forward_only,
    )
    local = torch.zeros(4, dtype=torch.float64, device=device())
    for d in out or []:
        local += d["sums"].to(local.device)
    return reduce_modality_sums(local)


def reduce_modality_sums(local: torch.Tensor) -> torch.Tensor:
    """Sum over DP on the last stage, then broadcast over the pipeline group."""
    from megatron.core import parallel_state as ps

    if ps.is_pipeline_last_stage():
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    dist.broadcast(
        local,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return local.cpu()


def modality_losses(sums: torch.Tensor) -> dict[str, float]:
    """Token-mean loss overall and per modality from [img_sum, img_n, txt_sum, txt_n]."""
    s = sums.tolist()
    return {
        "loss": (s[0] + s[2]) / max(1.0, s[1] + s[3]),
        "image_loss": s[0] / max(1.0, s[1]),
        "text_loss": s[2] / max(1.0, s[3]),
    }
