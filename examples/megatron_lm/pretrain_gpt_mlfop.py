"""Pretrain a GPT with Megatron-LM's own training loop and ``--optimizer mlfop_soap``.

Megatron-LM (``megatron.training``: argument parsing, ``pretrain``, training loop, checkpointing)
is not on PyPI: run this from a Megatron-LM checkout (core_v0.16.x or core_v0.19.x) on
``PYTHONPATH``, or point
``MEGATRON_LM_DIR`` at one (it is then appended to ``sys.path``, so megatron-core keeps coming
from the installed wheel and only ``megatron.training`` is taken from the checkout). Every flag is
Megatron-LM's own plus ``--optimizer mlfop_soap`` and the ``--mlfop-*`` flags of
:func:`mlfop_megatron.megatron_lm.add_mlfop_args`; this script parses nothing itself.

This is a deliberately small GPT pretraining script (a megatron-core GPTModel with the local or
Transformer-Engine layer spec, Megatron-LM's mock or indexed GPT datasets), not a copy of
Megatron-LM's ``pretrain_gpt.py``: no MoE/MTP/FIM/SFT/packed sequences/virtual pipeline.
``--optimizer adam`` runs it unchanged.

Versions (:mod:`mlfop_megatron.megatron_lm.compat`): on core_v0.16 the model comes from
:func:`model_provider` through ``get_model``. On core_v0.19 it is built as 0.19's own
``pretrain_gpt.py`` / ``pretrain_hybrid.py`` build it, from a ``ModelConfig``
(:func:`model_config_from_args`): a ``GPTModelConfig``, or a ``HybridModelConfig`` when
``--hybrid-layer-pattern`` is given (e.g. ``'*-*-'``: attention + MLP layers, the GPT
equivalent; 0.19's stock hybrid layer specs are Transformer-Engine only, select one with
``--spec megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec``).

``MLFOP_CPU_EMULATION=1`` runs it on CPU with gloo (tests and demos only; see
:func:`install_cpu_stand_ins`). See examples/megatron_lm/README.md for command lines.

Imports of torch/Megatron are inside the functions on purpose: the torch_dist checkpoint writer
starts a ``multiprocessing`` "spawn" helper, which re-imports this file as ``__mp_main__``; a
light module top keeps that from re-importing Megatron (seconds per save on a small machine).
"""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("MEGATRON_LM_DIR"):
    # Appended, not prepended: `megatron` is a namespace package, so megatron.core resolves to the
    # installed megatron-core wheel (with its compiled dataset helpers); megatron.training is
    # pinned to the checkout (the megatron-core 0.19 wheel ships one of its own). Light: no
    # Megatron or torch import here.
    from mlfop_megatron.megatron_lm.compat import use_megatron_lm_checkout

    use_megatron_lm_checkout(os.environ["MEGATRON_LM_DIR"])


def install_cpu_stand_ins() -> None:
    """CPU/gloo test runs only: what Megatron-LM's training package needs beyond cpu_emulation.

    ``install_cpu_emulation()`` redirects ``device='cuda'`` allocations, streams, events and the
    CUDA RNG to the CPU. On top of that, Megatron-LM core_v0.16.1:

    * ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless called with
      ``allow_no_cuda=True`` (megatron/training/initialize.py:60); ``pretrain`` does not pass it,
      so we wrap the function ``megatron.training.training`` calls to pass it
      (``is_available()`` itself stays False so no other code takes a CUDA-only branch);
    * ``_initialize_distributed`` builds the model-parallel groups (initialize.py:360) and
      ``_set_random_seed`` seeds the tensor-parallel RNG tracker (initialize.py:422) only when
      ``torch.cuda.device_count() > 0``: we report one device (the CPU; ``set_device`` is
      already a no-op under the emulation);
    * ``_compile_dependencies`` calls ``megatron.legacy.fused_kernels.load`` (initialize.py:224),
      which runs ``$CUDA_HOME/bin/nvcc -V`` and compiles nothing else: made a no-op (core_v0.19
      has no ``megatron.legacy`` and loads no fused kernels there);
    * with TP > 1 ``validate_args`` reads the GPU architecture (arguments.py:928, to require
      CUDA_DEVICE_MAX_CONNECTIONS=1 before Blackwell): reported as Hopper (9).
    """
    import torch

    from mlfop_megatron.runtime.cpu_emulation import install_cpu_emulation

    install_cpu_emulation()
    torch.cuda.device_count = lambda: 1

    import megatron.training.arguments as arguments
    import megatron.training.training as training

    from mlfop_megatron.megatron_lm.compat import legacy_fused_kernels

    original = training.initialize_megatron

    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    training.initialize_megatron = initialize_megatron
    fused_kernels = legacy_fused_kernels()
    if fused_kernels is not None:
        fused_kernels.load = lambda args: None
    arguments.get_device_arch_version = lambda: 9


def use_prebuilt_dataset_helpers() -> None:
    """Skip Megatron-LM's runtime ``make`` of the dataset helpers when they are prebuilt.

    ``initialize_megatron`` runs ``megatron.core.datasets.utils.compile_helpers()`` (``make`` in
    the megatron/core/datasets directory) on rank 0 (initialize.py:190). The megatron-core wheel
    ships the compiled ``helpers_cpp`` extension but no Makefile, so that ``make`` fails and the
    run exits; a checkout has the Makefile and compiles there. When the extension imports, there
    is nothing to compile.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a checkout without a built extension: let Megatron-LM compile it
    import megatron.core.datasets.utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: Any = None,
    pg_collection: Any = None,
) -> Any:
    """A plain megatron-core GPTModel from Megatron-LM's parsed arguments."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    args = get_args()
    print_rank_0("building GPT model ...")
    if config is None:
        config = core_transformer_config_from_args(args)
    if args.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(
            args.num_experts, args.moe_grouped_gemm, args.qk_layernorm
        )
    else:
        spec = get_gpt_layer_local_spec(
            args.num_experts,
            args.moe_grouped_gemm,
            args.qk_layernorm,
            normalization=args.normalization,
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
    )


def model_config_from_args(args: Any) -> Any:
    """core_v0.19: the ``ModelConfig`` Megatron-LM builds the model from (its own scripts' way).

    ``--hybrid-layer-pattern`` selects a HybridModel (what 0.19 recommends over the deprecated
    GPTModel), otherwise a GPTModel with the same layer spec choice as :func:`model_provider`.
    """
    from megatron.training import argument_utils

    if getattr(args, "hybrid_layer_pattern", None):
        return argument_utils.hybrid_config_from_args(args)
    return argument_utils.gpt_config_from_args(args)


def _on_data_stage() -> bool:
    """Pipeline stages that read data: the first (tokens) and the last (labels, loss mask)."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_first_stage(
        ignore_virtual=True
    ) or parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def get_batch(data_iterator: Any) -> tuple[Any, ...]:
    """This rank's micro-batch: read on TP rank 0, broadcast over TP, sliced for CP."""
    from mlfop_megatron.megatron_lm.compat import batch_on_this_rank

    if not _on_data_stage():
        return None, None, None, None, None
    batch = batch_on_this_rank(data_iterator)
    keys = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
    return tuple(batch[k] for k in keys)


def loss_func(loss_mask: Any, output_tensor: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Summed token loss, token count and the 'lm loss' report (Megatron-LM's loss contract)."""
    import torch

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(data_iterator: Any, model: Any) -> tuple[Any, Any]:
    """One micro-batch forward; returns the per-token losses and the loss function."""
    from functools import partial

    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def _is_dataset_built_on_rank() -> bool:
    from megatron.core import parallel_state

    return _on_data_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples: list[int]) -> Any:
    """Megatron-LM's GPT datasets: mock data with --mock-data, else --data-path etc."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building {dataset_type.__name__} train/valid/test splits ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, _is_dataset_built_on_rank, config
    ).build()


# Megatron-LM calls the provider on every rank (each builds what _is_dataset_built_on_rank says).
train_valid_test_datasets_provider.is_distributed = True


def stopped_before_the_end() -> int | None:
    """Latest saved iteration if the run stopped before --train-iters (signal, time limit).

    Megatron-LM exits its training loop early on ``--exit-signal-handler`` (after saving a
    checkpoint), ``--exit-duration-in-mins`` or ``--exit-interval``; its tracker file
    ``latest_checkpointed_iteration.txt`` is written only after a save completed, so a
    checkpoint it names is complete and is what ``--load`` resumes from.
    """
    from megatron.training.global_vars import get_args

    args = get_args()
    if not args.save or not args.train_iters:
        return None
    tracker = os.path.join(args.save, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        return None
    with open(tracker) as fh:
        text = fh.read().strip()
    saved = int(text) if text.isdigit() else None
    return saved if saved is not None and saved < args.train_iters else None


def exit_for_requeue_if_stopped_early(exit_code: int) -> None:
    """Under slurm/pretrain.sbatch: a run that stopped early asks the batch script to requeue.

    Writes ``$MLFOP_REQUEUE_MARKER`` (rank 0) and exits with the requeue code, as the digits
    demo does; the requeued job then resumes with ``--load``.
    """
    from mlfop_megatron.launch.preemption import REQUEUE_EXIT_CODE

    saved = stopped_before_the_end() if exit_code == 0 else None
    if saved is None:
        raise SystemExit(exit_code)
    marker = os.environ.get("MLFOP_REQUEUE_MARKER")
    if marker and os.environ.get("RANK", "0") == "0":
        with open(marker, "w") as fh:
            fh.write(f"{saved}\n")
    print(f"[pretrain_gpt_mlfop] stopped at iteration {saved}: exiting for requeue", flush=True)
    raise SystemExit(REQUEUE_EXIT_CODE)


def main() -> None:
    """Install ML-FOP-SOAP into Megatron-LM and run its pretrain loop on the GPT model."""
    from mlfop_megatron.megatron_lm.compat import backport_typing_override

    backport_typing_override()  # Megatron-LM 0.19 on Python 3.11 (no-op otherwise)
    if os.environ.get("RANK", "0") != "0":
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    if os.environ.get("MLFOP_CPU_EMULATION", "0") == "1":
        install_cpu_stand_ins()
    use_prebuilt_dataset_helpers()

    import megatron.core
    import megatron.training
    from megatron.core.enums import ModelType

    from mlfop_megatron.megatron_lm import add_mlfop_args, install
    from mlfop_megatron.megatron_lm.compat import run_pretrain

    # MLFOP_RUNTIME_INSTALL=0: a Megatron-LM patched with patches/ needs no runtime install.
    if os.environ.get("MLFOP_RUNTIME_INSTALL", "1") == "1":
        install()
    if os.environ.get("RANK", "0") == "0":
        where = {
            m.__name__: os.path.dirname(m.__file__) for m in (megatron.training, megatron.core)
        }
        print(f"[pretrain_gpt_mlfop] using {where}", flush=True)
    try:
        run_pretrain(  # megatron.training.pretrain, called as this Megatron-LM version expects
            train_valid_test_datasets_provider,
            model_provider,
            ModelType.encoder_or_decoder,
            forward_step,
            extra_args_provider=add_mlfop_args,
            model_config_from_args=model_config_from_args,
        )
    except SystemExit as stop:  # Megatron-LM's early exit (signal, time limit) calls sys.exit
        exit_for_requeue_if_stopped_early(stop.code or 0)


if __name__ == "__main__":
    main()
