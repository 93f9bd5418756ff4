"""Training runs of the tiny GPT with ML-FOP-SOAP through the Megatron adapter (tests, demo)."""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mlfop_megatron.config import MLFOPConfig
from mlfop_megatron.distributed.comm_config import CommConfig
from mlfop_megatron.distributed.comm_counter import count_collectives
from mlfop_megatron.megatron import compat
from mlfop_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
from mlfop_megatron.megatron.factory import get_mlfop_optimizer
from mlfop_megatron.megatron.sharded_adam import adam_state_bytes, owned_adam_state
from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
from tests.support.order import REFERENCE_ORDER
from tests.support.step_capture import capture_engine_steps
from tests.support.tiny_gpt import (
    TinyGPTConfig,
    build_tiny_gpt,
    canonical_param_names,
    deterministic_init_,
    global_mean_loss,
    train_iteration,
)


def run_tiny_gpt(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the tiny GPT for spec['iters'] steps; return params by canonical name and stats.

    spec keys: tp, pp, iters, microbatches, global_micro (samples per micro-batch over all DP
    ranks), lr, clip_grad, sharded, tp_mode, block_size (SOAP blocks), enabled (folding: on
    unless False here, off in the package's FoldingConfig),
    overlap, dtype, max_precond_dim,
    nan_at (iteration, rank) to poison one backward (nan_param: a name part choosing the
    poisoned param), mtp_tagged (name parts: params tagged grad_norm_group="mtp" as 0.19 tags
    MTP params), discard_at (iteration) to drop a step,
    save_at (iteration, dir) to checkpoint after that step, load_from (dir) to resume,
    save_without (SOAP state fields left out of that checkpoint, as an older version wrote),
    signal_after_save: after that save send SIGUSR1 and SIGTERM to every process this rank
    started (as Slurm signals every process of a job step) and save again,
    hidden and layers for the model size, arch ('gpt' or 'hybrid': the same model as a
    megatron-core 0.19 HybridModel), on_device to create params and batches on the (emulated)
    CUDA device, parallel (more initialize_model_parallel kwargs, e.g.
    expert_model_parallel_size), extra_config (TinyGPTConfig.extra_config pairs), folding
    (more FoldingConfig options, e.g. structure, step_size, statistics_from, beta_max), soap
    (more SOAPConfig options, e.g. batched),
    grad_groups (group id per micro-batch: request_grad_diagnostics before every window),
    shard_adam (ZeRO-1 Adam for the non-matrix params, default True), position_embeddings
    ("adam" or "soap": who steps the learned position embeddings),
    comm (CommConfig options), count_comm (count the collectives of training and steps),
    package_order (the package's default SOAP order instead of REFERENCE_ORDER), check_step
    (capture that iteration's SOAP step of every engine: tests/support/step_capture.py).
    Returns also, per applied step, how many parameter all-gathers were left in flight
    ("pending_gathers": CommConfig.overlap_param_gather).
    """
    init_megatron_parallel(
        tp=spec.get("tp", 1), pp=spec.get("pp", 1), seed=1234, **spec.get("parallel", {})
    )
    # Megatron's torch LayerNorm wrapper allocates in the default dtype.
    torch.set_default_dtype(spec.get("dtype", torch.float32))
    k = spec.get("microbatches", 4)
    cfg = TinyGPTConfig(
        overlap_grad_reduce=spec.get("overlap", True),
        dtype=spec.get("dtype", torch.float32),
        hidden_size=spec.get("hidden", 32),
        num_layers=spec.get("layers", 2),
        on_device=spec.get("on_device", False),
        extra_config=tuple(spec.get("extra_config", ())),
    )
    if spec.get("arch", "gpt") == "hybrid":  # the same model as a 0.19 HybridModel
        from tests.support.tiny_hybrid import build_tiny_hybrid, gpt_equivalent_name

        model = build_tiny_hybrid(cfg, ddp_class=FoldingDistributedDataParallel)
        deterministic_init_(model, seed=0, rename=gpt_equivalent_name)
    else:
        model = build_tiny_gpt(cfg, ddp_class=FoldingDistributedDataParallel)
        deterministic_init_(model, seed=0)
    for name, p in model.named_parameters():  # as megatron-core 0.19 tags its MTP params
        if any(part in name for part in spec.get("mtp_tagged", ())):
            p.grad_norm_group = "mtp"
    # The machinery tests run the SOAP reference's order unless a spec asks for the package's
    # (package_order=True, or its soap options set it): see tests/support/order.py.
    order = {} if spec.get("package_order") else dict(REFERENCE_ORDER)
    mlfop = MLFOPConfig.from_kwargs(
        lr=spec.get("lr", 1e-2),
        precondition_frequency=spec.get("precondition_frequency", 3),
        accumulation_steps=k,
        enabled=spec.get("enabled", True),
        max_precond_dim=spec.get("max_precond_dim", 10000),
        **spec.get("folding", {}),
        **{**order, **spec.get("soap", {})},
    )
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=spec.get("lr", 1e-2),
        weight_decay=0.01,
        clip_grad=spec.get("clip_grad", 0.0),
        bf16=spec.get("dtype") == torch.bfloat16,
        fp16=False,
    )
    optimizer = get_mlfop_optimizer(
        opt_config,
        [model],
        mlfop,
        sharded=spec.get("sharded", True),
        shard_adam=spec.get("shard_adam", True),
        tp_mode=spec.get("tp_mode", "blockwise"),
        comm=CommConfig(**spec.get("comm", {})),
        block_size=spec.get("block_size"),
        position_embeddings=spec.get("position_embeddings", "adam"),
    )
    # Megatron's own LR/WD scheduler drives the chained optimizer, as in Megatron-LM.
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=opt_config.lr,
        max_lr=opt_config.lr,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=1000,
        lr_decay_style="constant",
        start_wd=opt_config.weight_decay,
        end_wd=opt_config.weight_decay,
        wd_incr_steps=1000,
        wd_incr_style="constant",
    )
    dp = parallel_state.get_data_parallel_world_size()
    mbs = spec.get("global_micro", 2) // dp
    losses, results, step_times, pending = [], [], [], []
    group_norms: list[dict[str, float]] = []  # per step: the separately clipped groups' norms
    clip_scales: list[list[dict]] = []  # per step: each ML-FOP-SOAP optimizer's clip factors
    comm_counts: list[tuple[dict[str, int], dict[str, int]]] = []
    signalled: list[str] = []
    first = 0
    if spec.get("load_from"):
        first = load_checkpoint(spec["load_from"], model, optimizer) + 1
    captured: list[dict[str, Any]] = []
    it = first
    if spec.get("check_step") is not None:  # record that iteration's SOAP step per engine
        capture_engine_steps(optimizer, lambda: it == spec["check_step"], captured)
    for it in range(first, spec.get("iters", 10)):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        if spec.get("grad_groups") is not None:  # grad-group diagnostics in every window
            optimizer.request_grad_diagnostics(spec["grad_groups"])
        nan_at = spec.get("nan_at")
        if nan_at is not None and nan_at[0] == it and nan_at[1] == torch.distributed.get_rank():
            poison_next_backward(model, spec.get("nan_param"))
        counting = count_collectives() if spec.get("count_comm") else nullcontext()
        with counting as counts:  # the window's backward passes and the step, not the loss
            local = train_iteration(model, cfg, it, k, mbs, zero_grad=False)
            if spec.get("discard_at") != it:
                start = time.perf_counter()
                results.append(optimizer.step())
                step_times.append(time.perf_counter() - start)
                group_norms.append(dict(getattr(optimizer, "grad_norms_by_group", {})))
                clip_scales.append([dict(o.last_grad_scales) for o in optimizer.mlfop])
                pending.append(len(model.param_gathers))
        if counts is not None:
            comm_counts.append((dict(counts.launches), dict(counts.bytes)))
        losses.append(global_mean_loss(local))
        if spec.get("discard_at") == it:  # reference for the NaN test: drop this step
            for opt in optimizer.mlfop:
                opt.discard_step()
            results.append((False, None, None))
            continue
        scheduler.step(increment=1)
        if spec.get("save_at") is not None and spec["save_at"][0] == it:
            if spec.get("save_without"):
                import mlfop_megatron.megatron.checkpointing as ckpt_module

                kept = tuple(f for f in ckpt_module.STATE_FIELDS if f not in spec["save_without"])
                ckpt_module.STATE_FIELDS = kept  # this rank process only
            save_checkpoint(spec["save_at"][1], model, optimizer, it)
            if spec.get("signal_after_save"):
                signalled = signal_descendants((signal.SIGUSR1, signal.SIGTERM))
                save_checkpoint(spec["save_at"][1], model, optimizer, it)
    # The params are read outside a forward: the last step's all-gathers must land first.
    optimizer.finish_param_sync()
    names = canonical_param_names(model)
    return {
        "params": {names[p]: p.detach().clone() for p in model.parameters()},
        "partition_dims": {
            names[p]: p.partition_dim
            for p in model.parameters()
            if getattr(p, "tensor_model_parallel", False)
        },
        "losses": losses,
        "results": [(ok, norm) for ok, norm, _ in results],
        "state_bytes": sum(o.state_bytes() for o in optimizer.mlfop),
        "adam_state_bytes": sum(adam_state_bytes(o) for o in optimizer.others),
        "adam_pieces": owned_adam_state(optimizer.others, names),
        # bytes one rank moves in the ZeRO-1 Adam params' all-gathers per step (0: replicated)
        "adam_gather_bytes": sum(
            o.all_gather_bytes_per_step()
            for o in optimizer.others
            if hasattr(o, "all_gather_bytes_per_step")
        ),
        "engines": [type(e).__name__ for o in optimizer.mlfop for e in o.engines],
        "step_times": step_times,
        "broadcast_bytes": sum(
            e.communication_bytes_per_step() for o in optimizer.mlfop for e in o.engines
        ),
        "grad_buffer_bytes": sum(
            b.grad_data.numel() * b.grad_data.element_size() for b in compat.ddp_buffers(model)
        ),
        "comm_counts": comm_counts,
        "comm_bytes": [o.communication_bytes_per_step() for o in optimizer.mlfop],
        # collectives per level reduction of each LevelReducer (CommConfig.level_buckets)
        "level_buckets": [r.num_buckets for o in optimizer.mlfop for r, _ in o._reducers],
        # the same of each TP-full reducer's step 1 (its DP reduce-scatters)
        "tp_level_buckets": [r.num_buckets for o in optimizer.mlfop for r, _ in o._tp_reducers],
        # the whole chain: SOAP levels, Adam grads and both parameter all-gathers
        "chain_comm_bytes": optimizer.communication_bytes_per_step(),
        "pending_gathers": pending,
        "group_norms": group_norms,
        "clip_scales": clip_scales,
        "stats": optimizer.stats(),
        "signalled": signalled,
        "captured_steps": captured,
    }


def signal_descendants(signals: tuple[int, ...]) -> list[str]:
    """Send ``signals`` to every live process this one started; returns their command lines."""
    import psutil

    hit = []
    for proc in psutil.Process().children(recursive=True):
        try:
            hit.append(" ".join(proc.cmdline()))
            for sig in signals:
                proc.send_signal(sig)
        except psutil.NoSuchProcess:
            continue
    time.sleep(0.5)  # let default dispositions take effect before the next use
    return hit


def poison_next_backward(model: torch.nn.Module, name_part: str | None = None) -> None:
    """Make the next backward produce a NaN gradient in one weight (fault injection).

    ``name_part``: the first param whose name contains it (default: the first matrix).
    """
    if name_part is None:
        param = next(p for p in model.parameters() if p.dim() >= 2)
    else:
        param = next(p for n, p in model.named_parameters() if name_part in n)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        handle.remove()
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    handle = param.register_hook(hook)
