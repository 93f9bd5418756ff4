"""The Megatron-LM argument provider: flags reach the config, bad values fail with the flag name.

These run without Megatron-LM's source (pure argparse); tests/test_megatron_lm_entry.py runs the
provider inside Megatron-LM's own parse_args where a checkout is available.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

import pytest

from mlfop_megatron.config import FoldingConfig, SOAPConfig
from mlfop_megatron.megatron_lm import (
    add_mlfop_args,
    chain_args_providers,
    install,
    mlfop_config_from_args,
    validate_megatron_args,
)
from mlfop_megatron.megatron_lm.compat import checkout_tag, checkout_version


def megatron_like_parser() -> argparse.ArgumentParser:
    """A parser that already has an --optimizer with choices, as Megatron-LM's does."""
    parser = argparse.ArgumentParser(prog="pretrain", allow_abbrev=False)
    parser.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    return add_mlfop_args(parser)


def test_provider_adds_optimizer_choice_and_keeps_existing_ones():
    parser = megatron_like_parser()
    assert parser.parse_args(["--optimizer", "mlfop_soap"]).optimizer == "mlfop_soap"
    assert parser.parse_args(["--optimizer", "sgd"]).optimizer == "sgd"
    standalone = add_mlfop_args(argparse.ArgumentParser())
    assert standalone.parse_args(["--optimizer", "mlfop_soap"]).optimizer == "mlfop_soap"


def test_chained_provider_applies_user_provider_too():
    def user(parser):
        parser.add_argument("--my-flag", type=int, default=3)
        return parser

    parser = chain_args_providers(add_mlfop_args, None, user)(argparse.ArgumentParser())
    args = parser.parse_args(["--my-flag", "5", "--mlfop-eps", "1e-6"])
    assert (args.my_flag, args.mlfop_eps) == (5, 1e-6)


def test_defaults_give_the_default_config():
    args = megatron_like_parser().parse_args(["--optimizer", "mlfop_soap"])
    config = mlfop_config_from_args(args, num_microbatches=4)
    assert config.soap == SOAPConfig()
    assert config.folding == FoldingConfig(accumulation_steps=4)
    assert not config.folding.enabled  # folding is off by default: --mlfop-folding


def test_every_flag_reaches_its_option():
    argv = (
        "--optimizer mlfop_soap --mlfop-folding --mlfop-beta1 0.9 --mlfop-beta2 0.99 "
        "--mlfop-shampoo-beta 0.98 "
        "--mlfop-eps 1e-7 --mlfop-precondition-frequency 5 --mlfop-max-precond-dim 512 "
        "--mlfop-refresh-method eigh --mlfop-precondition-1d --mlfop-no-bias-correction "
        "--mlfop-levels 1,3,8 --mlfop-no-projection --mlfop-fixed-beta 0.5 --mlfop-beta-max none "
        "--mlfop-fop-eps 1e-20 --mlfop-no-diagnostics --mlfop-replicated-state "
        "--mlfop-block-size 256 --mlfop-tp-mode full --mlfop-stats-interval 0 "
        "--mlfop-fold-structure tree --mlfop-step-size eta_star --mlfop-statistics-from mean "
        "--mlfop-parallel-tol 1e-6"
    ).split()
    args = megatron_like_parser().parse_args(argv)
    config = mlfop_config_from_args(args, num_microbatches=8)
    assert config.soap == SOAPConfig(
        betas=(0.9, 0.99),
        shampoo_beta=0.98,
        eps=1e-7,
        precondition_frequency=5,
        max_precond_dim=512,
        refresh_method="eigh",
        precondition_1d=True,
        correct_bias=False,
    )
    assert config.folding == FoldingConfig(
        enabled=True,
        accumulation_steps=8,
        boundaries=(1, 3, 8),
        project=False,
        fixed_beta=0.5,
        beta_max=None,
        fop_eps=1e-20,
        diagnostics=False,
        structure="tree",
        step_size="eta_star",
        statistics_from="mean",
        parallel_tol=1e-6,
    )
    assert args.mlfop_replicated_state and args.mlfop_block_size == 256
    assert args.mlfop_tp_mode == "full" and args.mlfop_stats_interval == 0
    # --mlfop-no-folding (the default now) is still accepted; the last of the two switches wins.
    for argv, enabled in (
        (["--mlfop-no-folding"], False),
        (["--mlfop-folding", "--mlfop-no-folding"], False),
        (["--mlfop-no-folding", "--mlfop-folding"], True),
    ):
        args = megatron_like_parser().parse_args(argv)
        assert mlfop_config_from_args(args, 2).folding.enabled is enabled, argv


def test_folding_options_without_folding_are_refused():
    """Folding is off by default: its options alone would be ignored, so they are refused."""
    for argv, named in (
        (["--mlfop-levels", "1,2,4"], "--mlfop-levels only acts with --mlfop-folding"),
        (
            [
                "--mlfop-no-folding",
                "--mlfop-fold-structure",
                "tree",
                "--mlfop-step-size",
                "eta_star",
            ],
            "--mlfop-fold-structure, --mlfop-step-size only act with --mlfop-folding",
        ),
        (["--mlfop-no-projection"], "--mlfop-no-projection only acts with --mlfop-folding"),
        (["--mlfop-beta-max", "none"], "--mlfop-beta-max only acts with --mlfop-folding"),
    ):
        args = megatron_like_parser().parse_args(["--optimizer", "mlfop_soap", *argv])
        with pytest.raises(ValueError, match=named):
            mlfop_config_from_args(args, 4)
        with pytest.raises(ValueError, match=named):  # before any model is built
            validate_megatron_args(args)
        on = megatron_like_parser().parse_args(
            ["--optimizer", "mlfop_soap", *argv, "--mlfop-folding"]
        )
        assert mlfop_config_from_args(on, 4).folding.enabled
        validate_megatron_args(on)
    # Options that act without folding, and the default values of the folding ones, pass.
    argv = "--mlfop-no-diagnostics --mlfop-beta-max 1.0 --mlfop-fold-structure chain".split()
    args = megatron_like_parser().parse_args(["--optimizer", "mlfop_soap", *argv])
    assert not mlfop_config_from_args(args, 4).folding.enabled


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--mlfop-eps", "-1"], "argument --mlfop-eps: must be in (0, inf) (got -1.0)"),
        (["--mlfop-eps", "abc"], "argument --mlfop-eps: cannot parse 'abc' as a number"),
        (["--mlfop-beta1", "1.0"], "argument --mlfop-beta1: must be in [0, 1) (got 1.0)"),
        (["--mlfop-beta2", "-0.1"], "argument --mlfop-beta2: must be in [0, 1)"),
        (["--mlfop-shampoo-beta", "2"], "argument --mlfop-shampoo-beta: must be in [0, 1)"),
        (
            ["--mlfop-precondition-frequency", "0"],
            "argument --mlfop-precondition-frequency: must be an integer >= 1 (got 0)",
        ),
        (
            ["--mlfop-precondition-frequency", "2.5"],
            "argument --mlfop-precondition-frequency: cannot parse '2.5' as an integer",
        ),
        (["--mlfop-max-precond-dim", "0"], "argument --mlfop-max-precond-dim: must be an integer"),
        (["--mlfop-refresh-method", "svd"], "argument --mlfop-refresh-method: invalid choice"),
        (["--mlfop-fold-structure", "ring"], "argument --mlfop-fold-structure: invalid choice"),
        (["--mlfop-step-size", "eta"], "argument --mlfop-step-size: invalid choice"),
        (["--mlfop-statistics-from", "v"], "argument --mlfop-statistics-from: invalid choice"),
        (
            ["--mlfop-parallel-tol", "-1"],
            "argument --mlfop-parallel-tol: must be in [0, 1) (got -1.0)",
        ),
        (["--mlfop-levels", "1,4,2"], "argument --mlfop-levels: must be strictly increasing"),
        (["--mlfop-levels", "1;2"], "argument --mlfop-levels: cannot parse '1;2' as comma"),
        (["--mlfop-beta-max", "0"], "argument --mlfop-beta-max: must be in (0, inf)"),
        (["--mlfop-fixed-beta", "nan"], "argument --mlfop-fixed-beta: must be a real number"),
        (["--mlfop-fop-eps=-1e-9"], "argument --mlfop-fop-eps: must be in [0, inf)"),
        (["--mlfop-block-size", "0"], "argument --mlfop-block-size: must be an integer >= 1"),
        (["--mlfop-stats-interval", "-1"], "argument --mlfop-stats-interval: must be an integer"),
        (["--mlfop-tp-mode", "rows"], "argument --mlfop-tp-mode: invalid choice: 'rows'"),
        (["--optimizer", "soap"], "argument --optimizer: invalid choice: 'soap'"),
    ],
)
def test_bad_values_are_rejected_naming_the_flag(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        megatron_like_parser().parse_args(argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_levels_are_checked_against_the_fold_structure():
    """Tree leaves may start above 1; chain levels must start at 1 (named with the flag)."""
    chain = megatron_like_parser().parse_args(["--mlfop-folding", "--mlfop-levels", "2,4"])
    with pytest.raises(ValueError, match="--mlfop-levels 2,4 with --mlfop-fold-structure chain"):
        mlfop_config_from_args(chain, num_microbatches=4)
    tree = megatron_like_parser().parse_args(
        ["--mlfop-folding", "--mlfop-levels", "2,4", "--mlfop-fold-structure", "tree"]
    )
    assert mlfop_config_from_args(tree, num_microbatches=4).folding.boundaries == (2, 4)


def test_levels_must_end_at_the_microbatch_count():
    argv = ["--optimizer", "mlfop_soap", "--mlfop-folding", "--mlfop-levels", "1,4"]
    args = megatron_like_parser().parse_args(argv)
    assert mlfop_config_from_args(args, 4).folding.boundaries == (1, 4)
    with pytest.raises(ValueError, match=r"--mlfop-levels 1,4 must end at the number of micro"):
        mlfop_config_from_args(args, 8)


def megatron_args(**overrides) -> argparse.Namespace:
    """The Megatron-LM settings validate_megatron_args reads, at values that are allowed."""
    values = dict(
        optimizer="mlfop_soap",
        use_distributed_optimizer=False,
        fp16=False,
        bf16=True,
        accumulate_allreduce_grads_in_fp32=True,
        virtual_pipeline_model_parallel_size=None,
        rampup_batch_size=None,
        use_torch_fsdp2=False,
        use_megatron_fsdp=False,
        decoupled_lr=None,
        optimizer_cpu_offload=False,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(use_distributed_optimizer=True), "--use-distributed-optimizer cannot be combined"),
        (dict(fp16=True, bf16=False), "--fp16 is not supported"),
        (dict(accumulate_allreduce_grads_in_fp32=False), "add --accumulate-allreduce-grads"),
        (dict(virtual_pipeline_model_parallel_size=2), "virtual pipeline stages"),
        (dict(rampup_batch_size=["16", "16", "1000"]), "drop --rampup-batch-size"),
        (dict(use_torch_fsdp2=True), "FSDP (--use-torch-fsdp2 / --use-megatron-fsdp)"),
        (dict(decoupled_lr=1e-3), "--decoupled-lr is not supported"),
        (dict(optimizer_cpu_offload=True), "--optimizer-cpu-offload is not supported"),
    ],
)
def test_megatron_flags_incompatible_with_mlfop(overrides, expected):
    validate_megatron_args(megatron_args())  # the base settings pass
    with pytest.raises(ValueError) as exc:
        validate_megatron_args(megatron_args(**overrides))
    assert expected in str(exc.value)
    # Other optimizers are not our business.
    validate_megatron_args(megatron_args(optimizer="adam", **overrides))


@pytest.mark.parametrize(
    "te, cuda, expected",
    [
        (False, False, "TransformerEngine (transformer_engine.pytorch) is not installed and no"),
        (True, False, "but no CUDA GPU is available"),
        (False, True, "but TransformerEngine (transformer_engine.pytorch) is not installed:"),
    ],
)
def test_fp8_format_without_te_or_gpu_names_the_flag(monkeypatch, te, cuda, expected):
    from mlfop_megatron.megatron import fp8

    monkeypatch.setattr(fp8, "_te_importable", lambda: te)
    monkeypatch.setattr(fp8, "_cuda_available", lambda: cuda)
    with pytest.raises(ValueError) as exc:
        validate_megatron_args(megatron_args(fp8="hybrid"))
    assert "--fp8-format hybrid needs TransformerEngine's CUDA kernels" in str(exc.value)
    assert expected in str(exc.value) and "drop --fp8-format" in str(exc.value)
    monkeypatch.setattr(fp8, "_te_importable", lambda: True)
    monkeypatch.setattr(fp8, "_cuda_available", lambda: True)
    validate_megatron_args(megatron_args(fp8="hybrid"))  # both present: accepted


@pytest.mark.skipif(
    importlib.util.find_spec("megatron.training") is not None,
    reason="Megatron-LM is importable here; tests/test_megatron_lm_entry.py covers install()",
)
def test_install_without_megatron_lm_says_what_to_do():
    with pytest.raises(ImportError, match=r"put a Megatron-LM checkout .* on PYTHONPATH"):
        install()


def test_checkout_version_names_the_tested_tag(tmp_path):
    """The Megatron-LM checkout's version and tag come from package_info.py.

    Tests pick the patch and skip reasons from megatron/core/package_info.py; the
    core_v0.19.0 tag's file already says 0.19.1, so the tag follows major.minor.
    """
    info = tmp_path / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text('MAJOR = 0\nMINOR = 19\nPATCH = 1\nPRE_RELEASE = ""\n')
    assert checkout_version(tmp_path) == (0, 19, 1)
    assert checkout_tag(tmp_path) == "core_v0.19.0"
    info.write_text("MAJOR = 0\nMINOR = 16\nPATCH = 1\n")
    assert checkout_tag(tmp_path) == "core_v0.16.1"
    info.write_text("MAJOR = 0\nMINOR = 17\nPATCH = 0\n")
    assert checkout_tag(tmp_path) is None
    assert checkout_version(tmp_path / "elsewhere") is None


def test_checkout_training_package_wins_over_an_installed_one(tmp_path):
    """megatron-core 0.19.2's wheel ships megatron/training; MEGATRON_LM_DIR's must be used."""
    package = tmp_path / "megatron" / "training"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("WHERE = 'checkout'\n")
    (package / "arguments.py").write_text("WHERE = 'checkout submodule'\n")
    code = (
        "import sys\n"
        "from mlfop_megatron.megatron_lm.compat import use_megatron_lm_checkout\n"
        "use_megatron_lm_checkout(sys.argv[1])\n"
        "import megatron.training, megatron.training.arguments as a, typing\n"
        "print(megatron.training.WHERE, '|', a.WHERE, '|', hasattr(typing, 'override'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "checkout | checkout submodule | True"


def test_flags_are_generated_from_every_config_field():
    """Each field is a flag (help and default from its metadata) or says it has none."""
    from dataclasses import fields

    from mlfop_megatron.config import ShardingConfig
    from mlfop_megatron.distributed.comm_config import CommConfig
    from mlfop_megatron.megatron_lm.arguments import FLAGS, LoggingConfig

    by_option = {(flag.owner, flag.option): flag for flag in FLAGS}
    for owner in (SOAPConfig, FoldingConfig, ShardingConfig, CommConfig, LoggingConfig):
        for f in fields(owner):
            if f.metadata.get("flag", "") is None:
                assert not any(o is owner and n.startswith(f.name) for o, n in by_option)
                continue
            if "pair" in f.metadata:
                for index, (suffix, text) in enumerate(f.metadata["pair"]):
                    flag = by_option[(owner, f"{f.name}[{index}]")]
                    assert flag.name == f"--mlfop-{suffix}" and flag.kwargs["help"] == text
                    assert flag.kwargs["default"] == f.default[index]
                continue
            flag = by_option[(owner, f.name)]
            assert flag.kwargs["help"] == f.metadata["help"]
            if f.type == "bool":
                assert flag.negated == f.default
            else:
                assert flag.kwargs["default"] == f.default
                assert flag.kwargs.get("choices") == f.metadata.get("choices")


def test_a_config_field_without_flag_metadata_is_refused():
    from dataclasses import dataclass, field

    from mlfop_megatron.megatron_lm.arguments import _field_flags

    @dataclass(frozen=True)
    class Undeclared:
        documented: float = field(default=1.0, metadata={"help": "a flag"})
        forgotten: bool = True

    with pytest.raises(TypeError, match=r"Undeclared.forgotten has no flag metadata"):
        _field_flags(Undeclared)


def test_layout_and_logging_flags_build_their_configs():
    from mlfop_megatron.config import ShardingConfig
    from mlfop_megatron.megatron_lm.arguments import (
        LoggingConfig,
        logging_config_from_args,
        sharding_config_from_args,
    )

    default = megatron_like_parser().parse_args([])
    assert sharding_config_from_args(default) == ShardingConfig()
    assert logging_config_from_args(default) == LoggingConfig()
    argv = "--mlfop-replicated-state --mlfop-block-size 64 --mlfop-tp-mode full".split()
    argv += "--mlfop-stats-interval 5 --mlfop-grad-groups halves".split()
    args = megatron_like_parser().parse_args(argv)
    assert sharding_config_from_args(args) == ShardingConfig(False, 64, "full")
    assert logging_config_from_args(args) == LoggingConfig(5, "halves")
    # Adam sharding is its own switch: replicating SOAP state leaves Adam ZeRO-1 and back.
    adam = megatron_like_parser().parse_args(["--mlfop-replicated-adam"])
    assert sharding_config_from_args(adam) == ShardingConfig(shard_adam=False)
    assert sharding_config_from_args(args).shard_adam is True


def test_comm_flags_build_the_comm_config():
    from mlfop_megatron.distributed.comm_config import CommConfig
    from mlfop_megatron.megatron_lm.arguments import comm_config_from_args

    assert comm_config_from_args(megatron_like_parser().parse_args([])) == CommConfig()
    argv = "--mlfop-level-reduce all_reduce --mlfop-param-sync broadcast".split()
    first = comm_config_from_args(megatron_like_parser().parse_args(argv))
    assert first == CommConfig(level_reduce="all_reduce", param_sync="broadcast")
    bf16 = comm_config_from_args(
        megatron_like_parser().parse_args(["--mlfop-grad-wire-dtype", "bf16"])
    )
    assert bf16 == CommConfig(grad_wire_dtype="bf16") and bf16.owner_reduce
    argv = "--mlfop-segments exact --mlfop-fold-stream".split()
    balance = comm_config_from_args(megatron_like_parser().parse_args(argv))
    assert balance == CommConfig(segments="exact", fold_stream=True)
    buckets = comm_config_from_args(
        megatron_like_parser().parse_args(["--mlfop-level-buckets", "4"])
    )
    assert buckets == CommConfig(level_buckets=4)
    assert comm_config_from_args(megatron_like_parser().parse_args([])).level_buckets is None


def test_comm_flags_refuse_bad_values_and_combinations(capsys):
    from mlfop_megatron.megatron_lm.arguments import validate_megatron_args

    with pytest.raises(SystemExit):
        megatron_like_parser().parse_args(["--mlfop-param-sync", "scatter"])
    assert "--mlfop-param-sync: invalid choice: 'scatter'" in capsys.readouterr().err
    argv = "--optimizer mlfop_soap --mlfop-level-reduce all_reduce --mlfop-grad-wire-dtype bf16"
    args = megatron_like_parser().parse_args(argv.split())
    with pytest.raises(ValueError, match=r"--mlfop-grad-wire-dtype bf16 needs --mlfop-level-"):
        validate_megatron_args(args)
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            megatron_like_parser().parse_args(["--mlfop-level-buckets", bad])
        assert "--mlfop-level-buckets" in capsys.readouterr().err


def test_readme_flag_table_lists_every_flag():
    from pathlib import Path

    from mlfop_megatron.megatron_lm.arguments import FLAGS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [flag.name for flag in FLAGS if f"`{flag.name}`" not in readme]
    assert not missing, f"README.md's flag table lacks {missing}"


def _build_from_flags(spec: dict) -> dict:
    """Rank body: tiny GPT at DP=2, install.build_mlfop_optimizer from parsed flags."""
    import torch
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )
    from megatron.core.optimizer import OptimizerConfig

    from mlfop_megatron.megatron.ddp import FoldingDistributedDataParallel
    from mlfop_megatron.megatron_lm.install import build_mlfop_optimizer
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt

    init_megatron_parallel(tp=1, pp=1, seed=1234)
    rank = torch.distributed.get_rank()
    # 4 micro-batches per step: global batch 8 = micro-batch 1 x DP 2 x 4
    init_num_microbatches_calculator(rank, None, 8, 1, 2)
    try:
        model = build_tiny_gpt(TinyGPTConfig(), ddp_class=FoldingDistributedDataParallel)
        args = megatron_like_parser().parse_args(["--optimizer", "mlfop_soap", *spec["argv"]])
        config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=0.0)
        optimizer = build_mlfop_optimizer(config, [model], args)
        return {
            "comm": [o.comm for o in optimizer.mlfop],
            "adam": [type(o).__name__ for o in optimizer.others],
            "owner_reduce": model.owner_reduce,
            "accumulation_steps": optimizer.mlfop[0].mlfop_config.folding.accumulation_steps,
        }
    finally:
        destroy_num_microbatches_calculator()


@pytest.mark.parametrize(
    "argv,comm,adam",
    [
        ([], {}, "ShardedMainParamAdamW"),
        (
            "--mlfop-level-reduce all_reduce --mlfop-param-sync broadcast "
            "--mlfop-replicated-adam".split(),
            {"level_reduce": "all_reduce", "param_sync": "broadcast"},
            "FP32Optimizer",
        ),
        (["--mlfop-grad-wire-dtype", "bf16"], {"grad_wire_dtype": "bf16"}, "ShardedMainParamAdamW"),
    ],
    ids=["defaults", "first-version", "bf16-wire"],
)
def test_comm_and_adam_flags_reach_the_optimizer(argv, comm, adam):
    """install.build_mlfop_optimizer passes the flags into get_mlfop_optimizer (real DP=2)."""
    from mlfop_megatron.distributed.comm_config import CommConfig
    from mlfop_megatron.runtime.spawn import run_distributed

    for run in run_distributed(_build_from_flags, 2, {"argv": argv}):
        assert run["comm"] == [CommConfig(**comm)]
        assert run["adam"] == [adam]
        assert run["owner_reduce"] is CommConfig(**comm).owner_reduce
        assert run["accumulation_steps"] == 4
