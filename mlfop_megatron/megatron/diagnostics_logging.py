"""Write ML-FOP-SOAP stats through the trainer's logger (tensorboard / wandb writers)."""

from __future__ import annotations

from typing import Any


def flatten_stats(stats: dict[str, Any], prefix: str = "mlfop") -> dict[str, float]:
    """{'levels': [{...}, ...], 'skipped_steps': n} -> {'mlfop/level1/beta_mean': x, ...}.

    The grad-group diagnostics (``stats['grad']``, steps armed with request_grad_diagnostics)
    become 'mlfop/grad/cos_g0_g1', 'mlfop/grad/noise_scale', ...

    Several folds ending at one level (``structure="tree"``) are told apart by their fold
    index: 'mlfop/level3_fold2/beta_mean'.
    """
    flat: dict[str, float] = {}
    for key, value in stats.items():
        if key == "levels":
            per_level: dict[int, int] = {}
            for entry in value:
                per_level[int(entry["level"])] = per_level.get(int(entry["level"]), 0) + 1
            for entry in value:
                level = int(entry["level"])
                tag = f"level{level}"
                if per_level[level] > 1:
                    tag += f"_fold{int(entry['fold'])}"
                for name, v in entry.items():
                    if name not in ("level", "fold"):
                        flat[f"{prefix}/{tag}/{name}"] = float(v)
        elif isinstance(value, dict):  # "grad": the grad-group diagnostics of an armed step
            for name, v in value.items():
                if isinstance(v, (int, float)):
                    flat[f"{prefix}/{key}/{name}"] = float(v)
        elif isinstance(value, (int, float)):
            flat[f"{prefix}/{key}"] = float(value)
    return flat


def default_writer() -> Any | None:
    """Megatron-LM's tensorboard writer when running under its launcher, else None."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer
    except ImportError:
        return None
    try:
        return get_tensorboard_writer()
    except AssertionError:  # global vars not initialised (not launched by Megatron-LM)
        return None


def log_optimizer_stats(stats: dict[str, Any], iteration: int, writer: Any | None = None) -> int:
    """Add every scalar of ``stats`` to a SummaryWriter-like ``writer``; returns the count.

    ``writer`` defaults to Megatron-LM's tensorboard writer; without one nothing is written.
    """
    writer = writer if writer is not None else default_writer()
    if writer is None:
        return 0
    flat = flatten_stats(stats)
    for tag, value in flat.items():
        writer.add_scalar(tag, value, iteration)
    return len(flat)
