"""A tiny megatron-core GPTModel wrapped in Megatron DDP, plus a one-iteration training driver.

For tests and the CPU demo: builds the model for the current megatron parallel_state (TP/PP
from parallel_state, fp32, CPU initialisation, no dropout), wraps it in Megatron's
DistributedDataParallel (or a subclass passed as ``ddp_class``) and runs one iteration through
``get_forward_backward_func``. Synthetic tokens depend only on the *global* sample index, laid
out as in Megatron (global batch = microbatches x DP x micro-batch, each microbatch slice is
split across DP ranks), so DP=N with micro-batch b sees exactly the samples of DP=1 with
micro-batch N*b.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp

from mlfop_megatron.megatron.naming import canonical_param_names  # noqa: F401 (re-export)


@dataclass(frozen=True)
class TinyGPTConfig:
    """Shape and DDP settings of the tiny GPT (TP/PP sizes come from parallel_state)."""

    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    vocab_size: int = 64
    seq_length: int = 16
    tie_embeddings: bool = False
    overlap_grad_reduce: bool = True
    bucket_size: int | None = 2000  # elements; small so the tiny model gets several buckets
    grad_reduce_in_fp32: bool = True
    data_seed: int = 0
    # Linear biases off by default: the attention key bias has an exactly-zero gradient, and
    # Adam's g/(|g|+eps) turns rounding noise in it into layout-dependent updates.
    add_bias_linear: bool = False
    # fp64 makes cross-layout comparisons meaningful for SOAP, whose eigenbases amplify
    # last-bit differences between reduction orders (see tests/test_megatron_dp.py).
    dtype: torch.dtype = torch.float32
    # Further TransformerConfig fields as (name, value) pairs, e.g. (("sequence_parallel", True),
    # ("recompute_granularity", "full")); num_moe_experts also selects the local MoE layer spec.
    extra_config: tuple[tuple[str, Any], ...] = ()
    # Create the params on the (emulated) CUDA device (use_cpu_initialization=False) and move
    # the micro-batches there, as Megatron-LM does: what strict device checking needs.
    on_device: bool = False


def transformer_config(cfg: TinyGPTConfig) -> TransformerConfig:
    """TransformerConfig for ``cfg`` on the current parallel_state (fp32, CPU init, no dropout)."""
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=cfg.dtype,
        params_dtype=cfg.dtype,
        use_cpu_initialization=not cfg.on_device,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        add_bias_linear=cfg.add_bias_linear,
        **dict(cfg.extra_config),
    )


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """LayerNorm that accepts sequence-parallel input (Megatron's torch norm refuses it).

    Megatron's sequence-parallel norms are TransformerEngine's or apex's; on CPU this plain
    LayerNorm tags its params ``sequence_parallel`` like they do, so finalize_model_grads
    all-reduces their grads over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel


def layer_spec(config: TransformerConfig) -> Any:
    """Megatron's local GPT layer spec (MoE when num_moe_experts), SP-capable norms with SP."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    if not config.sequence_parallel:
        return spec
    sub = spec.submodules
    sub.input_layernorm = SequenceParallelLayerNorm
    if sub.pre_mlp_layernorm is not IdentityOp:
        sub.pre_mlp_layernorm = SequenceParallelLayerNorm
    layers = [spec] * get_num_layers_to_build(config)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=layers, layer_norm=SequenceParallelLayerNorm
        ),
    )


def build_tiny_gpt(
    cfg: TinyGPTConfig | None = None,
    ddp_class: type[DistributedDataParallel] = DistributedDataParallel,
    ddp_config: DistributedDataParallelConfig | None = None,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """Build this rank's GPTModel stage wrapped in ``ddp_class`` and wire the schedule hooks.

    Weights depend only on the CPU RNG (seed it first, e.g. init_megatron_parallel), so DP
    replicas are identical and TP shards are slices of the TP=1 weights. Sets
    ``config.no_sync_func``, ``grad_sync_func`` and ``finalize_model_grads_func`` like
    Megatron-LM's training loop so the schedules drive the DDP bucket machinery.
    """
    cfg = cfg or TinyGPTConfig()
    config = transformer_config(cfg)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="learned_absolute",
    )
    return wrap_in_ddp(model, config, cfg, ddp_class, ddp_config, **ddp_kwargs)


def wrap_in_ddp(
    model: torch.nn.Module,
    config: TransformerConfig,
    cfg: TinyGPTConfig,
    ddp_class: type[DistributedDataParallel] = DistributedDataParallel,
    ddp_config: DistributedDataParallelConfig | None = None,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """Wrap a built model stage in ``ddp_class`` and wire the schedule hooks as Megatron-LM."""
    if cfg.on_device:  # Megatron-LM's get_model moves the stage (plain torch modules too)
        model.cuda(torch.cuda.current_device())
    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=cfg.grad_reduce_in_fp32 and cfg.dtype != torch.float64,
            overlap_grad_reduce=cfg.overlap_grad_reduce,
            use_distributed_optimizer=False,
            bucket_size=cfg.bucket_size,
        )
    ddp = ddp_class(config=config, ddp_config=ddp_config, module=model, **ddp_kwargs)
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync if ddp_config.overlap_grad_reduce else None
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def tp_shard(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of the full (TP=1) tensor ``full`` for a possibly TP-split param."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return torch.chunk(full, tp, dim=param.partition_dim)[rank]


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """Shape of the unsplit (TP=1) tensor behind a possibly TP-split param."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= parallel_state.get_tensor_model_parallel_world_size()
    return tuple(shape)


@torch.no_grad()
def deterministic_init_(
    model: torch.nn.Module,
    seed: int = 0,
    std: float = 0.02,
    rename: Callable[[str], str] | None = None,
) -> None:
    """Re-initialise every param from (seed, canonical name) so all layouts hold one model.

    Matrices/embeddings ~ N(0, std), norm weights = 1, biases = 0; TP shards are slices of
    the full tensor. Makes TP=2/PP=2 runs directly comparable with TP=1/PP=1. ``rename`` maps
    a canonical name to the name whose values it takes (another architecture of one model).
    """
    for param, name in canonical_param_names(model).items():
        name = rename(name) if rename else name
        if param.dim() == 1:
            value = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            param.fill_(value)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.randn(full_shape(param), generator=gen, dtype=param.dtype) * std
        param.copy_(tp_shard(full, param))


def synthetic_sample(index: int, cfg: TinyGPTConfig) -> torch.Tensor:
    """Tokens (seq_length + 1) of global sample ``index``: a learnable arithmetic progression."""
    gen = torch.Generator().manual_seed(cfg.data_seed * 1_000_003 + index)
    start = int(torch.randint(cfg.vocab_size, (1,), generator=gen))
    step = 1 + index % 3
    return (start + step * torch.arange(cfg.seq_length + 1)) % cfg.vocab_size


def global_sample_indices(
    iteration: int, microbatch: int, num_microbatches: int, micro_batch_size: int
) -> list[int]:
    """Global sample indices this DP rank uses for one microbatch of one iteration."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    first = (
        iteration * num_microbatches * dp_size * micro_batch_size
        + microbatch * dp_size * micro_batch_size
        + dp_rank * micro_batch_size
    )
    return list(range(first, first + micro_batch_size))


def microbatches(
    cfg: TinyGPTConfig, iteration: int, num_microbatches: int, micro_batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's microbatches for ``iteration`` (every PP stage gets the same stream)."""
    for k in range(num_microbatches):
        idx = global_sample_indices(iteration, k, num_microbatches, micro_batch_size)
        tokens = torch.stack([synthetic_sample(i, cfg) for i in idx])
        batch = {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(len(idx), cfg.seq_length),
            "position_ids": torch.arange(cfg.seq_length).expand(len(idx), -1).contiguous(),
        }
        if cfg.on_device:
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        yield batch


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss of one microbatch (the schedule divides it by the microbatch count)."""
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    """forward_step_func for megatron schedules: (output_tensor, loss_func)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def train_iteration(
    model: DistributedDataParallel,
    cfg: TinyGPTConfig,
    iteration: int,
    num_microbatches: int,
    micro_batch_size: int,
    zero_grad: bool = True,
    forward_only: bool = False,
) -> list[float]:
    """Run forward+backward over ``num_microbatches``; grads end up reduced in main_grad.

    Returns this rank's per-microbatch losses on the last pipeline stage, [] elsewhere.
    """
    if zero_grad and not forward_only:
        model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=microbatches(cfg, iteration, num_microbatches, micro_batch_size),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=cfg.seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=cfg.seq_length,
        forward_only=forward_only,
    )
    return [float(d["lm loss"]) for d in losses] if losses else []


def global_mean_loss(losses: list[float]) -> float:
    """Mean loss over microbatches and DP ranks, broadcast from the last PP stage to all ranks."""
    value = torch.tensor([sum(losses) / len(losses) if losses else 0.0], dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage():
        torch.distributed.all_reduce(value, group=parallel_state.get_data_parallel_group())
        value /= parallel_state.get_data_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(value, src=last, group=pp_group)
    return float(value)
