"""Train a miniature Janus/Emu3-style unified image+text model on the digits corpus.

One megatron-core GPTModel predicts one token stream that mixes two tasks (see
``digits_data.py``): text -> image generation (loss on the 64 image tokens) and image -> text
understanding (loss on the caption words). It trains through the ML-FOP-SOAP Megatron
integration: ``FoldingDistributedDataParallel`` + ``get_mlfop_optimizer`` and Megatron's
``get_forward_backward_func`` schedules, exactly as a Megatron-LM job would.

CPU (spawns the gloo ranks itself, installs the CUDA emulation of mlfop_megatron.runtime)::

    python examples/train_digits.py --nproc 2 --out runs/demo
    python examples/train_digits.py --nproc 2 --out runs/compare --compare
    python examples/train_digits.py --nproc 2 --out runs/ci --quick

GPUs (torchrun or srun set RANK/WORLD_SIZE; NCCL, one GPU per rank, TE layers if installed)::

    torchrun --nproc-per-node 8 examples/train_digits.py --tp 2 --out runs/gpu

Optimizers: ``mlfop`` (SOAP + multi-level FOP folding), ``soap`` (the same code with folding
off: plain SOAP on the mean gradient) and ``adamw`` (Megatron's own optimizer from
``megatron.core.optimizer.get_megatron_optimizer`` with Megatron's plain DDP). Every run writes
metrics.csv / metrics.jsonl (one row per step), checkpoint/<optimizer>/ (torch.save per rank,
written atomically), loss.png / cosine.png / beta.png / grad.png and summary.json into
``--out``. ``--micro-batch-layout by-modality`` gives each micro-batch one task (image first
half of the step, text second half); every ``--diag-every`` steps the optimizer reports its
grad-group diagnostics (per-modality cosines, predicted loss changes, noise scale).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlfop_megatron.launch.preemption import (
    REQUEUE_EXIT_CODE,
    REQUEUE_MARKER,
    PreemptionHandler,
)
from mlfop_megatron.launch.telemetry import GPUTelemetry

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from digits_data import (  # noqa: E402
    LAYOUTS,
    TASK_GEN,
    TASK_UND,
    DigitsData,
    causal_attention_mask,
    collate,
    micro_step_groups,
    modality_tasks,
    num_micro_batches,
)

OPTIMIZERS = ("mlfop", "soap", "adamw")
# Peak learning rates: one-seed sweep of 1e-3..3e-2 at 200 steps of the default model (val
# loss, before the vocabulary padding); 5e-3 was best or within noise of the best for each
# optimizer. --lr overrides.
DEFAULT_LR = {"mlfop": 5e-3, "soap": 5e-3, "adamw": 5e-3}
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
# Optimizer-phase wall times (max over ranks) and NVML samples (empty without a GPU).
TELEMETRY_COLUMNS = (
    "time_fold_s",
    "time_update_s",
    "time_refresh_s",
    "time_communication_s",
    "time_diagnostics_s",
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
Batch = dict[str, Any]


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
    precondition_frequency: int = 10
    diag_every: int = 10
    save_interval: int = 0
    threads: int = 1
    resume: bool = False
    stop_at_step: int = 0
    fold_project: bool = True  # mlfop ablation: False skips the Fisher-orthogonalisation (s = 0)
    fold_fixed_beta: float | None = None  # mlfop ablation: fixed beta instead of the adaptive one
    log_every: int = 0  # > 0: a plain progress line every N steps instead of the tqdm bar
    layout: str = "mixed"  # micro-batch layout: "mixed" | "by-modality" (see digits_data)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn (CPU, no torchrun)")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (300; quick 30)")
    p.add_argument(
        "--global-batch", type=int, default=None, help="samples per optimizer step (32; quick 16)"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="samples per micro-batch and DP rank (4; quick 2)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="mlfop")
    p.add_argument(
        "--micro-batch-layout",
        choices=LAYOUTS,
        default="mixed",
        help="mixed: micro-batches mix both tasks at random; by-modality: one task per "
        "micro-batch, image first half of each step, text second half",
    )
    p.add_argument("--lr", type=float, default=None, help="peak lr (default: per optimizer)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compare", action="store_true", help="train mlfop, soap and adamw in turn")
    p.add_argument("--quick", action="store_true", help="tiny run for CI (seconds)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (4; quick 2)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (128; quick 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument(
        "--diag-every",
        type=int,
        default=None,
        help="steps between inter-modality gradient cosines (10; quick 3; 0: never)",
    )
    p.add_argument(
        "--save-interval",
        type=int,
        default=0,
        help="also checkpoint every N steps (0: only at the end)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from checkpoint/<optimizer>/ when it exists (preemption-safe "
        "restarts; SIGTERM/SIGUSR1 save a checkpoint at the next step and exit "
        f"with code {REQUEUE_EXIT_CODE} for the batch script to requeue)",
    )
    p.add_argument(
        "--no-project",
        action="store_true",
        help="mlfop ablation: fold without the Fisher-orthogonal projection (s = 0)",
    )
    p.add_argument(
        "--fixed-beta",
        type=float,
        default=None,
        help="mlfop ablation: fixed fold weight beta instead of the adaptive one",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=0,
        help="print a plain progress line every N steps instead of the bar (0: bar)",
    )
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=0,
        help="behave as if preempted after this step (tests the requeue path)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="spawned-run timeout (s)")
    p.add_argument("--verbose", action="store_true", help="keep library warnings")
    return p.parse_args(argv)


def specs_from_args(args: argparse.Namespace, world_size: int) -> list[RunSpec]:
    """One RunSpec per optimizer to train (three with --compare)."""
    preset = QUICK if args.quick else DEFAULTS
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    dp = world_size // (args.tp * args.pp)
    if dp < 1 or world_size % (args.tp * args.pp):
        raise SystemExit(f"world size {world_size} is not a multiple of tp*pp={args.tp * args.pp}")
    k = num_micro_batches(size["global_batch"], size["micro_batch"], dp)  # raises unless divides
    if args.micro_batch_layout == "by-modality":
        try:
            modality_tasks(k)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    names = OPTIMIZERS if args.compare else (args.optimizer,)
    threads = max(1, (os.cpu_count() or 1) // max(1, world_size))
    base = RunSpec(
        optimizer=names[0],
        out=str(args.out),
        steps=size["steps"],
        global_batch=size["global_batch"],
        micro_batch=size["micro_batch"],
        lr=0.0,
        seed=args.seed,
        tp=args.tp,
        pp=args.pp,
        num_layers=size["layers"],
        hidden=size["hidden"],
        heads=args.heads,
        weight_decay=args.weight_decay,
        clip_grad=args.clip_grad,
        diag_every=size["diag_every"],
        save_interval=args.save_interval,
        threads=threads,
        resume=args.resume,
        stop_at_step=args.stop_at_step,
        fold_project=not args.no_project,
        fold_fixed_beta=args.fixed_beta,
        log_every=args.log_every,
        layout=args.micro_batch_layout,
    )
    return [replace(base, optimizer=n, lr=args.lr or DEFAULT_LR[n]) for n in names]


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


# ----------------------------------------------------------------------------------- devices
def use_cuda() -> bool:
    """Whether this process trains on a GPU."""
    return torch.cuda.is_available()


def on_accelerator() -> bool:
    """Whether model and batches go to "cuda": a real GPU, or the strict CPU emulation.

    Strict mode (``MLFOP_STRICT_DEVICE=1``, see mlfop_megatron/runtime/strict_device.py) tags
    what is created for "cuda" and fails on host/device mixing, so the demo's GPU data path
    runs on a CPU machine and device bugs show there. Kernel choices (TE, NCCL, the attention
    mask) still follow use_cuda().
    """
    if use_cuda():
        return True
    from mlfop_megatron.runtime.strict_device import is_strict_installed

    return is_strict_installed()


def device() -> torch.device:
    """The device of this rank (its local GPU, else CPU; "cuda" under strict emulation)."""
    if on_accelerator():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: Batch) -> Batch:
    """Move a collated batch to this rank's device."""
    dev = device()
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------- model
def layer_spec() -> Any:
    """TransformerEngine layer spec on CUDA when TE imports, else megatron's local spec."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_cuda():
        try:
            import transformer_engine  # noqa: F401

            return specs.get_gpt_layer_with_transformer_engine_spec()
        except ImportError:
            pass
    return specs.get_gpt_layer_local_spec()


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary padded like Megatron-LM (--make-vocab-size-divisible-by) so TP can split it.

    A multiple of lcm(64, tp): the same padded size for every power-of-two TP up to 64, so
    TP layouts train the same model. Padding ids never occur in the data.
    """
    multiple = math.lcm(VOCAB_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def build_model(spec: RunSpec, data: DigitsData) -> Any:
    """This rank's GPTModel stage (current parallel_state) wrapped in the right Megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel

    config = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        # Weights from the CPU RNG on every device (then moved), so GPU, CPU and strict
        # emulated runs start from the same model.
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        add_bias_linear=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(),
        vocab_size=padded_vocab_size(data.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=data.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="learned_absolute",
    )
    if on_accelerator():
        model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=True,
        use_distributed_optimizer=False,
    )
    ddp_class = (
        DistributedDataParallel if spec.optimizer == "adamw" else (FoldingDistributedDataParallel)
    )
    ddp = ddp_class(config=config, ddp_config=ddp_config, module=model)
    # The hooks Megatron-LM's training loop installs, so the schedules drive the DDP buckets.
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(spec: RunSpec, model: Any, accumulation_steps: int) -> Any:
    """ML-FOP-SOAP / SOAP through our factory, or Megatron's own AdamW."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=spec.lr,
        min_lr=spec.lr * spec.min_lr_frac,
        weight_decay=spec.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        clip_grad=spec.clip_grad,
        bf16=False,
        fp16=False,
        use_distributed_optimizer=False,
    )
    if spec.optimizer == "adamw":
        if use_cuda():
            return get_megatron_optimizer(config, [model])
        return cpu_adamw(config, model)
    mlfop = MLFOPConfig.from_kwargs(
        lr=spec.lr,
        betas=(0.95, 0.95),
        weight_decay=spec.weight_decay,
        precondition_frequency=spec.precondition_frequency,
        accumulation_steps=accumulation_steps,
        enabled=spec.optimizer == "mlfop",
        project=spec.fold_project,
        fixed_beta=spec.fold_fixed_beta,
    )
    return get_mlfop_optimizer(config, [model], mlfop, sharded=True)


def cpu_adamw(config: Any, model: Any) -> Any:
    """AdamW for the CPU path, through our factory's Adam path (Megatron's FP32Optimizer).

    Megatron's own optimizer from get_megatron_optimizer fails under the CPU emulation as soon
    as gradient clipping triggers: clip_grad_by_total_norm_fp32 asserts that every grad is a
    ``torch.cuda.FloatTensor``. So on CPU we build what get_megatron_optimizer builds there
    (torch.optim.AdamW, its pick without TE/apex, inside Megatron's FP32Optimizer, weight decay
    on matrices only) and chain it like get_mlfop_optimizer chains its Adam part, so the global
    norm, the clipping and the inf check are the CPU-safe ones of MLFOPChainedOptimizer.
    """
    from megatron.core.optimizer import FP32Optimizer

    from mlfop_megatron.megatron.checkpointing import adam_init_state_fn
    from mlfop_megatron.megatron.optimizer import MLFOPChainedOptimizer
    from mlfop_megatron.megatron.param_groups import megatron_group_fields

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in params if p.dim() >= 2],
            "weight_decay": config.weight_decay,
            **megatron_group_fields(config, 1.0),
        },
        {
            "params": [p for p in params if p.dim() < 2],
            "weight_decay": 0.0,
            **megatron_group_fields(config, 0.0),
        },
    ]
    adam = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
    )
    return MLFOPChainedOptimizer([FP32Optimizer(adam, config, adam_init_state_fn)])


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every param group (weight decay is left alone)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# -------------------------------------------------------------------------------------- data
def attention_mask(seq_length: int) -> torch.Tensor | None:
    """None on GPU (causal mask type); an explicit causal mask on CPU (see digits_data)."""
    return None if use_cuda() else causal_attention_mask(seq_length).to(device())


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
def loss_func(batch: Batch, output_tensor: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Token-mean loss of one micro-batch, plus per-modality (sum, count) for logging."""
    per_token = output_tensor.float()
    mask = batch["loss_mask"]
    loss = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    img, txt = batch["image_loss_mask"], batch["text_loss_mask"]
    sums = torch.stack([(per_token * img).sum(), img.sum(), (per_token * txt).sum(), txt.sum()])
    return loss, {"sums": sums.detach().double()}


def forward_step(mask: torch.Tensor | None, data_iterator: Iterator[Batch], model: Any):
    """forward_step_func for Megatron's schedules: (per-token loss, loss_func)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    return output, partial(loss_func, batch)


def run_schedule(
    model: Any,
    batches: Iterator[Batch] | list[Batch],
    n: int,
    spec: RunSpec,
    seq: int,
    forward_only: bool = False,
) -> torch.Tensor:
    """Forward(+backward) of ``n`` micro-batches through Megatron's schedule; global loss sums.

    Returns [image loss sum, image tokens, text loss sum, text tokens] over the micro-batches
    of every DP rank, broadcast from the last pipeline stage (float64, on CPU).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(
        forward_step_func=partial(forward_step, attention_mask(seq)),
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


# ------------------------------------------------------------------------------- run folder
def clean(value: Any) -> Any:
    """JSON-safe scalar: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one row per step to metrics.csv and metrics.jsonl (rank 0 only)."""

    def __init__(self, out: Path, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.csv_path, self.jsonl_path = out / "metrics.csv", out / "metrics.jsonl"

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (missing columns are left empty / null)."""
        full = {c: clean(row.get(c)) for c in self.columns}
        with open(self.csv_path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns).writerow(
                {k: "" if v is None else v for k, v in full.items()}
            )
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(full) + "\n")


def start_metric_files(out: Path, columns: Sequence[str]) -> None:
    """Create the run folder and fresh metric files with the CSV header."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as fh:
        csv.writer(fh).writerow(columns)
    (out / "metrics.jsonl").write_text("")


def save_checkpoint(
    out: Path,
    name: str,
    model: Any,
    optimizer: Any,
    step: int,
    spec: RunSpec,
) -> Path:
    """torch.save model + optimizer state of every rank into checkpoint/<name>/, atomically.

    Ranks write ``rank_XXXXX.pt`` into a temporary sibling folder, then rank 0 swaps it in with
    a rename, so a crash never leaves a half-written checkpoint/<name>/ behind. All ranks need
    the same filesystem (one node, or a shared one under Slurm). Optimizer state is sharded by
    block over DP, so every rank's file is needed to resume.
    """
    root = out / "checkpoint"
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    payload = {
        "step": step,
        "spec": asdict(spec),
        "model": model.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rank": rank,
        "world_size": dist.get_world_size(),
    }
    part = tmp / f"rank_{rank:05d}.pt.part"
    torch.save(payload, part)
    os.replace(part, tmp / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        meta = {
            "step": step,
            "optimizer": name,
            "world_size": dist.get_world_size(),
            "tp": spec.tp,
            "pp": spec.pp,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # else .old (if any) is the latest complete one: keep it until
            shutil.rmtree(old, ignore_errors=True)  # the new checkpoint is in place
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(out: Path, name: str, model: Any, optimizer: Any) -> int:
    """Load this rank's part of the latest complete checkpoint; returns its step, else 0.

    checkpoint/<name>/ is the latest; a save killed between its two renames leaves only the
    previous one, as .<name>.old/. A folder without meta.json (written last) is never used.
    """
    root = out / "checkpoint"
    complete = [d for d in (root / name, root / f".{name}.old") if (d / "meta.json").exists()]
    if not complete:
        return 0
    final = complete[0]
    meta = json.loads((final / "meta.json").read_text())
    if meta["world_size"] != dist.get_world_size():
        raise SystemExit(
            f"checkpoint {final} was written by {meta['world_size']} ranks; resume with the "
            f"same layout (this job has {dist.get_world_size()} ranks)"
        )
    payload = torch.load(final / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
    model.module.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return int(payload["step"])


# ---------------------------------------------------------------------------------- training
def make_progress(spec: RunSpec, start: int = 0) -> Any:
    """Tqdm bar on global rank 0 (None elsewhere, and with plain lines: log_every > 0)."""
    if dist.get_rank() != 0 or spec.log_every > 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=spec.steps,
        initial=start,
        desc=f"{spec.optimizer:>5}",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
    )


def train_step(
    model: Any,
    optimizer: Any,
    data: DigitsData,
    spec: RunSpec,
    step: int,
    k: int,
) -> tuple[torch.Tensor, bool, float]:
    """One optimizer step over k micro-batches: (modality sums, success, grad norm)."""
    set_lr(optimizer, lr_at(step, spec))
    model.zero_grad_buffer()
    optimizer.zero_grad()
    sums = run_schedule(model, train_microbatches(data, spec, step), k, spec, data.seq_length)
    success, grad_norm, _ = optimizer.step()
    return sums, bool(success), float("nan") if grad_norm is None else float(grad_norm)


def evaluate(model: Any, data: DigitsData, spec: RunSpec) -> dict[str, float]:
    """Validation loss overall and per modality (both tasks on every val image)."""
    batches = eval_microbatches(data, spec.micro_batch)
    model.eval()
    with torch.no_grad():
        sums = run_schedule(model, batches, len(batches), spec, data.seq_length, True)
    model.train()
    return {f"val_{k}": v for k, v in modality_losses(sums).items()}


def setup_rank(spec: RunSpec) -> None:
    """Megatron parallel state for this rank, seeded (torch.distributed is already up)."""
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel

    torch.set_num_threads(spec.threads)
    init_megatron_parallel(tp=spec.tp, pp=spec.pp, seed=spec.seed)


@dataclass
class Run:
    """One rank's training state: data, model, optimizer and running counters."""

    spec: RunSpec
    data: DigitsData
    model: Any
    optimizer: Any
    accumulation_steps: int
    levels: list[int]
    start: float = 0.0
    skipped: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    telemetry: GPUTelemetry = field(default_factory=GPUTelemetry)


def setup_run(spec: RunSpec) -> Run:
    """Parallel state, data, model (in its DDP) and optimizer for this rank."""
    from megatron.core import parallel_state as ps

    setup_rank(spec)
    data = DigitsData()
    dp = ps.get_data_parallel_world_size()
    k = num_micro_batches(spec.global_batch, spec.micro_batch, dp)
    model = build_model(spec, data)
    optimizer = build_optimizer(spec, model, k)
    return Run(spec, data, model, optimizer, k, fold_levels(spec, dp), time.perf_counter())


def run_step(run: Run, step: int) -> dict[str, Any]:
    """Diagnostics (every diag_every steps), one optimizer step, and its metrics row."""
    spec, seq = run.spec, run.data.seq_length
    cosine = float("nan")
    if spec.diag_every > 0 and (step % spec.diag_every == 0 or step == spec.steps - 1):
        cosine = modality_cosine(run.model, train_microbatches(run.data, spec, step), seq)
        request_grad_diagnostics(run.optimizer, spec.layout, run.accumulation_steps)
    t0 = time.perf_counter()
    sums, success, grad_norm = train_step(
        run.model, run.optimizer, run.data, spec, step, run.accumulation_steps
    )
    dt = time.perf_counter() - t0
    run.skipped += int(not success)
    run.stats = optimizer_stats(run.optimizer)
    return {
        "step": step + 1,
        "optimizer": spec.optimizer,
        **modality_losses(sums),
        "tokens_per_s": spec.global_batch * seq / dt,
        "grad_norm": grad_norm,
        "lr": lr_at(step, spec),
        "step_time_s": dt,
        "elapsed_s": time.perf_counter() - run.start,
        "skipped_steps": run.skipped,
        "modality_cosine": cosine,
        **level_columns(run.stats, run.levels),
        **grad_columns(run.stats),
        **{k: v for k, v in run.stats.items() if k.startswith("time_")},
        **run.telemetry.sample(),
    }


def train_worker(spec: RunSpec) -> dict[str, Any] | None:
    """Train one optimizer on this rank; rank 0 returns rows and a summary, others None.

    A SIGTERM/SIGUSR1 on any rank makes every rank stop after the same step, save a checkpoint
    and exit with REQUEUE_EXIT_CODE; with --resume the next run continues from it.
    """
    run = setup_run(spec)
    out, rank0 = Path(spec.out), dist.get_rank() == 0
    if rank0 and on_accelerator() and not use_cuda():
        print("strict device emulation: model and batches on emulated cuda; mixing fails")
    start = load_checkpoint(out, spec.optimizer, run.model, run.optimizer) if spec.resume else 0
    if start and torchrun_env():  # one line per rank: which node resumed from what
        print(
            f"rank {dist.get_rank()} on {socket.gethostname()}: resumed from "
            f"{out / 'checkpoint'} at step {start}",
            flush=True,
        )
    writer = MetricsWriter(out, metric_columns(run.levels)) if rank0 else None
    bar, rows = make_progress(spec, start), []
    preemption = PreemptionHandler()
    for step in range(start, spec.steps):
        row = run_step(run, step)
        if writer is not None:
            writer.write(row)
            rows.append(row)
            update_progress(bar, row)
            log_progress(spec, row)
        if preemption.stop_requested() or step + 1 == spec.stop_at_step:
            save_checkpoint(out, spec.optimizer, run.model, run.optimizer, step + 1, spec)
            if torchrun_env():  # one line per rank: did the stop signal reach it?
                got = preemption.received
                print(
                    f"rank {dist.get_rank()} on {socket.gethostname()}: stop signal "
                    f"{signal.Signals(got).name if got else 'not received here'}, "
                    f"checkpoint at step {step + 1} saved",
                    flush=True,
                )
            if rank0:
                # The batch script requeues when this marker exists, whatever exit codes srun
                # reports (it may kill the slower rank once the first one has exited).
                (out / REQUEUE_MARKER).write_text(f"{step + 1}\n")
                print(
                    f"\npreempted: checkpoint at step {step + 1}, exiting for requeue",
                    file=sys.stderr,
                    flush=True,
                )
            dist.barrier()
            raise SystemExit(REQUEUE_EXIT_CODE)
        if spec.save_interval and (step + 1) % spec.save_interval == 0:
            save_checkpoint(out, spec.optimizer, run.model, run.optimizer, step + 1, spec)
    preemption.restore()
    train_time = time.perf_counter() - run.start
    if bar is not None:
        bar.close()
    final = evaluate(run.model, run.data, spec)
    if not (spec.save_interval and spec.steps % spec.save_interval == 0):  # else saved already
        save_checkpoint(out, spec.optimizer, run.model, run.optimizer, spec.steps, spec)
    if not rank0:
        return None
    return {"rows": rows, "summary": summarize(spec, rows, final, train_time, run.stats)}


def update_progress(bar: Any, row: dict[str, Any]) -> None:
    """Advance the rank-0 bar with step, per-modality loss and throughput."""
    if bar is None:
        return
    bar.set_postfix_str(
        f"img {row['image_loss']:.3f} txt {row['text_loss']:.3f} {row['tokens_per_s']:,.0f} tok/s",
        refresh=False,
    )
    bar.update(1)


def log_progress(spec: RunSpec, row: dict[str, Any]) -> None:
    """Plain progress line every spec.log_every steps (and at the last step); rank 0 only."""
    step = row["step"]
    if spec.log_every <= 0 or (step % spec.log_every and step != spec.steps):
        return
    print(
        f"  [{spec.optimizer} seed {spec.seed}] step {step}/{spec.steps} "
        f"loss {row['loss']:.4f} img {row['image_loss']:.4f} txt {row['text_loss']:.4f} "
        f"{row['tokens_per_s']:,.0f} tok/s {row['elapsed_s']:.0f} s",
        flush=True,
    )


def summarize(
    spec: RunSpec,
    rows: list[dict[str, Any]],
    final: dict[str, float],
    train_time: float,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Final numbers of one run: train losses (mean of the last 10% of steps), val, speed."""
    tail = rows[-max(1, len(rows) // 10) :]
    out = {
        "optimizer": spec.optimizer,
        "steps": spec.steps,
        "lr": spec.lr,
        "train_time_s": train_time,
        "tokens_per_s": sum(r["tokens_per_s"] for r in rows[1:]) / max(1, len(rows) - 1),
        "skipped_steps": rows[-1]["skipped_steps"] if rows else 0,
        "eigh_failures": stats.get("eigh_failures", 0),
        "qr_failures": stats.get("qr_failures", 0),
    }
    for key in ("loss", "image_loss", "text_loss"):
        out[f"first_{key}"] = rows[0][key] if rows else float("nan")
        out[f"final_{key}"] = sum(r[key] for r in tail) / len(tail) if tail else float("nan")
    return {**out, **final}


# ------------------------------------------------------------------------------------ launch
def torchrun_env() -> bool:
    """Launched by torchrun / srun (RANK and WORLD_SIZE set by the launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env() -> None:
    """torch.distributed from the launcher's env: NCCL on GPUs (gloo + emulation on CPU)."""
    if "LOCAL_RANK" not in os.environ and "SLURM_LOCALID" in os.environ:
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        from mlfop_megatron.runtime.cpu_emulation import install_cpu_emulation

        install_cpu_emulation()
        dist.init_process_group("gloo")


def run_all(specs: list[RunSpec], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train every spec in turn; returns rank 0's results (an empty list on other ranks)."""
    results = []
    if torchrun_env():
        init_from_env()
        for spec in specs:
            res = train_worker(spec)
            if res is not None:
                results.append(res)
        dist.destroy_process_group()
        return results
    if use_cuda():
        raise SystemExit(
            "on GPUs launch with torchrun/srun (e.g. torchrun --nproc-per-node 8 "
            "examples/train_digits.py ...); --nproc spawns CPU gloo ranks only"
        )
    from mlfop_megatron.runtime.spawn import run_distributed

    for spec in specs:
        res = run_distributed(
            train_worker, args.nproc, spec, timeout=args.timeout, threads=spec.threads
        )
        results.append(res[0])
    return results


SUMMARY_COLUMNS = (
    ("optimizer", "{}"),
    ("steps", "{}"),
    ("lr", "{:.0e}"),
    ("final_image_loss", "{:.4f}"),
    ("final_text_loss", "{:.4f}"),
    ("val_image_loss", "{:.4f}"),
    ("val_text_loss", "{:.4f}"),
    ("tokens_per_s", "{:,.0f}"),
    ("train_time_s", "{:.1f}"),
    ("skipped_steps", "{}"),
)


def summary_table(summaries: list[dict[str, Any]]) -> str:
    """Fixed-width text table of the per-optimizer summaries."""
    header = [name for name, _ in SUMMARY_COLUMNS]
    body = [[fmt.format(s[name]) for name, fmt in SUMMARY_COLUMNS] for s in summaries]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def finish(out: Path, results: list[dict[str, Any]], wall: float) -> None:
    """Plots, summary.json and the printed summary table (rank 0 / the launcher)."""
    from plots import make_plots

    rows = [r for res in results for r in res["rows"]]
    pngs = make_plots(rows, out)
    summaries = [res["summary"] for res in results]
    payload = {"wall_time_s": wall, "runs": summaries}
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=clean))
    print("\n" + summary_table(summaries))
    print(
        f"\nwall time {wall:.1f} s; run folder {out}: metrics.csv, metrics.jsonl, "
        f"checkpoint/, {', '.join(p.name for p in pngs)}, summary.json"
    )


def quiet_warnings() -> None:
    """Hide the library UserWarnings (no TE/apex on CPU, deprecations) here and in the ranks."""
    import warnings

    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, train, write the run folder."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    if not args.verbose:
        quiet_warnings()
    world = int(os.environ["WORLD_SIZE"]) if torchrun_env() else args.nproc
    specs = specs_from_args(args, world)
    out = Path(args.out)
    is_rank0 = not torchrun_env() or int(os.environ["RANK"]) == 0
    resuming = args.resume and (out / "metrics.csv").exists()
    if is_rank0 and not resuming:
        start_metric_files(out, metric_columns(fold_levels(specs[0], world // (args.tp * args.pp))))
    if is_rank0:
        (out / REQUEUE_MARKER).unlink(missing_ok=True)
    try:
        results = run_all(specs, args)
    except RuntimeError:
        if (out / REQUEUE_MARKER).exists():  # spawned ranks stopped for a "preemption"
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        raise
    if is_rank0:
        finish(out, results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
