"""patches/: each Megatron-LM source patch applies to the version it names and works there.

One patch per supported Megatron-LM tag (core_v0.16.1, core_v0.19.0). Megatron-LM's source is not
on PyPI (megatron-core 0.16's wheel carries only megatron/core), so the apply test needs a
checkout: set MEGATRON_LM_DIR to Megatron-LM at one of the tags; the patch for that checkout's
version (megatron/core/package_info.py) is applied. Without one only the checks that need no
Megatron-LM source run, for every patch: it is a well-formed git patch touching the expected
files, and every mlfop_megatron function it calls exists and accepts the arguments the patch
passes (so renaming our API cannot silently break a patch).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlfop_megatron.megatron_lm import SUPPORTED_MEGATRON_LM
from mlfop_megatron.megatron_lm.compat import TESTED_TAGS
from tests.test_megatron_lm_entry import SKIP_REASON, TAG

REPO = Path(__file__).resolve().parents[1]
ARGUMENTS, TRAINING = "megatron/training/arguments.py", "megatron/training/training.py"
# Files each patch touches: 0.19 also builds models from a ModelConfig, whose builders wrap
# them in DDP in models/dist_utils.py (not in training.get_model).
TOUCHED = {
    "core_v0.16.1": (ARGUMENTS, TRAINING),
    "core_v0.19.0": (ARGUMENTS, TRAINING, "megatron/training/models/dist_utils.py"),
}
SOURCE = os.environ.get("MEGATRON_LM_DIR")
needs_source = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def patch_for(tag: str) -> Path:
    return REPO / "patches" / f"megatron-lm-{tag}-mlfop-soap.patch"


def added_lines(tag: str) -> list[str]:
    return [
        line[1:]
        for line in patch_for(tag).read_text().splitlines()
        if line.startswith("+") and not line.startswith("+++")
    ]


def test_there_is_one_patch_per_tested_tag():
    assert sorted(TOUCHED) == sorted(TESTED_TAGS.values())
    assert sorted(p.name for p in (REPO / "patches").glob("*.patch")) == sorted(
        patch_for(tag).name for tag in TOUCHED
    )


@pytest.mark.parametrize("tag", sorted(TOUCHED))
def test_patch_is_a_git_patch_on_the_named_base(tag):
    text = patch_for(tag).read_text()
    assert f"Base: Megatron-LM {tag}" in text
    assert tag in SUPPORTED_MEGATRON_LM
    stat = subprocess.run(
        ["git", "apply", "--numstat", str(patch_for(tag))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert sorted(line.split("\t")[2] for line in stat.splitlines()) == sorted(TOUCHED[tag])


@pytest.mark.parametrize("tag", sorted(TOUCHED))
def test_every_mlfop_call_in_the_patch_matches_our_api(tag):
    """Imports in the added lines resolve; each call binds to the function's signature."""
    functions = {}
    for line in added_lines(tag):
        match = re.match(r"\s*from (mlfop_megatron[\w.]*) import (\w+)(?: as (\w+))?", line)
        if match:
            module, name, alias = match.groups()
            functions[alias or name] = getattr(importlib.import_module(module), name)
    assert {"add_mlfop_args", "validate_megatron_args"} <= set(functions)
    assert {"build_mlfop_optimizer", "log_stats_if_due", "DP"} <= set(functions)
    calls = 0
    for line in added_lines(tag):
        stripped = line.strip()
        if not re.match(r"^(\w+ = |return )?\w+\(.*\)$", stripped):
            continue
        call = ast.parse(stripped).body[0]
        node = call.value if isinstance(call, (ast.Expr, ast.Assign, ast.Return)) else None
        if not isinstance(node, ast.Call) or node.func.id not in functions:
            continue
        signature = inspect.signature(functions[node.func.id])
        signature.bind(*node.args, **{k.arg: None for k in node.keywords})  # raises if wrong
        calls += 1
    assert calls >= 4  # add_mlfop_args, validate_megatron_args, build_..., log_stats_if_due


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory) -> Path:
    """A Megatron-LM checkout on the path, patched, over the megatron-core wheel.

    MEGATRON_LM_DIR's packages but megatron/core (that comes from the wheel), with the patch
    for the checkout's version applied.
    """
    source, patch = Path(SOURCE), patch_for(TAG)
    tree = tmp_path_factory.mktemp("megatron-lm")
    for package in (source / "megatron").iterdir():
        if package.is_dir() and package.name != "core":
            shutil.copytree(package, tree / "megatron" / package.name)
    for path in TOUCHED[TAG]:  # exactly the files of the named base (git blob ids in the patch)
        blob = subprocess.run(
            ["git", "hash-object", str(tree / path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        pre_image = re.search(
            rf"diff --git a/{re.escape(path)} .*?\nindex (\w+)\.\.", patch.read_text(), re.S
        ).group(1)
        assert blob.startswith(pre_image), f"{path} in {source} is not Megatron-LM {TAG}"
    check = subprocess.run(
        ["git", "apply", "--check", "-v", str(patch)], cwd=tree, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
    return tree


PARSE = (
    "import sys\n"
    "from mlfop_megatron.megatron_lm.compat import use_megatron_lm_checkout\n"
    "use_megatron_lm_checkout(sys.argv.pop(1))  # training from the tree, core from the wheel\n"
    "from megatron.training.arguments import parse_args, validate_args\n"
    "args = parse_args()\n"
    "validate_args(args)\n"
    "print('PARSED', args.optimizer, args.mlfop_eps, args.mlfop_levels)\n"
)
BASE_ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 --train-iters 10 "
    "--lr 1e-3"
).split()


def run_megatron_parse(tree: Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PARSE, str(tree), *BASE_ARGS, *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@needs_source
def test_patched_megatron_lm_parses_and_validates_mlfop_flags(patched_tree):
    mlfop = ("--optimizer", "mlfop_soap", "--mlfop-folding")
    ok = run_megatron_parse(patched_tree, *mlfop, "--mlfop-levels", "1,2,4")
    assert "No module named" not in ok.stderr, (
        "Megatron-LM's training code needs extra packages: pip install '.[megatron-lm]'\n"
        + ok.stderr[-2000:]
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "PARSED mlfop_soap 1e-08 (1, 2, 4)" in ok.stdout
    # Folding is off by default: its options without --mlfop-folding are refused, not ignored.
    unfolded = run_megatron_parse(
        patched_tree, "--optimizer", "mlfop_soap", "--mlfop-levels", "1,2,4"
    )
    assert unfolded.returncode != 0
    refused = "--mlfop-levels only acts with --mlfop-folding"
    assert refused in unfolded.stderr, unfolded.stderr[-3000:]

    bad = run_megatron_parse(patched_tree, "--optimizer", "mlfop_soap", "--mlfop-beta1", "1.5")
    assert bad.returncode == 2
    assert "argument --mlfop-beta1: must be in [0, 1) (got 1.5)" in bad.stderr

    distopt = run_megatron_parse(
        patched_tree, "--optimizer", "mlfop_soap", "--use-distributed-optimizer"
    )
    assert distopt.returncode != 0
    assert "--use-distributed-optimizer cannot be combined with --optimizer mlfop_soap" in (
        distopt.stderr
    )
    # Other optimizers are untouched by the patch.
    adam = run_megatron_parse(patched_tree, "--optimizer", "adam", "--use-distributed-optimizer")
    assert adam.returncode == 0, adam.stderr[-3000:]


@needs_source
def test_patched_megatron_lm_trains_without_the_runtime_install(patched_tree):
    """The patched get_model / setup_model_and_optimizer / train loop alone run mlfop_soap."""
    from tests.test_megatron_lm_entry import check_ok, losses, run_launcher

    out = check_ok(run_launcher(source=str(patched_tree), MLFOP_RUNTIME_INSTALL="0"))
    assert f"'megatron.training': '{patched_tree / 'megatron' / 'training'}'" in out
    assert "ML-FOP-SOAP |" in out  # the patched train loop's log_stats_if_due call
    logged = losses(out)
    assert len(logged) >= 2 and logged[max(logged)] < logged[min(logged)], logged
