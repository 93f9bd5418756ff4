"""Factory with the shape of megatron.core.optimizer.get_megatron_optimizer for ML-FOP-SOAP."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import FP32Optimizer, OptimizerConfig

from mlfop_megatron.config import TP_MODES, MLFOPConfig
from mlfop_megatron.core.precision import check_tf32_override
from mlfop_megatron.distributed.comm_config import CommConfig
from mlfop_megatron.megatron import compat
from mlfop_megatron.megatron.checkpointing import adam_init_state_fn
from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel, check_supported_features
from mlfop_megatron.megatron.fp8 import check_fp8_support, is_quantized
from mlfop_megatron.megatron.fused_kernels import make_adamw
from mlfop_megatron.megatron.main_param_adam import MainParamAdamW
from mlfop_megatron.megatron.naming import canonical_param_names
from mlfop_megatron.megatron.optimizer import MLFOPChainedOptimizer, MLFOPMegatronOptimizer
from mlfop_megatron.megatron.param_groups import megatron_group_fields
from mlfop_megatron.megatron.sharded_adam import ShardedMainParamAdamW
from mlfop_megatron.policies import is_soap_matrix


def is_soap_param(name: str, param: torch.nn.Parameter, position_embeddings: str = "adam") -> bool:
    """SOAP takes the transformer's linear weights; embeddings, output, norms, biases -> Adam.

    The name and shape rule is :func:`mlfop_megatron.policies.is_soap_matrix`.
    Matrices whose gradients finalize_model_grads still all-reduces over the tensor-parallel
    group (``sequence_parallel`` ones such as the MoE router weight under sequence
    parallelism, ``average_gradients_across_tp_domain`` ones) also go to Adam: that reduction
    runs after the folding levels consumed the gradients, and Adam reads them after it. The
    ``sequence_parallel`` tag decides whether it is set at all, not its value, so a weight
    gets the same optimizer with and without sequence parallelism.
    """
    if hasattr(param, "sequence_parallel") or getattr(
        param, "average_gradients_across_tp_domain", False
    ):
        return False
    return is_soap_matrix(name, param.dim(), position_embeddings)


def is_expert_param(param: torch.nn.Parameter) -> bool:
    """Expert-parallel params (Megatron tags them allreduce=False; expert-data-parallel)."""
    return not getattr(param, "allreduce", True)


def _check_config(config: OptimizerConfig, tp_mode: str) -> None:
    if config.fp16:
        raise ValueError(
            "ML-FOP-SOAP does not support fp16 training (OptimizerConfig.fp16=True): fp16 "
            "needs loss scaling that this optimizer does not implement; use bf16=False (fp32) "
            "or bf16"
        )
    if config.use_distributed_optimizer:
        raise ValueError(
            "set OptimizerConfig.use_distributed_optimizer=False: ML-FOP-SOAP shards its own "
            "state by block across the data-parallel group (sharded=True)"
        )
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode must be one of {TP_MODES} (got {tp_mode!r})")


def _check_precision(config: OptimizerConfig, chunk: Any) -> None:
    low = {p.dtype for p in chunk.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if low and not config.bf16:
        raise ValueError(
            f"model params are {sorted(map(str, low))} but OptimizerConfig.bf16=False; set "
            "bf16=True so the optimizer keeps fp32 main weights"
        )
    grads = compat.ddp_params_with_grad(chunk)
    if config.bf16 and any(p.main_grad.dtype != torch.float32 for p in grads):
        raise ValueError(
            "OptimizerConfig.bf16=True needs DistributedDataParallelConfig("
            "grad_reduce_in_fp32=True): folding reads fp32 main_grad level sums"
        )


def get_mlfop_optimizer(
    config: OptimizerConfig,
    model_chunks: list[Any],
    mlfop_config: MLFOPConfig | None = None,
    sharded: bool = True,
    block_size: int | None = None,
    tp_mode: str = "blockwise",
    shard_adam: bool = True,
    comm: CommConfig | None = None,
    adam_only: bool = False,
    position_embeddings: str = "adam",
) -> MLFOPChainedOptimizer:
    """ML-FOP-SOAP for the matrices, AdamW for everything else.

    ``config`` supplies lr, weight_decay, clip_grad and the Adam hyperparameters; ``mlfop_config``
    the SOAP and folding options (its accumulation_steps must equal the schedule's
    num_microbatches; folding runs only with ``FoldingConfig(enabled=True)``, by default the
    step takes the plain mean of the micro-batch gradients). ``sharded`` spreads SOAP state
    over the data-parallel group (and over TP x DP in ``tp_mode="full"``, which preconditions
    whole matrices instead of TP shards).
    ``shard_adam`` shards the AdamW state and fp32 main weights of the other params over the
    data-parallel group (ZeRO-1, ``ShardedMainParamAdamW``); False keeps them replicated
    (Megatron's FP32Optimizer, or MainParamAdamW for bf16/FP8 params). FP8 params always
    stay replicated.
    ``comm`` chooses the level reductions and the parameter sync (default: owner-ordered
    reduce-scatter per level, ZeRO-1 Adam grads reduce-scattered once into the slices each
    rank steps, one parameter all-gather per engine and per Adam buffer).
    ``position_embeddings``: "adam" (default) or "soap", who steps learned absolute position
    embeddings (``ShardingConfig.position_embeddings``).
    ``adam_only`` sends every param to the Adam part (an AdamW baseline through the same
    chained optimizer; any Megatron DistributedDataParallel, ``mlfop_config`` unused).
    """
    mlfop_config = mlfop_config or MLFOPConfig()
    comm = comm or CommConfig()
    _check_config(config, tp_mode)
    if len(model_chunks) != 1:
        raise ValueError(
            "virtual pipeline stages (several model chunks per rank) are not supported; "
            "use one model chunk per pipeline stage"
        )
    chunk = model_chunks[0]
    if not adam_only and not isinstance(chunk, FoldingDistributedDataParallel):
        raise TypeError(
            "wrap the model in mlfop_megatron.megatron.FoldingDistributedDataParallel (a "
            f"subclass of Megatron's DistributedDataParallel), got {type(chunk).__name__}"
        )
    check_supported_features(getattr(chunk, "config", None), getattr(chunk, "ddp_config", None))
    if comm.overlap_param_gather and not isinstance(chunk, FoldingDistributedDataParallel):
        raise TypeError(
            "CommConfig.overlap_param_gather=True needs the model wrapped in "
            f"FoldingDistributedDataParallel (its forward pre-hooks wait), got "
            f"{type(chunk).__name__}"
        )
    # FP8 (TransformerConfig.fp8 / fp8_param, OptimizerConfig.fp8_recipe, fp8 params) needs
    # TransformerEngine and a GPU: fail here with the fix rather than deep inside TE.
    check_fp8_support(getattr(chunk, "config", None), config, list(chunk.parameters()))
    _check_precision(config, chunk)
    if not adam_only:
        check_tf32_override(next(chunk.parameters()).device)
    soap, adam_decay, adam_no_decay = [], [], []
    names = canonical_param_names(chunk)
    for param in chunk.parameters():
        if not param.requires_grad:
            continue
        name = names[param]
        if not adam_only and is_soap_param(name, param, position_embeddings):
            soap.append((param, name))
        elif param.dim() >= 2:
            adam_decay.append(param)
        else:
            adam_no_decay.append(param)
    chained = []
    if soap:
        ours = MLFOPMegatronOptimizer(
            config,
            mlfop_config,
            model_chunks,
            [p for p, _ in soap],
            [n for _, n in soap],
            sharded=sharded,
            block_size=block_size,
            tp_mode=tp_mode,
            comm=comm,
        )
        chunk.attach_folding(ours.schedule, ours.reduce_and_fold_level)
        chained.append(ours)
    # Expert-parallel params get their own Adam: their grads are replicated over the
    # expert-data-parallel group, not the dense one, which the global norm must know.
    for expert in (False, True):
        groups = [
            {
                "params": [p for p in ps if is_expert_param(p) == expert],
                "weight_decay": config.weight_decay * mult,
                **megatron_group_fields(config, mult),
                "is_expert_parallel": expert,
            }
            for ps, mult in ((adam_decay, 1.0), (adam_no_decay, 0.0))
        ]
        groups = [g for g in groups if g["params"]]
        if groups:
            for adam in _make_adam(groups, config, shard_adam, expert):
                adam.mlfop_expert_parallel = expert
                if isinstance(adam, ShardedMainParamAdamW):
                    _wire_sharded_adam(adam, chunk, comm)
                chained.append(adam)
    return MLFOPChainedOptimizer(chained)


def _wire_sharded_adam(adam: ShardedMainParamAdamW, chunk: Any, comm: CommConfig) -> None:
    """Reduce-scatter its grads into its slices and defer its all-gather, as ``comm`` asks.

    The reduce-scatter needs the DDP's owner-reduced levels (without them Megatron's buckets
    all-reduce every grad, and adam_only runs use Megatron's own DDP sync).
    """
    if comm.adam_reduce_scatter and getattr(chunk, "owner_reduce", False):
        adam.take_over_grad_sync(chunk)
    if comm.overlap_param_gather:
        chunk.param_gathers.install(chunk.module)
        adam.defer_param_gather(chunk.param_gathers)


def _adam_group(expert: bool) -> Any:
    """The group over which an Adam param is replicated: expert-DP or dense DP x CP."""
    from megatron.core import parallel_state

    if expert:
        return parallel_state.get_expert_data_parallel_group()
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _split_groups(
    groups: list[dict[str, Any]], keep: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(groups of the params ``keep`` accepts, groups of the rest), empty groups dropped."""
    yes = [dict(g, params=[p for p in g["params"] if keep(p)]) for g in groups]
    no = [dict(g, params=[p for p in g["params"] if not keep(p)]) for g in groups]
    return [g for g in yes if g["params"]], [g for g in no if g["params"]]


def _make_adam(
    groups: list[dict[str, Any]], config: OptimizerConfig, shard: bool = False, expert: bool = False
) -> list[Any]:
    """Optimizers for the Adam-side groups: ZeRO-1 sharded (FP8 params stay replicated)."""
    out: list[Any] = []
    if shard:
        plain, groups = _split_groups(groups, lambda p: not is_quantized(p))
        if plain:
            out.append(ShardedMainParamAdamW(plain, config, _adam_group(expert)))
        if not groups:
            return out
    quantized = any(is_quantized(p) for g in groups for p in g["params"])
    if config.bf16 or quantized:
        # fp32 main weights for bf16 (and FP8) params
        return out + [MainParamAdamW(groups, config)]
    # apex FusedAdam on CUDA when apex is installed, torch AdamW otherwise
    adam = make_adamw(groups, config.lr, (config.adam_beta1, config.adam_beta2), config.adam_eps)
    return out + [FP32Optimizer(adam, config, adam_init_state_fn)]
