"""Megatron-LM command line for ML-FOP-SOAP: ``--optimizer mlfop_soap`` and ``--mlfop-*`` flags.

:func:`add_mlfop_args` is an ``extra_args_provider`` for ``megatron.training.pretrain``. The
flags are generated from the config dataclasses' field metadata (name, help, choices, default:
:mod:`mlfop_megatron.config`, :class:`~mlfop_megatron.distributed.comm_config.CommConfig`,
and :class:`LoggingConfig` here), so flags and config cannot
drift. Every flag value is checked when it is parsed, by the same validated dataclasses the
Python API uses, so argparse rejects a bad value with the flag's name and the
allowed range. Checks that need the rest of Megatron-LM's arguments (micro-batch count,
precision, parallel layout) live in :func:`validate_megatron_args` and
:func:`mlfop_config_from_args`. Pure argparse: nothing here imports Megatron-LM.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from mlfop_megatron.config import (
    FoldingConfig,
    MLFOPConfig,
    ShardingConfig,
    SOAPConfig,
    check_int,
    option,
)
from mlfop_megatron.distributed.comm_config import CommConfig
from mlfop_megatron.megatron_lm.compat import distributed_optimizer_requested

OPTIMIZER_NAME = "mlfop_soap"
FLAG_PREFIX = "--mlfop-"
GRAD_GROUPS = ("off", "one", "halves")
FOLDING_FLAG = FLAG_PREFIX + "folding"  # FoldingConfig.enabled (off by default)
NO_FOLDING_FLAG = FLAG_PREFIX + "no-folding"  # the default; accepted for older launch lines
_FOLDING_DEST = FOLDING_FLAG[2:].replace("-", "_")


@dataclass(frozen=True)
class LoggingConfig:
    """What ML-FOP-SOAP logs inside a Megatron-LM run (its ``--mlfop-*`` logging flags)."""

    stats_interval: int | None = option(
        None,
        "log fold diagnostics and phase timings every N iterations (default: --log-interval; "
        "0: never)",
    )
    grad_groups: str = option(
        "off",
        "grad-group diagnostics (per-group gradients, cosines, predicted loss changes, noise "
        "scale) at every stats interval: 'one' group, or 'halves' (the first floor(K/2) "
        "micro-batches of a step are group 0, the rest group 1: a data loader that orders each "
        "step's micro-batches by modality); off: none",
        choices=GRAD_GROUPS,
    )

    def __post_init__(self) -> None:
        if self.stats_interval is not None:
            check_int("stats_interval", self.stats_interval, 0)
        if self.grad_groups not in GRAD_GROUPS:
            raise ValueError(f"grad_groups must be one of {GRAD_GROUPS} (got {self.grad_groups!r})")


def _config_message(err: ValueError) -> str:
    """'ML-FOP-SOAP option 'eps' must be X (got y)' -> 'must be X (got y)'."""
    text = str(err)
    return text[text.index("must be") :] if "must be" in text else text


def _checked(parse: Callable[[str], Any], check: Callable[[Any], object]) -> Callable[[str], Any]:
    """Argparse ``type=``: parse the text, then validate it with the config dataclasses."""

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


# Parser of each field annotation (the dataclasses use postponed annotations: strings).
_PARSERS: dict[str, Callable[[str], Any]] = {
    "float": float,
    "int": int,
    "float | None": _optional_float,
    "int | None": int,
    "tuple[int, ...] | None": _int_list,
}
# Checks that differ from "construct the dataclass with this one field".
_FIELD_CHECKS: dict[str, Callable[[Any], object]] = {"boundaries": _check_levels}


@dataclass(frozen=True)
class Flag:
    """One ``--mlfop-*`` flag: the config dataclass and field it sets, and its parser kwargs."""

    name: str
    owner: type
    option: str  # the field name; "betas[0]" for an element of a pair
    kwargs: dict[str, Any]
    negated: bool = False  # a switch that turns a default-True option off

    @property
    def dest(self) -> str:
        """Attribute name on the parsed namespace."""
        return self.name[2:].replace("-", "_")


def _field_flags(owner: type) -> list[Flag]:
    """The flags of every field of ``owner`` that has one, from the fields' metadata."""
    flags = []
    for f in fields(owner):
        meta = f.metadata
        default: Any = f.default
        if "pair" in meta:
            for index, (suffix, text) in enumerate(meta["pair"]):
                flags.append(
                    Flag(
                        FLAG_PREFIX + suffix,
                        owner,
                        f"{f.name}[{index}]",
                        dict(
                            type=_checked(float, partial(_check_pair, owner, f.name, index)),
                            default=default[index],
                            help=text,
                        ),
                    )
                )
            continue
        if meta.get("flag", "") is None:
            continue  # set from elsewhere (Megatron-LM's own flags, the micro-batch count)
        if "help" not in meta:
            raise TypeError(
                f"{owner.__name__}.{f.name} has no flag metadata: declare it with "
                "mlfop_megatron.config.option(default, help) (a --mlfop-* flag) or "
                "field(default=..., metadata=NO_FLAG)"
            )
        name = FLAG_PREFIX + (meta.get("flag") or f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if f.type == "bool":
            # A switch: it sets the dest True; a default-True option reads it negated.
            kwargs.update(action="store_true")
        elif "choices" in meta:
            kwargs.update(choices=meta["choices"], default=default)
        else:
            check = _FIELD_CHECKS.get(f.name, partial(_check_field, owner, f.name))
            kwargs.update(type=_checked(_PARSERS[str(f.type)], check), default=default)
        negated = f.type == "bool" and default is True
        flags.append(Flag(name, owner, f.name, kwargs, negated=negated))
    return flags


def _check_field(owner: type, name: str, value: Any) -> None:
    owner(**{name: value})


def _check_pair(owner: type, name: str, index: int, value: float) -> None:
    pair = [0.5, 0.5]
    pair[index] = value
    owner(**{name: tuple(pair)})


FLAGS: tuple[Flag, ...] = tuple(
    flag
    for owner in (SOAPConfig, FoldingConfig, ShardingConfig, CommConfig, LoggingConfig)
    for flag in _field_flags(owner)
)


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
    # Folding was on by default before the measurement turned it off (FoldingConfig.enabled):
    # launch lines that still say --mlfop-no-folding keep working (the last of the two wins).
    group.add_argument(
        NO_FOLDING_FLAG,
        dest=_FOLDING_DEST,
        action="store_false",
        default=False,
        help="plain SOAP on the mean gradient: the default (kept for older launch lines)",
    )
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


def _field_values(owner: type, args: argparse.Namespace) -> dict[str, Any]:
    """Field values of ``owner`` that its flags set on the parsed ``args``."""
    values: dict[str, Any] = {}
    pairs: dict[str, list[Any]] = {}
    for flag in FLAGS:
        if flag.owner is not owner:
            continue
        value = getattr(args, flag.dest)
        if "[" in flag.option:
            name, index = flag.option[:-1].split("[")
            pairs.setdefault(name, [None, None])[int(index)] = value
        else:
            values[flag.option] = not value if flag.negated else value
    values.update({name: tuple(pair) for name, pair in pairs.items()})
    return values


def sharding_config_from_args(args: argparse.Namespace) -> ShardingConfig:
    """The :class:`ShardingConfig` (get_mlfop_optimizer's layout options) of parsed flags."""
    return ShardingConfig(**_field_values(ShardingConfig, args))


def comm_config_from_args(args: argparse.Namespace) -> CommConfig:
    """The :class:`CommConfig` (level reductions, parameter sync) of parsed flags."""
    try:
        return CommConfig(**_field_values(CommConfig, args))
    except ValueError as err:
        text = str(err)
        if "grad_wire_dtype='bf16' needs" in text:
            raise ValueError(
                "--mlfop-grad-wire-dtype bf16 needs --mlfop-level-reduce reduce_scatter (the "
                "all_reduce path reduces Megatron's fp32 buckets); drop one of the two flags"
            ) from None
        raise


def logging_config_from_args(args: argparse.Namespace) -> LoggingConfig:
    """The :class:`LoggingConfig` of parsed flags."""
    return LoggingConfig(**_field_values(LoggingConfig, args))


# FoldingConfig fields that do something without folding (the rest only shape the folds).
_NOT_FOLD_ONLY = ("enabled", "accumulation_steps", "diagnostics")


def check_folding_flags(args: argparse.Namespace) -> None:
    """Refuse folding options given while folding is off (they would be silently ignored).

    Folding is off by default (``FoldingConfig.enabled``), so a launch line that sets e.g.
    ``--mlfop-levels`` without ``--mlfop-folding`` would train plain SOAP: fail naming both.
    """
    values = _field_values(FoldingConfig, args)
    if values["enabled"]:
        return
    defaults = {f.name: f.default for f in fields(FoldingConfig)}
    given = [
        _flag_for(name)
        for name, value in values.items()
        if name not in _NOT_FOLD_ONLY and value != defaults[name]
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)} only act{'s' if len(given) == 1 else ''} with "
            f"{FOLDING_FLAG} (folding is off by default: plain SOAP on the mean gradient); "
            f"add {FOLDING_FLAG} or drop {'it' if len(given) == 1 else 'them'}"
        )


def mlfop_config_from_args(args: argparse.Namespace, num_microbatches: int) -> MLFOPConfig:
    """Build the validated :class:`MLFOPConfig` from parsed flags and the micro-batch count.

    lr and weight decay are not taken from here: Megatron's scheduler drives them per step.
    Folding options without ``--mlfop-folding`` are refused (:func:`check_folding_flags`).
    """
    check_folding_flags(args)
    kwargs: dict[str, Any] = {
        **_field_values(SOAPConfig, args),
        **_field_values(FoldingConfig, args),
        "accumulation_steps": num_microbatches,
    }
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
            getattr(args, "defer_embedding_wgrad_compute", False),
            "--defer-embedding-wgrad-compute is not supported with --optimizer mlfop_soap: "
            "the output layer's weight gradient arrives after the folding levels and the Adam "
            "reduction consumed main_grad and would be lost; drop it",
        ),
        (
            getattr(args, "async_save", False),
            "--async-save is not supported with --optimizer mlfop_soap (its optimizer state "
            "is saved synchronously, under the stop-signal guard that preemption needs); drop "
            "--async-save",
        ),
        (
            getattr(args, "fp8_param_gather", False),
            "--fp8-param-gather is not supported with --optimizer mlfop_soap: Megatron-LM "
            "ties it to --use-distributed-optimizer, which ML-FOP-SOAP replaces. Drop it: "
            "--fp8-format alone trains FP8 GEMMs on bf16 weights; FP8 primary weights are "
            "available through the Python API (TransformerConfig.fp8_param=True, README 'FP8')",
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
    if hasattr(args, "mlfop_level_reduce"):
        comm_config_from_args(args)  # flag combinations, refused before any model is built
    if hasattr(args, _FOLDING_DEST):
        check_folding_flags(args)
    if getattr(args, "fp8", None):
        from mlfop_megatron.megatron.fp8 import missing_fp8_requirements

        missing = missing_fp8_requirements()
        if missing:
            raise ValueError(
                f"--fp8-format {args.fp8} needs TransformerEngine's CUDA kernels, but "
                f"{' and '.join(missing)}: run on a CUDA machine with TransformerEngine "
                "(pip install 'mlfop_megatron[te]') or drop --fp8-format (--bf16 trains in bf16)"
            )
