"""Strict device checking for the CPU emulation of CUDA. FOR CPU TESTS AND THE CPU DEMO ONLY.

The plain emulation (:mod:`mlfop_megatron.runtime.cpu_emulation`) maps every "cuda" tensor to
the CPU, so a CPU tensor meeting a "cuda" one goes unnoticed, while a real GPU run fails on it
("Expected all tensors to be on the same device"). Strict mode brings that failure back:

* **Tagging.** Tensors meant for the accelerator are tagged: the results of factories,
  ``Tensor.to`` and ``Tensor.cuda`` whose device is cuda-like (the ones the emulation
  redirects), and, through a ``TorchDispatchMode``, every output of an aten op with a tagged
  input (autograd's backward ops and views included). The tag sits on the *storage*, so
  ``.data``, views and Megatron's ``main_grad`` views of its grad buffers stay tagged.
  ``.cpu()`` / ``.to("cpu")`` of a tagged tensor return an untagged copy.
* **Reported device.** While strict mode is installed ``Tensor.device`` (and ``is_cuda``) of a
  tagged tensor say ``cuda:0``, so code that derives devices from params (``torch.zeros(n,
  device=p.device)``, ``x.to(p.device)``) behaves as on a GPU and is redirected and tagged.
* **Checks.** An aten op that mixes a tagged tensor with an untagged host tensor of dim > 0
  raises :class:`DeviceMismatchError` naming the op, the shapes and the host operand. 0-dim
  host tensors pass in elementwise ops (as on CUDA) but not in ``cat``/``stack``/matmul-like
  ops, nor as the written-to operand of an in-place op. Cross-device by design: ``copy_``,
  ``_to_copy`` and host index tensors of ``aten.index``/``index_put_``. A c10d collective
  whose tensors mix tagged and untagged raises as well.
* :func:`forbid_host_sync` fails on host reads of tagged tensors (``.item()``, ``bool()``,
  ``float()``, ``nonzero``) and on device-to-host copies, to show a code path is sync-free.

Known limits: tensors created by C++ code from another tensor's options without a tagged
input (none seen so far) would come out untagged; ``Tensor.tolist()`` and ``numpy()`` bypass
the dispatcher (``numpy()`` of a tagged tensor is refused by the function layer; ``tolist()``
is not seen by :func:`forbid_host_sync`); collectives on host-only tensors pass (gloo groups
legitimately use them, NCCL ones cannot); nothing models streams.

Enable with ``install_cpu_emulation(strict=True)``, ``cpu_emulation(strict=True)``,
``run_distributed(..., strict_device=True)`` or ``MLFOP_STRICT_DEVICE=1`` in the environment.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ENV_VAR = "MLFOP_STRICT_DEVICE"
CUDA0 = torch.device("cuda", 0)
_CPU = torch.device("cpu")

# The C getset descriptors (typeshed types them as the values they return).
_REAL_DEVICE: Any = torch._C.TensorBase.device
_REAL_IS_CUDA: Any = torch._C.TensorBase.is_cuda


class DeviceMismatchError(RuntimeError):
    """An op mixed accelerator ("cuda") tensors with host tensors under strict mode."""


class HostSyncError(RuntimeError):
    """A host read or device-to-host copy of an accelerator tensor inside forbid_host_sync()."""


def env_enabled() -> bool:
    """Whether $MLFOP_STRICT_DEVICE asks for strict mode (1/true/yes/on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------- storage tags
# StorageImpl address -> weak reference to it. The weak reference keeps the StorageImpl object
# (not its data) allocated, so its address cannot be reused while the entry exists; entries of
# freed storages are dropped when met (expired()) and by a sweep as the table grows.
_TAGS: dict[int, StorageWeakRef] = {}
_SWEEP_AT = [4096]


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # sparse, nested or wrapper-subclass tensors carry no plain storage


def is_tagged(t: torch.Tensor) -> bool:
    """Whether ``t`` lives on the emulated accelerator (its storage is tagged)."""
    st = _storage(t)
    if st is None:
        return False
    key = st._cdata
    ref = _TAGS.get(key)
    if ref is None:
        return False
    if ref.expired():
        del _TAGS[key]
        return False
    return True


def tag(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t``'s storage as accelerator memory (returns ``t``)."""
    st = _storage(t)
    if st is not None and st._cdata not in _TAGS:
        _TAGS[st._cdata] = StorageWeakRef(st)
        if len(_TAGS) > _SWEEP_AT[0]:
            for key in [k for k, ref in _TAGS.items() if ref.expired()]:
                del _TAGS[key]
            _SWEEP_AT[0] = max(4096, 2 * len(_TAGS))
    return t


def tag_all(out: Any) -> Any:
    """Tag every tensor in a (nested) result."""
    for x in pytree.tree_leaves(out):
        if isinstance(x, torch.Tensor):
            tag(x)
    return out


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_DEFAULT_TF = (
    torch.Tensor.__torch_function__.__func__,  # type: ignore[attr-defined]  # a classmethod
    torch._C._disabled_torch_function_impl,
)


def _own_getter(self: torch.Tensor, real: Any) -> Any:
    """The original getter's value for tensor subclasses with their own __torch_function__.

    Subclasses with their own __torch_function__ (torch's ShardedTensor) know only the
    original getters: hand them the original, as the C getter would (else None).
    """
    cls = type(self)
    if cls not in _PLAIN_TYPES:
        tf = cls.__torch_function__
        if getattr(tf, "__func__", tf) not in _DEFAULT_TF:
            return (tf(real.__get__, (cls,), (self,), {}),)
    return None


def _device(self: torch.Tensor) -> torch.device:
    own = _own_getter(self, _REAL_DEVICE)
    if own is not None:
        return own[0]
    device = _REAL_DEVICE.__get__(self)
    if device.type == "cpu" and is_tagged(self):
        return CUDA0
    return device


def _is_cuda(self: torch.Tensor) -> bool:
    own = _own_getter(self, _REAL_IS_CUDA)
    if own is not None:
        return own[0]
    return _REAL_IS_CUDA.__get__(self) or is_tagged(self)


# ------------------------------------------------------------------------- the checks
_aten = torch.ops.aten
# Cross-device by design (host <-> device copies).
_COPY_OPS = {_aten.copy_.default, _aten._to_copy.default, _aten.lift_fresh.default}
# Host index tensors are allowed in these (as on CUDA); other operands are checked.
_INDEX_OPS = {
    _aten.index.Tensor,
    _aten.index_put_.default,
    _aten.index_put.default,
    _aten._index_put_impl_.default,
}
# Ops that reject even 0-dim host tensors on CUDA (not TensorIterator elementwise kernels).
_NO_HOST_SCALARS = {
    _aten.cat.default,
    _aten.stack.default,
    _aten.mm.default,
    _aten.bmm.default,
    _aten.addmm.default,
    _aten.addmm_.default,
    _aten.dot.default,
    _aten.mv.default,
    _aten.matmul.default,
    _aten.index_select.default,
    _aten.embedding.default,
}
# Host syncs: data-dependent host reads of a device tensor.
_SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_dim.default,
    _aten._unique2.default,
}

_LOCAL = threading.local()


def _sync_forbidden() -> int:
    return getattr(_LOCAL, "forbid_sync", 0)


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Inside, host reads and device-to-host copies of tagged tensors raise HostSyncError."""
    _LOCAL.forbid_sync = _sync_forbidden() + 1
    try:
        yield
    finally:
        _LOCAL.forbid_sync -= 1


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _operands(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    """(position name, tensor) of every tensor operand, nested lists included."""
    out = []
    named = [(f"arg {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        leaves = pytree.tree_leaves(value)
        for j, x in enumerate(leaves):
            if isinstance(x, torch.Tensor):
                out.append((name if len(leaves) == 1 else f"{name}[{j}]", x))
    return out


def _mixing_error(func: Any, device: list, host: list, why: str) -> DeviceMismatchError:
    dev = ", ".join(f"{n}: {_describe(t)}" for n, t in device[:4])
    hst = ", ".join(f"{n}: {_describe(t)}" for n, t in host[:4])
    return DeviceMismatchError(
        f"strict device check: {func} mixes accelerator (cuda) tensors [{dev}] with host "
        f"(cpu) tensors [{hst}]; {why}. On a GPU this op raises 'Expected all tensors to be "
        "on the same device'."
    )


def _check(func: Any, args: tuple, kwargs: dict, operands: list, flags: list[bool]) -> None:
    if func in _COPY_OPS:
        return
    device = [op for op, f in zip(operands, flags) if f]
    host = [op for op, f in zip(operands, flags) if not f]
    if func in _INDEX_OPS:  # host integer/bool index tensors are fine
        index_ids = {
            id(x)
            for x in pytree.tree_leaves(args[1] if len(args) > 1 else kwargs.get("indices"))
            if isinstance(x, torch.Tensor)
        }
        host = [(n, t) for n, t in host if id(t) not in index_ids]
    if not host:
        return
    if func.namespace == "c10d":
        raise _mixing_error(func, device, host, "a collective needs all tensors on one device")
    bad = [(n, t) for n, t in host if t.dim() > 0]
    if bad:
        raise _mixing_error(func, device, bad, "host operands of dim > 0")
    if func in _NO_HOST_SCALARS:
        raise _mixing_error(func, device, host, "this op takes no 0-dim host tensors either")
    if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
        if not flags[0]:  # writing device results into a host tensor
            raise _mixing_error(func, device, host[:1], "in-place op on a host tensor")


def _check_sync(func: Any, args: tuple, kwargs: dict, operands: list, flags: list[bool]) -> None:
    if func in _SYNC_OPS and flags[0]:
        raise HostSyncError(f"host sync under forbid_host_sync(): {func} reads a cuda tensor")
    if func is _aten._to_copy.default and flags[0] and kwargs.get("device") == _CPU:
        if not getattr(_LOCAL, "redirecting", False):
            raise HostSyncError(
                f"host sync under forbid_host_sync(): device-to-host copy of a cuda tensor "
                f"({_describe(args[0])})"
            )
    if func is _aten.copy_.default and not flags[0] and any(flags[1:]):
        raise HostSyncError(
            f"host sync under forbid_host_sync(): copy_ of a cuda tensor into a host tensor "
            f"({_describe(args[0])})"
        )


class StrictDeviceMode(TorchDispatchMode):
    """Propagates storage tags through aten ops and checks their operands (module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _operands(args, kwargs)
        flags = [is_tagged(t) for _, t in operands]
        any_tagged = any(flags)
        if any_tagged:
            _check(func, args, kwargs, operands, flags)
            if _sync_forbidden():
                _check_sync(func, args, kwargs, operands, flags)
        out = func(*args, **kwargs)
        # An explicit device (factories, _like ops, .cpu()/.to(device)) decides by itself: the
        # function layer tags the redirected "cuda" ones; copies to the host stay untagged.
        if any_tagged and kwargs.get("device") is None and func.namespace != "c10d":
            if func is _aten.copy_.default and not flags[0]:
                return out  # a device-to-host copy: the host destination stays host
            tag_all(out)
        return out


# ------------------------------------------------------------- function-layer helpers
def _untagged_storages(args: tuple, kwargs: dict) -> set[int]:
    out = set()
    for x in pytree.arg_tree_leaves(*args, **kwargs):
        if isinstance(x, torch.Tensor) and not is_tagged(x):
            st = _storage(x)
            if st is not None:
                out.add(st._cdata)
    return out


def tag_new(out: Any, args: tuple, kwargs: dict) -> Any:
    """Tag the result of a redirected factory call.

    Tag the result of a redirected factory call; a result that aliases an untagged input
    (torch.as_tensor(host, device="cuda") returns its input on CPU) is copied first.
    """
    shared = _untagged_storages(args, kwargs)
    if isinstance(out, torch.Tensor):
        st = _storage(out)
        if st is not None and st._cdata in shared:
            out = out.clone()
        return tag(out)
    return tag_all(out)


def to_device(func: Any, args: tuple, kwargs: dict, is_cuda_like: Any) -> Any:
    """Strict form of Tensor.to: copies across the emulated host/device boundary."""
    self, rest = args[0], args[1:]
    if rest and isinstance(rest[0], torch.Tensor):  # to(other): other's (reported) device
        other = rest[0]
        kwargs = dict(kwargs, device=other.device, dtype=other.dtype)
        for name, value in zip(("non_blocking", "copy"), rest[1:]):
            kwargs[name] = value
        rest = ()
    # to(device, dtype, non_blocking, copy) / to(dtype, non_blocking, copy): trailing bools.
    bools = [a for a in rest if isinstance(a, bool)] + [False, False]
    non_blocking = kwargs.get("non_blocking", bools[0])
    copy = kwargs.get("copy", bools[1])
    parse_kwargs = {k: v for k, v in kwargs.items() if k not in ("non_blocking", "copy")}
    device, dtype, _, memory_format = torch._C._nn._parse_to(
        *[a for a in rest if not isinstance(a, bool)], **parse_kwargs
    )
    if device is None:  # dtype/memory-format only: the dispatch layer propagates the tag
        return func(*args, **kwargs)
    tagged = is_tagged(self)
    to_cuda = bool(is_cuda_like(device))
    _LOCAL.redirecting = to_cuda
    try:
        out = func(
            self,
            device=_CPU,
            dtype=dtype or self.dtype,
            non_blocking=bool(non_blocking),
            copy=bool(copy) or to_cuda != tagged,
            memory_format=memory_format or torch.preserve_format,
        )
    finally:
        _LOCAL.redirecting = False
    return tag(out) if to_cuda else out


def device_to_host(t: torch.Tensor) -> torch.Tensor:
    """Strict form of Tensor.cpu(): an untagged copy of a tagged tensor."""
    return t.to(_CPU, copy=True) if is_tagged(t) else t


# ------------------------------------------------------------------ install/uninstall
class _StrictState:
    def __init__(self) -> None:
        self.mode: StrictDeviceMode | None = None
        self.capability: Any = None


def _capability(device: Any = None) -> tuple[int, int]:
    """The emulated GPU is a Hopper (H100/H200): torch.distributed asks for is_cuda tensors."""
    return (9, 0)


_STATE = _StrictState()


def is_strict_installed() -> bool:
    """Whether strict device checking is installed in this process."""
    return _STATE.mode is not None


def install_strict_device() -> None:
    """Enter the tagging dispatch mode and override Tensor.device/is_cuda (idempotent)."""
    if _STATE.mode is not None:
        return
    torch.Tensor.device = property(_device, doc=_REAL_DEVICE.__doc__)  # type: ignore[assignment]
    torch.Tensor.is_cuda = property(_is_cuda, doc=_REAL_IS_CUDA.__doc__)  # type: ignore[assignment]
    _STATE.capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = _capability
    mode = StrictDeviceMode()
    mode.__enter__()
    _STATE.mode = mode


def uninstall_strict_device() -> None:
    """Undo install_strict_device() (no-op when not installed); tags are forgotten."""
    if _STATE.mode is None:
        return
    _STATE.mode.__exit__(None, None, None)
    _STATE.mode = None
    torch.cuda.get_device_capability = _STATE.capability
    for name in ("device", "is_cuda"):
        if name in torch.Tensor.__dict__:
            delattr(torch.Tensor, name)
    _TAGS.clear()
