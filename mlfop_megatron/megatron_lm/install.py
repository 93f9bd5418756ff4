"""Runtime install of ML-FOP-SOAP into Megatron-LM's training setup (no source patch needed).

``install()`` wraps six functions of ``megatron.training.training`` (Megatron-LM core_v0.16.x
and core_v0.19.x; what differs between them is in :mod:`mlfop_megatron.megatron_lm.compat`);
each wrapper does nothing new unless the run was started with ``--optimizer mlfop_soap``:

* ``setup_model_and_optimizer`` and ``get_model``: validate the Megatron-LM flags against
  ML-FOP-SOAP, then make the model wrapper ``FoldingDistributedDataParallel`` (level boundaries
  become gradient sync points) wherever this version takes its DDP class from (0.19 also
  builds models from a ``ModelConfig`` outside ``get_model``);
* ``get_megatron_optimizer_config``: builds Megatron's Adam config (lr, weight decay, clipping
  and the Adam settings of the non-matrix params) exactly as for ``--optimizer adam``;
* ``get_megatron_optimizer``: returns :func:`get_mlfop_optimizer` built from the ``--mlfop-*``
  flags, with ``accumulation_steps`` = the run's number of micro-batches per step;
* ``setup_model_and_optimizer`` also, with ``--exit-signal-handler``, makes Slurm's other stop
  signal (SIGTERM or SIGUSR1, whichever ``--exit-signal`` is not) stop the run the same way
  (:func:`route_stop_signals_to_exit_handler`);
* ``save_checkpoint``: runs with the stop signals (SIGTERM, SIGUSR1 and ``--exit-signal``)
  blocked, so the torch_dist writer's helper processes survive a signal Slurm sends to every
  process of the job (:func:`mlfop_megatron.launch.stop_signals.stop_signals_blocked`);
* ``training_log``: every ``--mlfop-stats-interval`` iterations logs the fold diagnostics, the
  optimizer phase timings (fold, factor update, refresh, communication) and NVML GPU memory /
  utilisation / power (max over ranks) to Megatron-LM's tensorboard writer and prints a line.

``patches/`` carries the same change as a source patch for users who prefer that.
"""

from __future__ import annotations

import argparse
import importlib
import signal
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from mlfop_megatron.launch.stop_signals import STOP_SIGNALS, stop_signals_blocked
from mlfop_megatron.megatron_lm import compat
from mlfop_megatron.megatron_lm.arguments import (
    accept_mlfop_optimizer,
    add_mlfop_args,
    chain_args_providers,
    comm_config_from_args,
    mlfop_config_from_args,
    sharding_config_from_args,
    uses_mlfop,
    validate_megatron_args,
)
from mlfop_megatron.megatron_lm.compat import SUPPORTED_MEGATRON_LM

_HOOKED = (
    "get_model",
    "setup_model_and_optimizer",
    "get_megatron_optimizer_config",
    "get_megatron_optimizer",
    "save_checkpoint",
)
_MARK = "_mlfop_installed"


class _Installed:
    """The optimizer built by the last wrapped get_megatron_optimizer (for stats logging)."""

    optimizer: Any = None
    telemetry: Any = None


def _training_module() -> Any:
    compat.backport_typing_override()
    try:
        return importlib.import_module("megatron.training.training")
    except ImportError as err:
        raise ImportError(
            "Megatron-LM's training package (megatron.training) is not importable: put a "
            f"Megatron-LM checkout ({SUPPORTED_MEGATRON_LM}) on PYTHONPATH; megatron-core from "
            f"PyPI does not contain it ({err})"
        ) from err


def is_installed() -> bool:
    """True once :func:`install` has wrapped Megatron-LM's training functions."""
    try:
        return bool(getattr(importlib.import_module("megatron.training.training"), _MARK, False))
    except ImportError:
        return False


def build_mlfop_optimizer(config: Any, model_chunks: list[Any], args: argparse.Namespace) -> Any:
    """Our chained optimizer from Megatron's Adam ``config`` and the ``--mlfop-*`` flags."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    from mlfop_megatron.megatron.factory import get_mlfop_optimizer

    layout = sharding_config_from_args(args)
    comm = comm_config_from_args(args)
    if comm.overlap_param_gather and getattr(args, "log_params_norm", False):
        raise ValueError(
            "--mlfop-overlap-param-gather with --log-params-norm: Megatron-LM computes the "
            "params norm right after the step, while the parameter all-gathers are still in "
            "flight; drop one of the two flags"
        )
    return get_mlfop_optimizer(
        config,
        model_chunks,
        mlfop_config_from_args(args, get_num_microbatches()),
        sharded=layout.sharded,
        shard_adam=layout.shard_adam,
        block_size=layout.block_size,
        tp_mode=layout.tp_mode,
        comm=comm,
        position_embeddings=layout.position_embeddings,
    )


def _stats_line(stats: dict[str, Any]) -> str:
    parts = [f"skipped {stats['skipped_steps']}", f"eigh fallbacks {stats['eigh_failures']}"]
    parts += [f"{k[5:-2]} {v * 1e3:.1f} ms" for k, v in stats.items() if k.startswith("time_")]
    if "gpu/memory_used_gib_max" in stats:
        parts.append(
            f"gpu max {stats['gpu/memory_used_gib_max']:.1f} GiB "
            f"{stats['gpu/utilization_pct_max']:.0f}% {stats['gpu/power_w_max']:.0f} W"
        )
    for level in stats["levels"]:
        parts.append(
            f"L{int(level['level'])} beta {level['beta_mean']:+.3f} s {level['s_mean']:.3f}"
        )
    grad = stats.get("grad")
    if grad:
        if "cos_g0_g1" in grad:
            parts.append(f"cos(g0,g1) {grad['cos_g0_g1']:+.3f} M^-1 {grad['cos_mi_g0_g1']:+.3f}")
        parts.append(
            f"ascent plain/folded {grad['ascent_plain_any']:.2f}/{grad['ascent_folded_any']:.2f}"
        )
        parts.append(f"noise scale {grad['noise_scale']:.3g} of K {grad['micro_steps']:.0f}")
    return "ML-FOP-SOAP | " + " | ".join(parts)


def grad_groups_for(args: argparse.Namespace, optimizer: Any) -> list[int] | None:
    """Group ids per micro-batch for ``--mlfop-grad-groups`` (None: off or no ML-FOP-SOAP)."""
    mode = getattr(args, "mlfop_grad_groups", "off")
    ours = getattr(optimizer, "mlfop", [optimizer])  # the chained optimizer, or MLFOPSOAP
    if mode == "off" or not ours or not hasattr(ours[0], "request_grad_diagnostics"):
        return None
    k = ours[0].schedule.accumulation_steps
    if mode == "one" or k < 2:
        return [0] * k
    return [0] * (k // 2) + [1] * (k - k // 2)


def gpu_telemetry_max() -> dict[str, float]:
    """NVML memory / utilisation / power, max over all ranks (a collective); {} without NVML."""
    import torch
    import torch.distributed as dist

    from mlfop_megatron.distributed.collective_device import collective_device
    from mlfop_megatron.launch.telemetry import GPUTelemetry

    if _Installed.telemetry is None:
        _Installed.telemetry = GPUTelemetry()  # says once when telemetry is off
    sample = _Installed.telemetry.sample()
    keys = ("gpu/memory_used_gib", "gpu/utilization_pct", "gpu/power_w")
    values = torch.tensor(
        [sample.get(k, -1.0) for k in keys], dtype=torch.float64, device=collective_device()
    )
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return {f"{k}_max": float(v) for k, v in zip(keys, values.tolist()) if v >= 0}


def log_stats_if_due(
    args: argparse.Namespace, iteration: int, optimizer: Any = None, writer: Any = None
) -> dict[str, Any] | None:
    """Collective on all ranks: every N iterations gather optimizer stats and log them.

    With ``--mlfop-grad-groups`` the window of every logged iteration is armed for the
    grad-group diagnostics (at the iteration before it), so they cost only every N steps.

    ``optimizer`` defaults to the one the runtime install built (the patch passes its own);
    ``writer`` to Megatron-LM's tensorboard writer (None on ranks that have none).
    """
    optimizer = optimizer if optimizer is not None else _Installed.optimizer
    interval = args.mlfop_stats_interval
    if interval is None:
        interval = args.log_interval
    if interval and optimizer is not None and (iteration + 1) % interval == 0:
        groups = grad_groups_for(args, optimizer)  # the next iteration logs: arm its window
        if groups is not None:
            optimizer.request_grad_diagnostics(groups)
    if not interval or iteration % interval or optimizer is None:
        return None
    import torch.distributed as dist

    from mlfop_megatron.megatron.diagnostics_logging import log_optimizer_stats

    stats = {**optimizer.stats(), **gpu_telemetry_max()}
    log_optimizer_stats(stats, iteration, writer)
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(f" iteration {iteration:8d} | {_stats_line(stats)}", flush=True)  # as Megatron-LM
    return stats


def route_stop_signals_to_exit_handler(args: argparse.Namespace) -> list[int]:
    """With ``--exit-signal-handler``: every stop signal sets Megatron-LM's exit flag.

    Megatron-LM catches one signal (``--exit-signal``; slurm/pretrain.sbatch passes SIGUSR1,
    Slurm's time-limit signal). Slurm's preemption sends SIGTERM to every process of the job
    instead, which would kill the ranks without a checkpoint. The stop signals that still have
    their default action get Megatron-LM's handler too (a handler set by someone else is left
    alone). Returns the signals routed. Call after ``initialize_megatron``.
    """
    if not getattr(args, "exit_signal_handler", False):
        return []
    handler = signal.getsignal(args.exit_signal)
    if not callable(handler):  # Megatron-LM has not installed its handler (yet)
        return []
    routed = []
    for sig in STOP_SIGNALS:
        if sig != args.exit_signal and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, handler)
            routed.append(int(sig))
    return routed


def stop_signals_of(args: argparse.Namespace) -> set[int]:
    """The signals that stop a run: Slurm's (SIGTERM, SIGUSR1) and ``--exit-signal``."""
    signals: set[int] = set(STOP_SIGNALS)
    if getattr(args, "exit_signal", None) is not None:
        signals.add(int(args.exit_signal))
    return signals


def save_signal_guard(args: argparse.Namespace) -> AbstractContextManager[None]:
    """What a checkpoint save of this run runs inside: the stop signals blocked (mlfop_soap runs).

    Other optimizers' runs get a null context: the install changes nothing for them.
    """
    if not uses_mlfop(args):
        return nullcontext()
    return stop_signals_blocked(stop_signals_of(args))


def _accept_optimizer_choice(arguments: Any) -> None:
    """Add ``mlfop_soap`` to the ``--optimizer`` choices of every Megatron-LM parser.

    ``pretrain`` parses the command line before it uses our extra_args_provider (fault
    tolerance / in-process restart setup call ``parse_args(ignore_unknown_args=True)`` without
    it: ft_integration.py:78, inprocess_restart.py:128 at core_v0.16.1, :133 at core_v0.19.0).
    Unknown ``--mlfop-*``
    flags pass there, but an unknown ``--optimizer`` choice does not.
    """
    original = arguments.add_megatron_arguments

    def add_megatron_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = original(parser)
        accept_mlfop_optimizer(parser)
        return parser

    arguments.add_megatron_arguments = add_megatron_arguments


def install() -> None:
    """Wrap Megatron-LM's model/optimizer setup so ``--optimizer mlfop_soap`` uses our plugin.

    Idempotent. Raises if Megatron-LM is not importable or lacks the functions it wraps.
    """
    training = _training_module()
    missing = [n for n in (*_HOOKED, "training_log", "DDP") if not hasattr(training, n)]
    if missing:
        raise RuntimeError(
            f"megatron.training.training has no {missing}: this Megatron-LM version is not "
            f"supported by the runtime install (supported: {SUPPORTED_MEGATRON_LM}); use "
            "patches/ as a guide to adapt it"
        )
    if getattr(training, _MARK, False):
        return
    arguments = importlib.import_module("megatron.training.arguments")
    if not hasattr(arguments, "add_megatron_arguments"):
        raise RuntimeError(
            "megatron.training.arguments has no add_megatron_arguments: this Megatron-LM "
            f"version is not supported by the runtime install ({SUPPORTED_MEGATRON_LM})"
        )
    _accept_optimizer_choice(arguments)
    from megatron.training.global_vars import get_args

    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel

    original: dict[str, Callable[..., Any]] = {
        name: getattr(training, name) for name in (*_HOOKED, "training_log")
    }
    slots = compat.ddp_class_slots()
    original_ddp = [getattr(module, attr) for module, attr in slots]

    def select_ddp_class() -> None:
        """Validate an mlfop_soap run and point every DDP-class slot at ours (else restore)."""
        args = get_args()
        if uses_mlfop(args):
            validate_megatron_args(args)
        for (module, attr), ddp in zip(slots, original_ddp):
            setattr(module, attr, FoldingDistributedDataParallel if uses_mlfop(args) else ddp)

    def get_model(*a: Any, **kw: Any) -> Any:
        select_ddp_class()
        return original["get_model"](*a, **kw)

    def setup_model_and_optimizer(*a: Any, **kw: Any) -> Any:
        select_ddp_class()  # 0.19's ModelConfig builders wrap the model without get_model
        if uses_mlfop(get_args()):  # Megatron-LM's signal handler is in place by now
            route_stop_signals_to_exit_handler(get_args())
        return original["setup_model_and_optimizer"](*a, **kw)

    def get_megatron_optimizer_config(args: Any) -> Any:
        if uses_mlfop(args):  # Megatron's Adam config drives lr/wd/clipping and the Adam part
            return original["get_megatron_optimizer_config"](
                argparse.Namespace(**{**vars(args), "optimizer": "adam"})
            )
        return original["get_megatron_optimizer_config"](args)

    def get_megatron_optimizer(config: Any, model_chunks: list[Any], *a: Any, **kw: Any) -> Any:
        args = get_args()
        if not uses_mlfop(args):
            return original["get_megatron_optimizer"](config, model_chunks, *a, **kw)
        # config_overrides (Megatron's per-param lr/wd rules) are replaced by our own split:
        # matrices -> ML-FOP-SOAP, embeddings/output -> Adam with decay, vectors -> no decay.
        _Installed.optimizer = build_mlfop_optimizer(config, model_chunks, args)
        return _Installed.optimizer

    def save_checkpoint(*a: Any, **kw: Any) -> Any:
        with save_signal_guard(get_args()):
            return original["save_checkpoint"](*a, **kw)

    def training_log(*a: Any, **kw: Any) -> Any:
        result = original["training_log"](*a, **kw)
        args = get_args()
        if uses_mlfop(args):
            iteration = kw["iteration"] if "iteration" in kw else a[3]
            log_stats_if_due(args, iteration)
        return result

    training.get_model = get_model
    training.setup_model_and_optimizer = setup_model_and_optimizer
    training.get_megatron_optimizer_config = get_megatron_optimizer_config
    training.get_megatron_optimizer = get_megatron_optimizer
    training.save_checkpoint = save_checkpoint
    training.training_log = training_log
    setattr(training, _MARK, True)


def pretrain(
    train_valid_test_dataset_provider: Any,
    model_provider: Any,
    model_type: Any,
    forward_step_func: Any,
    *,
    extra_args_provider: Any = None,
    **kwargs: Any,
) -> Any:
    """``megatron.training.pretrain`` with ML-FOP-SOAP installed and its flags added.

    Takes core_v0.16's arguments on every supported version; on core_v0.19 it parses the
    command line and builds the config container first (:func:`compat.run_pretrain`, which
    also accepts ``model_config_from_args=`` to build from a 0.19 ``ModelConfig``).
    """
    install()
    return compat.run_pretrain(
        train_valid_test_dataset_provider,
        model_provider,
        model_type,
        forward_step_func,
        extra_args_provider=chain_args_providers(add_mlfop_args, extra_args_provider),
        **kwargs,
    )
