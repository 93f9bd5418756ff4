"""Multi-tensor elementwise kernels: apex's fused ``amp_C`` kernels on CUDA, torch otherwise.

The optimizer's elementwise work outside the SOAP math is a handful of list-wide operations:
scale gradients in place (clipping, level weights), copy fp32 main weights into bf16 model
params, zero the folded ``main_grad`` slices, and sum squares for the gradient norm. With many
small tensors (norm weights, biases, per-block slices) the per-tensor kernel launches dominate;
``apex.multi_tensor_apply`` processes a whole list in a few launches. apex is optional and
never required: without it (or for CPU tensors, or dtypes apex's kernels do not take) the same
operations run through ``torch._foreach_*``, which is also a fused multi-tensor path on CUDA.

Both paths give the same values: scaling and copying are one multiply / one rounding per element
either way; the l2 norm is accumulated in fp32 by apex and by ``torch._foreach_norm`` (summation
order differs, so the last bits may too). ``backend()`` says which path a list takes.

apex is imported lazily, once, on the first CUDA call; nothing is imported on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# dtypes apex's amp_C multi-tensor kernels accept.
_APEX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_APEX: dict[str, Any] | None = None  # None: not probed yet; {}: probed, unavailable
_FORCE_TORCH = False


def _apex() -> dict[str, Any]:
    """Apex's applier and kernels, or {} when apex (with its CUDA extension amp_C) is absent."""
    global _APEX
    if _APEX is None:
        try:
            import amp_C  # apex's compiled CUDA extension
            from apex.multi_tensor_apply import multi_tensor_applier
        except Exception:  # noqa: BLE001 - any import failure means "no apex"
            _APEX = {}
        else:
            _APEX = {
                "applier": multi_tensor_applier,
                "scale": amp_C.multi_tensor_scale,
                "axpby": amp_C.multi_tensor_axpby,
                "l2norm": amp_C.multi_tensor_l2norm,
            }
    return _APEX


def apex_available() -> bool:
    """True when apex's fused multi-tensor kernels can be imported (needs a CUDA build)."""
    return bool(_apex())


def set_force_torch(flag: bool) -> None:
    """Route every call through torch (for A/B comparisons and tests)."""
    global _FORCE_TORCH
    _FORCE_TORCH = flag


def backend(*lists: Sequence[torch.Tensor]) -> str:
    """'apex' if these tensor lists go through apex's kernels, else 'torch'."""
    tensors = [t for lst in lists for t in lst]
    if _FORCE_TORCH or not tensors:
        return "torch"
    if not all(t.is_cuda and t.dtype in _APEX_DTYPES and t.is_contiguous() for t in tensors):
        return "torch"
    # amp_C dispatches on the first tensor of each list: a list must have a single dtype.
    if any(len({t.dtype for t in lst}) > 1 for lst in lists):
        return "torch"
    if len({t.device for t in tensors}) > 1:
        return "torch"
    return "apex" if apex_available() else "torch"


def _overflow_buf(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int, device=like.device)


def _check_lengths(*lists: Sequence[torch.Tensor]) -> None:
    if len({len(lst) for lst in lists}) > 1:
        raise ValueError(f"tensor lists differ in length: {[len(lst) for lst in lists]}")


@torch.no_grad()
def scale_(tensors: Sequence[torch.Tensor], scale: float) -> None:
    """tensors[i] *= scale, in place."""
    tensors = list(tensors)
    if not tensors or scale == 1.0:
        return
    if backend(tensors) == "apex":
        k = _apex()
        k["applier"](k["scale"], _overflow_buf(tensors[0]), [tensors, tensors], float(scale))
    else:
        torch._foreach_mul_(tensors, float(scale))


@torch.no_grad()
def copy_(src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]) -> None:
    """dst[i] <- src[i] (with a cast when dtypes differ, e.g. fp32 main -> bf16 param)."""
    src, dst = list(src), list(dst)
    _check_lengths(src, dst)
    if not src:
        return
    if backend(src, dst) == "apex":
        k = _apex()
        k["applier"](k["scale"], _overflow_buf(src[0]), [src, dst], 1.0)
    else:
        torch._foreach_copy_(dst, src)


@torch.no_grad()
def zero_(tensors: Sequence[torch.Tensor]) -> None:
    """tensors[i] <- 0 (torch's fused foreach zero; apex has no faster kernel for this)."""
    tensors = list(tensors)
    if tensors:
        torch._foreach_zero_(tensors)


@torch.no_grad()
def axpby(
    a: float,
    x: Sequence[torch.Tensor],
    b: float,
    y: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
) -> None:
    """out[i] <- a * x[i] + b * y[i]."""
    x, y, out = list(x), list(y), list(out)
    _check_lengths(x, y, out)
    if not x:
        return
    if backend(x, y, out) == "apex":
        k = _apex()
        # last argument: which input to check for inf/nan (-1: both); the flag is not read here
        k["applier"](k["axpby"], _overflow_buf(x[0]), [x, y, out], float(a), float(b), -1)
    else:
        # Like apex: compute in (at least) fp32, round once into ``out``.
        def wide(ts):
            return [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in ts]

        result = torch._foreach_mul(wide(x), float(a))
        torch._foreach_add_(result, torch._foreach_mul(wide(y), float(b)))
        torch._foreach_copy_(out, result)


@torch.no_grad()
def l2_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum_i ||tensors[i]||^2) as a 0-d fp32 tensor on the tensors' device."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    if backend(tensors) == "apex":
        k = _apex()
        total, _ = k["applier"](k["l2norm"], _overflow_buf(tensors[0]), [tensors], False)
        return total.reshape(())
    norms = torch._foreach_norm(tensors, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def fused_adam_class(params: Sequence[torch.Tensor]) -> Callable[..., torch.optim.Optimizer] | None:
    """Apex's FusedAdam when apex is installed and every param is a CUDA tensor, else None."""
    params = list(params)
    if _FORCE_TORCH or not params or not all(p.is_cuda for p in params):
        return None
    if not apex_available():
        return None
    try:
        from apex.optimizers import FusedAdam
    except Exception:  # noqa: BLE001 - apex without its optimizer extension
        return None
    return FusedAdam


def make_adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """AdamW over ``groups``: apex FusedAdam (adam_w_mode) on CUDA with apex, else torch AdamW.

    Both apply decoupled weight decay from each group's ``weight_decay``; apex keeps ``step``
    in the param group instead of per param (Megatron's checkpoint code handles both).
    """
    fused = fused_adam_class([p for g in groups for p in g["params"]])
    if fused is not None:
        return fused(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
