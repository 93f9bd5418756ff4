"""Megatron 0.19's own SOAP and Muon in the digits demo, and the demo's argument errors.

The peers (``--optimizer megatron-soap|megatron-muon``, examples/digits/optimizers.py) need
emerging-optimizers (``make setup-peers`` builds ``.venv-peers``); without it their training
test is skipped with the reason and the demo must refuse them in one line naming the fix.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("sklearn")
torch = pytest.importorskip("torch")

from examples.digits.optimizers import TABLE, entry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_digits.py"
PEERS = [name for name, e in TABLE.items() if not e.ours]
POSITION_EMBEDDINGS = "module.embedding.position_embeddings.weight"
LINEAR_WEIGHTS = (
    "linear_qkv.weight",
    "linear_proj.weight",
    "linear_fc1.weight",
    "linear_fc2.weight",
)


def _peer_steps(name: str, out: str, steps: int) -> dict[str, Any]:
    """One rank: build the demo's model and the peer, train ``steps`` steps, report."""
    from megatron.core.optimizer.emerging_optimizers import _EMERGING_OPTIMIZERS

    from examples.digits.spec import RunSpec
    from examples.digits.train import run_step, setup_run

    spec = RunSpec(
        optimizer=name,
        out=out,
        steps=steps,
        global_batch=8,
        micro_batch=2,
        lr=5e-3,
        seed=0,
        num_layers=1,
        hidden=32,
        diag_every=0,
    )
    run = setup_run(spec)
    cls = _EMERGING_OPTIMIZERS[name.removeprefix("megatron-")].optimizer_cls
    managed = {
        id(p)
        for opt in run.optimizer.chained_optimizers
        if isinstance(opt.optimizer, cls)
        for group in opt.optimizer.param_groups
        for p in group["params"]
    }
    named = {n: p for n, p in run.model.named_parameters() if id(p) in managed}
    # Megatron's rule (emerging_optimizers._is_nonlinear_or_embedding): 2-D params that are
    # not tagged embedding / output layer; the others go to its Adam.
    expected = sorted(
        n
        for n, p in run.model.named_parameters()
        if p.dim() == 2 and not getattr(p, "is_embedding_or_output_parameter", False)
    )
    before = {n: p.detach().clone() for n, p in named.items()}
    rows = [run_step(run, step) for step in range(steps)]
    return {
        "ddp": type(run.model).__name__,
        "managed": {n: tuple(p.shape) for n, p in named.items()},
        "expected": expected,
        "changed": {n: not torch.equal(before[n], p.detach()) for n, p in named.items()},
        "losses": [r["loss"] for r in rows],
        "skipped": rows[-1]["skipped_steps"],
    }


@pytest.mark.distributed
@pytest.mark.parametrize("name", PEERS)
def test_megatron_peer_trains_its_matrices(name: str, tmp_path: Path) -> None:
    """A few DP=2 steps of Megatron's own optimizer through the demo's table.

    The emerging optimizer manages the decoder's 2-D linear weights, and by Megatron's rule every
    other 2-D param not tagged embedding / output layer: here also the learned position
    embeddings (word embeddings, the output layer and 1-D params go to its Adam). Every managed
    weight moves, the losses are finite, and the model sits in Megatron's standard DDP.
    """
    reason = entry(name).missing()
    if reason is not None:
        pytest.skip(reason)
    from mlfop_megatron.runtime.spawn import run_distributed

    results = run_distributed(_peer_steps, 2, name, str(tmp_path), 3, timeout=300)
    res = results[0]
    assert res["ddp"] == "DistributedDataParallel"
    managed = sorted(res["managed"])
    assert managed == res["expected"], managed
    linear = sorted(n.rsplit(".", 2)[-2] + ".weight" for n in managed if "decoder" in n)
    assert linear == sorted(LINEAR_WEIGHTS), managed
    assert managed == sorted([*(n for n in managed if "decoder" in n), POSITION_EMBEDDINGS])
    assert not any("word_embeddings" in n or "output_layer" in n for n in managed)
    assert all(len(shape) == 2 for shape in res["managed"].values())
    assert all(res["changed"].values()), res["changed"]
    assert all(math.isfinite(x) for x in res["losses"]) and res["skipped"] == 0
    assert results[1]["losses"] == res["losses"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--global-batch", "3"], ("--global-batch 3", "--micro-batch", "divisible by 8")),
        (["--steps", "-5"], ("--steps -5", ">= 1")),
        (["--nproc", "0"], ("--nproc 0", ">= 1")),
    ],
)
def test_bad_sizes_end_in_one_line(args: list[str], words: tuple[str, ...], tmp_path) -> None:
    """Impossible sizes end before any rank starts: one line naming the option, no traceback."""
    proc = _cli(*args, "--out", str(tmp_path / "run"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", PEERS)
def test_missing_peer_ends_in_one_line_naming_setup_peers(name: str, tmp_path) -> None:
    if entry(name).missing() is None:
        pytest.skip(f"{name} is installed here")
    proc = _cli("--optimizer", name, "--out", str(tmp_path / "run"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--optimizer {name}" in lines[0] and "make setup-peers" in lines[0]


def test_compare_trains_what_is_installed_and_says_what_it_skips(capsys) -> None:
    from examples.digits.cli import optimizer_names, parse_args

    names = optimizer_names(parse_args(["--compare"]))
    printed = capsys.readouterr().out
    assert names[:3] == ["mlfop", "soap", "adamw"]
    for name in PEERS:
        reason = entry(name).missing()
        assert (name in names) == (reason is None)
        if reason is not None:
            assert f"--compare: skipping {name}: {reason}" in printed
    # Peers save no checkpoints: --resume drops them from --compare (with the reason) and
    # refuses them by name.
    assert optimizer_names(parse_args(["--compare", "--resume"]))[:3] == names[:3]
    assert not set(PEERS) & set(optimizer_names(parse_args(["--compare", "--resume"])))


def _spec(optimizer: str, options: tuple[tuple[str, Any], ...]) -> Any:
    from examples.digits.spec import RunSpec

    return RunSpec(
        optimizer=optimizer, out="unused", steps=1, global_batch=8, micro_batch=2, lr=1e-3,
        seed=0, megatron_options=options,
    )  # fmt: skip


def test_megatron_options_set_a_peers_config_and_are_refused_elsewhere() -> None:
    """A peer's OptimizerConfig takes the row's fields; ours and unknown fields are refused."""
    from dataclasses import fields

    from megatron.core.optimizer import OptimizerConfig

    from examples.digits.optimizers import optimizer_config

    config = optimizer_config(_spec("megatron-soap", (("adam_eps", 1e-6),)), "soap")
    assert config.adam_eps == 1e-6 and config.optimizer == "soap"
    if "soap_use_kl_shampoo" in {f.name for f in fields(OptimizerConfig)}:  # 0.19+
        spec = _spec("megatron-soap", (("soap_use_kl_shampoo", False),))
        assert optimizer_config(spec, "soap").soap_use_kl_shampoo is False
        assert optimizer_config(_spec("megatron-soap", ()), "soap").soap_use_kl_shampoo is True
    with pytest.raises(ValueError, match=r"megatron_options.*'soap'.*soap_options"):
        optimizer_config(_spec("soap", (("adam_eps", 1e-6),)))
    with pytest.raises(ValueError, match=r"\['no_such_field'\].*not fields"):
        optimizer_config(_spec("megatron-muon", (("no_such_field", 1),)), "muon")
