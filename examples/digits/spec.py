"""Run specification of the digits demo: sizes, defaults, metric columns and the lr schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .data import num_micro_batches
from .optimizers import TABLE

# Every optimizer the demo knows (ours and Megatron's peers; see optimizers.py) and its peak
# learning rate (--lr overrides).
OPTIMIZERS = tuple(TABLE)
DEFAULT_LR = {name: e.default_lr for name, e in TABLE.items()}
# Defaults sized for a 2-core CPU: the full run well under 10 minutes, --quick in seconds.
DEFAULTS = {
    "steps": 300,
    "global_batch": 32,
    "micro_batch": 4,
    "layers": 4,
    "hidden": 128,
    "diag_every": 10,
}
QUICK = {
    "steps": 30,
    "global_batch": 16,
    "micro_batch": 2,
    "layers": 2,
    "hidden": 64,
    "diag_every": 3,
}
# Metric column suffix -> key of MLFOPChainedOptimizer.stats()["levels"][i].
LEVEL_FIELDS = {
    "beta": "beta_mean",
    "s": "s_mean",
    "ratio": "ratio",
    "cosine": "cosine_before",
    "cosine_after": "cosine_after",
}
BASE_COLUMNS = (
    "step",
    "optimizer",
    "loss",
    "image_loss",
    "text_loss",
    "tokens_per_s",
    "grad_norm",
    "lr",
    "step_time_s",
    "elapsed_s",
    "skipped_steps",
    "modality_cosine",
)
# Optimizer-phase wall times (max and min over ranks) and NVML samples (empty without a GPU).
TELEMETRY_COLUMNS = (
    "time_fold_s",
    "time_update_s",
    "time_refresh_s",
    "time_communication_s",
    "time_diagnostics_s",
    "time_fold_min_s",
    "time_update_min_s",
    "time_refresh_min_s",
    "time_communication_min_s",
    "time_diagnostics_min_s",
    "gpu/memory_used_gib",
    "gpu/utilization_pct",
    "gpu/power_w",
)
# Grad-group diagnostics of the optimizer (every diag_every steps; mlfop and soap), see
# mlfop_megatron/core/diagnostics.py: group 0 = image (generation) micro-steps and 1 = text in
# the by-modality layout; in the mixed layout one group ("all": the whole batch).
GRAD_COLUMNS = (
    "grad_cos_image_text",
    "grad_cos_mi_image_text",
    "grad_pred_plain_image",
    "grad_pred_folded_image",
    "grad_pred_plain_text",
    "grad_pred_folded_text",
    "grad_pred_plain_all",
    "grad_pred_folded_all",
    "grad_ascent_plain",
    "grad_ascent_folded",
    "grad_cos_mi_plain_folded",
    "grad_noise_scale",
    "grad_micro_steps",
)
VOCAB_MULTIPLE = 64


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RunSpec:
    """Everything one training run needs (picklable: it travels to every rank)."""

    optimizer: str
    out: str
    steps: int
    global_batch: int
    micro_batch: int
    lr: float
    seed: int
    tp: int = 1
    pp: int = 1
    num_layers: int = 4
    hidden: int = 128
    heads: int = 4
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1
    precondition_frequency: int | None = None  # None: the package default (SOAPConfig)
    diag_every: int = 10
    save_interval: int = 0
    threads: int = 1
    resume: bool = False
    stop_at_step: int = 0
    fold_project: bool = True  # mlfop ablation: False skips the Fisher-orthogonalisation (s = 0)
    fold_fixed_beta: float | None = None  # mlfop ablation: fixed beta instead of the adaptive one
    log_every: int = 0  # > 0: a plain progress line every N steps instead of the tqdm bar
    layout: str = "mixed"  # micro-batch layout: "mixed" | "by-modality" (see data.py)
    fold_structure: str = "chain"  # FoldingConfig.structure: "chain" | "tree" | "last"
    step_size: str = "none"  # FoldingConfig.step_size: "none" | "eta_star"
    statistics_from: str = "folded"  # FoldingConfig.statistics_from: "folded" | "mean"
    # SOAP options of ours (SOAPConfig field -> value) over the demo's; benchmarks/peers.py
    soap_options: tuple[tuple[str, Any], ...] = ()
    # Megatron's peers only: OptimizerConfig fields over Megatron's defaults (an ablation of
    # Megatron's own options, e.g. soap_use_kl_shampoo); benchmarks/peers.py
    megatron_options: tuple[tuple[str, Any], ...] = ()
    # Megatron's peers only (optimizers.LAYER_WISE): "" the plain path (the table's default),
    # "layout" Megatron-LM's --use-distributed-optimizer (LayerWiseDistributedOptimizer on its
    # per-bucket layout), "pingpong" that with --no-use-layer-wise-param-layout (its fallback).
    # Both train the model in bf16 (--bf16): 0.19.2's layer-wise optimizer fails in fp32.
    megatron_layer_wise: str = ""


def fold_levels(spec: RunSpec, dp: int) -> list[int]:
    """Folding levels with diagnostics (1..J) for this batch layout (dyadic schedule)."""
    from mlfop_megatron.core.levels import dyadic_boundaries

    k = num_micro_batches(spec.global_batch, spec.micro_batch, dp)
    return list(range(1, len(dyadic_boundaries(k))))


def metric_columns(levels: Sequence[int]) -> list[str]:
    """CSV header: base columns, then beta/s/ratio/cosine of every folding level."""
    return [
        *BASE_COLUMNS,
        *(f"level{j}_{f}" for j in levels for f in LEVEL_FIELDS),
        *GRAD_COLUMNS,
        *TELEMETRY_COLUMNS,
    ]


def lr_at(step: int, spec: RunSpec) -> float:
    """Linear warmup then cosine decay to min_lr_frac * lr (step counts from 0)."""
    warm = max(1, int(spec.warmup_frac * spec.steps))
    if step < warm:
        return spec.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, spec.steps - warm))
    floor = spec.min_lr_frac * spec.lr
    return floor + 0.5 * (spec.lr - floor) * (1.0 + math.cos(math.pi * progress))
