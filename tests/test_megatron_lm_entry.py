"""Real Megatron-LM pretraining with --optimizer mlfop_soap: 2 gloo ranks on CPU, tiny GPT.

Runs examples/megatron_lm/pretrain_gpt_mlfop.py (Megatron-LM's own ``pretrain``: its argument
parsing, training loop and torch_dist checkpointing) under torchrun with the CPU emulation.
Set MEGATRON_LM_DIR to a Megatron-LM checkout of a supported tag (core_v0.16.1 or core_v0.19.0;
its megatron/core/package_info.py says which) and use the matching megatron-core (0.16.1 or
0.19.x): the launcher takes megatron.training from the checkout and megatron.core from the wheel.
On core_v0.19 the model is built from Megatron-LM's GPTModelConfig (its builder path), on
core_v0.16 by the launcher's model_provider through get_model.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mlfop_megatron.megatron_lm.compat import TESTED_TAGS, checkout_tag, checkout_version

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "examples" / "megatron_lm" / "pretrain_gpt_mlfop.py"
SOURCE = os.environ.get("MEGATRON_LM_DIR")
SUPPORTED_TAGS = " or ".join(sorted(TESTED_TAGS.values()))


def megatron_lm_skip_reason(source: str | None) -> str | None:
    """Why the Megatron-LM tests cannot run with this MEGATRON_LM_DIR (None: they can)."""
    if not source or not (Path(source) / "megatron" / "training").is_dir():
        return (
            f"Megatron-LM source checkout ({SUPPORTED_TAGS}) not available (its training "
            "package is not on PyPI for 0.16): set MEGATRON_LM_DIR"
        )
    if checkout_tag(source) is None:
        version = checkout_version(source)
        found = ".".join(map(str, version)) if version else "of unknown version"
        return f"MEGATRON_LM_DIR={source} is Megatron-LM {found}; supported: {SUPPORTED_TAGS}"
    return None


SKIP_REASON = megatron_lm_skip_reason(SOURCE)
TAG = checkout_tag(SOURCE) if SKIP_REASON is None else None

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or ""),
]

ITERS = 6
SAVE_AT = 3
# 2 DP ranks x micro-batch 2 x 2 micro-batches = global batch 8; folding levels 1,2 (TRAIN
# turns folding on: it is off by default).
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
    "--hidden-dropout 0 --optimizer mlfop_soap --mlfop-folding --mlfop-precondition-frequency 2 "
    "--ckpt-format torch_dist"
).split()
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|")
# Same layout, same deterministic CPU kernels, same gloo reductions: a resumed run repeats the
# uninterrupted one bit for bit, so the only difference allowed is Megatron-LM's printing
# ("%E", 7 significant digits: <= 5e-7 for losses in [1, 10)) and the undoing of its
# first-iteration averaging below (2x that): 1e-5 leaves margin and is still ~100x below what a
# resume without the optimizer state changes (checked in the same test).
LOSS_TOL = 1e-5


def launcher_command(
    *flags: str, nproc: int = 2, source: str | None = None, **env_extra: str
) -> tuple[list[str], dict[str, str]]:
    """Command and environment of the launcher under torchrun on CPU."""
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
    return cmd, env


def run_launcher(
    *flags: str, nproc: int = 2, timeout: int = 240, source: str | None = None, **env_extra: str
) -> subprocess.CompletedProcess:
    """The launcher under torchrun on CPU; ``source`` overrides MEGATRON_LM_DIR."""
    cmd, env = launcher_command(*flags, nproc=nproc, source=source, **env_extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def losses(out: str) -> dict[int, float]:
    """Per-iteration 'lm loss' from Megatron-LM's log lines.

    Megatron-LM logs the first iteration of every run without resetting its loss accumulator
    (megatron/training/training.py:1796 at core_v0.16.1, :2594 at core_v0.19.0), so with
    --log-interval 1 the second
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
    """TP, PP and bf16 inside Megatron-LM's training loop.

    TP=2 (both TP modes), PP=2 and bf16 at DP=2 inside Megatron-LM's loop: 2 micro-batches
    per step (global batch 4 at DP=1, 8 at DP=2).
    """
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
    # megatron-core's optimizer set up with Adam (0.16: AdamOptimizerConfig, 0.19: OptimizerConfig)
    assert re.search(
        r"Setting up optimizer with config \w*OptimizerConfig\(.*optimizer='adam'", out
    )
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
from mlfop_megatron.megatron_lm.compat import use_megatron_lm_checkout
source = sys.argv.pop(1)
use_megatron_lm_checkout(source)
import megatron.core, megatron.training
from megatron.training.arguments import parse_args
from mlfop_megatron.megatron_lm import add_mlfop_args
assert not megatron.core.__file__.startswith(source), megatron.core.__file__
assert megatron.training.__file__.startswith(source), megatron.training.__file__
base = sys.argv[1:]
sys.argv = ['pretrain_gpt_mlfop.py', *base, '--optimizer', 'mlfop_soap', '--mlfop-folding',
            '--mlfop-levels', '1,2']
args = parse_args(add_mlfop_args)
print('PARSED', args.optimizer, args.mlfop_folding, args.mlfop_levels, flush=True)
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
    assert "PARSED mlfop_soap True (1, 2)" in proc.stdout
    assert "ACCEPTED" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.count("EXIT 2") == 4, proc.stderr[-4000:]
    for message in (
        "argument --mlfop-beta1: must be in [0, 1) (got 1.5)",
        "argument --mlfop-levels: must be strictly increasing (got (2, 1))",
        "argument --mlfop-precondition-frequency: must be an integer >= 1 (got 0)",
        "argument --mlfop-refresh-method: invalid choice: 'svd' (choose from 'qr', 'eigh')",
    ):
        assert f"pretrain_gpt_mlfop.py: error: {message}" in proc.stderr, proc.stderr[-4000:]


FAULT_ITERS = 8


def _signal_during_megatron_save(
    ckpt: Path, log: Path, sig: int, *flags: str, every_process: bool = False
) -> int:
    """Interrupt a run while it saves; return its exit code.

    Start a run saving every 2 iterations; send ``sig`` to its ranks (``every_process`` or
    SIGKILL: to the ranks and every process they started, as Slurm signals a job step) while
    the save after the first complete one is being written. Returns the run's exit code.
    """
    cmd, env = launcher_command(
        "--train-iters", str(FAULT_ITERS), "--save", str(ckpt), "--save-interval", "2", *flags
    )
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            complete = tracker.read_text().strip() if tracker.exists() else ""
            if complete == "2" and (ckpt / "iter_0000004").is_dir():  # save of 4 in progress
                # The ranks, as srun would signal them (torchrun runs them in their own
                # sessions; signalling torchrun instead makes it tear the workers down).
                ranks = psutil.Process(proc.pid).children()
                targets = psutil.Process(proc.pid).children(recursive=True)
                for child in targets if sig == signal.SIGKILL or every_process else ranks:
                    child.send_signal(sig)
                break
            time.sleep(0.01)
        else:
            proc.kill()
            raise AssertionError("never saw the second save in progress:\n" + log.read_text())
        return proc.wait(timeout=180)


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory) -> dict[int, float]:
    ckpt = tmp_path_factory.mktemp("fault-ref")
    flags = ("--train-iters", str(FAULT_ITERS), "--save", str(ckpt), "--save-interval", "1000")
    return losses(check_ok(run_launcher(*flags)))


def test_sigkill_during_a_megatron_save_resumes_from_the_last_complete_one(
    tmp_path, fault_reference
):
    """Megatron-LM's tracker names only complete saves: a save killed midway is never loaded."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "killed.log"
    code = _signal_during_megatron_save(ckpt, log, signal.SIGKILL)
    assert code != 0 and "Signal 9 (SIGKILL)" in log.read_text(), log.read_text()[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    out = check_ok(run_launcher("--train-iters", str(FAULT_ITERS), "--load", str(ckpt)))
    assert "successfully loaded checkpoint" in out and "at iteration 2" in out, out[-3000:]
    resumed = losses(out)
    assert sorted(resumed) == list(range(3, FAULT_ITERS + 1)), out[-3000:]
    for it, value in resumed.items():
        assert value == pytest.approx(fault_reference[it], abs=LOSS_TOL), (it, value)


@pytest.mark.parametrize("every_process", [False, True], ids=["ranks", "every-process"])
def test_sigterm_during_a_megatron_save_finishes_it_and_stops_for_requeue(
    tmp_path, fault_reference, every_process
):
    """A signal during a save: the save completes, the run requeues and resumes.

    With --exit-signal-handler the interrupted save completes, the run saves again at the
    next iteration and exits with the requeue code; the resumed run repeats the reference.
    ``every_process``: the signal also reaches the processes the ranks started (the torch_dist
    writer's Manager, kept since the first save), as Slurm preemption sends it.
    """
    from mlfop_megatron.launch.preemption import REQUEUE_EXIT_CODE

    ckpt, log = tmp_path / "ckpt", tmp_path / "terminated.log"
    code = _signal_during_megatron_save(
        ckpt, log, signal.SIGTERM, "--exit-signal-handler", every_process=every_process
    )
    text = log.read_text()
    # torchrun reports a failed worker (1); the ranks themselves exit with the requeue code.
    assert code != 0 and f"(exitcode: {REQUEUE_EXIT_CODE})" in text, text[-3000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert stopped == 5, text[-3000:]  # save of 4 finished, stop after iteration 5
    assert f"stopped at iteration {stopped}: exiting for requeue" in text
    out = check_ok(run_launcher("--train-iters", str(FAULT_ITERS), "--load", str(ckpt)))
    resumed = losses(out)
    assert sorted(resumed) == list(range(stopped + 1, FAULT_ITERS + 1)), out[-3000:]
    for it, value in resumed.items():
        assert value == pytest.approx(fault_reference[it], abs=LOSS_TOL), (it, value)


def test_slurm_preemption_sigterm_stops_a_run_that_exits_on_sigusr1(tmp_path, fault_reference):
    """slurm/pretrain.sbatch passes ``--exit-signal SIGUSR1``; Slurm preempts with SIGTERM.

    SIGTERM to every process of the run (as Slurm's preemption sends it) after iteration 3
    stops it like SIGUSR1 would: a checkpoint, the requeue exit code, and the resumed run
    repeats the uninterrupted losses. Without the routing the ranks died of the SIGTERM.
    """
    from mlfop_megatron.launch.preemption import REQUEUE_EXIT_CODE

    ckpt, log = tmp_path / "ckpt", tmp_path / "preempted.log"
    flags = ("--train-iters", str(FAULT_ITERS), "--save", str(ckpt), "--save-interval", "1000")
    cmd, env = launcher_command(*flags, "--exit-signal-handler", "--exit-signal", "SIGUSR1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 180
        while len(losses(log.read_text())) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    text = log.read_text()
    assert code != 0 and f"(exitcode: {REQUEUE_EXIT_CODE})" in text, text[-3000:]
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < FAULT_ITERS and f"stopped at iteration {stopped}" in text, text[-3000:]
    out = check_ok(run_launcher("--train-iters", str(FAULT_ITERS), "--load", str(ckpt)))
    resumed = losses(out)
    assert sorted(resumed) == list(range(stopped + 1, FAULT_ITERS + 1)), out[-3000:]
    for it, value in resumed.items():
        assert value == pytest.approx(fault_reference[it], abs=LOSS_TOL), (it, value)
