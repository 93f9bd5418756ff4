"""Megatron-LM command line for ML-FOP-SOAP: ``--optimizer mlfop_soap`` and ``--mlfop-*`` flags.

:func:`add_mlfop_args` is an ``extra_args_provider`` for ``megatron.training.pretrain``. Every
flag value is checked when it is parsed, by the same validated dataclasses the Python API uses
(:mod:`mlfop_megatron.config`), so argparse rejects a bad value with the flag's name and the
allowed range. Checks that need the rest of Megatron-LM's arguments (micro-batch count,
precision, parallel layout) live in :func:`validate_megatron_args` and
:func:`mlfop_config_from_args`. Pure argparse: nothing here imports Megatron-LM.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlfop_megatron.config import (
    FOLD_STRUCTURES,
    STATISTICS_SOURCES,
    STEP_SIZES,
    FoldingConfig,
    MLFOPConfig,
    SOAPConfig,
)
from mlfop_megatron.megatron_lm.compat import distributed_optimizer_requested

OPTIMIZER_NAME = "mlfop_soap"
TP_MODES = ("blockwise", "full")


def _config_message(err: ValueError) -> str:
    """'ML-FOP-SOAP option 'eps' must be X (got y)' -> 'must be X (got y)'."""
    text = str(err)
    return text[text.index("must be") :] if "must be" in text else text


def _checked(parse: Callable[[str], Any], check: Callable[[Any], object]) -> Callable[[str], Any]:
    """argparse ``type=``: parse the text, then validate it with the config dataclasses."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot parse {text!r} as {_KINDS.get(parse, getattr(parse, 'kind', ''))}"
            ) from None
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(_config_message(err)) from None
        return value

    return convert


_KINDS: dict[Any, str] = {int: "an integer", float: "a number"}


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


_optional_float.kind = "a number or 'none'"  # type: ignore[attr-defined]


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


_int_list.kind = "comma-separated integers, e.g. 1,2,4"  # type: ignore[attr-defined]


def _check_levels(levels: tuple[int, ...]) -> None:
    # Tree leaves may start above 1; the structure-specific check runs when the config is built.
    FoldingConfig(accumulation_steps=levels[-1], boundaries=levels, structure="tree")


@dataclass(frozen=True)
class Flag:
    """One ``--mlfop-*`` flag: its config option (None: optimizer-factory option) and parser."""

    name: str
    option: str | None
    kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")


GRAD_GROUPS = ("off", "one", "halves")

FLAGS: tuple[Flag, ...] = (
    Flag(
        "--mlfop-beta1",
        "betas[0]",
        dict(
            type=_checked(float, lambda v: SOAPConfig(betas=(v, 0.5))),
            default=SOAPConfig.betas[0],
            help="EMA coefficient of the first moment (in the preconditioner's eigenbasis)",
        ),
    ),
    Flag(
        "--mlfop-beta2",
        "betas[1]",
        dict(
            type=_checked(float, lambda v: SOAPConfig(betas=(0.5, v))),
            default=SOAPConfig.betas[1],
            help="EMA coefficient of the second moment",
        ),
    ),
    Flag(
        "--mlfop-shampoo-beta",
        "shampoo_beta",
        dict(
            type=_checked(_optional_float, lambda v: SOAPConfig(shampoo_beta=v)),
            default=None,
            help="EMA coefficient of the Kronecker factors (default: --mlfop-beta2)",
        ),
    ),
    Flag(
        "--mlfop-eps",
        "eps",
        dict(
            type=_checked(float, lambda v: SOAPConfig(eps=v)),
            default=SOAPConfig.eps,
            help="denominator epsilon of the Adam step in the eigenbasis",
        ),
    ),
    Flag(
        "--mlfop-precondition-frequency",
        "precondition_frequency",
        dict(
            type=_checked(int, lambda v: SOAPConfig(precondition_frequency=v)),
            default=SOAPConfig.precondition_frequency,
            help="refresh the eigenbases every this many optimizer steps",
        ),
    ),
    Flag(
        "--mlfop-max-precond-dim",
        "max_precond_dim",
        dict(
            type=_checked(int, lambda v: SOAPConfig(max_precond_dim=v)),
            default=SOAPConfig.max_precond_dim,
            help="dimensions larger than this get no rotation (identity basis)",
        ),
    ),
    Flag(
        "--mlfop-refresh-method",
        "refresh_method",
        dict(
            choices=("qr", "eigh"),
            default=SOAPConfig.refresh_method,
            help="basis refresh: one power-iteration step + QR (qr) or a full eigh",
        ),
    ),
    Flag(
        "--mlfop-precondition-1d",
        "precondition_1d",
        dict(action="store_true", help="also precondition vectors (their one factor)"),
    ),
    Flag(
        "--mlfop-no-bias-correction",
        "correct_bias",
        dict(action="store_true", help="turn off Adam bias correction"),
    ),
    Flag(
        "--mlfop-no-folding",
        "enabled",
        dict(action="store_true", help="plain SOAP on the mean gradient (no level folding)"),
    ),
    Flag(
        "--mlfop-levels",
        "boundaries",
        dict(
            type=_checked(_int_list, _check_levels),
            default=None,
            help="level boundaries in micro-batches, e.g. 1,2,4,8; must end at the number of "
            "micro-batches per step (default: dyadic 1,2,4,...)",
        ),
    ),
    Flag(
        "--mlfop-fold-structure",
        "structure",
        dict(
            choices=FOLD_STRUCTURES,
            default=FoldingConfig.structure,
            help="chain: fold each level into the running estimate; tree: balanced binary "
            "folds of equal halves; last: one half-vs-half fold (FOP as published)",
        ),
    ),
    Flag(
        "--mlfop-step-size",
        "step_size",
        dict(
            choices=STEP_SIZES,
            default=FoldingConfig.step_size,
            help="eta_star: FOP's per-block step size <g_avg, M^-1 g_comb>/<g_comb, M^-1 "
            "g_comb> on the preconditioned direction; none: no scaling",
        ),
    ),
    Flag(
        "--mlfop-statistics-from",
        "statistics_from",
        dict(
            choices=STATISTICS_SOURCES,
            default=FoldingConfig.statistics_from,
            help="which gradient feeds SOAP's second moment and Kronecker factors: the folded "
            "one, or the plain window mean (FOP: the curvature never sees g_comb)",
        ),
    ),
    Flag(
        "--mlfop-parallel-tol",
        "parallel_tol",
        dict(
            type=_checked(_optional_float, lambda v: FoldingConfig(parallel_tol=v)),
            default=FoldingConfig.parallel_tol,
            help="beta = 0 when |d_perp| <= tol |d| in the M^-1 norm ('none': dtype-based)",
        ),
    ),
    Flag(
        "--mlfop-no-projection",
        "project",
        dict(action="store_true", help="ablation: fold without the Fisher-orthogonal projection"),
    ),
    Flag(
        "--mlfop-fixed-beta",
        "fixed_beta",
        dict(
            type=_checked(float, lambda v: FoldingConfig(fixed_beta=v)),
            default=None,
            help="ablation: use this fold coefficient instead of the adaptive one",
        ),
    ),
    Flag(
        "--mlfop-beta-max",
        "beta_max",
        dict(
            type=_checked(_optional_float, lambda v: FoldingConfig(beta_max=v)),
            default=FoldingConfig.beta_max,
            help="clip |beta| to this value ('none' disables the clip)",
        ),
    ),
    Flag(
        "--mlfop-fop-eps",
        "fop_eps",
        dict(
            type=_checked(float, lambda v: FoldingConfig(fop_eps=v)),
            default=FoldingConfig.fop_eps,
            help="added to the denominators of the FOP coefficients",
        ),
    ),
    Flag(
        "--mlfop-no-diagnostics",
        "diagnostics",
        dict(action="store_true", help="skip the per-level fold diagnostics"),
    ),
    Flag(
        "--mlfop-replicated-state",
        None,
        dict(
            action="store_true",
            help="keep the full SOAP state on every data-parallel rank instead of sharding it",
        ),
    ),
    Flag(
        "--mlfop-block-size",
        None,
        dict(
            type=_checked(int, lambda v: _positive("--mlfop-block-size", v)),
            default=None,
            help="split matrices into blocks of at most this many rows/cols (default: auto)",
        ),
    ),
    Flag(
        "--mlfop-tp-mode",
        None,
        dict(
            choices=TP_MODES,
            default="blockwise",
            help="blockwise: precondition each TP shard; full: gather whole matrices",
        ),
    ),
    Flag(
        "--mlfop-stats-interval",
        None,
        dict(
            type=_checked(int, lambda v: _positive("--mlfop-stats-interval", v, low=0)),
            default=None,
            help="log fold diagnostics and phase timings every N iterations "
            "(default: --log-interval; 0: never)",
        ),
    ),
    Flag(
        "--mlfop-grad-groups",
        None,
        dict(
            choices=GRAD_GROUPS,
            default="off",
            help="grad-group diagnostics (per-group gradients, cosines, predicted loss "
            "changes, noise scale) at every stats interval: 'one' group, or 'halves' (the "
            "first floor(K/2) micro-batches of a step are group 0, the rest group 1: a data "
            "loader that orders each step's micro-batches by modality); off: none",
        ),
    ),
)

# Store-true flags that switch a config option off.
_NEGATED = {"correct_bias", "enabled", "project", "diagnostics"}


def _positive(flag: str, value: int, low: int = 1) -> None:
    if value < low:
        raise ValueError(f"{flag} must be an integer >= {low} (got {value})")


def _optimizer_action(parser: argparse.ArgumentParser) -> argparse.Action | None:
    return next((a for a in parser._actions if a.dest == "optimizer"), None)


def accept_mlfop_optimizer(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``mlfop_soap`` to ``--optimizer``'s choices (adds the option on a bare parser)."""
    action = _optimizer_action(parser)
    if action is None:
        parser.add_argument("--optimizer", default="adam", choices=["adam", OPTIMIZER_NAME])
    elif action.choices is not None and OPTIMIZER_NAME not in action.choices:
        action.choices = [*action.choices, OPTIMIZER_NAME]
    return parser


def add_mlfop_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add ``mlfop_soap`` to ``--optimizer`` and the flags.

    On a parser without ``--optimizer`` (standalone use) it adds one. Idempotent: a parser
    that has the flags already (a Megatron-LM patched from patches/) is left as it is.
    """
    accept_mlfop_optimizer(parser)
    if FLAGS[0].name in parser._option_string_actions:
        return parser
    group = parser.add_argument_group(
        "ML-FOP-SOAP",
        "options of --optimizer mlfop_soap (lr, weight decay, clipping and the "
        "Adam settings for embeddings/norms/biases come from Megatron-LM's own flags)",
    )
    for flag in FLAGS:
        group.add_argument(flag.name, dest=flag.dest, **flag.kwargs)
    return parser


def chain_args_providers(
    *providers: Callable[[argparse.ArgumentParser], argparse.ArgumentParser] | None,
) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """One extra_args_provider that applies several (ours plus the user's own)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for p in providers:
            if p is not None:
                parser = p(parser)
        return parser

    return provider


def uses_mlfop(args: argparse.Namespace) -> bool:
    """True when the run asked for ``--optimizer mlfop_soap``."""
    return getattr(args, "optimizer", None) == OPTIMIZER_NAME


def _flag_for(option: str) -> str:
    for flag in FLAGS:
        if flag.option == option or (flag.option == "betas[0]" and option == "betas"):
            return flag.name
    return option


def mlfop_config_from_args(args: argparse.Namespace, num_microbatches: int) -> MLFOPConfig:
    """Build the validated :class:`MLFOPConfig` from parsed flags and the micro-batch count.

    lr and weight decay are not taken from here: Megatron's scheduler drives them per step.
    """
    kwargs: dict[str, Any] = {
        "betas": (args.mlfop_beta1, args.mlfop_beta2),
        "accumulation_steps": num_microbatches,
    }
    for flag in FLAGS:
        if flag.option is None or flag.option.startswith("betas"):
            continue
        value = getattr(args, flag.dest)
        if flag.option in _NEGATED:
            value = not value
        kwargs[flag.option] = value
    try:
        return MLFOPConfig.from_kwargs(**kwargs)
    except ValueError as err:
        text = str(err)
        if "'boundaries'" in text and args.mlfop_levels[-1] == num_microbatches:
            raise ValueError(
                f"--mlfop-levels {','.join(map(str, args.mlfop_levels))} with "
                f"--mlfop-fold-structure {args.mlfop_fold_structure}: {_config_message(err)}"
            ) from None
        if "'boundaries'" in text:
            raise ValueError(
                f"--mlfop-levels {','.join(map(str, args.mlfop_levels))} must end at the number "
                f"of micro-batches per step ({num_microbatches} = global batch size / (micro "
                "batch size x data-parallel size)); change --mlfop-levels or the batch sizes"
            ) from None
        option = text.split("'")[1] if "'" in text else ""
        raise ValueError(f"{_flag_for(option)} {_config_message(err)}") from None


def validate_megatron_args(args: argparse.Namespace) -> None:
    """Reject Megatron-LM settings that ML-FOP-SOAP cannot honour, naming the flag and the fix."""
    if not uses_mlfop(args):
        return
    checks = [
        (
            distributed_optimizer_requested(args),
            "--use-distributed-optimizer cannot be combined with --optimizer mlfop_soap: "
            "ML-FOP-SOAP shards its own state by block over the data-parallel group; drop the flag",
        ),
        (
            getattr(args, "fp16", False),
            "--fp16 is not supported by --optimizer mlfop_soap (no loss scaling); use --bf16",
        ),
        (
            getattr(args, "bf16", False)
            and not getattr(args, "accumulate_allreduce_grads_in_fp32", True),
            "--bf16 with --optimizer mlfop_soap needs fp32 gradient accumulation: add "
            "--accumulate-allreduce-grads-in-fp32 (folding reads fp32 level sums)",
        ),
        (
            getattr(args, "virtual_pipeline_model_parallel_size", None) is not None,
            "virtual pipeline stages (--num-layers-per-virtual-pipeline-stage / "
            "--num-virtual-stages-per-pipeline-rank) are not supported with --optimizer "
            "mlfop_soap; use one model chunk per pipeline stage",
        ),
        (
            getattr(args, "rampup_batch_size", None) is not None,
            "--rampup-batch-size changes the number of micro-batches per step, which fixes "
            "ML-FOP-SOAP's folding levels; drop --rampup-batch-size",
        ),
        (
            getattr(args, "use_torch_fsdp2", False) or getattr(args, "use_megatron_fsdp", False),
            "FSDP (--use-torch-fsdp2 / --use-megatron-fsdp) is not supported with --optimizer "
            "mlfop_soap; use Megatron DDP (the default)",
        ),
        (
            getattr(args, "decoupled_lr", None) is not None,
            "--decoupled-lr is not supported with --optimizer mlfop_soap; drop it",
        ),
        (
            getattr(args, "optimizer_cpu_offload", False),
            "--optimizer-cpu-offload is not supported with --optimizer mlfop_soap; drop it",
        ),
        (
            getattr(args, "overlap_param_gather", False),
            "--overlap-param-gather only applies to Megatron's distributed optimizer, which "
            "--optimizer mlfop_soap replaces; drop --overlap-param-gather",
        ),
        (
            getattr(args, "calculate_per_token_loss", False),
            "--calculate-per-token-loss is not supported with --optimizer mlfop_soap: its "
            "1/num_tokens gradient scaling runs after the folding levels consumed the "
            "gradients; drop --calculate-per-token-loss",
        ),
        (
            getattr(args, "enable_cuda_graph", False)
            or getattr(args, "external_cuda_graph", False)
            or getattr(args, "cuda_graph_impl", "none") not in ("none", None),
            "CUDA graphs (--enable-cuda-graph / --cuda-graph-impl / --external-cuda-graph) "
            "are not supported with --optimizer mlfop_soap: captured backward passes skip the "
            "gradient hooks that end folding levels; drop the flag (--cuda-graph-impl none)",
        ),
        (
            getattr(args, "delay_wgrad_compute", False),
            "--delay-wgrad-compute is not supported with --optimizer mlfop_soap: weight "
            "gradients computed after the backward pass miss their folding level; drop it",
        ),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
    if getattr(args, "fp8", None):
        from mlfop_megatron.megatron.fp8 import missing_fp8_requirements

        missing = missing_fp8_requirements()
        if missing:
            raise ValueError(
                f"--fp8-format {args.fp8} needs TransformerEngine's CUDA kernels, but "
                f"{' and '.join(missing)}: run on a CUDA machine with TransformerEngine "
                "(pip install 'mlfop_megatron[te]') or drop --fp8-format (--bf16 trains in bf16)"
            )
