"""Per-modality gradient diagnostics of the demo and the metric columns they fill."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .data import micro_step_groups
from .devices import Batch
from .spec import GRAD_COLUMNS, LEVEL_FIELDS
from .steps import attention_mask


# ------------------------------------------------------------------------------ diagnostics
def decoder_matrices(model: Any) -> list[torch.nn.Parameter]:
    """The shared transformer trunk's matrices (what SOAP preconditions and FOP folds)."""
    return [p for n, p in model.named_parameters() if "decoder" in n and p.dim() >= 2]


def modality_grads(
    module: Any,
    batch: Batch,
    params: list[torch.nn.Parameter],
    seq: int,
) -> torch.Tensor:
    """[grad of the summed image-token loss, grad of the summed text-token loss], flattened.

    Logits (gathered over TP) and torch's cross-entropy: Megatron's fused vocab-parallel
    cross-entropy overwrites its saved softmax in backward, so it cannot be differentiated
    twice, which the two per-modality gradients of one forward need.
    """
    logits = module(
        batch["tokens"], batch["position_ids"], attention_mask(seq), runtime_gather_output=True
    ).float()
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"], reduction="none"
    )
    img = (per_token * batch["image_loss_mask"]).sum()
    txt = (per_token * batch["text_loss_mask"]).sum()
    gi = torch.autograd.grad(img, params, retain_graph=True)
    gt = torch.autograd.grad(txt, params)
    return torch.cat([g.reshape(-1) for g in (*gi, *gt)])


def modality_cosine(model: Any, batches: Iterator[Batch], seq: int) -> float:
    """Cosine between the gradients of the image and the text loss over the decoder matrices.

    Gradients of the summed per-modality losses over this rank's micro-batches, summed over DP
    (so over the whole global batch of the step), inner products summed over TP shards. Uses
    torch.autograd.grad on the unwrapped module, which neither touches main_grad nor fires the
    DDP hooks (training is bitwise unchanged). NaN with pipeline parallelism, where the
    gradient of a stage needs the pipeline schedule.
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        return float("nan")
    params = decoder_matrices(model)
    flat = sum(modality_grads(model.module, b, params, seq) for b in batches)
    dist.all_reduce(flat, group=ps.get_data_parallel_group())
    n = flat.numel() // 2
    a, b = flat[:n].double(), flat[n:].double()
    sums = torch.stack([a @ b, a @ a, b @ b])
    if ps.get_tensor_model_parallel_world_size() > 1:
        # Every decoder matrix is a TP shard (column/row parallel), so the pieces add up.
        assert all(getattr(p, "tensor_model_parallel", False) for p in params)
        dist.all_reduce(sums, group=ps.get_tensor_model_parallel_group())
    return float(sums[0] / (sums[1] * sums[2]).clamp_min(1e-300).sqrt())


def optimizer_stats(optimizer: Any) -> dict[str, Any]:
    """ML-FOP-SOAP stats reduced over all ranks ({} for AdamW); a collective: every rank calls."""
    return optimizer.stats() if hasattr(optimizer, "stats") else {}


def request_grad_diagnostics(optimizer: Any, layout: str, k: int) -> None:
    """Arm the optimizer's grad-group diagnostics for the next step (mlfop / soap; every rank).

    By-modality: group 0 = the image micro-steps, 1 = the text ones (per-modality gradients,
    cosines, predicted loss changes); mixed: one group (the noise scale and the predicted
    change of the whole loss). AdamW has none.
    """
    if hasattr(optimizer, "request_grad_diagnostics"):
        optimizer.request_grad_diagnostics(micro_step_groups(layout, k))


def grad_columns(stats: dict[str, Any]) -> dict[str, float]:
    """GRAD_COLUMNS of the last step (NaN when it was not armed)."""
    out = dict.fromkeys(GRAD_COLUMNS, float("nan"))
    grad = stats.get("grad")
    if not grad:
        return out
    k = grad["micro_steps"]
    names = {0: "image", 1: "text"} if "norm_g1" in grad else {0: "all"}
    for m, name in names.items():
        out[f"grad_pred_plain_{name}"] = grad[f"pred_plain_g{m}"]
        out[f"grad_pred_folded_{name}"] = grad[f"pred_folded_g{m}"]
    if "norm_g1" in grad:  # two groups: image micro-steps first (floor(K/2) of them)
        half = k // 2
        out["grad_cos_image_text"] = grad["cos_g0_g1"]
        out["grad_cos_mi_image_text"] = grad["cos_mi_g0_g1"]
        for kind in ("plain", "folded"):
            image, text = grad[f"pred_{kind}_g0"], grad[f"pred_{kind}_g1"]
            out[f"grad_pred_{kind}_all"] = (half * image + (k - half) * text) / k
    out["grad_ascent_plain"] = grad["ascent_plain_any"]
    out["grad_ascent_folded"] = grad["ascent_folded_any"]
    out["grad_cos_mi_plain_folded"] = grad["cos_mi_plain_folded"]
    out["grad_noise_scale"] = grad["noise_scale"]
    out["grad_micro_steps"] = k
    return out


def level_columns(stats: dict[str, Any], levels: Sequence[int]) -> dict[str, float]:
    """level{j}_beta/s/ratio/cosine/cosine_after of the last step's folds (NaN: no fold).

    beta and s are means over parameter blocks; ratio ||d||/||a|| and the cosines treat all
    blocks as one vector (cosine = cos(z_{j-1}, h_j) before the projection, cosine_after =
    cos(a, d_perp) after it).
    """
    out = {f"level{j}_{f}": float("nan") for j in levels for f in LEVEL_FIELDS}
    for entry in stats.get("levels", []):
        j = int(entry["level"])
        if j in levels:
            out.update({f"level{j}_{f}": float(entry[key]) for f, key in LEVEL_FIELDS.items()})
    return out
