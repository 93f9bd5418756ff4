"""Cost side by side with what Megatron ships: every optimizer of the digits table at DP=2 and 4.

Every row trains the digits demo's model through ``examples/digits/optimizers.py``'s one table
and the demo's own ``setup_run`` / ``train_step`` (gloo, CPU, ranks spawned by
``mlfop_megatron.runtime.spawn.run_distributed``) for a few steps: AdamW, our SOAP (folding
off, the package default) and ML-FOP-SOAP (folding on), Megatron 0.19's own ``soap`` and
``muon`` on its plain path (``use_distributed_optimizer=False``, as the demo trains them), and
the same two through Megatron's LayerWiseDistributedOptimizer (``+lw``: Megatron-LM's
``--use-distributed-optimizer --bf16``, the per-bucket layout; ``+lw-pingpong``: with
``--no-use-layer-wise-param-layout``, its fallback). Rows whose optimizer is not installed
here are skipped with the table's reason.

Per row and DP size, from the real calls:

* collectives launched and bytes one rank sends per step, by kind
  (``comm_counter.count_collectives`` around the demo's ``train_step``, with Megatron DDP's
  import-time bindings counted too; ring bytes, see comm_counter). The step includes the
  demo's one all-reduce of its four float64 loss sums (32 B at DP=2, 48 B at DP=4).
* optimizer state bytes per rank, max over ranks: every tensor storage reachable from the
  optimizer object that is not a model param or a DDP grad / param buffer (moments, factors,
  bases, fp32 main weights, and persistent work buffers the optimizer keeps), counted once.
* peak memory per rank, max over ranks: ``benchmarks/memory.py``'s MemTracker over one extra
  step (every live tensor registered first), so persistent + transient bytes at the peak.
* step time: median (plain) and mean (amortized: refresh steps included) over steps 2..N
  (step 1 builds state and is left out); CPU, shared 2 cores, so ratios side by side only.
* checkpoint: at DP=2 the optimizer's own ``sharded_state_dict`` saved with
  ``dist_checkpointing`` (the package's ``save_checkpoint``, which the demo uses), loaded at
  DP=1 into the same row built there (``load_checkpoint``), then one step. ``ok`` means the
  model params are bitwise those saved, the optimizer's ``sharded_state_dict`` after the load
  holds the numbers saved (sum of |x| over its main-replica shards, float64, rel 1e-6) and
  the step after it is finite; otherwise the first line of the error, as it came.

The layer-wise rows also tie ``comm_model``'s Megatron baselines to the counted calls: the
bytes of the launches on the layer-wise buffer (grad reduce-scatter / all-reduce, attributed by
the buffer's storage) and of the layer-wise param sync (launched inside
``LayerWiseDistributedOptimizer.step_with_ready_grads``) on rank 0, next to what the
``layerwise`` row of ``comm_model.layout_costs`` (0.19's per-bucket layout) and the
``layerwise_pingpong`` model (the fallback, ``comm_model.layerwise_fallback_traffic`` for rank
0) predict for the same params and DP (fp32 grads 4 B, bf16 params 2 B), with the ratio.

Run from the repository root in the peers venv::

    .venv-peers/bin/python -m benchmarks.peers_cost            # print the tables
    .venv-peers/bin/python -m benchmarks.peers_cost --write    # and record them in RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import statistics
import tempfile
import time
import types
from collections.abc import Sequence
from functools import wraps
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, log, machine_facts, package_version, replace_section

SECTION = (
    "## Cost side by side with Megatron's optimizers: collectives, state, memory, step time, "
    "checkpoints (digits model, CPU, DP=2 and 4)"
)
# label -> (optimizer of examples/digits/optimizers.py, RunSpec.megatron_layer_wise)
ROWS: dict[str, tuple[str, str]] = {
    "adamw": ("adamw", ""),
    "soap": ("soap", ""),
    "mlfop": ("mlfop", ""),
    "megatron-soap": ("megatron-soap", ""),
    "megatron-muon": ("megatron-muon", ""),
    "megatron-soap+lw": ("megatron-soap", "layout"),
    "megatron-muon+lw": ("megatron-muon", "layout"),
    "megatron-soap+lw-pingpong": ("megatron-soap", "pingpong"),
    "megatron-muon+lw-pingpong": ("megatron-muon", "pingpong"),
}
PARAM_SYNC = "layer-wise param sync"
GRAD_SYNC = "layer-wise buffer grads"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    p.add_argument("--dps", default="2,4", help="data-parallel sizes measured")
    p.add_argument("--steps", type=int, default=6, help="timed and counted steps per row")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the MemTracker step")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the round trip")
    p.add_argument("--write", action="store_true", help="write the tables to RESULTS.md")
    args = p.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; known {list(ROWS)}")
    return args


def make_spec(label: str, args: Any, dp: int) -> Any:
    """The demo's RunSpec of one row (its default lr, seed 0, diagnostics off).

    At DP=1 (the resume) the micro-batch doubles: the same K micro-steps of the same samples
    as at DP=2 (the fold levels of ML-FOP-SOAP depend on K).
    """
    from examples.digits.optimizers import entry
    from examples.digits.spec import RunSpec

    optimizer, layer_wise = ROWS[label]
    return RunSpec(
        optimizer=optimizer,
        out=os.devnull,
        steps=args.steps,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch * (2 if dp == 1 else 1),
        lr=entry(optimizer).default_lr,
        seed=0,
        num_layers=args.layers,
        hidden=args.hidden,
        diag_every=0,
        threads=max(1, (os.cpu_count() or 1) // dp),
        log_every=1,
        megatron_layer_wise=layer_wise,
    )


# ------------------------------------------------------------------------------ on each rank
def _storage_key(t: Any) -> tuple[int, int] | None:
    """(data_ptr, nbytes) of a tensor's storage; None when it has none."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return None if st.nbytes() == 0 else (st.data_ptr(), st.nbytes())


def _tensors(obj: Any) -> list[Any]:
    """Tensors in a collective's arguments (one level of lists)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for t in obj if isinstance(t, torch.Tensor)]
    return []


def model_storages(model: Any) -> set[tuple[int, int]]:
    """Storages of the model's params and of its DDP grad / param buffers."""
    from mlfop_megatron.megatron import compat

    tensors = list(model.parameters())
    tensors += [p.main_grad for p in model.parameters() if hasattr(p, "main_grad")]
    for buffer in compat.ddp_buffers(model):
        tensors += [getattr(buffer, name, None) for name in ("grad_data", "param_data")]
    keys = {_storage_key(t) for t in tensors if t is not None}
    return {k for k in keys if k is not None}


def optimizer_state_bytes(model: Any, optimizer: Any) -> int:
    """Bytes of every storage reachable from the optimizer that is not the model's (module)."""
    import torch

    from benchmarks.memory import reachable_tensors

    exclude = model_storages(model)
    seen: set[tuple[int, int]] = set()
    for t in reachable_tensors(optimizer, skip=(torch.nn.Module, types.ModuleType)):
        key = _storage_key(t)
        if key is not None and key not in exclude:
            seen.add(key)
    return sum(n for _, n in seen)


def own_state_bytes(optimizer: Any) -> int | None:
    """Ours: the package's own count of its state; None for Megatron's optimizers.

    SOAP engines' ``state_bytes`` + the Adam side's: a cross-check of ``optimizer_state_bytes``.
    """
    from mlfop_megatron.megatron.sharded_adam import adam_state_bytes

    if not hasattr(optimizer, "mlfop"):
        return None
    return sum(o.state_bytes() for o in optimizer.mlfop) + sum(
        adam_state_bytes(o) for o in optimizer.others
    )


def layer_wise_parts(run: Any) -> tuple[Any, set[int]]:
    """(the LayerWiseDistributedOptimizer or None, storages of the buffers it syncs)."""
    from mlfop_megatron.megatron import compat

    optimizer = run.optimizer
    found = None
    for opt in [optimizer, *getattr(optimizer, "chained_optimizers", ())]:
        if type(opt).__name__ == "LayerWiseDistributedOptimizer":
            found = opt
    if found is None:
        return None, set()
    layout = run.spec.megatron_layer_wise == "layout"
    buffers = [
        b
        for b in compat.ddp_buffers(run.model)
        if not layout or getattr(b.params[0], "is_managed_by_layer_wise_optimizer", False)
    ]
    keys = {_storage_key(b.grad_data) for b in buffers}
    return found, {k[0] for k in keys if k is not None}


def model_specs(model: Any) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, managed by the layer-wise optimizer) of every param, model order.

    Megatron's rule (``is_managed_by_layer_wise_optimizer``): 2-D and not tagged embedding /
    output layer; the others go to its Adam.
    """
    return [
        (
            name,
            tuple(p.shape),
            p.dim() == 2 and not getattr(p, "is_embedding_or_output_parameter", False),
        )
        for name, p in model.named_parameters()
    ]


def megatron_lm_metadata(spec: Any) -> dict[str, Any] | None:
    """Megatron-LM 0.19's sharded_state_dict metadata for a peer row (None for ours).

    Its own ``_build_sharded_state_dict_metadata`` with its default flags
    (``--ckpt-format torch_dist``, no ``--dist-ckpt-optim-fully-reshardable``): a layer-wise
    row's DistributedOptimizer part saves ``dp_reshardable`` buffers.
    """
    from examples.digits.optimizers import entry

    if entry(spec.optimizer).ours:
        return None
    from megatron.training.checkpointing import _build_sharded_state_dict_metadata

    args = argparse.Namespace(
        use_distributed_optimizer=False,
        use_layer_wise_distributed_optimizer=bool(spec.megatron_layer_wise),
        ckpt_format="torch_dist",
        dist_ckpt_optim_fully_reshardable=False,
        distrib_optim_fully_reshardable_mem_efficient=False,
    )
    return dict(_build_sharded_state_dict_metadata(args))


def sharded_state(run: Any, is_loading: bool = False) -> dict[str, Any]:
    """The {"model", "optimizer"} sharded state dicts of a row.

    Ours as the package's checkpointing builds them, the peers' as Megatron-LM's
    ``generate_state_dict`` does (with its metadata).
    """
    meta = megatron_lm_metadata(run.spec)
    if meta is None:
        model_sd = run.model.module.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": run.optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        }
    state = {"model": run.model.module.sharded_state_dict(metadata=meta)}
    state["optimizer"] = run.optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata=meta
    )
    return state


def save_checkpoint(run: Any, checkpoint_dir: str) -> str:
    """Save a row's checkpoint; returns its path.

    Ours: the package's save_checkpoint (the demo's). Peers: dist_checkpointing.save of
    Megatron-LM's state (``sharded_state``) into ``checkpoint_dir``.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from mlfop_megatron.megatron import checkpointing

    if megatron_lm_metadata(run.spec) is None:
        return checkpointing.save_checkpoint(checkpoint_dir, run.model, run.optimizer, 1)
    if dist.get_rank() == 0:
        os.makedirs(checkpoint_dir)
    dist.barrier()
    dist_checkpointing.save(sharded_state(run), checkpoint_dir)
    dist.barrier()
    return checkpoint_dir


def load_checkpoint(run: Any, path: str) -> None:
    """The counterpart of ``save_checkpoint`` (peers: Megatron-LM's loading template)."""
    from megatron.core import dist_checkpointing

    from mlfop_megatron.megatron import checkpointing

    if megatron_lm_metadata(run.spec) is None:
        checkpointing.load_checkpoint(path, run.model, run.optimizer)
        return
    loaded = dist_checkpointing.load(sharded_state(run, is_loading=True), path)
    run.model.module.load_state_dict(loaded["model"])
    run.optimizer.load_state_dict(loaded["optimizer"])


def param_hashes(model: Any) -> dict[str, str]:
    """sha256 of every param's bytes, by name."""
    import torch

    return {
        n: hashlib.sha256(p.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for n, p in model.named_parameters()
    }


def tracked_peak(run: Any, step: int) -> int:
    """Peak bytes of this rank over one more step under benchmarks/memory.py's MemTracker."""
    import torch
    from torch.distributed._tools.mem_tracker import _MemRefType

    from benchmarks.memory import make_tracker, reachable_tensors
    from examples.digits.train import train_step

    gc.collect()
    params = {_storage_key(p) for p in run.model.parameters()}
    grads = model_storages(run.model) - params
    opt = {
        _storage_key(t)
        for t in reachable_tensors(run.optimizer, skip=(torch.nn.Module, types.ModuleType))
    }
    tracker = make_tracker()
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            continue
        key = _storage_key(obj)
        if key is None:
            continue
        ref = (
            _MemRefType.PARAM
            if key in params
            else _MemRefType.GRAD
            if key in grads
            else _MemRefType.OPT
            if key in opt
            else _MemRefType.OTH
        )
        tracker._update_and_maybe_create_winfos(obj, ref)
    with tracker:
        train_step(run.model, run.optimizer, run.data, run.spec, step, run.accumulation_steps)
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(s.get("Total", 0) for s in peak.values()))


def measure_row(spec: Any, checkpoint_dir: str | None, memory: bool) -> dict[str, Any]:
    """One rank: build the row, count and time its steps, then state, peak, checkpoint."""
    import torch.distributed as dist

    from examples.digits.diagnostics import optimizer_stats
    from examples.digits.optimizers import entry
    from examples.digits.steps import modality_losses
    from examples.digits.train import setup_run, train_step
    from mlfop_megatron.distributed.comm_counter import MEGATRON_IMPORT_BINDINGS, count_collectives

    run = setup_run(spec)
    lw, lw_storages = layer_wise_parts(run)
    attributed: dict[str, dict[str, int]] = {}
    phase = {"param_sync": False}
    if lw is not None:
        inner = lw.step_with_ready_grads

        @wraps(inner)
        def param_sync_marked(*a: Any, **k: Any) -> Any:
            phase["param_sync"] = True
            try:
                return inner(*a, **k)
            finally:
                phase["param_sync"] = False

        lw.step_with_ready_grads = param_sync_marked

    def observe(kind: str, sent: int, args: tuple, kwargs: dict) -> None:
        if phase["param_sync"]:
            part = PARAM_SYNC
        elif any(
            (_storage_key(t) or (0, 0))[0] in lw_storages
            for a in (*args, *kwargs.values())
            for t in _tensors(a)
        ):
            part = GRAD_SYNC
        else:
            return
        slot = attributed.setdefault(part, {})
        slot[kind] = slot.get(kind, 0) + sent

    steps = []
    for step in range(spec.steps):
        attributed.clear()
        with count_collectives(observe, MEGATRON_IMPORT_BINDINGS) as counts:
            t0 = time.perf_counter()
            sums, ok, _ = train_step(
                run.model, run.optimizer, run.data, spec, step, run.accumulation_steps
            )
            dt = time.perf_counter() - t0
        steps.append(
            {
                "time_s": dt,
                "ok": ok,
                "loss": modality_losses(sums)["loss"],
                "launches": dict(counts.launches),
                "bytes": dict(counts.bytes),
                "attributed": {k: dict(v) for k, v in attributed.items()},
            }
        )
    stats = optimizer_stats(run.optimizer) if entry(spec.optimizer).ours else {}
    out: dict[str, Any] = {
        "rank": dist.get_rank(),
        "steps": steps,
        "state_bytes": optimizer_state_bytes(run.model, run.optimizer),
        "own_state_bytes": own_state_bytes(run.optimizer),
        "refreshes": (stats.get("refreshes_done"), stats.get("refreshes_skipped")),
        "specs": model_specs(run.model),
        "optimizer_type": type(run.optimizer).__name__,
    }
    if memory:
        out["peak_bytes"] = tracked_peak(run, spec.steps)
    if checkpoint_dir is not None:
        out["checkpoint"] = save_row(run, checkpoint_dir)
    del run
    gc.collect()
    return out


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (300 characters at most), and where it was raised."""
    import traceback

    text = str(err).strip()
    line = f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{line} ({Path(frame.filename).name}:{frame.lineno} {frame.name})"


def param_update(run: Any, step: int) -> dict[str, Any]:
    """Take step ``step``; every param's change (float32, CPU) by name."""
    from examples.digits.train import train_step

    before = {n: p.detach().float().clone() for n, p in run.model.named_parameters()}
    sums, ok, _ = train_step(
        run.model, run.optimizer, run.data, run.spec, step, run.accumulation_steps
    )
    if not (ok and math.isfinite(float(sums[0]))):
        raise FloatingPointError(f"step {step + 1} skipped or not finite")
    return {n: p.detach().float() - before[n] for n, p in run.model.named_parameters()}


def save_row(run: Any, checkpoint_dir: str) -> dict[str, Any]:
    """Save (error text kept), then one more step here: the update a resume must reproduce."""
    import torch.distributed as dist

    out: dict[str, Any] = {"params": param_hashes(run.model)}
    try:
        out["path"] = save_checkpoint(run, checkpoint_dir)
    except Exception as err:  # recorded as it came, on every rank that raised
        out["error"] = error_line(err)
    dist.barrier()
    if "path" in out:
        update = param_update(run, run.spec.steps + 1)
        if dist.get_rank() == 0:
            out["update"] = update
    return out


def measure_world(
    specs: list[Any], checkpoint_root: str | None, memory: bool
) -> list[dict[str, Any]]:
    """Every row in turn in this spawned world (checkpoints under ``checkpoint_root``)."""
    import warnings

    warnings.filterwarnings("ignore")
    return [
        measure_row(
            spec,
            None if checkpoint_root is None else str(Path(checkpoint_root) / f"row{i}"),
            memory,
        )
        for i, spec in enumerate(specs)
    ]


def relative_l2(
    update: dict[str, Any], reference: dict[str, Any], names: Sequence[str] | None = None
) -> float:
    """||update - reference|| / ||reference|| over the params ``names`` (default: all)."""
    import torch

    names = sorted(reference) if names is None else sorted(names)
    ref = torch.cat([reference[n].reshape(-1) for n in names])
    got = torch.cat([update[n].reshape(-1) for n in names])
    return float((got - ref).norm() / ref.norm())


def load_row(spec: Any, path: str, saved: dict[str, Any], step_first: bool = False) -> str:
    """DP=1: build the row, load the DP=2 checkpoint, take the step the DP=2 run took next.

    ``ok`` when the loaded params are bitwise those saved and the update of that step is the
    DP=2 run's to within a tenth of how far the same step from the same params with a fresh
    optimizer state lands (relative L2 over all params; DP=1 sums gradients in another order,
    so the resumed update is close, not equal). The distance is also given apart for the
    matrices (Megatron's rule, ``model_specs``) and the other params. ``step_first``: take
    one step before the load (what Megatron-LM never does; see NOTES: without apex /
    TransformerEngine a DistributedOptimizer that has not stepped cannot build its loading
    template).
    """
    import torch

    from examples.digits.train import setup_run, train_step

    run = setup_run(spec)
    try:
        if step_first:
            train_step(run.model, run.optimizer, run.data, spec, 0, run.accumulation_steps)
        load_checkpoint(run, path)
        loaded = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        hashes = param_hashes(run.model)
        update = param_update(run, spec.steps + 1)
    except Exception as err:
        return f"load at DP=1 failed: {error_line(err)}"
    matrices = [n for n, _, managed in model_specs(run.model) if managed]
    others = [n for n in saved["update"] if n not in matrices]
    rel = relative_l2(update, saved["update"])
    parts = [relative_l2(update, saved["update"], group) for group in (matrices, others)]
    del run
    gc.collect()
    fresh = setup_run(spec)  # the control: the loaded params, a fresh optimizer state
    with torch.no_grad():
        for n, p in fresh.model.named_parameters():
            p.copy_(loaded[n])
    fresh.optimizer.reload_model_params()
    rel_fresh = relative_l2(param_update(fresh, spec.steps + 1), saved["update"])
    problems = []
    if hashes != saved["params"]:
        differ = sorted(n for n in saved["params"] if hashes.get(n) != saved["params"][n])
        problems.append(f"params differ from those saved ({len(differ)}: {differ[:2]})")
    if not rel <= 0.1 * rel_fresh:
        problems.append("optimizer state not restored")
    numbers = (
        f"next update vs DP=2: rel L2 {rel:.1e} (matrices {parts[0]:.1e}, others "
        f"{parts[1]:.1e}), {rel_fresh:.2f} from a fresh state"
    )
    return f"{'; '.join(problems) or 'ok'} ({numbers})"


def load_world(jobs: list[tuple[Any, str, dict[str, Any]]]) -> list[str]:
    """Every (spec, checkpoint, saved) at DP=1 in turn.

    A load that fails is tried once more with one step before it; both verdicts are kept.
    """
    import warnings

    warnings.filterwarnings("ignore")
    verdicts = []
    for job in jobs:
        verdict = load_row(*job)
        if verdict.startswith("load at DP=1 failed"):
            again = load_row(*job, step_first=True)
            verdict += f"; with one DP=1 step before the load (CPU-only retry): {again}"
        verdicts.append(verdict)
    return verdicts


# ---------------------------------------------------------------------------------- analysis
def layerwise_predictions(
    specs: list[tuple[str, tuple[int, ...], bool]], dp: int, rank: int = 0
) -> dict[str, dict[str, float]]:
    """Bytes per step on the layer-wise buffer's grads and param sync, per comm_model row.

    ``layerwise`` (0.19's per-bucket layout, the same on every rank): ``layout_costs`` gives
    bytes per matrix element for one fp32 grad reduce-scatter (4r B) and one bf16 param
    all-gather (2r B) per padded element: 6r x padded / P_matrix; its grad part is 4/6 of that,
    its param part 2/6. ``layerwise_pingpong`` (the fallback, every param): the grad
    all-reduce and this ``rank``'s piece-wise all-gather from ``layerwise_fallback_traffic``,
    whose busiest rank is the row.
    """
    from mlfop_megatron.distributed.assignment import ParamSpec
    from mlfop_megatron.distributed.comm_model import layerwise_fallback_traffic, layout_costs

    params = [ParamSpec(n, s, preconditioned=m) for n, s, m in specs]
    p_matrix = sum(p.numel for p in params if p.soap_matrix)
    out = {}
    for cost in layout_costs(params, dp, levels=1, block_size=None):
        if cost.layout == "layerwise":
            per_step = cost.bytes_per_soap_element * p_matrix
            out[cost.layout] = {"grads": per_step * 4 / 6, "params": per_step * 2 / 6}
    fallback = layerwise_fallback_traffic([p.numel for p in params], dp)
    out["layerwise_pingpong"] = {
        "grads": fallback.grad_all_reduce,
        "params": float(fallback.param_all_gather[rank]),
    }
    return out


def _kinds(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"


def _steady(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return steps[1:] if len(steps) > 1 else steps


def cost_table(results: dict[tuple[str, int], Any], rows: list[str], dps: list[int]) -> list:
    """The main table: one line per row and DP size."""
    lines = [
        "| row | DP | precision | launches/step by kind | bytes/step by kind (one rank) "
        "| optimizer state B/rank (max) | peak MiB/rank (max) | median ms/step | mean ms/step "
        "| refreshes (done/skipped) | checkpoint DP=2 -> DP=1 |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for label in rows:
        for dp in dps:
            res = results.get((label, dp))
            if res is None:
                continue
            if isinstance(res, str):  # skipped or failed: the reason
                lines.append(f"| {label} | {dp} | | {res} | | | | | | | |")
                continue
            ranks = res["ranks"]
            r0 = ranks[0]
            last = r0["steps"][-1]
            varies = any(
                s["launches"] != last["launches"] or s["bytes"] != last["bytes"]
                for s in _steady(r0["steps"])
            )
            times = [s["time_s"] for r in ranks[:1] for s in _steady(r["steps"])]
            peak = (
                f"{max(r['peak_bytes'] for r in ranks) / 2**20:.2f}"
                if "peak_bytes" in r0
                else "not measured"
            )
            done, skipped = r0["refreshes"]
            refresh = "-" if done is None else f"{done}/{skipped}"
            precision = "bf16 params" if ROWS[label][1] else "fp32"
            lines.append(
                f"| {label} | {dp} | {precision} | {_kinds(last['launches'])}"
                f"{' (varies)' if varies else ''} | {_kinds(last['bytes'])} "
                f"| {max(r['state_bytes'] for r in ranks)} | {peak} "
                f"| {1e3 * statistics.median(times):.0f} | {1e3 * statistics.fmean(times):.0f} "
                f"| {refresh} | {res.get('checkpoint', '-')} |"
            )
    return lines


def tie_table(results: dict[tuple[str, int], Any], rows: list[str], dps: list[int]) -> list:
    """Counted layer-wise bytes per step (rank 0) against comm_model's two layer-wise models."""
    lines = [
        "| row | DP | part | counted launches (kind) | counted B/step | `layerwise` row B "
        "| counted / `layerwise` | `layerwise_pingpong` B (rank 0) "
        "| counted / `layerwise_pingpong` |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for label in rows:
        if not ROWS[label][1]:
            continue
        for dp in dps:
            res = results.get((label, dp))
            if not isinstance(res, dict):
                continue
            r0 = res["ranks"][0]
            pred = layerwise_predictions(r0["specs"], dp, r0["rank"])
            last = r0["steps"][-1]["attributed"]
            for part, key in ((GRAD_SYNC, "grads"), (PARAM_SYNC, "params")):
                counted = last.get(part, {})
                total = sum(counted.values())
                lw, pp = pred["layerwise"][key], pred["layerwise_pingpong"][key]
                lines.append(
                    f"| {label} | {dp} | {part} | {_kinds({k: 1 for k in counted})} | {total} "
                    f"| {lw:.0f} | {total / lw:.3f} | {pp:.0f} | {total / pp:.3f} |"
                )
    return lines


# -------------------------------------------------------------------------------------- main
def measure_all(args: Any, runnable: list[str], dps: list[int], tmp: str) -> dict[Any, Any]:
    """Every runnable row at every DP size, then the DP=1 resumes.

    One spawned world per DP size (checkpoints saved at DP=2), one at DP=1 for the resumes:
    {(label, dp): {"ranks": per-rank results, "checkpoint": verdict}}.
    """
    from mlfop_megatron.runtime.spawn import run_distributed

    results: dict[Any, Any] = {}
    saved: dict[str, dict[str, Any]] = {}
    for dp in dps:
        specs = [make_spec(label, args, dp) for label in runnable]
        root = None if args.no_checkpoint or dp != 2 else tmp
        t0 = time.perf_counter()
        memory = not args.no_memory
        threads = specs[0].threads
        ranks = run_distributed(
            measure_world, dp, specs, root, memory, timeout=1800.0, threads=threads
        )
        log(f"DP={dp}: {len(specs)} rows in {time.perf_counter() - t0:.0f} s")
        for i, label in enumerate(runnable):
            per_rank = [r[i] for r in ranks]
            results[(label, dp)] = {"ranks": per_rank}
            if root is None:
                continue
            errors = sorted({r["checkpoint"].get("error") for r in per_rank} - {None})
            if errors:
                results[(label, dp)]["checkpoint"] = "save at DP=2 failed: " + " / ".join(errors)
            else:
                saved[label] = per_rank[0]["checkpoint"]
    if saved:
        jobs = [(make_spec(label, args, 1), saved[label]["path"], saved[label]) for label in saved]
        t0 = time.perf_counter()
        (verdicts,) = run_distributed(load_world, 1, jobs, timeout=1800.0, threads=2)
        log(f"DP=1 resumes: {len(jobs)} rows in {time.perf_counter() - t0:.0f} s")
        for label, verdict in zip(saved, verdicts):
            results[(label, 2)]["checkpoint"] = verdict
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every row at every DP size, the checkpoint round trip, print (and record)."""
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning")
    args = parse_args(argv)
    from examples.digits.optimizers import entry

    rows = args.rows.split(",")
    dps = [int(x) for x in args.dps.split(",") if x]
    skipped: dict[Any, Any] = {}
    for label in rows:
        reason = entry(ROWS[label][0]).missing()
        if reason is not None:
            log(f"skip {label}: {reason}")
            skipped.update({(label, dp): f"skipped: {reason}" for dp in dps})
    runnable = [label for label in rows if (label, dps[0]) not in skipped]
    with tempfile.TemporaryDirectory(prefix="peers_cost_") as tmp:
        results = {**skipped, **measure_all(args, runnable, dps, tmp)}
    lines = ["", "### Cost per row (counted on the real calls)", ""]
    lines += cost_table(results, rows, dps)
    lines += ["", "### Megatron's layer-wise optimizer: counted bytes against comm_model", ""]
    lines += tie_table(results, rows, dps)
    print("\n".join(lines))
    if args.write:
        command = (
            f".venv-peers/bin/python -m benchmarks.peers_cost --write --rows {args.rows} "
            f"--dps {args.dps} --steps {args.steps} --layers {args.layers} --hidden "
            f"{args.hidden} --global-batch {args.global_batch} --micro-batch {args.micro_batch}"
        )
        header = [
            "",
            f"Measured with `{command}` on "
            + machine_facts(
                f"megatron-core {package_version('megatron-core')}",
                f"emerging-optimizers {package_version('emerging-optimizers')}",
            )
            + " (shared with other jobs: times are side-by-side ratios at best).",
        ]
        replace_section(RESULTS, SECTION, "\n".join([SECTION, *header, *NOTES, *lines]) + "\n")


NOTES = [
    "",
    "Rows: every optimizer of `examples/digits/optimizers.py`'s table at its default lr, seed "
    "0, the digits model at the sizes in the command; `soap` is our SOAP with folding off "
    "(the package default), `mlfop` the same with folding on; Megatron's rows run its own "
    "defaults. `+lw`: Megatron-LM's `--use-distributed-optimizer` for an emerging optimizer "
    "(LayerWiseDistributedOptimizer on 0.19's per-bucket layout, the non-matrix params in a "
    "DistributedOptimizer), built by Megatron-LM's own `resolve_ddp_bucket_size` and "
    "`wrap_model_chunks_with_ddp`; `+lw-pingpong`: the same with "
    "`--no-use-layer-wise-param-layout` (its fallback: every param in one layer-wise buffer, "
    "grads all-reduced, params all-gathered in unequal pieces). Both `+lw` kinds train bf16 "
    "params (`--bf16`): with fp32 params 0.19.2's `get_megatron_optimizer` fails (it chains "
    "the bare torch optimizers, which have no config, with a DistributedOptimizer, and "
    "ChainedOptimizer asserts equal configs). CPU stand-ins, for these rows only: while the "
    "optimizer is built `Tensor.type()` names emulated tensors `torch.cuda.*` "
    "(DistributedOptimizer refuses anything else), and gloo is given the unequal all-gather "
    "NCCL runs (padded on the wire; counted at the call's own sizes).",
    "",
    "Collectives: the last counted step (`(varies)`: another step of 2..N launched "
    "something else), rank 0, ring bytes one rank sends (`comm_counter`, Megatron DDP's "
    "import-time bindings of all_gather_into_tensor / reduce_scatter_tensor counted too: "
    "before this they were missed). Every step includes the demo's all-reduce of its four "
    "float64 loss sums (32 B at DP=2, 48 B at DP=4). Optimizer state: every storage "
    "reachable from the optimizer object that is not a model param or a DDP buffer, max over "
    "ranks (for ours within 600 B of the package's own `state_bytes()` count: 0-d step "
    "counters). Peak: MemTracker (`benchmarks/memory.py`) over one extra step, persistent "
    "and transient, max over ranks. Time: rank 0, steps 2..N (step 1 builds state), median "
    "= plain step, mean = amortized (refresh steps included); refreshes: ours' sides "
    "refreshed / skipped by the drift gate over the run (Megatron's SOAP refreshes every step).",
    "",
    "Checkpoint: at DP=2 after the counted steps and the tracked one, ours through the "
    "package's `save_checkpoint` (what the demo uses), Megatron's through "
    "`dist_checkpointing.save` of its model's and optimizer's own `sharded_state_dict` with "
    "Megatron-LM's metadata (its `_build_sharded_state_dict_metadata`, default flags: "
    "`dp_reshardable` DistributedOptimizer buffers); the DP=2 run then takes one more step. "
    "At DP=1 (same K micro-steps of the same samples: micro-batch doubled) the row is built, "
    "loaded and takes that step. `ok`: loaded params bitwise those saved, and that step's "
    "update within a tenth of the distance a fresh optimizer state lands from the DP=2 "
    "update (relative L2 over all params, also given for the matrices and the other params "
    "apart; DP=1 sums gradients in another order, and SOAP's eigenbases of early, "
    "rank-deficient factors follow it: on a 1-layer, hidden-32 model with 3 steps before the "
    "save our SOAP's resumed update was 0.8 away against 1.0 fresh, while a resume of the "
    "same checkpoint at DP=2 was bitwise equal). A failed save or load shows its first line "
    "and where it was raised.",
    "",
    "A load that fails is tried once more after one step at DP=1 (Megatron-LM never does "
    "this): without apex / TransformerEngine, DistributedOptimizer.state_dict asserts one "
    "`step` over its Adam state, which a fresh torch Adam lacks, so no DistributedOptimizer "
    "(the `+lw` rows' non-matrix part) can build its loading template before stepping on "
    "this CPU; with them the step comes from the param groups. That retry is not a resume "
    "of the DistributedOptimizer part: loaded the same way at DP=2, the layer-wise matrices' "
    "next update was bitwise the saved run's and the DistributedOptimizer's params' up to "
    "0.7 away (checked once, muon, these sizes), so the `+lw` rows' resume is not measured "
    "on this machine, only that it fails here.",
    "",
    "Tie to comm_model: on the `+lw` rows, the launches on the layer-wise buffer's grads "
    "(by storage) and inside `LayerWiseDistributedOptimizer.step_with_ready_grads` (its param "
    "sync), rank 0, next to `comm_model` for the same params and DP: its `layerwise` row "
    "(0.19's per-bucket layout, Megatron's rule for the matrices: 2-D, not embedding / output "
    "layer; 4r x padded elements for the fp32 grad reduce-scatter, 2r x padded for the bf16 "
    "param all-gather) and its `layerwise_pingpong` model (the fallback, "
    "`layerwise_fallback_traffic`: with no layout DDP all-reduces every param's fp32 grads, "
    "8r x P B, and the optimizer all-gathers the ping-pong-dealt bf16 params in unequal "
    "pieces, 2 x (P - the rank's own elements) B as `comm_counter` counts it; the ranks "
    "differ, so the column is rank 0's and the row of the modelled tables carries the busiest "
    "rank's). `tests/test_layerwise_counted.py` asserts both exactly, every rank, at DP=2 "
    "and 4 (on a 1-layer, hidden-32 model).",
]


if __name__ == "__main__":
    main()
