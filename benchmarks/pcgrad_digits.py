"""PCGrad + AdamW on the digits demo: the positive control of the training runs (part b).

Each step: the gradients of the image and of the text token-mean loss over the global batch
(every param, autograd on the unwrapped module, summed over micro-batches and DP ranks), PCGrad
projection of each off the other when they conflict (benchmarks.conflict.pcgrad_combine), the
mean of the two written into Megatron's main_grad buffers, then the demo's AdamW step (the
factory's Adam-only path: same clipping and lr schedule as the other optimizers). The objective
is the demo's modality-balanced loss, so without conflict this is the AdamW step (up to the
rounding of two backward passes instead of one).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.conflict import pcgrad_combine
from examples.digits.model import set_lr
from examples.digits.spec import RunSpec, lr_at
from examples.digits.steps import attention_mask, modality_losses, train_microbatches
from examples.digits.train import evaluate, setup_run, summarize


def _task_grads(model: Any, spec: RunSpec, data: Any, step: int) -> tuple[torch.Tensor, ...]:
    """(flat grad of the image token sum, of the text token sum, [img_sum, n, txt_sum, n])."""
    from megatron.core import parallel_state as ps

    params = [p for p in model.module.parameters() if p.requires_grad]
    flat = torch.zeros(2, sum(p.numel() for p in params), dtype=torch.float32)
    sums = torch.zeros(4, dtype=torch.float64)
    for batch in train_microbatches(data, spec, step):
        logits = model.module(
            batch["tokens"],
            batch["position_ids"],
            attention_mask(data.seq_length),
            runtime_gather_output=True,
        ).float()
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none"
        )
        img, txt = batch["image_loss_mask"], batch["text_loss_mask"]
        losses = ((per_token * img).sum(), (per_token * txt).sum())
        for i, loss in enumerate(losses):
            if not bool((img, txt)[i].any()):
                continue  # no token of this modality in the micro-batch (a host sync: control)
            grads = torch.autograd.grad(loss, params, retain_graph=i == 0, allow_unused=True)
            flat[i] += torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                    for g, p in zip(grads, params)
                ]
            )
        sums += torch.stack([losses[0], img.sum(), losses[1], txt.sum()]).detach().double().cpu()
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    dist.all_reduce(sums, group=ps.get_data_parallel_group())
    return flat[0], flat[1], sums


def pcgrad_worker(spec: RunSpec) -> dict[str, Any] | None:
    """Train one PCGrad + AdamW run (spec.optimizer must be "adamw"); rank 0 returns results.

    Data parallel only (TP = PP = 1): the flat gradients are whole-model vectors.
    """
    if spec.optimizer != "adamw" or spec.tp != 1 or spec.pp != 1:
        raise ValueError("pcgrad runs on the AdamW spec with TP = PP = 1")
    run = setup_run(spec)
    model, optimizer = run.model, run.optimizer
    params = [p for p in model.module.parameters() if p.requires_grad]
    rows, conflicts, t_start = [], 0, time.perf_counter()
    for step in range(spec.steps):
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, spec))
        model.zero_grad_buffer()
        optimizer.zero_grad()
        g_img, g_txt, sums = _task_grads(model, spec, run.data, step)
        s = sums.tolist()
        combined, hit = pcgrad_combine(g_img / max(1.0, s[1]), g_txt / max(1.0, s[3]))
        conflicts += int(hit)
        offset = 0
        for p in params:
            n = p.numel()
            p.main_grad.copy_(combined[offset : offset + n].view_as(p).to(p.main_grad.device))
            offset += n
        success, grad_norm, _ = optimizer.step()
        dt = time.perf_counter() - t0
        run.skipped += int(not success)
        rows.append(
            {
                "step": step + 1,
                **modality_losses(sums),
                "tokens_per_s": spec.global_batch * run.data.seq_length / dt,
                "step_time_s": dt,
                "skipped_steps": run.skipped,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            }
        )
    final = evaluate(model, run.data, spec)
    if dist.get_rank() != 0:
        return None
    summary = summarize(spec, rows, final, time.perf_counter() - t_start, {})
    summary["optimizer"] = "pcgrad"
    summary["pcgrad_conflict_steps"] = conflicts
    return {"rows": rows, "summary": summary}
