"""Single home for every private or version-dependent megatron-core access.

The plugin supports megatron-core 0.16 to 0.19 (0.16.1 is what pip resolves on Python 3.11;
0.17+ need Python >= 3.12). Anything that reaches into a private module, a leading-underscore
name or behaviour that changed between releases must be imported from here, so that a new
megatron-core release means editing one file. Public, documented entry points
(``megatron.core.parallel_state``, ``megatron.core.distributed.DistributedDataParallel``, ...)
may be imported directly elsewhere.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

MIN_VERSION: tuple[int, int, int] = (0, 16, 1)
MAX_VERSION_EXCLUSIVE: tuple[int, int, int] = (0, 20, 0)

# Message logged by megatron's CudaRNGStatesTracker.fork (tensor_parallel/random.py, 0.16-0.19).
_RNG_FORK_WARNING = "CPU RNG state changed within GPU RNG context"
_RNG_LOGGER = "megatron.core.tensor_parallel.random"


def _parse_version(text: str) -> tuple[int, int, int]:
    """Parse 'X.Y.Z[suffix]' into a comparable (X, Y, Z) tuple without needing packaging."""
    nums = [int(n) for n in re.findall(r"\d+", text)[:3]]
    return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def megatron_core_version() -> tuple[int, int, int]:
    """Installed megatron-core version as (major, minor, patch); raises if not installed."""
    try:
        text = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        from megatron.core import package_info  # source checkout without dist metadata

        text = package_info.__version__
    return _parse_version(text)


def check_megatron_core_version(strict: bool = False) -> tuple[int, int, int]:
    """Warn (or raise when strict) if megatron-core is outside the supported range."""
    version = megatron_core_version()
    if not MIN_VERSION <= version < MAX_VERSION_EXCLUSIVE:
        msg = (
            f"megatron-core {'.'.join(map(str, version))} is outside the supported range "
            f">={'.'.join(map(str, MIN_VERSION))},<{'.'.join(map(str, MAX_VERSION_EXCLUSIVE))}"
        )
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, stacklevel=2)
    return version


def rng_module() -> Any:
    """Megatron's tensor_parallel.random module (home of the private CUDA RNG state helpers)."""
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom


def patch_rng_state_functions(
    get_state: Callable[..., torch.Tensor], set_state: Callable[..., None]
) -> Callable[[], None]:
    """Replace megatron's private _get/_set_cuda_rng_state; returns a function that restores them.

    CudaRNGStatesTracker.fork/add and the activation-checkpoint code look these names up as
    module globals at call time, so rebinding the module attributes is sufficient.
    """
    mod = rng_module()
    old_get, old_set = mod._get_cuda_rng_state, mod._set_cuda_rng_state
    mod._get_cuda_rng_state = get_state
    mod._set_cuda_rng_state = set_state

    def restore() -> None:
        mod._get_cuda_rng_state = old_get
        mod._set_cuda_rng_state = old_set

    return restore


class _DropMessage(logging.Filter):
    """Logging filter that drops records whose message starts with a fixed prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_rng_fork_warning() -> Callable[[], None]:
    """Drop the tracker's 'CPU RNG state changed' warning (expected when cuda RNG == CPU RNG)."""
    logger = logging.getLogger(_RNG_LOGGER)
    flt = _DropMessage(_RNG_FORK_WARNING)
    logger.addFilter(flt)
    return lambda: logger.removeFilter(flt)


def reset_rng_tracker() -> None:
    """Drop megatron's global RNG tracker so the next seeding call builds a fresh one."""
    mod = rng_module()
    if hasattr(mod, "initialize_rng_tracker"):
        mod.initialize_rng_tracker(force_reset=True)
    else:  # older layouts kept only the module global
        mod._CUDA_RNG_STATE_TRACKER = mod.CudaRNGStatesTracker()


def ddp_bucket_groups(ddp_model: Any) -> list[Any]:
    """All bucket groups (dense + expert) of a megatron DistributedDataParallel instance."""
    return list(ddp_model.bucket_groups) + list(ddp_model.expert_parallel_bucket_groups)


def ddp_buffers(ddp_model: Any) -> list[Any]:
    """All param-and-grad buffers (dense + expert) of a megatron DistributedDataParallel."""
    return list(ddp_model.buffers) + list(ddp_model.expert_parallel_buffers)


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the current autograd backward pass finishes (torch private API)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def main_grad(param: torch.Tensor) -> torch.Tensor:
    """``param.main_grad``: the gradient buffer view Megatron's DDP attaches to ``param``."""
    return param.main_grad  # type: ignore[attr-defined]  # Megatron's attribute: not in torch's stubs


def ddp_params_with_grad(ddp_model: Any) -> list[Any]:
    """Trainable params registered with a megatron DistributedDataParallel's grad buffers."""
    return list(ddp_model.params_with_grad)


@functools.cache
def separate_grad_norm_groups() -> tuple[str, ...]:
    """Param groups this megatron-core norms and clips apart from the rest (0.19: ``("mtp",)``).

    0.19 tags multi-token-prediction params ``grad_norm_group = "mtp"``; older releases have
    no such groups. Fixed for the process (read once: the step asks per param).
    """
    try:
        module = importlib.import_module("megatron.core.optimizer.optimizer")
    except ImportError:
        return ()
    return tuple(getattr(module, "SEPARATE_GRAD_NORM_GROUPS", ()))


def grad_norm_group_of(param: Any) -> str | None:
    """The separately normed and clipped group ``param`` is tagged into (None: the main norm).

    Tags this megatron-core does not register are refused as Megatron refuses them; releases
    without such groups (< 0.19) ignore the attribute, as Megatron does.
    """
    group = getattr(param, "grad_norm_group", None)
    registered = separate_grad_norm_groups()
    if group is None or not registered:
        return None
    if group not in registered:
        raise ValueError(
            f"a parameter is tagged grad_norm_group={group!r}, which megatron-core "
            f"{'.'.join(map(str, megatron_core_version()))} does not register (it knows "
            f"{registered}): register the group in megatron.core.optimizer.optimizer."
            "SEPARATE_GRAD_NORM_GROUPS or remove the tag"
        )
    return group


def optimizer_grads_for_norm(optimizer: Any, group: str | None = None) -> list[torch.Tensor]:
    """Grads a Megatron optimizer counts in one of its norms (no shared or TP-duplicate params).

    ``group`` None: the main norm; else that separately clipped group (0.19: "mtp"). 0.16-0.18
    call it ``get_main_grads_for_grad_norm()`` and have no separate groups; 0.19 renamed it to
    ``get_grads_for_grad_norm(grad_norm_group=None)``, which leaves the tagged params out.
    """
    if not hasattr(optimizer, "get_grads_for_grad_norm"):
        return [] if group is not None else list(optimizer.get_main_grads_for_grad_norm())
    if group is None:
        return list(optimizer.get_grads_for_grad_norm())
    return list(optimizer.get_grads_for_grad_norm(group))


def _resolve(module: str, *names: str) -> Any:
    """``module.names[0].names[1]...``, failing with the full dotted name that is missing."""
    obj: Any = importlib.import_module(module)
    path = module
    for name in names:
        path = f"{path}.{name}"
        if not hasattr(obj, name):
            raise AttributeError(f"{path} does not exist in this megatron-core / torch")
        obj = getattr(obj, name)
    return obj


def _grads_for_norm_name() -> str:
    """The MegatronOptimizer method optimizer_grads_for_norm() calls on this version."""
    return (
        "get_grads_for_grad_norm"
        if megatron_core_version() >= (0, 19, 0)
        else "get_main_grads_for_grad_norm"
    )


_TP_RANDOM = "megatron.core.tensor_parallel.random"
_DDP = "megatron.core.distributed.distributed_data_parallel"
_BUFFER = "megatron.core.distributed.param_and_grad_buffer"
_FP8 = "megatron.core.fp8_utils"

# Every private or version-dependent megatron-core (and torch) name this package relies on, as
# name -> resolver. tests/test_compat.py resolves each on the installed megatron-core, so a
# release that moves one fails there, by name, instead of deep inside a training run. (The DDP
# instance attributes behind ddp_bucket_groups / ddp_buffers are checked there on a real DDP.)
PRIVATE_API_PROBES: dict[str, Callable[[], Any]] = {
    f"{_TP_RANDOM}._get_cuda_rng_state": lambda: _resolve(_TP_RANDOM, "_get_cuda_rng_state"),
    f"{_TP_RANDOM}._set_cuda_rng_state": lambda: _resolve(_TP_RANDOM, "_set_cuda_rng_state"),
    f"{_TP_RANDOM}.CudaRNGStatesTracker": lambda: _resolve(_TP_RANDOM, "CudaRNGStatesTracker"),
    "DistributedDataParallel._make_backward_post_hook": lambda: _resolve(
        _DDP, "DistributedDataParallel", "_make_backward_post_hook"
    ),
    "_ParamAndGradBucketGroup.reset": lambda: _resolve(
        _BUFFER, "_ParamAndGradBucketGroup", "reset"
    ),
    "torch.autograd Variable._execution_engine.queue_callback": lambda: _resolve(
        "torch.autograd", "Variable", "_execution_engine", "queue_callback"
    ),
    "MegatronOptimizer grads for the global norm": lambda: _resolve(
        "megatron.core.optimizer", "MegatronOptimizer", _grads_for_norm_name()
    ),
    f"{_FP8}.quantize_param_shard": lambda: _resolve(_FP8, "quantize_param_shard"),
    f"{_FP8}.post_all_gather_processing": lambda: _resolve(_FP8, "post_all_gather_processing"),
    f"{_FP8}.is_float8tensor": lambda: _resolve(_FP8, "is_float8tensor"),
    f"{_FP8}.dequantize_fp8_tensor": lambda: _resolve(_FP8, "dequantize_fp8_tensor"),
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32": lambda: _resolve(
        "megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"
    ),
}


def define_moe_te_general_gemm_without_te() -> Callable[[], None]:
    """CPU runs: give moe_utils the ``te_general_gemm = None`` it lacks without TE.

    megatron-core 0.16.1's router gating reads the module global ``te_general_gemm``, which
    moe_utils binds only when TransformerEngine imports (NameError on CPU). Returns a restorer.
    """
    from megatron.core.transformer.moe import moe_utils

    if "te_general_gemm" in moe_utils.__dict__:
        return lambda: None
    moe_utils.te_general_gemm = None
    return lambda: moe_utils.__dict__.pop("te_general_gemm", None)


def _clip_grad_by_total_norm_fp32_any_device(
    parameters: Any, max_norm: float, total_norm: Any, use_decoupled_grad: bool = False
) -> None:
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its ``torch.cuda.FloatTensor`` assert.

    The same arithmetic as its local (no apex / TE) path: every fp32 grad scaled in place by
    ``max_norm / (total_norm + 1e-6)`` when that is below 1 (clamped to 1 for a tensor norm).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in params if getattr(p, attr, None) is not None]
    assert all(g.dtype in (torch.float32, torch.bfloat16) for g in grads)
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        coeff = clip_coeff.clamp_max(1.0)
        for g in grads:
            g.copy_(g * coeff)
    elif clip_coeff < 1.0:
        for g in grads:
            g.copy_(g * clip_coeff)


def clip_grads_on_cpu() -> Callable[[], None]:
    """CPU runs: let Megatron's own optimizers clip CPU grads. Returns a restorer.

    ``MegatronOptimizer.step`` (``megatron/core/optimizer/optimizer.py``, 0.16-0.19) clips
    through ``clip_grad_by_total_norm_fp32``, which asserts ``grad.type() ==
    'torch.cuda.FloatTensor'``: with clipping on, Megatron's FP32Optimizer fails on CPU (the
    digits demo's peers, Megatron's SOAP and Muon, go through it). The name bound in
    ``optimizer.py`` is replaced by the same scaling without the assert.
    """
    module = importlib.import_module("megatron.core.optimizer.optimizer")
    name = "clip_grad_by_total_norm_fp32"
    old = getattr(module, name)
    setattr(module, name, _clip_grad_by_total_norm_fp32_any_device)
    return lambda: setattr(module, name, old)
