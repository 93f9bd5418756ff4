"""FP8 (TransformerEngine): fp32 main weights, main_grad folding, DP-consistent requantization.

Two FP8 modes reach the optimizer:

* **fp8 compute, bf16 weights** (``TransformerConfig.fp8`` set, ``fp8_param=False``): TE casts
  the bf16 weights to fp8 inside each GEMM. For the optimizer these are ordinary bf16 params
  (fp32 main weights in the SOAP state, see ``core/soap.py``); only the checks below apply.
* **fp8 primary weights** (``fp8_param=True``, ``te.fp8_model_init``): the model params are
  TE ``QuantizedTensor``/``Float8Tensor`` objects (``megatron.core.fp8_utils.is_float8tensor``)
  whose storage is fp8 bytes plus a scale. They cannot be updated in place. For each such
  param, :class:`QuantizedParamShadows` gives the SOAP engine a plain stand-in tensor of the
  param's nominal dtype (the "shadow"). The engine's owners keep **fp32 main weights** for the
  blocks they own (forced even when the nominal dtype is fp32) initialised from TE's
  high-precision init value (``get_high_precision_init_val``, as Megatron's distributed optimizer
  does) or else from the dequantized param. Each step: shadows get storage (the dequantized
  params), owners write their updated blocks, the existing owner broadcast fills every rank's
  shadow, and every data-parallel rank requantizes its full param from the identical values
  with ``megatron.core.fp8_utils.quantize_param_shard(params, values, [0]*n, dp_group)``
  (TE's ``cast_master_weights_to_fp8``: delayed scaling updates ``amax``, current scaling
  computes it, and both all-reduce it with MAX over the DP group, so scale, scale_inv and amax
  agree on every rank), followed by ``fp8_utils.post_all_gather_processing`` which rebuilds the
  transpose (Hopper) / columnwise (blockwise recipe) data TE's GEMMs need, exactly as
  Megatron's DDP does after its fp8 param all-gather. The shadow storage is then released, so
  the steady-state memory is fp8 params + fp32 main weights of owned blocks (1/DP each); the
  full-size shadows exist only during the step. This is Megatron's non-distributed-optimizer
  layout with the main weights sharded by block instead of replicated.

Gradients (main_grad and fused wgrad accumulation), checked against megatron-core 0.16.1
(``distributed/distributed_data_parallel.py``, ``param_and_grad_buffer.py``) and
TransformerEngine 2.x (``pytorch/module/linear.py``, ``layernorm_linear.py``):

* Megatron's DDP gives every trainable param (fp8 params included; their *grad* dtype is fp32
  with ``grad_reduce_in_fp32``) a ``main_grad`` view into an fp32 grad buffer. Without a
  distributed optimizer the *param* buffer is not created, so fp8 params keep their own storage.
* With ``gradient_accumulation_fusion`` TE's linear layers are built with
  ``fuse_wgrad_accumulation=True``: the wgrad GEMM writes into ``weight.main_grad`` directly
  (``out=main_grad``, ``accumulate=True`` except when TE is told ``is_first_microbatch=True``,
  when it overwrites; ``overwrite_main_grad`` also forces overwriting), sets
  ``weight.grad_added_to_main_grad = True`` and returns a dummy wgrad. Megatron's backward
  post-hook then skips ``main_grad.add_(grad)`` (it checks ``grad_added_to_main_grad``), drops the
  dummy grad and marks the param ready for its bucket. Without fusion the hook adds ``grad``.
  Either way, when the hook for a param fires, that micro-step's gradient is in ``main_grad``.
* ``FoldingDistributedDataParallel`` makes each level boundary a sync point (its end-of-backward
  callback runs after every hook of that backward pass): the buckets are all-reduced (averaged
  over DP), the optimizer folds ``main_grad`` of the SOAP params and then zeroes those slices
  in place. The next micro-step's wgrad GEMM accumulates onto the zeroed buffer (or overwrites
  it: both give the same), so at the next boundary ``main_grad`` holds exactly that level's
  sum. That is the "difference of main_grad snapshots at level boundaries" with no snapshot
  copy; it needs only that nothing else rewrites ``main_grad`` between micro-steps, which holds
  for the non-distributed DDP path (``zero_grad_buffer`` runs once per iteration, before the
  first micro-step). The zeroing happens outside backward, so TE's
  ``grad_added_to_main_grad`` flag (reset only by ``zero_grad_buffer``) does not matter.
* Not covered: TE's ``delay_wgrad_compute`` (wgrad GEMMs deferred past the backward pass would
  land in the next level) and Megatron FSDP (lazily created main_grad); both are rejected by the
  factory's existing checks (distributed optimizer / FSDP unsupported) or must stay off.

TransformerEngine is imported lazily: this module imports without it, and without TE no param
can be an fp8 tensor. :func:`check_fp8_support` raises a clear error when a config asks for
FP8 and TE or a CUDA GPU is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist

TE_HINT = (
    "install TransformerEngine on a CUDA machine (pip install 'mlfop_megatron[te]'), or train "
    "without FP8: TransformerConfig(fp8=None, fp8_param=False) and OptimizerConfig("
    "fp8_recipe=None), with bf16=True for bf16 training"
)


# ----------------------------------------------------------------------------- checks
def _te_importable() -> bool:
    """True if TransformerEngine's PyTorch bindings import (needs a CUDA build of TE)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - any failure (missing, no CUDA libs) means unusable
        return False
    return True


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def fp8_requests(
    transformer_config: Any = None,
    optimizer_config: Any = None,
    params: Sequence[torch.Tensor] = (),
) -> list[str]:
    """The settings that ask for FP8, as 'Option=value' strings (empty: FP8 not requested)."""
    out = []
    if transformer_config is not None:
        if getattr(transformer_config, "fp8", None):
            out.append(f"TransformerConfig.fp8={transformer_config.fp8!r}")
        if getattr(transformer_config, "fp8_param", False):
            out.append("TransformerConfig.fp8_param=True")
    # OptimizerConfig.fp8_recipe alone is not a request: Megatron-LM copies the
    # TransformerConfig default ('delayed') into it on every run, FP8 or not.
    if out and optimizer_config is not None and getattr(optimizer_config, "fp8_recipe", None):
        out.append(f"OptimizerConfig.fp8_recipe={optimizer_config.fp8_recipe!r}")
    n_fp8 = sum(1 for p in params if is_quantized(p))
    if n_fp8:
        out.append(f"{n_fp8} FP8 (TransformerEngine QuantizedTensor) model params")
    return out


def missing_fp8_requirements() -> list[str]:
    """What this machine lacks for FP8 (TransformerEngine, a CUDA GPU); empty when usable."""
    missing = []
    if not _te_importable():
        missing.append("TransformerEngine (transformer_engine.pytorch) is not installed")
    if not _cuda_available():
        missing.append("no CUDA GPU is available (torch.cuda.is_available() is False)")
    return missing


def check_fp8_support(
    transformer_config: Any = None,
    optimizer_config: Any = None,
    params: Sequence[torch.Tensor] = (),
) -> bool:
    """Raise RuntimeError if FP8 is requested without TransformerEngine or a CUDA GPU.

    Returns True when FP8 is requested (and usable), False when it is not requested.
    """
    requests = fp8_requests(transformer_config, optimizer_config, params)
    if not requests:
        return False
    configs_only = fp8_requests(transformer_config, optimizer_config)
    if not configs_only and not getattr(_BACKEND, "requires_transformer_engine", True):
        return True  # quantized params of a non-TE backend (the CPU emulation in tests)
    missing = missing_fp8_requirements()
    if missing:
        raise RuntimeError(
            f"FP8 training was requested ({', '.join(requests)}) but "
            f"{' and '.join(missing)}; FP8 needs TransformerEngine's CUDA kernels: {TE_HINT}"
        )
    return True


# ---------------------------------------------------------------------------- backend
class QuantizedParamBackend(Protocol):
    """How the optimizer reads and writes quantized params (TransformerEngine by default)."""

    def is_quantized(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a quantized (FP8) tensor."""

    def initial_value(self, param: torch.Tensor) -> torch.Tensor:
        """Best high-precision value at start (TE's high-precision init value if kept)."""

    def current_value(self, param: torch.Tensor) -> torch.Tensor:
        """The param dequantized, in its nominal dtype (a new tensor)."""

    def requantize(
        self,
        params: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        group: dist.ProcessGroup | None,
    ) -> None:
        """params[i] <- quantize(values[i]) with scales agreed over ``group``; refresh caches."""


class TransformerEngineBackend:
    """FP8 params of TransformerEngine, through megatron.core.fp8_utils (lazy imports)."""

    requires_transformer_engine = True

    def is_quantized(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is a TransformerEngine Float8Tensor."""
        # Without TE nothing can be an fp8 tensor; do not import fp8_utils for plain tensors
        # of a CPU run more than needed (it is cheap, but it probes for TE).
        if type(param) in (torch.Tensor, torch.nn.Parameter):
            return False
        from megatron.core.fp8_utils import is_float8tensor

        return is_float8tensor(param)

    def initial_value(self, param: torch.Tensor) -> torch.Tensor:
        """TE's kept high-precision init value (then freed), else the dequantized param."""
        getter = getattr(param, "get_high_precision_init_val", None)
        value = getter() if getter is not None else None
        if value is None:
            return self.current_value(param)
        # Kept on the CPU by te.fp8_model_init(preserve_high_precision_init_val=True); not
        # needed once the main weights exist (Megatron's distributed optimizer clears it too).
        value = value.to(device=param.device, dtype=param.dtype)
        param.clear_high_precision_init_val()  # type: ignore[attr-defined]  # TE's FP8 tensor
        return value

    def current_value(self, param: torch.Tensor) -> torch.Tensor:
        """The param dequantized by megatron.core.fp8_utils."""
        from megatron.core.fp8_utils import dequantize_fp8_tensor

        return dequantize_fp8_tensor(param.detach())

    def requantize(self, params, values, group) -> None:
        """Quantize ``values`` into ``params`` with amax agreed over ``group`` (TE's kernels)."""
        from megatron.core.fp8_utils import post_all_gather_processing, quantize_param_shard

        params = list(params)
        if not params:
            return
        # Every rank holds the full new values: each param is one "shard" at offset 0. TE
        # all-reduces amax with MAX over ``group`` and recomputes scale / scale_inv.
        quantize_param_shard(params, [v.reshape(-1) for v in values], [0] * len(params), group)
        # Transpose (Hopper, per-tensor scaling) / columnwise data (blockwise) for the GEMMs.
        post_all_gather_processing(params)


_BACKEND: QuantizedParamBackend = TransformerEngineBackend()


def get_backend() -> QuantizedParamBackend:
    """The installed quantized-param backend."""
    return _BACKEND


def set_backend(backend: QuantizedParamBackend | None) -> QuantizedParamBackend:
    """Install a backend (tests emulate FP8 on CPU with one); None restores TE. Returns the old."""
    global _BACKEND
    old = _BACKEND
    _BACKEND = backend if backend is not None else TransformerEngineBackend()
    return old


def is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` is a quantized (FP8) param the optimizer must requantize."""
    return _BACKEND.is_quantized(param)


# ---------------------------------------------------------------------------- shadows
def _copy_parallel_attributes(dst: torch.Tensor, src: torch.Tensor) -> None:
    for name in ("tensor_model_parallel", "partition_dim", "partition_stride", "shared"):
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


class QuantizedParamShadows:
    """High-precision stand-ins for quantized params inside an optimizer (see module docstring).

    ``substitute(params)`` returns the list to hand to the SOAP engines (shadows in place of
    quantized params); ``model_param(t)`` maps a shadow back to its model param (for
    ``main_grad``). Around each step: ``materialize()`` gives every shadow the current
    dequantized value, the engines step and broadcast into the shadows, ``commit()``
    requantizes the model params from them and frees the shadow storage.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
    ) -> None:
        self.backend = get_backend()
        self.group = group
        self.model_params: list[torch.Tensor] = []
        self.shadows: list[torch.Tensor] = []
        self._by_shadow: dict[int, torch.Tensor] = {}
        self._by_param: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for p in params:
                if not self.backend.is_quantized(p):
                    continue
                if not getattr(p, "allreduce", True):
                    raise ValueError(
                        "FP8 primary weights of MoE expert params are not supported by "
                        "ML-FOP-SOAP: their scales would be agreed over the dense data-parallel "
                        "group, not the expert-data-parallel group that holds an expert's "
                        "replicas. Keep expert weights in bf16 (fp8_param_gather=False, or "
                        "exclude the experts from FP8 primary weights)"
                    )
                shadow = self.backend.initial_value(p).detach().clone()
                _copy_parallel_attributes(shadow, p)
                self.model_params.append(p)
                self.shadows.append(shadow)
                self._by_shadow[id(shadow)] = p
                self._by_param[id(p)] = shadow

    def __len__(self) -> int:
        return len(self.shadows)

    def substitute(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``params`` with every quantized param replaced by its high-precision shadow."""
        return [self._by_param.get(id(p), p) for p in params]

    def is_shadow(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is one of the shadows."""
        return id(tensor) in self._by_shadow

    def model_param(self, tensor: torch.Tensor) -> torch.Tensor:
        """The quantized model param of a shadow (any other tensor: itself)."""
        return self._by_shadow.get(id(tensor), tensor)

    @torch.no_grad()
    def release(self) -> None:
        """Free the shadows' storage (shape, dtype and device stay readable via attributes)."""
        for s in self.shadows:
            s.data = torch.empty(0, dtype=s.dtype, device=s.device)

    @torch.no_grad()
    def materialize(self) -> None:
        """Give every shadow the current (dequantized) value of its param."""
        for p, s in zip(self.model_params, self.shadows):
            s.data = self.backend.current_value(p).to(dtype=s.dtype).reshape(p.shape)

    @torch.no_grad()
    def commit(self) -> None:
        """Requantize the params from the shadows (identical on every DP rank), then release."""
        self.backend.requantize(self.model_params, self.shadows, self.group)
        self.release()
