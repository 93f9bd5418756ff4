"""The demo's model (a megatron-core GPTModel in Megatron's DDP) and its optimizer.

The optimizer comes from the table in ``optimizers.py``: ours from the package's factory
``get_mlfop_optimizer`` (ML-FOP-SOAP, SOAP with folding off, or the AdamW baseline through the
same chained optimizer: global norm, clipping and inf check shared by all three), or Megatron
0.19's own SOAP / Muon from ``get_megatron_optimizer``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mlfop_megatron import policies

from .data import DigitsData
from .devices import on_accelerator, use_cuda
from .optimizers import entry
from .spec import VOCAB_MULTIPLE, RunSpec


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
    """Vocabulary padded with Megatron's rule (``policies.padded_vocab_size``) to lcm(64, tp).

    The same padded size for every power-of-two TP up to 64, so TP layouts train the same
    model. Padding ids never occur in the data.
    """
    return policies.padded_vocab_size(vocab_size, 1, math.lcm(VOCAB_MULTIPLE, tp))


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

    from .optimizers import check_layer_wise

    check_layer_wise(spec)
    # Megatron's layer-wise optimizer trains in bf16 (see optimizers.LAYER_WISE); else fp32.
    dtype = torch.bfloat16 if spec.megatron_layer_wise else torch.float32
    config = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
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
    if spec.megatron_layer_wise:
        ddp = layer_wise_ddp(spec, config, ddp_config, model)
    else:
        # Folding needs our DDP (level boundaries are sync points); AdamW and Megatron's own
        # optimizers get Megatron's standard DDP.
        ddp_class = (
            FoldingDistributedDataParallel
            if entry(spec.optimizer).folding_ddp
            else DistributedDataParallel
        )
        ddp = ddp_class(config=config, ddp_config=ddp_config, module=model)
    # The hooks Megatron-LM's training loop installs, so the schedules drive the DDP buckets.
    config.no_sync_func = ddp.no_sync
    config.grad_sync_func = ddp.start_grad_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def layer_wise_ddp(spec: RunSpec, config: Any, ddp_config: Any, model: Any) -> Any:
    """The model as Megatron-LM 0.19's ``get_model`` wraps it for a layer-wise optimizer.

    ``--bf16`` (``Float16Module``), the bucket size from its ``resolve_ddp_bucket_size``, then
    its ``wrap_model_chunks_with_ddp``: with the per-bucket layout (``"layout"``) it tags the
    params, computes LayerWiseDistributedOptimizer's layout and turns on
    ``use_distributed_optimizer`` in DDP; ``"pingpong"`` passes
    ``use_layer_wise_param_layout=False`` (``--no-use-layer-wise-param-layout``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module
    from megatron.training.training import resolve_ddp_bucket_size, wrap_model_chunks_with_ddp

    model = Float16Module(config, model)
    ddp_config.bucket_size = resolve_ddp_bucket_size(
        ddp_config,
        ps.get_data_parallel_group(with_context_parallel=True),
        ddp_config.overlap_grad_reduce,
        sum(p.numel() for p in model.parameters()),
    )
    (ddp,) = wrap_model_chunks_with_ddp(
        [model],
        config,
        ddp_config,
        use_layer_wise_distributed_optimizer=True,
        use_layer_wise_param_layout=spec.megatron_layer_wise == "layout",
    )
    return ddp


def build_optimizer(spec: RunSpec, model: Any, accumulation_steps: int) -> Any:
    """The optimizer ``spec.optimizer`` names, built as its entry in ``optimizers.TABLE`` says."""
    return entry(spec.optimizer).build(spec, model, accumulation_steps)


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every param group (weight decay is left alone).

    ``optimizer.param_groups`` of ours and of Megatron's optimizers (a ChainedOptimizer lists
    the live groups of every optimizer it chains). ``lr_mult`` of a Megatron group scales it,
    as Megatron-LM's OptimizerParamScheduler does (1.0 in every group the demo builds).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
