"""``make gpu-check``: everything the first GPU run must show, in one command (issue 21 item 5).

On one CUDA GPU, in this order, parts 2 and 3 each in its own process (a crash in one is
recorded and the next still runs):

1. device facts: name, compute capability, memory, torch / CUDA / megatron-core /
   TransformerEngine / apex versions ('absent' where not installed), and
   ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`` (NGC images set it; the optimizer refuses a CUDA run
   with it on, so the child processes get ``0`` and the original value is recorded);
2. the GPU suite, ``pytest tests/gpu -q -rs -p no:cacheprovider`` (its ranks start with
   ``spawn``, made explicit by ``MLFOP_MP_START_METHOD=spawn``): TE LayerNormLinear / Linear
   stacks in bf16 and in FP8 (delayed and tensorwise recipes, fp8_param on and off) with
   folding on, asserting the SOAP weights move, follow the SOAP equations and equal their
   requantized fp32 main weights; passed / failed / skipped counts and the tail of its output;
3. the optimizer's cost at scale: a Megatron GPTModel (tests/support/tiny_gpt.py sized up:
   the local layer spec, bf16, DP=1) in ``FoldingDistributedDataParallel`` with
   ``get_mlfop_optimizer`` and every ML-FOP-SOAP default; the median forward+backward time of
   one accumulation window and of ``optimizer.step()`` (CUDA events, synchronised only around
   the timed regions) after warm-up, their ratio, and ``torch.cuda.max_memory_allocated``
   (reset before each phase) against the memory model
   (``mlfop_megatron.launch.plan.memory.rank_memory`` on the engine's own assignment).

Sizing of part 3: hidden 2048, 16 heads, ffn 4 x hidden, sequence 1024, micro-batch 2, K = 8
micro-batches (16384 tokens per optimizer step), vocab 64 (the synthetic data's; the stack is
what is measured), and as many layers, up to 20 (1.0B parameters), as the memory model plus an
activation estimate fit into 80% of the GPU's memory. With the defaults (whole matrices, every
side up to 10000 rotated) the model puts a 1.0B stack at ~55 GiB (SOAP factors and bases are
~31 bytes per parameter; the basis refresh runs in waves of at most one largest class's
gradient stack, ``SOAPConfig.refresh_wave``: it was ~21 GiB more, 88 GiB in all, with every
new basis at once), so an 80 GB H100 and a 141 GB H200 both get all 20 layers (modelled
55 GiB + 5.8 GiB of activations); a 40 GB card would get 10. An out-of-memory failure retries
once at 2/3 of the layers; any other failure
with NCCL retries once with gloo. Expected time (estimated, not measured): 2-3 minutes, most of
it SOAP's first step (an eigh of every Kronecker factor, 26 of them 8192 x 8192); one fwd+bwd
window is ~0.2 s of GEMMs, a step that refreshes bases a few seconds. Every iteration's
figures are saved as they come, so a run stopped at its timeout still reports.

4. the compiled chains (issue 23, ``SOAPConfig.compile``): the fold's phase-1 and phase-2
   sums, the fold and the Adam chain of ``core/fused.py`` on one Llama-like class stack (16
   blocks of 1024 x 1024 fp32; ``--quick``: 4 of 32 x 32 on the CPU), eager and
   ``torch.compile``d (Triton on the GPU): median times, compile seconds, kernels compiled
   and the largest difference from eager (relative to the largest entry; must be <= 1e-4).

Outputs: ``<out>/gpu_check.json`` (every figure), ``<out>/gpu_check.md`` (the tables that
benchmarks/RESULTS.md quotes; ``--write`` replaces its section with them), ``<out>/
gpu_suite.log``. The whole run is checked against an 8-minute budget (a warning if over).

    python -m benchmarks.gpu_check [--out runs/gpu-check]   # needs CUDA (exit 2 without)
    python -m benchmarks.gpu_check --quick                  # part 3 only, tiny; on CPU with
                                                            # the CUDA emulation (strict device
                                                            # checking) and perf_counter

Exit status: 0 all parts passed, 1 a part failed, 2 no CUDA (nothing ran).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA_MESSAGE = "make gpu-check needs a CUDA GPU: torch.cuda.is_available() is False; nothing ran"
SECTION = "## GPU check (make gpu-check)"
BUDGET_S = 8 * 60
# Timeouts (s). Expected: the suite ~2-3 min (10 spawned runs, TE imports), part 3 ~2-3 min
# (its first step takes an eigh of every Kronecker factor: ~26 of 8192 x 8192 on an H100 stack).
# Part 3 gets at least MEASURE_MIN_S even when the suite used up the budget: over budget is a
# warning, a killed measurement is nothing.
SUITE_TIMEOUT_S = 360
MEASURE_TIMEOUT_S = 360
MEASURE_MIN_S = 180
TF32_ENV = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"
GIB = float(1 << 30)
# Share of the GPU's memory the modelled peak plus activations may take when sizing part 3.
MEMORY_SHARE = 0.8
MOST_LAYERS = 20


@dataclass(frozen=True)
class StackSpec:
    """The GPT stack of part 3 and how it is run (JSON-serialisable: it crosses processes)."""

    hidden: int = 2048
    layers: int = MOST_LAYERS
    heads: int = 16
    vocab: int = 64
    seq: int = 1024
    micro_batch: int = 2
    microbatches: int = 8  # K: one optimizer step per K micro-batches
    warmup: int = 2  # SOAP's first step only collects statistics; the second makes moments
    steps: int = 5  # timed iterations (fewer when time_budget_s runs out, at least 2)
    time_budget_s: float = 150.0
    cuda: bool = True  # False: CPU with mlfop_megatron.runtime.cpu_emulation, perf_counter
    backend: str = "nccl"  # the process group (DP=1); gloo on CPU

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one accumulation window (one optimizer step)."""
        return self.seq * self.micro_batch * self.microbatches


# The CPU path of part 3 (also `--quick` on a GPU): the tiny GPT of the CPU tests.
QUICK = StackSpec(
    hidden=32,
    layers=2,
    heads=4,
    vocab=64,
    seq=16,
    micro_batch=2,
    microbatches=2,
    warmup=2,
    steps=2,
    time_budget_s=30.0,
)


# Part 4: the class stack of the compiled-chain check, and how far from eager it may be.
COMPILED_STACK = (16, 1024, 1024)
COMPILED_STACK_QUICK = (4, 32, 32)
COMPILED_RTOL = 1e-4


def compiled_chains(cuda: bool, quick: bool, repeats: int = 5) -> dict[str, Any]:
    """Part 4: each fused chain eager vs compiled on one class stack (see the docstring)."""
    import torch

    from mlfop_megatron.core import fused

    device = "cuda" if cuda else "cpu"
    shape = COMPILED_STACK_QUICK if quick or not cuda else COMPILED_STACK
    gen = torch.Generator().manual_seed(0)

    def stack() -> Any:
        return torch.randn(shape, generator=gen).to(device)

    z, h, zg, hg, g = stack(), stack(), stack(), stack(), stack()
    diag = stack().abs_().add_(0.1)  # v of the metric sqrt(v / bias) + eps, and Adam's v
    s = torch.randn(shape[0], generator=gen).to(device)
    coef = torch.randn(shape[0], 1, 1, generator=gen).to(device)
    chains: dict[str, Callable[[bool], Any]] = {
        "phase 1 sums": lambda c: fused.per_block_sums(
            fused.fold_phase1_sums, c, z, h, diag, 0.9, 1e-8, 0.25, 0.75, True
        ),
        "phase 2 sums": lambda c: fused.per_block_sums(
            fused.fold_phase2_sums, c, z, h, diag, 0.9, 1e-8, s, 0.25, 0.75, True
        ),
        "fold (both forms)": lambda c: _fold_copy(c, zg, hg, z, h, coef),
        "Adam chain": lambda c: fused.adam_direction(
            c, zg.clone(), diag.clone(), g, g, 0.95, 0.95, 1e-8, False
        ),
    }
    timer = make_timer(cuda)
    before = fused.KERNELS.stats()
    rows = {}
    for name, run in chains.items():
        eager = run(False)
        compiled = run(True)  # compiles
        diff = float((compiled - eager).abs().max() / eager.abs().max().clamp_min(1e-30))
        rows[name] = {
            "eager_s": _median_time(timer, run, False, repeats),
            "compiled_s": _median_time(timer, run, True, repeats),
            "max_rel_diff": diff,
        }
    after = fused.KERNELS.stats()
    ok = all(r["max_rel_diff"] <= COMPILED_RTOL for r in rows.values())
    return {
        "status": "ok" if ok else f"failed: a chain is over {COMPILED_RTOL} from eager",
        "device": device,
        "stack": list(shape),
        "chains": rows,
        "compiles": after["compiles"] - before["compiles"],
        "compile_s": after["compile_seconds"] - before["compile_seconds"],
    }


def _median_time(timer: Callable, run: Callable[[bool], Any], compiled: bool, n: int) -> float:
    """Median seconds of ``run(compiled)`` over ``n`` timed calls."""
    return sorted(timer(lambda: run(compiled))[1] for _ in range(n))[n // 2]


def _fold_copy(compiled: bool, zg: Any, hg: Any, zr: Any, hr: Any, coef: Any) -> Any:
    """The fold of both forms on copies of ``zg`` and ``zr``; the folded rotated form."""
    from mlfop_megatron.core import fused

    zg, zr = zg.clone(), zr.clone()
    fused.fold_update(compiled, zg, hg, zr, hr, coef, 1.0 - coef)
    return zr


def compiled_lines(c: dict[str, Any]) -> list[str]:
    """Part 4's table."""
    lines = [
        "",
        f"Compiled chains (`SOAPConfig.compile`, core/fused.py) on one class stack "
        f"{c['stack']} fp32 on {c['device']}: **{c['status']}**; {c['compiles']} kernels "
        f"compiled in {c['compile_s']:.1f} s.",
        "",
        "| chain | eager ms | compiled ms | eager / compiled | max rel. diff from eager |",
        "|---|---|---|---|---|",
    ]
    for name, r in c["chains"].items():
        lines.append(
            f"| {name} | {1e3 * r['eager_s']:.3f} | {1e3 * r['compiled_s']:.3f} | "
            f"{r['eager_s'] / r['compiled_s']:.2f} | {r['max_rel_diff']:.1e} |"
        )
    return lines


# ------------------------------------------------------------------ device-specific pieces
def cuda_timer(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` between two CUDA events; (its result, seconds). Syncs only around it."""
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()  # earlier work must not land inside the region
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end) / 1000.0


def wall_timer(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` under ``time.perf_counter``; (its result, seconds). The CPU path."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def make_timer(cuda: bool) -> Callable[[Callable[[], Any]], tuple[Any, float]]:
    """CUDA-event timing on a GPU, perf_counter on the CPU emulation."""
    return cuda_timer if cuda else wall_timer


def reset_peak_memory(cuda: bool) -> None:
    """``torch.cuda.reset_peak_memory_stats`` on a GPU; nothing on CPU."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory(cuda: bool) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset; None on CPU (not measured)."""
    if not cuda:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())


def init_world(spec: StackSpec) -> None:
    """A one-rank torch.distributed world for ``spec`` (installs the emulation on CPU)."""
    import datetime

    import torch
    import torch.distributed as dist

    if spec.cuda:
        torch.cuda.set_device(0)
    else:
        from mlfop_megatron.runtime.cpu_emulation import install_cpu_emulation

        # Strict device checking: host/"cuda" mixing fails here as it would on the GPU.
        install_cpu_emulation(strict=True)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        spec.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=600),
    )


def _dist_version(*names: str) -> str:
    """The installed version of the first distribution found among ``names``, else 'absent'."""
    import importlib.metadata

    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def device_facts(cuda: bool) -> dict[str, Any]:
    """What ran where: GPU, versions, the TF32 override variable (no megatron import)."""
    import torch

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "megatron_core": _dist_version("megatron-core", "megatron_core"),
        "transformer_engine": _dist_version(
            "transformer_engine",
            "transformer-engine",
            "transformer_engine_torch",
            "transformer-engine-cu12",
            "transformer_engine_cu12",
            "transformer-engine-cu13",
            "transformer_engine_cu13",
        ),
        "apex": _dist_version("apex"),
        TF32_ENV: os.environ.get(TF32_ENV, "unset"),
        "cpu": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(props.total_memory / GIB, 2),
            memory_bytes=int(props.total_memory),
            multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(),
            driver=_nvidia_smi_driver(),
        )
    else:
        facts.update(device="cpu (CUDA emulated: mlfop_megatron.runtime.cpu_emulation)")
    return facts


def _nvidia_smi_driver() -> str:
    """The driver version nvidia-smi reports ('unknown' without it)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"


def child_env(cuda: bool) -> dict[str, str]:
    """Environment of the child processes: spawn ranks, no forced TF32, the repo importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if cuda:
        # Ranks on a real GPU start with spawn (runtime/spawn.py default_start_method); said
        # explicitly, so nothing forks a process that initialised CUDA.
        env["MLFOP_MP_START_METHOD"] = "spawn"
        # The optimizer refuses forced TF32 on CUDA (core/precision.py check_tf32_override).
        if env.get(TF32_ENV, "") not in ("", "0"):
            env[TF32_ENV] = "0"
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    else:  # the CPU worker: one thread, as run_distributed's ranks (loaded CI machines)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


# ------------------------------------------------------------------------ memory model
def activation_bytes(spec: StackSpec) -> int:
    """Estimated activation bytes of one micro-batch, bf16, no recompute, unfused attention.

    Korthikanti et al. 2022: s b h (34 + 5 a s / h) per layer; the schedule runs the K
    micro-batches one after the other, so one micro-batch's activations are alive at a time.
    Not part of the memory model (which leaves activations to the model's owner).
    """
    s, b, h, a = spec.seq, spec.micro_batch, spec.hidden, spec.heads
    return int(spec.layers * s * b * h * (34 + 5 * a * s / h))


def stack_param_specs(spec: StackSpec) -> list[Any]:
    """The param shapes of the GPT local-spec stack that part 3 builds (add_bias_linear off)."""
    from mlfop_megatron.distributed.assignment import ParamSpec
    from mlfop_megatron.policies import is_soap_matrix

    h, ffn = spec.hidden, 4 * spec.hidden
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embedding.word_embeddings.weight", (spec.vocab, h)),
        ("embedding.position_embeddings.weight", (spec.seq, h)),
    ]
    for i in range(spec.layers):
        pre = f"decoder.layers.{i}."
        shapes += [
            (pre + "input_layernorm.weight", (h,)),
            (pre + "input_layernorm.bias", (h,)),
            (pre + "self_attention.linear_qkv.weight", (3 * h, h)),
            (pre + "self_attention.linear_proj.weight", (h, h)),
            (pre + "pre_mlp_layernorm.weight", (h,)),
            (pre + "pre_mlp_layernorm.bias", (h,)),
            (pre + "mlp.linear_fc1.weight", (ffn, h)),
            (pre + "mlp.linear_fc2.weight", (h, ffn)),
        ]
    shapes += [
        ("decoder.final_layernorm.weight", (h,)),
        ("decoder.final_layernorm.bias", (h,)),
        ("output_layer.weight", (spec.vocab, h)),
    ]
    return [ParamSpec(n, s, preconditioned=is_soap_matrix(n, len(s))) for n, s in shapes]


def modelled_memory(
    assignment: Any,
    rank: int,
    params_numel: int,
    adam_numel: int,
    dp: int,
    param_bytes: int,
    backend: str,
    folding: bool,
) -> dict[str, int]:
    """``rank_memory`` of one rank, by term and by phase (bytes)."""
    from mlfop_megatron.launch.plan.memory import rank_memory

    m = rank_memory(
        assignment,
        rank,
        params_numel=params_numel,
        adam_numel=adam_numel,
        dp=dp,
        param_bytes=param_bytes,
        backend=backend,
        folding=folding,
    )
    resident = m.params + m.grads + m.opt_state
    return {
        "params": m.params,
        "grads": m.grads,
        "soap_state": m.soap_state,
        "adam_state": m.adam_state,
        "probe_cache": m.probe_cache,
        "transient_window": m.transient_window,
        "transient_step": m.transient_step,
        "optimizer_peak": m.optimizer_peak,
        "total": m.total,
        # what each measured phase should peak at (activations not modelled)
        "window_phase": resident + m.transient_window,
        "step_phase": resident + m.transient_step,
    }


def predicted_memory(spec: StackSpec) -> dict[str, int]:
    """The memory model for ``spec`` from its shapes alone (the sizing of part 3)."""
    from mlfop_megatron.config import SOAPConfig
    from mlfop_megatron.distributed.assignment import Assignment, BlockingConfig, make_blocks

    specs = stack_param_specs(spec)
    soap = [p for p in specs if p.soap_matrix]
    blocking = BlockingConfig(None, SOAPConfig().max_precond_dim)  # the factory's default
    numel = sum(p.numel for p in specs)
    return modelled_memory(
        Assignment.build(make_blocks(soap, blocking), 1),
        0,
        params_numel=numel,
        adam_numel=numel - sum(p.numel for p in soap),
        dp=1,
        param_bytes=2,  # bf16 params, fp32 main weights and state
        backend=spec.backend if spec.cuda else "gloo",
        folding=False,  # FoldingConfig's default
    )


def choose_layers(spec: StackSpec, device_bytes: int, share: float = MEMORY_SHARE) -> int:
    """Most layers (up to spec.layers) whose modelled peak + activations fit share x memory."""
    for layers in range(spec.layers, 1, -1):
        s = replace(spec, layers=layers)
        if predicted_memory(s)["total"] + activation_bytes(s) <= share * device_bytes:
            return layers
    return 2


# ------------------------------------------------------------------------ part 3 worker
def measure(
    spec: StackSpec, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Build the stack, train warm-up + timed iterations; times, memory, the model's figures.

    Runs in the worker process after :func:`init_world`. ``progress`` gets the summary so far
    after every iteration (the worker saves it, so a run stopped at its timeout still reports).
    """
    import torch
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mlfop_megatron.config import MLFOPConfig
    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron.factory import get_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt, forward_step, microbatches

    t_start = time.perf_counter()
    timer = make_timer(spec.cuda)
    init_megatron_parallel(seed=1234)
    # Megatron's torch LayerNorm allocates in the default dtype (as tests/support/mlfop_runs).
    torch.set_default_dtype(torch.bfloat16)
    cfg = TinyGPTConfig(
        num_layers=spec.layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        vocab_size=spec.vocab,
        seq_length=spec.seq,
        dtype=torch.bfloat16,
        on_device=True,  # params made on the device, batches moved there (Megatron-LM's way)
        bucket_size=None,  # Megatron's default bucket size (the tiny default is 2000)
    )
    model = build_tiny_gpt(cfg, ddp_class=FoldingDistributedDataParallel)
    k = spec.microbatches
    mlfop = MLFOPConfig.from_kwargs(accumulation_steps=k)  # every other option its default
    opt_config = OptimizerConfig(
        optimizer="adam", lr=mlfop.soap.lr, weight_decay=mlfop.soap.weight_decay, bf16=True
    )
    optimizer = get_mlfop_optimizer(opt_config, [model], mlfop)
    engines: list[Any] = [e for o in optimizer.mlfop for e in o.engines]  # ShardedSOAP here
    params_numel = sum(p.numel() for p in model.parameters())
    soap_numel = sum(p.numel() for e in engines for p in e.params)
    static: dict[str, Any] = {
        "spec": asdict(spec),
        "tokens_per_step": spec.tokens_per_step,
        "params_numel": params_numel,
        "soap_numel": soap_numel,
        "engines": [type(e).__name__ for e in engines],
        "build_s": time.perf_counter() - t_start,
        "model_terms": engine_memory_model(spec, optimizer, engines, params_numel, soap_numel),
    }
    # One window's micro-batches, made once on the device: no host work in the timed region.
    batches = list(microbatches(cfg, 0, k, spec.micro_batch))
    forward_backward = get_forward_backward_func()

    def window() -> list[Any]:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=k,
            seq_length=spec.seq,
            micro_batch_size=spec.micro_batch,
            decoder_seq_length=spec.seq,
            forward_only=False,
        )

    def refreshes() -> int:
        return sum(e.counters.refreshes_done for e in engines)

    records: list[dict[str, Any]] = []
    t_loop = time.perf_counter()
    for it in range(spec.warmup + spec.steps):
        timed = it >= spec.warmup
        if timed and it - spec.warmup >= 2 and time.perf_counter() - t_loop > spec.time_budget_s:
            break
        reset_peak_memory(spec.cuda)
        losses, fwd_bwd_s = timer(window)
        window_peak = peak_memory(spec.cuda)
        before = refreshes()
        reset_peak_memory(spec.cuda)
        (ok, grad_norm, _), step_s = timer(optimizer.step)
        step_peak = peak_memory(spec.cuda)
        records.append(
            {
                "iteration": it,
                "timed": timed,
                "fwd_bwd_s": fwd_bwd_s,
                "step_s": step_s,
                "ok": bool(ok),
                "refreshed_sides": refreshes() - before,
                "loss": sum(float(d["lm loss"]) for d in losses) / max(len(losses), 1),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "window_peak_bytes": window_peak,
                "step_peak_bytes": step_peak,
            }
        )
        if progress is not None:
            progress(summarize(spec, static, records, "partial", time.perf_counter() - t_start))
    optimizer.finish_param_sync()
    status = "ok" if all(r["ok"] for r in records) else "failed: a step reported not ok"
    return summarize(spec, static, records, status, time.perf_counter() - t_start)


def engine_memory_model(
    spec: StackSpec, optimizer: Any, engines: list[Any], params_numel: int, soap_numel: int
) -> dict[str, int] | str:
    """``rank_memory`` on the engine's own assignment (or why it was not computed)."""
    if len(engines) != 1:
        return f"not computed: {len(engines)} SOAP engines (the model takes one)"
    (engine,) = engines
    return modelled_memory(
        engine.assignment,
        engine.rank,
        params_numel=params_numel,
        adam_numel=params_numel - soap_numel,
        dp=engine.world_size,
        param_bytes=engine.params[0].element_size(),
        backend=spec.backend,
        folding=any(o.schedule.num_folds > 0 for o in optimizer.mlfop),
    )


def summarize(
    spec: StackSpec,
    static: dict[str, Any],
    records: list[dict[str, Any]],
    status: str,
    worker_s: float,
) -> dict[str, Any]:
    """Part 3's result from its iteration records (medians over the timed ones)."""
    import statistics

    out: dict[str, Any] = {**static, "status": status, "iterations": records}
    out["worker_s"] = worker_s
    if records:
        out["first_step_s"] = records[0]["step_s"]  # SOAP's first step: eigh of every factor
        out["loss_first_last"] = [records[0]["loss"], records[-1]["loss"]]
    timed = [r for r in records if r["timed"]]
    out["timed_iterations"] = len(timed)
    if timed:
        fwd_bwd = statistics.median(r["fwd_bwd_s"] for r in timed)
        step = statistics.median(r["step_s"] for r in timed)
        out.update(
            fwd_bwd_s=fwd_bwd,
            step_s=step,
            step_over_fwd_bwd=step / fwd_bwd,
            mean_step_s=statistics.fmean(r["step_s"] for r in timed),
        )
    out["memory"] = memory_figures(spec, static["model_terms"], timed)
    return out


def memory_figures(
    spec: StackSpec, model_terms: dict[str, int] | str, timed: list[dict[str, Any]]
) -> dict[str, Any]:
    """Measured peaks (GPU) beside the memory model of this rank's engine."""
    out: dict[str, Any] = {"activations_estimate": activation_bytes(spec), "model": model_terms}
    out["model_from_shapes"] = predicted_memory(spec)["total"]  # the sizing's figure
    peaks = [r for r in timed if r["window_peak_bytes"] is not None]
    if not peaks or isinstance(model_terms, str):
        out["measured"] = None  # CPU: no torch.cuda.max_memory_allocated
        return out
    window = max(r["window_peak_bytes"] for r in peaks)
    step = max(r["step_peak_bytes"] for r in peaks)
    act = out["activations_estimate"]
    out["measured"] = {"window_peak": window, "step_peak": step, "peak": max(window, step)}
    out["ratios"] = {
        # the clean comparison: no activations are alive during the step
        "step_peak / model step phase": step / model_terms["step_phase"],
        "window_peak / (model window phase + activations estimate)": window
        / (model_terms["window_phase"] + act),
        "peak / model total": max(window, step) / model_terms["total"],
    }
    return out


def worker_main(spec_path: str, result_path: str) -> int:
    """Entry of the part-3 process: read the spec, measure, write the result (never raises)."""
    spec = StackSpec(**json.loads(Path(spec_path).read_text()))
    path = Path(result_path)
    last: dict[str, Any] = {"spec": asdict(spec)}

    def save(summary: dict[str, Any]) -> None:
        last.clear()
        last.update(summary)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        tmp.replace(path)  # the parent never reads half a file

    try:
        init_world(spec)
        save(measure(spec, progress=save))
    except BaseException as exc:  # noqa: BLE001 - the parent reads every failure from the file
        text = f"{type(exc).__name__}: {exc}"
        oom = any(k in text for k in ("OutOfMemoryError", "out of memory", "ALLOC_FAILED"))
        save(
            {
                **last,
                "status": "oom" if oom else "failed",
                "error": text[:2000],
                "traceback": traceback.format_exc()[-6000:],
            }
        )
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------- parts
def run_child(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group; (stdout + stderr, exit code or None on timeout).

    At the timeout the whole group is killed: the ranks a test spawned must not outlive it
    holding GPU memory.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=timeout_s)
        return text, proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        return text + f"\n[gpu-check] killed at the {timeout_s:.0f} s timeout\n", None


def run_suite(out: Path, cuda: bool, timeout_s: float) -> dict[str, Any]:
    """``pytest tests/gpu -q -rs`` in a subprocess; counts, skip reasons, the output's tail."""
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    t0 = time.perf_counter()
    text, rc = run_child(cmd, child_env(cuda), timeout_s)
    (out / "gpu_suite.log").write_text(text)
    counts = suite_counts(text)
    ok = rc == 0 and counts.get("failed", 0) == 0 and counts.get("error", 0) == 0
    status = "passed" if ok else "timed out" if rc is None else "failed"
    if ok and not counts.get("passed"):
        status = "skipped"  # nothing ran (no CUDA, TE or sm_89+): the check is not done
    return {
        "command": " ".join(cmd[2:]),
        "status": status,
        "returncode": rc,
        "counts": counts,
        "skip_reasons": [ln.strip() for ln in text.splitlines() if ln.startswith("SKIPPED")],
        "wall_s": time.perf_counter() - t0,
        "tail": text.splitlines()[-40:],
        "log": "gpu_suite.log",
    }


def suite_counts(text: str) -> dict[str, int]:
    """Counts of passed / failed / skipped / error / ... from pytest's last summary line."""
    counts: dict[str, int] = {}
    for line in reversed(text.splitlines()):
        found = re.findall(
            r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", line
        )
        if found:
            for n, what in found:
                counts["error" if what.startswith("error") else what] = int(n)
            break
    return counts


def run_measurement(spec: StackSpec, out: Path, timeout_s: float) -> dict[str, Any]:
    """Part 3 in a subprocess (``--worker``); its result, partial at a timeout, or the failure."""
    spec_path, result_path = out / "measure_spec.json", out / "measure_result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", str(spec_path)]
    t0 = time.perf_counter()
    text, rc = run_child([*cmd, str(result_path)], child_env(spec.cuda), timeout_s)
    tail = text.splitlines()[-30:]
    if not result_path.exists():
        error = f"timed out at {timeout_s:.0f} s" if rc is None else f"exit code {rc}"
        return {
            "status": "timed out" if rc is None else "failed",
            "error": f"the worker wrote no result ({error})",
            "spec": asdict(spec),
            "output_tail": tail,
        }
    result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - t0
    if rc is None:  # killed: what it had saved after its last iteration
        result["status"] = "timed out"
        result["error"] = f"stopped at the {timeout_s:.0f} s timeout; figures so far"
    if result["status"] != "ok":
        result["output_tail"] = tail
    return result


def measurement_attempts(
    spec: StackSpec,
    out: Path,
    deadline: float,
    log: Callable[[str], None],
    run: Callable[[StackSpec, Path, float], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Part 3 with its retries: out of memory at 2/3 of the layers, an NCCL failure on gloo.

    A timeout is not retried (no time left). ``run``: :func:`run_measurement` (tests pass a
    stand-in). The result is the last attempt's, with every attempt listed under "attempts".
    """
    run = run or run_measurement
    attempts: list[dict[str, Any]] = []
    while True:
        timeout = max(MEASURE_MIN_S, min(MEASURE_TIMEOUT_S, deadline - time.perf_counter()))
        log(
            f"part 3: {spec.layers} layers x hidden {spec.hidden}, seq {spec.seq}, micro-batch "
            f"{spec.micro_batch}, K={spec.microbatches}, {spec.backend} (timeout {timeout:.0f} s)"
        )
        result = run(spec, out, timeout)
        attempts.append(result)
        if result["status"] == "ok":
            break
        log(f"part 3 {result['status']}: {str(result.get('error', ''))[:300]}")
        tried = {(a["spec"]["layers"], a["spec"]["backend"]) for a in attempts}
        if result["status"] == "oom" and spec.layers > 2:
            spec = replace(spec, layers=max(2, spec.layers * 2 // 3))
        elif result["status"] == "failed" and spec.cuda and spec.backend == "nccl":
            spec = replace(spec, backend="gloo")
        else:
            break
        if (spec.layers, spec.backend) in tried or deadline - time.perf_counter() < 60:
            break
    final = dict(attempts[-1])
    final["attempts"] = [
        {k: a.get(k) for k in ("status", "error", "spec", "process_s")} for a in attempts
    ]
    return final


# ------------------------------------------------------------------------------ report
def _count(n: int) -> str:
    """A parameter count as 0.657B or 25.7K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


def _gib(n: float | None) -> str:
    """Bytes as GiB (MiB below 1 GiB, for the CPU path's tiny model)."""
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (1 << 20):.2f} MiB"


def report(results: dict[str, Any]) -> str:
    """The markdown figures (gpu_check.md, quoted by benchmarks/RESULTS.md)."""
    dev = results["device"]
    lines = [
        SECTION,
        "",
        f"`{results['command']}` on {dev.get('device')} (capability {dev.get('capability', '-')}, "
        f"{dev.get('memory_gib', '-')} GiB, driver {dev.get('driver', '-')}); torch "
        f"{dev['torch']} (CUDA {dev['torch_cuda']}), megatron-core {dev['megatron_core']}, "
        f"TransformerEngine {dev['transformer_engine']}, apex {dev['apex']}, Python "
        f"{dev['python']}; {TF32_ENV}={dev[TF32_ENV]} (children: "
        f"{results.get('children_tf32', '-')}). Run {results['started']}, "
        f"{results['wall_s']:.0f} s in all (budget {BUDGET_S} s"
        f"{': OVER' if results['over_budget'] else ''}).",
        "",
    ]
    lines += [f"Warning: {w}." for w in results.get("warnings", [])]
    if results.get("warnings"):
        lines.append("")
    suite = results["suite"]
    if suite.get("status") == "not run":
        lines.append(f"GPU suite: not run ({suite['reason']}).")
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(suite["counts"].items())) or "no counts"
        lines.append(
            f"GPU suite (`{suite['command']}`, {suite['wall_s']:.0f} s): **{suite['status']}**, "
            f"{counts}; log `gpu_suite.log`."
        )
        lines += [f"- {reason}" for reason in suite.get("skip_reasons", [])]
    lines.append("")
    lines += measurement_lines(results["measurement"])
    compiled = results.get("compiled", {})
    if "chains" in compiled:
        lines += compiled_lines(compiled)
    elif compiled:
        lines += ["", f"Compiled chains: **{compiled['status']}**."]
    return "\n".join(lines) + "\n"


def measurement_lines(m: dict[str, Any]) -> list[str]:
    """Part 3's tables (or why there are none)."""
    tries = "; ".join(
        f"{a['spec']['layers']} layers, {a['spec']['backend']}: {a['status']}"
        for a in m.get("attempts", [])
    )
    status = "" if m.get("status") == "ok" else f"**{m.get('status')}** ({tries}): {m.get('error')}"
    if "fwd_bwd_s" not in m:  # not one timed iteration
        return [f"Optimizer cost at scale: {status}"]
    s = m["spec"]
    refreshed = [r["refreshed_sides"] for r in m["iterations"] if r["timed"]]
    lines = [
        f"Optimizer cost at scale{': ' + status if status else ''}: GPT local layer spec, "
        f"{s['layers']} layers x hidden {s['hidden']} ({_count(m['params_numel'])} params, "
        f"{_count(m['soap_numel'])} in SOAP), bf16, DP=1 ({s['backend']}), seq {s['seq']} x "
        f"micro-batch {s['micro_batch']} x K={s['microbatches']} = {m['tokens_per_step']} tokens "
        f"per step; ML-FOP-SOAP defaults; median of {m['timed_iterations']} iterations after "
        f"{s['warmup']} warm-up ({'CUDA events' if s['cuda'] else 'perf_counter, CPU'}). The "
        f"first step (statistics only, eigh of every factor) took {m['first_step_s']:.2f} s.",
        "",
        "| fwd+bwd (one window) s | optimizer.step s | step / fwd+bwd | mean step s | "
        "basis sides refreshed per timed step |",
        "|---|---|---|---|---|",
        f"| {m['fwd_bwd_s']:.4f} | {m['step_s']:.4f} | {m['step_over_fwd_bwd']:.3f} | "
        f"{m['mean_step_s']:.4f} | {', '.join(map(str, refreshed))} |",
        "",
    ]
    mem = m["memory"]
    model = mem["model"]
    if isinstance(model, str):
        return [*lines, f"Memory model: {model}."]
    measured = mem.get("measured")
    lines += [
        "| memory | measured | model | measured / model |",
        "|---|---|---|---|",
    ]
    rows = [
        ("optimizer.step peak vs params+grads+state+step transient", "step_peak", "step_phase", 0),
        (
            "fwd+bwd peak vs params+grads+state+window transient + activations (estimate)",
            "window_peak",
            "window_phase",
            mem["activations_estimate"],
        ),
        ("peak vs model total (no activations)", "peak", "total", 0),
    ]
    for label, meas_key, model_key, extra in rows:
        want = model[model_key] + extra
        got = None if measured is None else measured[meas_key]
        ratio = "n/a" if got is None else f"{got / want:.3f}"
        lines.append(f"| {label} | {_gib(got)} | {_gib(want)} | {ratio} |")
    lines += [
        "",
        f"Model terms: params {_gib(model['params'])}, grads {_gib(model['grads'])}, SOAP "
        f"state {_gib(model['soap_state'])}, Adam state {_gib(model['adam_state'])}, null-probe "
        f"cache {_gib(model['probe_cache'])}, window transient "
        f"{_gib(model['transient_window'])}, step transient {_gib(model['transient_step'])}; "
        f"activations estimate {_gib(mem['activations_estimate'])} (not in the model).",
    ]
    return lines


# -------------------------------------------------------------------------------- main
def part3_spec(
    quick: bool,
    cuda: bool,
    device_bytes: int | None,
    hidden: int | None = None,
    layers: int | None = None,
    backend: str | None = None,
) -> StackSpec:
    """Part 3's stack: QUICK or the full size (layers fitted to ``device_bytes``)."""
    spec = QUICK if quick else StackSpec()
    spec = replace(spec, cuda=cuda, backend=(backend or "nccl") if cuda else "gloo")
    if hidden:
        spec = replace(spec, hidden=hidden)
    if layers:
        return replace(spec, layers=layers)
    if cuda and not quick and device_bytes:
        return replace(spec, layers=choose_layers(spec, device_bytes))
    return spec


def environment_warnings(facts: dict[str, Any], cuda: bool) -> list[str]:
    """What in this environment keeps parts of the check from running (or from meaning much)."""
    out = []
    if facts["megatron_core"] == "absent":
        out.append("megatron-core is absent: the suite's runs and part 3 cannot run")
    if cuda and facts["transformer_engine"] == "absent":
        out.append("TransformerEngine is absent: every FP8 test of the GPU suite skips")
    if facts[TF32_ENV] not in ("unset", "", "0"):
        out.append(f"{TF32_ENV}={facts[TF32_ENV]} here: the child processes get 0")
    capability = tuple(int(x) for x in str(facts.get("capability", "0.0")).split("."))
    if cuda and capability < (8, 9):
        out.append(f"compute capability {facts.get('capability')} < 8.9: the FP8 tests skip")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the parts, write gpu_check.json / gpu_check.md, print the summary; exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check", help="folder for the figures")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="part 3 only, at a tiny size (on CPU: the CUDA emulation, perf_counter timing)",
    )
    ap.add_argument("--no-suite", action="store_true", help="skip the GPU suite (part 2)")
    ap.add_argument("--layers", type=int, help="part 3 layers (default: sized to the memory)")
    ap.add_argument("--hidden", type=int, help="part 3 hidden size (default 2048)")
    ap.add_argument("--backend", choices=("nccl", "gloo"), help="part 3 process group (GPU)")
    ap.add_argument("--write", action="store_true", help="replace the RESULTS.md section")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print(NO_CUDA_MESSAGE, flush=True)
        return 2
    t0 = time.perf_counter()
    deadline = t0 + BUDGET_S

    def log(msg: str) -> None:
        print(f"[gpu-check {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    given = argv if argv is not None else sys.argv[1:]
    results: dict[str, Any] = {
        "schema": 1,
        "command": " ".join(["python -m benchmarks.gpu_check", *given]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
        "device": device_facts(cuda),
        "children_tf32": child_env(cuda).get(TF32_ENV, "unset"),
    }
    for key, value in results["device"].items():
        log(f"{key}: {value}")
    results["warnings"] = environment_warnings(results["device"], cuda)
    for warning in results["warnings"]:
        log(f"WARNING: {warning}")

    if args.quick or args.no_suite or not cuda:
        why = "--quick" if args.quick else "--no-suite" if args.no_suite else "no CUDA"
        results["suite"] = {"status": "not run", "reason": why}
    else:
        log("part 2: pytest tests/gpu (spawned ranks)")
        results["suite"] = run_suite(
            out, cuda, min(SUITE_TIMEOUT_S, deadline - time.perf_counter())
        )
        log(f"part 2: {results['suite']['status']} {results['suite']['counts']}")

    spec = part3_spec(
        args.quick,
        cuda,
        results["device"].get("memory_bytes"),
        hidden=args.hidden,
        layers=args.layers,
        backend=args.backend,
    )
    if cuda and not args.quick and not args.layers:
        pred = predicted_memory(spec)["total"] + activation_bytes(spec)
        total = results["device"]["memory_bytes"]
        log(
            f"part 3 sized to {spec.layers} layers: model + activations {pred / GIB:.1f} GiB of "
            f"{total / GIB:.1f} GiB ({MEMORY_SHARE:.0%} allowed)"
        )
    results["measurement"] = measurement_attempts(spec, out, deadline, log)
    m = results["measurement"]
    if m["status"] == "ok":
        log(
            f"part 3: fwd+bwd {m['fwd_bwd_s']:.4f} s, step {m['step_s']:.4f} s, step / fwd+bwd "
            f"{m['step_over_fwd_bwd']:.3f}"
        )

    log("part 4: the fused chains, eager and compiled")
    try:
        results["compiled"] = compiled_chains(cuda, args.quick)
    except Exception as exc:  # recorded, not raised: the report still comes out
        results["compiled"] = {"status": f"failed: {exc!r}"}
    log(f"part 4: {results['compiled']['status']}")

    results["wall_s"] = time.perf_counter() - t0
    results["over_budget"] = results["wall_s"] > BUDGET_S
    suite_ok = results["suite"]["status"] in ("passed", "not run")
    results["ok"] = suite_ok and m["status"] == "ok" and results["compiled"]["status"] == "ok"
    text = report(results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    if results["over_budget"]:
        log(f"WARNING: {results['wall_s']:.0f} s, over the {BUDGET_S} s budget of make gpu-check")
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if args.write:
        from benchmarks.common import RESULTS, replace_section

        replace_section(RESULTS, SECTION, text)
        log(f"replaced the section '{SECTION}' of {RESULTS}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
