"""CPU stand-ins for the CUDA calls megatron-core hard-codes. FOR CPU TESTS AND THE CPU DEMO ONLY.

megatron-core's model code runs on CPU with gloo, but its DDP buffers, pipeline schedules,
p2p communication and RNG tracker allocate with ``device=torch.cuda.current_device()`` or
``device="cuda"``, create CUDA streams/events and read/write the CUDA RNG state. On a machine
without CUDA, :func:`install_cpu_emulation` makes those calls behave as if the single "GPU"
were the CPU:

(a) a ``TorchFunctionMode`` rewrites ``device="cuda"``/``"cuda:N"``/int device arguments of
    tensor factories, ``Tensor.to`` and ``Tensor.cuda`` to CPU and drops ``pin_memory``;
(b) ``torch.cuda.current_device``/``set_device``/``synchronize``/``empty_cache``/``Stream``/
    ``Event``/``stream``/``current_stream``/``default_stream`` get CPU no-op equivalents;
(c) the "cuda" RNG is the CPU default generator: ``torch.cuda.manual_seed``/``get_rng_state``/
    ``set_rng_state`` and megatron's private ``_get/_set_cuda_rng_state`` (via
    ``mlfop_megatron.megatron.compat``) read and write it; Megatron's own optimizers clip
    CPU grads (``compat.clip_grads_on_cpu``: its clip asserts a ``torch.cuda.FloatTensor``).

(d) optionally (``strict=True`` or ``MLFOP_STRICT_DEVICE=1``), strict device checking: what
    was created for the "GPU" is tagged, reports ``device == cuda:0``, and ops that mix it
    with host tensors fail as on a real GPU (see :mod:`mlfop_megatron.runtime.strict_device`).

``torch.cuda.is_available()`` keeps returning False. Installing it on a machine with CUDA is
refused: the GPU path must never depend on this module.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mlfop_megatron.runtime import strict_device

_CPU = torch.device("cpu")


def _is_cuda_like(device: Any) -> bool:
    """True for int device ordinals and 'cuda' strings/devices (the ones to redirect)."""
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CpuDeviceMode(TorchFunctionMode):
    """Redirects CUDA device arguments of torch calls to CPU (see module docstring, (a))."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if strict_device.is_strict_installed():
            return self._strict(func, args, kwargs)
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if "device" in kwargs and _is_cuda_like(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_like(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)

    def _strict(self, func, args, kwargs):
        """Strict-mode redirection of one torch call.

        Strict mode: the same redirections, tagging what was meant for the accelerator
        and copying across the host/device boundary (see strict_device).
        """
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.cuda:
            t = args[0]
            return t if strict_device.is_tagged(t) else strict_device.tag(t.clone())
        if func is torch.Tensor.cpu:
            return strict_device.device_to_host(args[0])
        if func is torch.Tensor.numpy and strict_device.is_tagged(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy (strict mode)")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to:
            return strict_device.to_device(func, args, kwargs, _is_cuda_like)
        if "device" in kwargs and _is_cuda_like(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
            return strict_device.tag_new(func(*args, **kwargs), args, kwargs)
        return func(*args, **kwargs)


class CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is synchronous, so every wait is a no-op."""

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.device = _CPU
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        """No-op: there is a single, synchronous CPU stream."""

    def wait_event(self, event: Any) -> None:
        """No-op: events are complete as soon as they are recorded."""

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        """Record (and return) an event; mirrors torch.cuda.Stream.record_event."""
        event = event or CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        """No-op: nothing is ever pending."""

    def query(self) -> bool:
        """Always idle."""
        return True

    def __enter__(self) -> CpuStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class CpuEvent:
    """Stand-in for torch.cuda.Event with wall-clock timing for elapsed_time()."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, **_: Any) -> None:
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        """Remember the current time."""
        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        """No-op: the event is already complete."""

    def synchronize(self) -> None:
        """No-op: the event is already complete."""

    def query(self) -> bool:
        """Always complete."""
        return True

    def elapsed_time(self, end: CpuEvent) -> float:
        """Milliseconds between this event and ``end`` (both must be recorded)."""
        assert self._t is not None and end._t is not None, "event not recorded"
        return (end._t - self._t) * 1000.0


_DEFAULT_STREAM = CpuStream()


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """CPU generator state; signature-compatible with megatron's _get_cuda_rng_state."""
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Set the CPU generator state; compatible with megatron's _set_cuda_rng_state."""
    torch.default_generator.set_state(new_state)


def _manual_seed(seed: int) -> None:
    """Seed the CPU generator (torch.manual_seed would recurse through cuda.manual_seed_all)."""
    torch.default_generator.manual_seed(int(seed))


def _cuda_patches() -> dict[tuple[Any, str], Any]:
    """(module, attribute) -> replacement for the torch.cuda functions megatron calls."""
    import torch.cuda.random as cuda_random

    patches: dict[tuple[Any, str], Any] = {}
    for mod in (torch.cuda, cuda_random):
        patches[(mod, "get_rng_state")] = lambda device="cuda": _get_rng_state()
        patches[(mod, "set_rng_state")] = lambda new_state, device="cuda": _set_rng_state(new_state)
        patches[(mod, "manual_seed")] = _manual_seed
    patches.update(
        {
            (torch.cuda, "current_device"): lambda: 0,
            (torch.cuda, "set_device"): lambda device: None,
            (torch.cuda, "synchronize"): lambda device=None: None,
            (torch.cuda, "empty_cache"): lambda: None,
            (torch.cuda, "Stream"): CpuStream,
            (torch.cuda, "Event"): CpuEvent,
            (torch.cuda, "stream"): lambda stream=None: contextlib.nullcontext(stream),
            (torch.cuda, "current_stream"): lambda device=None: _DEFAULT_STREAM,
            (torch.cuda, "default_stream"): lambda device=None: _DEFAULT_STREAM,
            (torch.cuda.nvtx, "range_push"): lambda msg: 0,
            (torch.cuda.nvtx, "range_pop"): lambda: 0,
        }
    )
    return patches


class _State:
    """Book-keeping for the installed emulation (restorers and the active mode)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode: CpuDeviceMode | None = None
        self.restorers: list[Callable[[], None]] = []


_STATE = _State()


def _redirect_custom_backwards(mode: CpuDeviceMode) -> Callable[[], None]:
    """Run every custom autograd.Function backward under ``mode``; returns the restorer.

    Autograd runs backward nodes with torch-function modes off, and Megatron's custom
    Functions (sequence-parallel gathers, the MoE dispatcher, cross entropy) allocate with
    ``device=torch.cuda.current_device()`` there; Megatron's schedules start backward through
    the engine directly, so wrapping torch.autograd.backward would not reach them.
    """
    from torch.autograd.function import BackwardCFunction

    apply = BackwardCFunction.apply

    def apply_redirected(self: Any, *grads: Any) -> Any:
        with mode:
            return apply(self, *grads)

    BackwardCFunction.apply = apply_redirected  # type: ignore[method-assign]
    return lambda: setattr(BackwardCFunction, "apply", apply)


def is_cpu_emulation_installed() -> bool:
    """Whether install_cpu_emulation() is currently in effect."""
    return _STATE.mode is not None


def install_cpu_emulation(with_megatron: bool = True, strict: bool | None = None) -> None:
    """Install the CPU emulation (idempotent); refuses when a real CUDA device is present.

    ``strict`` adds strict device checking (:mod:`mlfop_megatron.runtime.strict_device`);
    None reads $MLFOP_STRICT_DEVICE. Strict mode can be added to an installed emulation.
    """
    if strict is None:
        strict = strict_device.env_enabled()
    with _STATE.lock:
        if _STATE.mode is not None:
            if strict:
                strict_device.install_strict_device()
            return
        if torch.cuda.is_available():
            raise RuntimeError("CPU emulation of CUDA must not be installed on a CUDA machine")
        restorers: list[Callable[[], None]] = []
        for (mod, name), repl in _cuda_patches().items():
            old = getattr(mod, name)
            setattr(mod, name, repl)
            restorers.append(partial(setattr, mod, name, old))
        mode = CpuDeviceMode()
        restorers.append(_redirect_custom_backwards(mode))
        if with_megatron:
            from mlfop_megatron.megatron import compat

            restorers.append(compat.patch_rng_state_functions(_get_rng_state, _set_rng_state))
            restorers.append(compat.silence_rng_fork_warning())
            restorers.append(compat.define_moe_te_general_gemm_without_te())
            restorers.append(compat.clip_grads_on_cpu())
        mode.__enter__()
        _STATE.mode, _STATE.restorers = mode, restorers
        if strict:
            strict_device.install_strict_device()


def uninstall_cpu_emulation() -> None:
    """Undo install_cpu_emulation() (no-op when not installed)."""
    with _STATE.lock:
        if _STATE.mode is None:
            return
        strict_device.uninstall_strict_device()
        _STATE.mode.__exit__(None, None, None)
        for restore in reversed(_STATE.restorers):
            restore()
        _STATE.mode, _STATE.restorers = None, []


@contextlib.contextmanager
def cpu_emulation(with_megatron: bool = True, strict: bool | None = None) -> Iterator[None]:
    """Context manager form: install on entry, uninstall on exit what this call installed."""
    if strict is None:
        strict = strict_device.env_enabled()
    owned = not is_cpu_emulation_installed()
    owned_strict = strict and not strict_device.is_strict_installed()
    install_cpu_emulation(with_megatron=with_megatron, strict=strict)
    try:
        yield
    finally:
        if owned:
            uninstall_cpu_emulation()
        elif owned_strict:
            strict_device.uninstall_strict_device()
