"""megatron.core.dist_checkpointing for ML-FOP-SOAP state, and atomic save/load helpers.

Every SOAP block tensor becomes a ShardedTensor keyed by (global param name, TP rank, block
offsets, field). The owner saves it (replica 0), so a checkpoint written at DP=N loads at any
DP size with the same blocking: each rank simply asks for the blocks it owns there.
Scalars (step, initialized) travel as 0-d tensors; param groups and the world totals of the
linalg counters (``world_counters``) are common state.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor

from mlfop_megatron.core.linalg import LinalgCounters
from mlfop_megatron.distributed.collective_device import collective_device
from mlfop_megatron.launch.stop_signals import stop_signals_blocked

STATE_FIELDS = ("L", "R", "QL", "QR", "DL", "DR", "exp_avg", "exp_avg_sq", "master")
# Derived from the saved factors and bases: a checkpoint written before they were kept lacks
# them, and the engines form them at load (``soap.ensure_estimates``).
DERIVED_FIELDS = ("DL", "DR")
SCALAR_FIELDS = {"step": torch.int64, "initialized": torch.bool}
PREFIX = "optimizer.mlfop"


def _block_key(engine_index: int, block_name: str) -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    return f"{PREFIX}.e{engine_index}.tp{tp}.{block_name}"


# A saved block tensor's key: _block_key's "<PREFIX>.e<i>.tp<t>.<param>@<row>,<col>" and
# ".<field>", behind "chained_<k>." where the optimizer is one of a chain; group 1: <param>.
_BLOCK_KEY = re.compile(r"(?:^|\.)" + re.escape(PREFIX) + r"\.e\d+\.tp\d+\.(.+)@\d+,\d+\.")


def optimizer_sharded_state_dict(optimizer: Any, is_loading: bool = False) -> dict[str, Any]:
    """Sharded state dict of an MLFOPMegatronOptimizer (see module docstring)."""
    replica = 0 if optimizer.sharded else parallel_state.get_data_parallel_rank()
    engines = []
    for index, engine in enumerate(optimizer.engines):
        blocks = {}
        for owned in engine.owned:
            name = engine.block_name(owned)
            key = _block_key(index, name)
            entry = {}
            for field in STATE_FIELDS:
                if field in owned.state:
                    entry[field] = ShardedTensor.from_rank_offsets(
                        f"{key}.{field}", owned.state[field], replica_id=replica
                    )
            device = owned.state["exp_avg"].device  # next to the block's tensors
            for field, dtype in SCALAR_FIELDS.items():
                value = torch.tensor(owned.state[field], dtype=dtype, device=device)
                entry[field] = ShardedTensor.from_rank_offsets(
                    f"{key}.{field}", value, replica_id=replica
                )
            blocks[name] = entry
        engines.append({"blocks": blocks})
    return {
        "engines": engines,
        "counters": {} if is_loading else world_counters(optimizer.engines),
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.optimizer.param_groups
        ],
        "skipped_steps": optimizer.skipped_steps,
    }


def world_counters(engines: Sequence[Any]) -> dict[str, int]:
    """The linalg counters of every engine summed over all ranks (a collective).

    dist_checkpointing keeps one copy of the common (non-sharded) state, rank 0's: per-rank
    counts there (each rank counts its own blocks' refreshes) would be lost or, worse, copied
    to every rank. The world total is the same on every rank; a load gives it to rank 0 alone
    (``MLFOPMegatronOptimizer.load_state_dict``), so the summed stats carry on across a resume
    at any parallel layout.
    """
    keys = LinalgCounters.keys()
    totals = [float(sum(e.counters.as_dict()[k] for e in engines)) for k in keys]
    packed = torch.tensor(totals, dtype=torch.float64, device=collective_device())
    dist.all_reduce(packed)
    return {k: int(v) for k, v in zip(keys, packed.tolist())}


def scalars_from_loaded(state: dict[str, Any]) -> dict[str, Any]:
    """Turn the 0-d tensors of a loaded block back into Python scalars."""
    out = dict(state)
    out["step"] = int(out["step"])
    out["initialized"] = bool(out["initialized"])
    return out


def adam_init_state_fn(opt: torch.optim.Optimizer, config: Any = None) -> None:
    """Create empty Adam moments so a loading template has every tensor to fill."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _sharded_state(model: Any, optimizer: Any, iteration: int) -> dict[str, Any]:
    # Parameter all-gathers the step left in flight (CommConfig.overlap_param_gather) finish
    # before the params are read (save) or overwritten (load).
    finish = getattr(optimizer, "finish_param_sync", None)
    if finish is not None:
        finish()
    model_sd = model.module.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd),
        "iteration": iteration,
    }


def save_checkpoint(checkpoint_dir: str, model: Any, optimizer: Any, iteration: int) -> str:
    """Save model + optimizer with dist_checkpointing into ``checkpoint_dir/iter_N``, atomically.

    All ranks write into a temporary directory; rank 0 renames it once every rank is done, so a
    crash mid-write never leaves a directory that looks complete.
    """
    final = os.path.join(checkpoint_dir, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    # The writer's helper processes must survive a stop signal sent to the whole job.
    with stop_signals_blocked():
        dist_checkpointing.save(_sharded_state(model, optimizer, iteration), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = os.path.join(checkpoint_dir, "latest")
        with open(marker + ".tmp", "w") as fh:  # the marker is replaced atomically too
            fh.write(os.path.basename(final))
        os.replace(marker + ".tmp", marker)
    dist.barrier()
    return final


_CHECKPOINT_NAME = re.compile(r"iter_(\d{7})")


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The newest complete checkpoint directory, or None.

    Complete directories are exactly the renamed ``iter_NNNNNNN`` ones (``.tmp`` ones are
    partial). The ``latest`` marker names the newest; if it is missing or unreadable (a crash
    between the rename and the marker update), the newest complete directory is used.
    """
    marker = os.path.join(checkpoint_dir, "latest")
    if os.path.exists(marker):
        with open(marker) as fh:
            name = fh.read().strip()
        if _CHECKPOINT_NAME.fullmatch(name) and os.path.isdir(os.path.join(checkpoint_dir, name)):
            return os.path.join(checkpoint_dir, name)
    if not os.path.isdir(checkpoint_dir):
        return None
    complete = sorted(
        name
        for name in os.listdir(checkpoint_dir)
        if _CHECKPOINT_NAME.fullmatch(name) and os.path.isdir(os.path.join(checkpoint_dir, name))
    )
    return os.path.join(checkpoint_dir, complete[-1]) if complete else None


def load_checkpoint(path: str, model: Any, optimizer: Any) -> int:
    """Load a checkpoint written by save_checkpoint into model and optimizer; returns iteration."""
    saved_keys = set(dist_checkpointing.load_tensors_metadata(path))
    check_soap_params_saved(path, saved_keys, model, optimizer)
    template = _sharded_state(model, optimizer, 0)
    for opt in optimizer.chained_optimizers:
        if hasattr(opt, "init_state_fn") and not hasattr(opt, "engines"):
            opt.init_state_fn(opt.optimizer, opt.config)
    template["optimizer"] = optimizer.sharded_state_dict(template["model"], is_loading=True)
    _drop_derived_fields_absent_from(template["optimizer"], saved_keys)
    loaded = dist_checkpointing.load(template, path)
    model.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded["iteration"])


def _saved_soap_params(saved_keys: set[str]) -> set[str]:
    """Canonical names of the params whose SOAP blocks a checkpoint's tensor keys hold."""
    names = set()
    for key in saved_keys:
        match = _BLOCK_KEY.search(key)
        if match:
            names.add(match.group(1))
    return names


def check_soap_params_saved(path: str, saved_keys: set[str], model: Any, optimizer: Any) -> None:
    """Refuse a checkpoint whose SOAP-stepped params differ from this optimizer's, naming how.

    Every param this optimizer steps with SOAP must have SOAP blocks saved, and no param of
    this model stepped by Adam here may have them (params of other pipeline stages may).
    Otherwise dist_checkpointing would fail on a missing key, or the blocks would be dropped.
    """
    from mlfop_megatron.megatron.naming import canonical_param_names

    ours: set[str] = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        ours.update(getattr(opt, "soap_param_names", ()))
    saved = _saved_soap_params(saved_keys)
    here = set(canonical_param_names(model).values())
    missing = sorted(ours - saved)
    extra = sorted((saved & here) - ours)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"SOAP steps {missing[:3]} here but the checkpoint has no SOAP state "
                "for them (they were Adam's when it was saved)"
            )
        if extra:
            parts.append(f"the checkpoint holds SOAP state for {extra[:3]}, which Adam steps here")
        raise ValueError(
            f"checkpoint {path} was saved with another choice of SOAP params: "
            + "; ".join(parts)
            + ". Resume with the settings it was saved with: the same "
            "--mlfop-position-embeddings (ShardingConfig.position_embeddings / "
            "get_mlfop_optimizer(position_embeddings=...)) and the same model"
        )


def _drop_derived_fields_absent_from(template: Any, saved: set[str]) -> None:
    """Leave out of a loading template the derived fields a checkpoint does not hold.

    A checkpoint saved before the estimates DL, DR were kept loads, and the engines form them
    from the loaded factors and bases. (Megatron-LM's own loader does the same with
    ``--dist-ckpt-strictness log_all``.) ``template``: an optimizer's (or a chain's) sharded
    state dict, walked whole; ``saved``: the checkpoint's tensor keys.
    """
    suffixes = tuple(f".{field}" for field in DERIVED_FIELDS)

    def absent(value: Any) -> bool:
        return (
            isinstance(value, ShardedTensor)
            and PREFIX in value.key
            and value.key.endswith(suffixes)
            and value.key not in saved
        )

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in [k for k, v in node.items() if absent(v)]:
                del node[key]
            children: list[Any] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            return
        for child in children:
            walk(child)

    walk(template)
