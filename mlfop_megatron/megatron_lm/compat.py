"""Everything that differs between the supported Megatron-LM releases, in one place.

Supported: Megatron-LM core_v0.16.x (tested: core_v0.16.1) and core_v0.19.x (tested:
core_v0.19.0). What changed in ``megatron/training`` between them, as far as we use it:

* ``pretrain``: 0.16 is ``pretrain(datasets_provider, model_provider, model_type, forward_step,
  extra_args_provider=..., args_defaults=...)`` and parses the command line itself (in
  ``initialize_megatron``). 0.19 is ``pretrain(cfg_container, datasets_provider, model_type,
  forward_step, model_provider=None, ...)``: the caller parses first
  (``arguments.parse_and_validate_args(extra_args_provider, args_defaults=...)``), builds a
  ``PretrainConfigContainer`` (``argument_utils.pretrain_cfg_container_from_args(args,
  model_cfg)``) and passes it. With a ``ModelConfig`` (``GPTModelConfig`` /
  ``HybridModelConfig``) the model is built by its builder
  (``megatron/training/models/dist_utils.py``), not by ``training.get_model``.
  :func:`run_pretrain` hides the difference.
* The DDP class: 0.16 reads ``training.DDP`` in ``get_model``; 0.19 reads it there and, on the
  ModelConfig builder path, as ``models.dist_utils.DistributedDataParallel`` in ``_ddp_wrap``:
  :func:`ddp_class_slots`.
* ``get_megatron_optimizer_config``: 0.16 builds an ``AdamOptimizerConfig`` for
  ``--optimizer adam``; 0.19 one ``OptimizerConfig`` for every optimizer. Both take
  ``args.optimizer`` from the namespace, so calling it with ``optimizer='adam'`` works on both.
* ``validate_args``: 0.19 treats every optimizer other than adam/sgd as an "emerging
  optimizer" and turns ``--use-distributed-optimizer`` into
  ``use_layer_wise_distributed_optimizer`` (arguments.py:1669 at core_v0.19.0); see
  :func:`distributed_optimizer_requested`.
* ``megatron.legacy`` is gone in 0.19 (``initialize_megatron`` no longer loads
  ``megatron.legacy.fused_kernels``): :func:`legacy_fused_kernels`.
* Packaging: the megatron-core 0.19.2 wheel also ships ``megatron/training`` (0.16.1's has only
  ``megatron/core``), so a checkout appended to ``sys.path`` no longer provides it:
  :func:`use_megatron_lm_checkout` pins ``megatron.training`` to the checkout.
* Python: 0.19's ``megatron/training/models/{gpt,hybrid}.py`` import ``typing.override``
  (Python 3.12+; Megatron-LM 0.19 declares Python >= 3.12): :func:`backport_typing_override`
  supplies ``typing_extensions.override`` on Python 3.11.
* Batch helpers: 0.16's ``megatron.training.utils.get_batch_on_this_tp_rank(data_iterator)``
  reads and broadcasts the micro-batch; 0.19 moved them to ``megatron.core.utils`` with
  explicit arguments (the caller reads the batch on TP rank 0): :func:`batch_on_this_rank`.
* Unchanged and relied on: ``get_model``, ``get_megatron_optimizer(config, model_chunks,
  **kw)``, ``setup_model_and_optimizer``, ``training_log`` (iteration is its 4th argument),
  ``arguments.add_megatron_arguments`` / ``parse_args(extra_args_provider)`` /
  ``validate_args``.

Megatron-LM's training package is not on PyPI and its ``megatron.core`` usually comes from the
megatron-core wheel, so the running code detects features (:func:`pretrain_takes_config_container`)
rather than versions; :func:`checkout_tag` reads a checkout's version for tests and tools.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import inspect
import re
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

# (major, minor) of a checkout's megatron/core/package_info.py -> the tag we test against.
# The core_v0.19.0 tag's package_info.py already says 0.19.1, so match on major.minor only.
TESTED_TAGS: dict[tuple[int, int], str] = {(0, 16): "core_v0.16.1", (0, 19): "core_v0.19.0"}
SUPPORTED_MEGATRON_LM = (
    "core_v0.16.x (tested: core_v0.16.1) and core_v0.19.x (tested: core_v0.19.0)"
)


def checkout_version(source: str | Path) -> tuple[int, int, int] | None:
    """(major, minor, patch) from a Megatron-LM checkout's megatron/core/package_info.py."""
    path = Path(source) / "megatron" / "core" / "package_info.py"
    if not path.is_file():
        return None
    text = path.read_text()
    parts = [re.search(rf"^{name}\s*=\s*(\d+)", text, re.M) for name in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return tuple(int(p.group(1)) for p in parts)  # type: ignore[union-attr,return-value]


def checkout_tag(source: str | Path) -> str | None:
    """The tested tag matching a checkout's release line (None: unknown or unsupported)."""
    version = checkout_version(source)
    return TESTED_TAGS.get(version[:2]) if version else None


def backport_typing_override() -> None:
    """``typing.override`` on Python < 3.12 (0.19's training package imports it)."""
    if not hasattr(typing, "override"):
        from typing_extensions import override

        typing.override = override  # type: ignore[attr-defined]


class _CheckoutTrainingFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.training`` in one checkout, ahead of a wheel that ships its own."""

    def __init__(self, package_dir: Path) -> None:
        self.package_dir = package_dir

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "megatron.training":
            return None
        return importlib.util.spec_from_file_location(
            fullname,
            self.package_dir / "__init__.py",
            submodule_search_locations=[str(self.package_dir)],
        )


def use_megatron_lm_checkout(source: str | Path) -> None:
    """Take Megatron-LM's training code from ``source``, megatron-core from the installed wheel.

    ``source`` is appended to ``sys.path`` (``megatron`` is a namespace package: megatron.core,
    with its compiled dataset helpers, stays the wheel's; ``megatron.legacy``/``rl``/... come
    from the checkout), and ``megatron.training`` is pinned to the checkout even where the wheel
    has one (megatron-core 0.19.2). Cheap: imports nothing of Megatron. Call before anything
    imports ``megatron.training``.
    """
    source = Path(source).resolve()
    if str(source) not in sys.path:
        sys.path.append(str(source))
    package_dir = source / "megatron" / "training"
    if package_dir.is_dir() and not any(
        isinstance(f, _CheckoutTrainingFinder) and f.package_dir == package_dir
        for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _CheckoutTrainingFinder(package_dir))
    backport_typing_override()


def pretrain_takes_config_container(pretrain: Any = None) -> bool:
    """True for Megatron-LM 0.19+: ``pretrain(cfg_container, ...)`` instead of providers first."""
    if pretrain is None:
        pretrain = importlib.import_module("megatron.training.training").pretrain
    params = list(inspect.signature(pretrain).parameters)
    return bool(params) and params[0] == "cfg_container"


def run_pretrain(
    train_valid_test_dataset_provider: Any,
    model_provider: Any,
    model_type: Any,
    forward_step_func: Any,
    *,
    extra_args_provider: Any = None,
    args_defaults: dict[str, Any] | None = None,
    model_config_from_args: Any = None,
    **kwargs: Any,
) -> Any:
    """Megatron-LM's ``pretrain`` called the way this checkout's version expects.

    0.16: as ``pretrain(providers..., extra_args_provider=, args_defaults=)``. 0.19: parse and
    validate the command line, build the config container and call ``pretrain(cfg, ...)``.
    ``model_config_from_args(args)`` (0.19 only) may return a ``ModelConfig`` (e.g.
    ``argument_utils.gpt_config_from_args(args)``); the model is then built by its builder, as
    Megatron-LM's own pretrain_gpt.py / pretrain_hybrid.py do, and ``model_provider`` is unused.
    Without it (or when it returns None) ``model_provider`` builds the model via ``get_model``.
    """
    training = importlib.import_module("megatron.training.training")
    if not pretrain_takes_config_container(training.pretrain):
        return training.pretrain(
            train_valid_test_dataset_provider,
            model_provider,
            model_type,
            forward_step_func,
            extra_args_provider=extra_args_provider,
            args_defaults=args_defaults or {},
            **kwargs,
        )
    arguments = importlib.import_module("megatron.training.arguments")
    argument_utils = importlib.import_module("megatron.training.argument_utils")
    args = arguments.parse_and_validate_args(
        extra_args_provider=extra_args_provider, args_defaults=args_defaults or {}
    )
    model_cfg = model_config_from_args(args) if model_config_from_args is not None else None
    cfg = argument_utils.pretrain_cfg_container_from_args(args, model_cfg)
    return training.pretrain(
        cfg,
        train_valid_test_dataset_provider,
        model_type,
        forward_step_func,
        model_provider=None if model_cfg is not None else model_provider,
        **kwargs,
    )


def ddp_class_slots() -> list[tuple[ModuleType, str]]:
    """(module, attribute) pairs from which Megatron-LM takes the DDP class at call time."""
    slots = [(importlib.import_module("megatron.training.training"), "DDP")]
    try:  # 0.19+: ModelConfig builders wrap the chunks in models/dist_utils.py:_ddp_wrap
        dist_utils = importlib.import_module("megatron.training.models.dist_utils")
    except ImportError:
        return slots
    if hasattr(dist_utils, "DistributedDataParallel"):
        slots.append((dist_utils, "DistributedDataParallel"))
    return slots


def distributed_optimizer_requested(args: argparse.Namespace) -> bool:
    """``--use-distributed-optimizer`` was given (0.19 renames it for non-Adam optimizers)."""
    return bool(
        getattr(args, "use_distributed_optimizer", False)
        or getattr(args, "use_layer_wise_distributed_optimizer", False)
    )


def legacy_fused_kernels() -> ModuleType | None:
    """Megatron-LM's fused-kernel loader module, or None.

    ``megatron.legacy.fused_kernels`` (0.16: ``initialize_megatron`` calls its ``load``);
    None where Megatron-LM has no ``megatron.legacy`` (0.19).
    """
    try:
        return importlib.import_module("megatron.legacy.fused_kernels")
    except ImportError:
        return None


def batch_on_this_rank(data_iterator: Any) -> dict[str, Any]:
    """This rank's GPT micro-batch, as Megatron-LM's pretrain_gpt builds it.

    This rank's GPT micro-batch (tokens, labels, loss_mask, attention_mask, position_ids):
    read on TP rank 0, broadcast over TP, sliced for context parallelism. No packed sequences,
    hybrid context parallelism or multi-token prediction.
    """
    training_utils = importlib.import_module("megatron.training.utils")
    if hasattr(training_utils, "get_batch_on_this_tp_rank"):  # 0.16
        return training_utils.get_batch_on_this_cp_rank(
            training_utils.get_batch_on_this_tp_rank(data_iterator)
        )
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training.global_vars import get_args

    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch: dict[str, Any] = {}
    if tp_rank == 0:
        data = next(data_iterator)
        for key in ("tokens", "labels", "loss_mask", "attention_mask", "position_ids"):
            value = data.get(key)
            batch[key] = value.cuda(non_blocking=True) if value is not None else None
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    return get_batch_on_this_cp_rank(
        batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group()
    )
