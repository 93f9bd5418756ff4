"""Readable text of a plan (``mlfop-plan``'s output) and the unit formatting it uses."""

from __future__ import annotations

from mlfop_megatron.distributed.comm_model import ALPHA_S, BETA_BYTES_PER_S, format_table
from mlfop_megatron.launch.plan.memory import RankMemory
from mlfop_megatron.launch.plan.model import Plan

KIB, MIB, GIB = 1024.0, float(1 << 20), float(1 << 30)


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
    """Count with a K/M/B suffix and one decimal."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_flops(gflop: float) -> str:
    """GFLOP amount in TFLOP/GFLOP/MFLOP/KFLOP, whichever keeps the number >= 1."""
    for unit, size in (("TFLOP", 1e3), ("GFLOP", 1.0), ("MFLOP", 1e-3), ("KFLOP", 1e-6)):
        if abs(gflop) >= size:
            return f"{gflop / size:.1f} {unit}"
    return f"{gflop * 1e9:.0f} FLOP"


def _row(label: str, *values: str, width: int = 72) -> str:
    return f"  {label:<{width}}" + "".join(f"{v:>12}" for v in values)


def _level_label(m: RankMemory, what: str) -> str:
    """The level reduction's line: one send buffer, or G buckets (CommConfig.level_buckets)."""
    if m.level_buckets == 1:
        return f"transient: {what}, send + receive buffers"
    return f"transient: {what} in {m.level_buckets} buckets, 2 send buffers + receive"


def _transient_lines(m: RankMemory) -> list[str]:
    """The window's and the step's transient terms: with or without folding (plan/memory.py)."""
    fb = format_bytes
    if m.folding:
        return [
            _row(
                "transient: class stacks + rotated estimate while the window folds (2 S)",
                fb(m.window_buffers),
            ),
            _row(
                "transient: a fold's eager chains (<= 1 class stack; compiled: none)",
                fb(m.fold),
            ),
            _row(
                "transient: the folded estimate (both forms) left at the step (2 S)",
                fb(m.step_buffers),
            ),
            _row(
                _level_label(m, "level reduce-scatter"),
                fb(m.level_buffers),
            ),
        ]
    return [
        _row("transient: fold buffers and fold workspace (folding off: none)", fb(0)),
        _row(
            _level_label(m, "the one level reduce-scatter"),
            fb(m.level_buffers),
        ),
        _row("transient: level stacked per class + received segment (S + seg)", fb(m.stacking)),
        _row("transient: class stacks + their rotation at the step (2 S)", fb(m.step_buffers)),
    ]


def _peak_phase(m: RankMemory) -> str:
    """Where the transient peaks: the step, or before it (window / level reduction)."""
    if m.transient_step >= m.transient_window:
        return "step"
    if m.folding:
        return "fwd/bwd"
    return "level reduction" if m.level_buffers >= m.stacking else "level stacking"


def _peak_memory_lines(plan: Plan) -> list[str]:
    """Peak memory per rank by the tracker's categories (launch/plan/memory.py)."""
    b, cfg, fb = plan.busiest, plan.config, format_bytes
    m = b.peak_memory
    if m is None:
        return []
    target = 1.1 * (b.distopt_adam_bytes + m.soap_state)
    lines = [
        _row("peak memory per rank (categories of benchmarks/memory.py; busiest owner)", "bytes"),
        _row(f"params ({cfg.param_bytes} B each; not optimizer memory)", fb(m.params)),
        _row("grads: DDP grad buffer (main_grad, fp32)", fb(m.grads)),
        _row(
            "optimizer state: owned SOAP blocks"
            + (" (with fp32 main weights)" if cfg.param_bytes < 4 else ""),
            fb(m.soap_state),
        ),
        _row("optimizer state: Adam, ZeRO-1 slice", fb(m.adam_state)),
        _row(
            "optimizer state: null-probe cache (worst case: n^2 per rotated dim)", fb(m.probe_cache)
        ),
        *_transient_lines(m),
        _row("transient: basis refresh, one wave (<= g_max or one block's 3 n^2)", fb(m.refresh)),
        _row(f"transient peak ({_peak_phase(m)})", fb(m.transient)),
        _row("optimizer peak: grads + optimizer state + transient", fb(m.optimizer_peak)),
        _row(
            "target: DistributedOptimizer-Adam (4 B + 12 B/DP per param) + SOAP state, +10%",
            fb(target),
        ),
        f"  optimizer peak / target {m.optimizer_peak / target:.3f}"
        f" ({'within' if m.optimizer_peak <= target else 'OVER'} the DESIGN budget; "
        "activations and communication library scratch not included)",
    ]
    return lines


def format_plan(plan: Plan) -> str:
    """Readable multi-section report of a plan."""
    cfg, d, b = plan.config, plan.config.dims, plan.busiest
    fb = format_bytes
    head_dim = d.head_dim or d.hidden // d.heads
    owners = (
        f"whole matrices owned over the TP x DP group ({cfg.owner_ranks} ranks)"
        if cfg.full_mode
        else f"each TP shard's blocks owned over the DP group ({cfg.dp} ranks)"
    )
    bs = "whole params" if plan.block_size is None else str(plan.block_size)
    if plan.block_size_source == "auto":
        met = "met" if plan.target_met else "NOT met"
        bs += f" (auto, target balance {cfg.target_balance:g} {met})"
    lines = [
        f"ML-FOP-SOAP plan: {cfg.model_name} (hidden {d.hidden}, ffn {d.ffn}, {d.layers} layers, "
        f"{d.heads} heads / {d.kv_heads} kv heads x {head_dim}, vocab {d.vocab}"
        f"{'' if cfg.gated else ', not gated'}{'' if cfg.fused else ', unfused'}"
        f"{', bias' if cfg.bias else ''}{', tied embeddings' if cfg.tied_embeddings else ''})",
        f"layout: DP {cfg.dp} x TP {cfg.tp} x PP {cfg.pp} = {cfg.world} ranks; "
        f"K = {cfg.micro_batches} micro-batches -> {plan.num_levels} level(s) "
        f"(boundaries {' '.join(map(str, plan.boundaries))}"
        f"{'' if cfg.folding is None or cfg.folding.enabled else '; folding off: --folding'})",
        f"optimizer: tp_mode {cfg.tp_mode}, {owners}; block size {bs}; "
        f"max_precond_dim {cfg.soap.max_precond_dim}; precondition_frequency "
        f"{cfg.soap.precondition_frequency}; state {cfg.state_bytes} B/float; params in "
        f"communication {cfg.param_bytes} B",
    ]
    if len(plan.stages) > 1:
        lines += [
            "",
            "per pipeline stage (per rank):",
            f"  {'stage':>5}  {'holds':<42}{'params':>9}{'blocks':>8}{'idle':>6}"
            f"{'opt mem max':>13}{'balance':>9}{'max flop':>13}{'comm/step':>12}",
        ]
        for s in plan.stages:
            lines.append(
                f"  {s.stage:>5}  {s.label:<42}{format_count(s.params_per_rank):>9}"
                f"{s.num_blocks:>8}{s.idle_ranks:>6}{fb(s.memory_max_bytes):>13}"
                f"{s.compute_balance:>9.3f}{format_flops(s.compute_max_gflop):>13}"
                f"{fb(s.comm_bytes_per_step):>12}"
            )
    full = cfg.full_mode
    lines += [
        "",
        f"busiest stage {b.stage} ({b.label}): {format_count(b.params_per_rank)} params per "
        f"TP rank ({format_count(b.soap_params_per_rank)} in {b.soap_matrices} SOAP matrices, "
        f"{format_count(b.adam_params_per_rank)} Adam)",
        _row("memory (optimizer only; main params/grads NOT included)", "max", "mean"),
        _row(
            f"SOAP state: factors, bases, moments (over {b.owner_ranks} owner ranks)",
            fb(b.soap_state_max_bytes),
            fb(b.soap_state_mean_bytes),
        ),
        _row(
            "Adam state: embedding/output/norms/biases, sharded over DP (ZeRO-1)",
            fb(b.adam_state_bytes),
            fb(b.adam_state_bytes),
        ),
        _row(
            "fold buffers: estimate + rotated estimate of owned blocks"
            if cfg.schedule.num_folds
            else "fold buffers (folding off: none)",
            fb(b.fold_buffer_max_bytes),
            fb(b.fold_buffer_mean_bytes),
        ),
        _row(
            "tp-full: whole-matrix fp32 param copy + gathered level grad",
            fb(b.tp_full_buffer_bytes) if full else "-",
            fb(b.tp_full_buffer_bytes) if full else "-",
        ),
        _row("total (max: busiest rank)", fb(b.memory_max_bytes), fb(b.memory_mean_bytes)),
        f"  SOAP state summed over the {b.owner_ranks} owner ranks: "
        f"{fb(b.soap_state_total_bytes)} (memory max/mean {b.soap_memory_balance:.3f})",
        *_peak_memory_lines(plan),
        "compute per optimizer step (SOAP matmuls + basis refresh amortized over "
        f"{cfg.soap.precondition_frequency} steps)",
        f"  busiest rank {format_flops(b.compute_max_gflop)}, mean "
        f"{format_flops(b.compute_mean_gflop)}, balance max/mean {b.compute_balance:.3f} "
        f"({b.num_blocks} blocks, {b.idle_ranks} idle ranks; "
        f"{format_flops(b.compute_total_gflop)} over the group)",
        f"  Megatron ping-pong (whole params, same ranks): balance {b.pingpong_balance:.3f}, "
        f"busiest rank {format_flops(b.pingpong_max_gflop)} -> ours "
        f"{b.speedup_vs_pingpong:.2f}x faster on the busiest rank",
        _row(
            f"communication per optimizer step, per rank (bytes sent, ring; N = DP {cfg.dp}; "
            f"{b.launches_per_step} launches)",
            "bytes",
        ),
        _row(
            f"level reduce-scatters: {plan.num_levels} x (N-1)/N x owner-ordered fp32 SOAP grads",
            fb(b.level_reduce_bytes_per_step),
        ),
        _row(
            "Adam: grads all-reduced once (fp32) + ZeRO-1 param all-gather",
            fb(b.adam_sync_bytes_per_step),
        ),
        _row(
            f"param all-gather: owner-ordered SOAP params ({cfg.param_bytes} B/param)",
            fb(b.param_gather_bytes_per_step),
        ),
        _row(
            f"TP all-gather of level grads (tp-full): {plan.num_levels} x (TP-1) x shard",
            fb(b.tp_gather_bytes_per_step) if full else "-",
        ),
        _row("total (with the norm/found-inf all-reduce)", fb(b.comm_bytes_per_step)),
        "",
        f"communication and optimizer memory side by side (comm_model, stage {b.stage}, bf16 "
        f"params, fp32 main weights; alpha-beta {ALPHA_S * 1e6:g} us per log2(N) step, "
        f"{BETA_BYTES_PER_S / 1e9:g} GB/s per GPU):",
        format_table(plan.communication),
        "",
        "notes:",
    ]
    lines += [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)
