"""Real Megatron-LM pretraining with --optimizer mlfop_soap: 2 gloo ranks on CPU, tiny GPT.

Runs examples/megatron_lm/pretrain_gpt_mlfop.py (Megatron-LM's own ``pretrain``: its argument
parsing, training loop and torch_dist checkpointing) under torchrun with the CPU emulation.
Megatron-LM's training package is not on PyPI: set MEGATRON_LM_DIR to a checkout of core_v0.16.1
(the launcher appends it to sys.path, so megatron.core still comes from the megatron-core wheel).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "examples" / "megatron_lm" / "pretrain_gpt_mlfop.py"
SOURCE = os.environ.get("MEGATRON_LM_DIR")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not SOURCE or not (Path(SOURCE) / "megatron" / "training").is_dir(),
        reason="Megatron-LM core_v0.16.1 source not available (not on PyPI): set MEGATRON_LM_DIR",
    ),
]

ITERS = 6
SAVE_AT = 3
# 2 DP ranks x micro-batch 2 x 2 micro-batches = global batch 8; folding levels 1,2.
MODEL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--tokenizer-type NullTokenizer --vocab-size 128"
).split()
# What CPU/gloo needs from Megatron-LM's own flags: no fused/TE/apex kernels, gloo, CPU init.
CPU_FLAGS = (
    "--distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion "
    "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion "
    "--no-persist-layer-norm --use-cpu-initialization --num-workers 0"
).split()
TRAIN = (
    f"--train-iters {ITERS} --lr 1e-3 --lr-decay-style constant --mock-data --split 100,0,0 "
    "--eval-iters 0 --eval-interval 1000 --log-interval 1 --seed 1234 --attention-dropout 0 "
    "--hidden-dropout 0 --optimizer mlfop_soap --mlfop-precondition-frequency 2 "
    "--ckpt-format torch_dist"
).split()
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|")
# Same layout, same deterministic CPU kernels, same gloo reductions: a resumed run repeats the
# uninterrupted one bit for bit, so the only difference allowed is Megatron-LM's printing
# ("%E", 7 significant digits: <= 5e-7 for losses in [1, 10)) and the undoing of its
# first-iteration averaging below (2x that): 1e-5 leaves margin and is still ~100x below what a
# resume without the optimizer state changes (checked in the same test).
LOSS_TOL = 1e-5


def run_launcher(
    *flags: str, nproc: int = 2, timeout: int = 240, source: str | None = None, **env_extra: str
) -> subprocess.CompletedProcess:
    """The launcher under torchrun on CPU; ``source`` overrides MEGATRON_LM_DIR."""
    env = dict(
        os.environ,
        MEGATRON_LM_DIR=str(Path(source or SOURCE).resolve()),
        **env_extra,
        MLFOP_CPU_EMULATION="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        # Megatron-LM warms up its torch.compile fusions at start (initialize.py:460), ~5 s of
        # dynamo tracing per run on CPU for kernels this model does not use: run them eagerly.
        TORCHDYNAMO_DISABLE="1",
        # Megatron-LM requires it with TP > 1 (one CUDA work queue, ordered communication).
        CUDA_DEVICE_MAX_CONNECTIONS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(LAUNCHER),
        *MODEL,
        *CPU_FLAGS,
        *TRAIN,
        *flags,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def losses(out: str) -> dict[int, float]:
    """Per-iteration 'lm loss' from Megatron-LM's log lines.

    Megatron-LM logs the first iteration of every run without resetting its loss accumulator
    (megatron/training/training.py:1796 at core_v0.16.1), so with --log-interval 1 the second
    line of a run is the mean of its first two iterations; undo that.
    """
    logged = {int(it): float(loss) for it, loss in LOSS_LINE.findall(out)}
    its = sorted(logged)
    if len(its) >= 2:
        logged[its[1]] = 2 * logged[its[1]] - logged[its[0]]
    return logged


def check_ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def test_pretrain_save_resume_matches_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    full = check_ok(run_launcher("--save", str(ckpt), "--save-interval", str(SAVE_AT)))
    assert "megatron.core': '" + str(Path(SOURCE).resolve()) not in full  # the wheel's core
    assert f"'megatron.training': '{Path(SOURCE).resolve() / 'megatron' / 'training'}'" in full
    assert "ML-FOP-SOAP |" in full  # our stats line from the runtime install's training_log
    ref = losses(full)
    assert sorted(ref) == list(range(1, ITERS + 1)), full[-3000:]
    assert all(math.isfinite(v) and 0 < v < 10 for v in ref.values()), ref
    assert ref[ITERS] < ref[1] - 0.1, ref  # it trains
    assert f"saving checkpoint at iteration {SAVE_AT:7d} to {ckpt} in torch_dist format" in full
    assert (ckpt / f"iter_{SAVE_AT:07d}" / ".metadata").is_file()

    resumed_out = check_ok(run_launcher("--load", str(ckpt), "--ckpt-step", str(SAVE_AT)))
    assert f"successfully loaded checkpoint from {ckpt}" in resumed_out
    resumed = losses(resumed_out)
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1)), resumed_out[-3000:]
    for it in resumed:
        assert resumed[it] == pytest.approx(ref[it], abs=LOSS_TOL), (it, resumed, ref)

    # Control: without the saved optimizer state (SOAP factors, eigenbases, moments) the same
    # resume ends elsewhere, so the comparison above does test the optimizer's checkpoint.
    fresh_opt = losses(
        check_ok(run_launcher("--load", str(ckpt), "--ckpt-step", str(SAVE_AT), "--no-load-optim"))
    )
    assert abs(fresh_opt[ITERS] - ref[ITERS]) > 100 * LOSS_TOL, (fresh_opt, ref)


@pytest.mark.parametrize(
    "layout",
    [
        ("--tensor-model-parallel-size", "2"),
        ("--tensor-model-parallel-size", "2", "--mlfop-tp-mode", "full"),
        ("--pipeline-model-parallel-size", "2"),
        ("--bf16", "--global-batch-size", "8"),
    ],
    ids=["tp2-blockwise", "tp2-full", "pp2", "bf16-dp2"],
)
def test_model_parallel_layouts_train(layout):
    """TP=2 (both TP modes), PP=2 and bf16 at DP=2 inside Megatron-LM's loop: 2 micro-batches
    per step (global batch 4 at DP=1, 8 at DP=2)."""
    out = check_ok(run_launcher("--global-batch-size", "4", *layout))
    logged = losses(out)
    assert sorted(logged) == list(range(1, ITERS + 1)), out[-3000:]
    assert logged[ITERS] < logged[1] - 0.1, logged
    assert "ML-FOP-SOAP |" in out and "L1 beta" in out  # folding ran (levels 1, 2)


def test_same_launcher_runs_megatron_adam_untouched():
    # --clip-grad 0: megatron-core's own clipping asserts CUDA tensors on the non-mlfop path
    # (megatron/core/optimizer/clip_grads.py:167); ML-FOP-SOAP's clipping runs on CPU.
    out = check_ok(run_launcher("--optimizer", "adam", "--clip-grad", "0", "--train-iters", "2"))
    assert "ML-FOP-SOAP |" not in out
    assert "Setting up optimizer with config AdamOptimizerConfig" in out
    assert sorted(losses(out)) == [1, 2], out[-3000:]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ("--use-distributed-optimizer",),
            "--use-distributed-optimizer cannot be combined with --optimizer mlfop_soap",
        ),
        (
            ("--mlfop-levels", "1,4"),
            "--mlfop-levels 1,4 must end at the number of micro-batches per step (2 = ",
        ),
        (
            ("--bf16", "--fp8-format", "hybrid"),
            "--fp8-format hybrid needs TransformerEngine's CUDA kernels",
        ),
    ],
    ids=["distributed-optimizer", "levels-vs-microbatches", "fp8-without-te"],
)
def test_runtime_install_rejects_what_needs_the_whole_run(flags, message):
    """Checks that need Megatron-LM's full arguments fail inside pretrain, naming the flag."""
    proc = run_launcher(*flags, "--train-iters", "1")
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-4000:]


PARSE = """
import sys
sys.path.append(sys.argv.pop(1))
import megatron.core
from megatron.training.arguments import parse_args
from mlfop_megatron.megatron_lm import add_mlfop_args
assert not megatron.core.__file__.startswith(sys.path[-1]), megatron.core.__file__
base = sys.argv[1:]
sys.argv = ['pretrain_gpt_mlfop.py', *base, '--optimizer', 'mlfop_soap', '--mlfop-levels', '1,2']
args = parse_args(add_mlfop_args)
print('PARSED', args.optimizer, args.mlfop_levels, flush=True)
for bad in (['--mlfop-beta1', '1.5'], ['--mlfop-levels', '2,1'],
            ['--mlfop-precondition-frequency', '0'], ['--mlfop-refresh-method', 'svd']):
    sys.argv = ['pretrain_gpt_mlfop.py', *base, '--optimizer', 'mlfop_soap', *bad]
    try:
        parse_args(add_mlfop_args)
    except SystemExit as exc:
        print('EXIT', exc.code, file=sys.stderr, flush=True)
    else:
        print('ACCEPTED', bad, file=sys.stderr, flush=True)
"""


def test_megatron_parse_args_rejects_bad_mlfop_values():
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PARSE, str(Path(SOURCE).resolve()), *MODEL],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PARSED mlfop_soap (1, 2)" in proc.stdout
    assert "ACCEPTED" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.count("EXIT 2") == 4, proc.stderr[-4000:]
    for message in (
        "argument --mlfop-beta1: must be in [0, 1) (got 1.5)",
        "argument --mlfop-levels: must be a sequence starting at 1",
        "argument --mlfop-precondition-frequency: must be an integer >= 1 (got 0)",
        "argument --mlfop-refresh-method: invalid choice: 'svd' (choose from 'qr', 'eigh')",
    ):
        assert f"pretrain_gpt_mlfop.py: error: {message}" in proc.stderr, proc.stderr[-4000:]
