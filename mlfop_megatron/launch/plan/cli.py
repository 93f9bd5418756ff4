r"""Size an ML-FOP-SOAP Megatron job before submitting it (pure Python: no torch, no GPU).

``mlfop-plan``'s command line; what the numbers model is in
:mod:`mlfop_megatron.launch.plan.model`.

For a model and a DP x TP x PP layout this reports, per rank of the busiest pipeline stage:
optimizer memory (SOAP state, Adam state, fold buffers with --folding), SOAP compute per
optimizer step and its balance over the owner ranks (with Megatron's whole-param ping-pong
assignment for comparison), and the bytes each rank moves per optimizer step. The SOAP
numbers come from the same pure owner assignment the optimizer builds at run time
(:mod:`mlfop_megatron.distributed.assignment`).

    mlfop-plan --model llama3-8b --dp 64 --tp 8 --pp 2 --micro-batches 8 [--folding]
    mlfop-plan --hidden 2048 --ffn 8192 --layers 16 --heads 16 --vocab 32000 \
        --world-size 256 --tp 4 --micro-batches 16 --auto-block-size --json plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar

from mlfop_megatron.config import TP_MODES, FoldingConfig, SOAPConfig
from mlfop_megatron.distributed.model_shapes import MODELS, TransformerDims
from mlfop_megatron.launch.plan.model import PlanConfig, make_plan
from mlfop_megatron.launch.plan.report import format_plan
from mlfop_megatron.policies import check_positive

PROG = "mlfop-plan"
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    """Command-line parser of ``mlfop-plan``."""
    ap = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = ap.add_argument_group("model (--model, optionally overridden by explicit dims)")
    m.add_argument("--model", choices=sorted(MODELS), default=None)
    for flag in ("--hidden", "--ffn", "--layers", "--heads", "--kv-heads", "--vocab"):
        m.add_argument(flag, type=int, default=None)
    m.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    m.add_argument("--no-gated", action="store_true", help="plain (not SwiGLU) MLP")
    m.add_argument("--unfused", action="store_true", help="separate q,k,v and gate,up matrices")
    m.add_argument("--bias", action="store_true", help="linear layers with biases")
    m.add_argument("--tied-embeddings", action="store_true")
    m.add_argument("--vocab-divisible-by", type=int, default=128)
    p = ap.add_argument_group("parallel layout")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size")
    p.add_argument("--world-size", type=int, default=None, help="total ranks (gives --dp)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batches", "-K", type=int, default=1, help="K per optimizer step")
    o = ap.add_argument_group("optimizer")
    o.add_argument("--block-size", type=int, default=None, help="default: whole params")
    o.add_argument("--auto-block-size", action="store_true", help="choose_block_size")
    o.add_argument("--target-balance", type=float, default=1.05, help="for --auto-block-size")
    o.add_argument(
        "--balance",
        choices=("compute", "memory", "both"),
        default="compute",
        help="what --auto-block-size balances to --target-balance: compute per step, "
        "optimizer-state memory, or both",
    )
    o.add_argument("--max-precond-dim", type=int, default=10000)
    o.add_argument("--precondition-frequency", type=int, default=10)
    o.add_argument(
        "--refresh-wave",
        type=float,
        default=1.0,
        help="SOAPConfig.refresh_wave: the basis refresh's memory bound in largest class stacks "
        "(0: every new basis at once)",
    )
    o.add_argument("--tp-mode", choices=TP_MODES, default="blockwise")
    o.add_argument("--param-bytes", type=int, default=2, help="bytes/param in the all-gather")
    o.add_argument("--state-bytes", type=int, default=4, help="bytes/float of optimizer state")
    o.add_argument(
        "--folding",
        action="store_true",
        help="plan multi-level folding (one reduction per level); off by default, as in the "
        "optimizer (FoldingConfig.enabled): one level, plain SOAP",
    )
    # One level, the default; still accepted from older command lines (not listed in --help).
    o.add_argument(
        "--no-folding", dest="folding", action="store_false", default=False, help=argparse.SUPPRESS
    )
    o.add_argument(
        "--boundaries", type=int, nargs="+", default=None, help="with --folding; default: dyadic"
    )
    o.add_argument(
        "--level-buckets",
        type=int,
        default=None,
        help="collectives per level reduction (--mlfop-level-buckets); default auto: each "
        "bucket's fp32 send buffer <= 1 GiB, as the optimizer",
    )
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the plan as JSON")
    return ap


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    """PlanConfig from parsed arguments (ValueError naming the option on bad input)."""
    explicit = {
        "hidden": args.hidden,
        "ffn": args.ffn,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        "head_dim": args.head_dim,
    }
    given = {k: v for k, v in explicit.items() if v is not None}
    if args.model is not None:
        dims = replace(MODELS[args.model], **given)
        name = args.model + (" (modified)" if given else "")
    else:
        required = ("hidden", "ffn", "layers", "heads", "vocab")
        missing = [f"--{k}" for k in required if k not in given]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} required without --model (one of {sorted(MODELS)})"
            )
        given.setdefault("kv_heads", given["heads"])  # default: multi-head attention
        dims = TransformerDims(**given)
        name = "custom"
    check_positive("--tp", args.tp)
    check_positive("--pp", args.pp)
    dp = args.dp
    if dp is None:
        if args.world_size is None:
            raise ValueError("give --dp or --world-size")
        check_positive("--world-size", args.world_size)
        if args.world_size % (args.tp * args.pp):
            raise ValueError(
                f"--world-size ({args.world_size}) must be divisible by --tp x --pp "
                f"({args.tp} x {args.pp})"
            )
        dp = args.world_size // (args.tp * args.pp)
    return PlanConfig(
        dims=dims,
        dp=dp,
        tp=args.tp,
        pp=args.pp,
        micro_batches=args.micro_batches,
        model_name=name,
        gated=not args.no_gated,
        fused=not args.unfused,
        bias=args.bias,
        tied_embeddings=args.tied_embeddings,
        vocab_divisible_by=args.vocab_divisible_by,
        block_size=args.block_size,
        auto_block_size=args.auto_block_size,
        target_balance=args.target_balance,
        balance=args.balance,
        tp_mode=args.tp_mode,
        param_bytes=args.param_bytes,
        state_bytes=args.state_bytes,
        world_size=args.world_size,
        level_buckets=args.level_buckets,
        soap=_config(
            SOAPConfig,
            max_precond_dim=args.max_precond_dim,
            precondition_frequency=args.precondition_frequency,
            refresh_wave=args.refresh_wave,
        ),
        folding=_config(
            FoldingConfig,
            enabled=args.folding,
            accumulation_steps=args.micro_batches,
            boundaries=tuple(args.boundaries) if args.boundaries is not None else None,
        ),
    )


# The CLI option of each config field the command line sets (error messages name it).
_FLAGS = {
    "max_precond_dim": "--max-precond-dim",
    "precondition_frequency": "--precondition-frequency",
    "refresh_wave": "--refresh-wave",
    "accumulation_steps": "--micro-batches",
    "boundaries": "--boundaries / --micro-batches",
}


def _config(cls: type[T], **values: Any) -> T:
    """``cls(**values)``; a ValueError is raised again naming the CLI option."""
    try:
        return cls(**values)
    except ValueError as exc:
        text = str(exc)
        option = text.split("'")[1] if "'" in text else ""
        raise ValueError(f"{_FLAGS.get(option, option)}: {text}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan (and write --json); 2 with an argparse-style message on bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse errors (2) and --help (0): return, do not exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        plan = make_plan(config_from_args(args))
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_dict(), f, indent=1)
            f.write("\n")
    try:
        print(format_plan(plan), flush=True)
    except BrokenPipeError:  # output piped into head & co: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
