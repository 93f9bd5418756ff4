"""dist_checkpointing of ML-FOP-SOAP: save at DP=2, resume at DP=2 (bitwise) and DP=1 (reshard)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core import dist_checkpointing  # noqa: E402

from mlfop_megatron.megatron.checkpointing import latest_checkpoint  # noqa: E402
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402

pytestmark = pytest.mark.distributed


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_save_dp2_resume_dp2_bitwise(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=7, microbatches=4, global_micro=2, precondition_frequency=2)
    full = run_distributed(run_tiny_gpt, 2, dict(base, save_at=(3, ckpt)))
    path = latest_checkpoint(ckpt)
    assert path is not None and path.endswith("iter_0000003")
    assert not any(name.endswith(".tmp") for name in os.listdir(ckpt))
    resumed = run_distributed(run_tiny_gpt, 2, dict(base, load_from=path))
    for r in (0, 1):
        assert _same(full[r]["params"], resumed[r]["params"])
        assert full[r]["losses"][4:] == resumed[r]["losses"]


def test_checkpoint_without_the_tracked_estimates_loads_and_trains_on(tmp_path):
    """A checkpoint saved before DL, DR were kept: the load forms them from L, QL, R, QR.

    fp64 so that the formed estimates equal the tracked ones to ~1e-15: the drift gate takes
    the same decisions and the resumed run matches the uninterrupted one to 1e-10.
    """
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=7, microbatches=4, global_micro=2, dtype=torch.float64)
    old = dict(base, save_at=(3, ckpt), save_without=("DL", "DR"))
    full = run_distributed(run_tiny_gpt, 2, old)
    path = latest_checkpoint(ckpt)
    keys = list(dist_checkpointing.load_tensors_metadata(path))
    assert any(k.endswith(".QL") for k in keys)
    assert not any(k.endswith((".DL", ".DR")) for k in keys)
    resumed = run_distributed(run_tiny_gpt, 2, dict(base, load_from=path))
    for r in (0, 1):
        assert full[r]["losses"][4:] != full[r]["losses"][:3]  # it trains past the save
        for name, value in full[r]["params"].items():
            assert torch.allclose(resumed[r]["params"][name], value, rtol=1e-10, atol=0), name


def test_save_dp2_reshard_to_dp1_allclose(tmp_path):
    """fp64, rotation off: DP=1 sees gradients that differ only in rounding (see DP tests)."""
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=6, microbatches=4, global_micro=2, dtype=torch.float64, max_precond_dim=1)
    full = run_distributed(run_tiny_gpt, 2, dict(base, save_at=(2, ckpt)))
    resumed = run_distributed(run_tiny_gpt, 1, dict(base, load_from=latest_checkpoint(ckpt)))[0]
    for name, value in full[0]["params"].items():
        assert torch.allclose(resumed["params"][name], value, rtol=1e-5, atol=1e-7), name


def test_latest_checkpoint_ignores_partial_dirs_and_survives_a_bad_marker(tmp_path):
    """Only complete checkpoint folders are loaded.

    Only renamed iter_NNNNNNN folders are complete; a missing or truncated marker (a crash
    between the rename and the marker update) falls back to the newest complete folder.
    """
    assert latest_checkpoint(str(tmp_path / "absent")) is None
    assert latest_checkpoint(str(tmp_path)) is None
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "iter_0000010").mkdir()
    (tmp_path / "iter_0000020.tmp").mkdir()  # a save that died mid-write
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000010")
    (tmp_path / "latest").write_text("iter_0000003")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000003")
    for bad in ("", "iter_00", "../elsewhere", "iter_0000020.tmp", "iter_0000099"):
        (tmp_path / "latest").write_text(bad)
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000010"), bad


def test_save_survives_stop_signals_sent_to_every_process_of_the_job(tmp_path):
    """A save's helper processes outlive a stop signal sent to every process of the job.

    Slurm signals every process of a job step (preemption, ``scancel --full``, the time-limit
    signal the batch shell forwards), not only the ranks. The torch_dist writer keeps a spawned
    multiprocessing Manager from the first save on: killed by that signal, the next save (the
    preemption checkpoint) died with EOFError or BrokenPipeError (seen in CI, tests/test_slurm.py).
    """
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=5, microbatches=2, global_micro=2, precondition_frequency=2)
    spec = dict(base, save_at=(2, ckpt), signal_after_save=True)
    full = run_distributed(run_tiny_gpt, 2, spec)
    for rank in full:  # the writer's Manager was among the signalled processes
        assert any("multiprocessing" in cmd for cmd in rank["signalled"]), rank["signalled"]
    resumed = run_distributed(run_tiny_gpt, 2, dict(base, load_from=latest_checkpoint(ckpt)))
    for r in (0, 1):
        assert _same(full[r]["params"], resumed[r]["params"])


def test_save_resume_with_the_separately_clipped_group_bitwise(tmp_path):
    """A checkpoint of a run with megatron-core 0.19's separately clipped (MTP) group resumes.

    The tagged matrices live in engines of their own; saved at DP=2, the checkpoint holds
    every engine's blocks and the resumed run repeats the uninterrupted one bitwise.
    """
    from mlfop_megatron.megatron import compat

    if "mtp" not in compat.separate_grad_norm_groups():
        pytest.skip("this megatron-core has no separately clipped grad-norm groups (< 0.19)")
    ckpt = str(tmp_path / "ckpt")
    base = dict(
        iters=7,
        microbatches=4,
        global_micro=2,
        precondition_frequency=2,
        clip_grad=0.3,
        mtp_tagged=("layers.1.",),
    )
    full = run_distributed(run_tiny_gpt, 2, dict(base, save_at=(3, ckpt)))
    assert all("mtp" in norms for norms in full[0]["group_norms"])  # the group is in the run
    resumed = run_distributed(run_tiny_gpt, 2, dict(base, load_from=latest_checkpoint(ckpt)))
    for r in (0, 1):
        assert _same(full[r]["params"], resumed[r]["params"])
        assert full[r]["losses"][4:] == resumed[r]["losses"]
        assert full[r]["group_norms"][4:] == resumed[r]["group_norms"]


@pytest.mark.parametrize(("saved", "resumed"), [("adam", "soap"), ("soap", "adam")])
def test_a_checkpoint_resumes_only_with_its_choice_of_soap_params(tmp_path, saved, resumed):
    """Switching --mlfop-position-embeddings across a resume is refused, naming the option.

    Either way the layouts differ: SOAP state missing for a param SOAP now steps, or SOAP
    state saved for a param Adam now steps. With the same setting the run resumes bitwise,
    also where one rank owns no block of an engine (the position embeddings, one replicated
    matrix in an engine of its own at DP=2: dist_checkpointing leaves that engine out of the
    rank's loaded list).
    """
    ckpt = str(tmp_path / "ckpt")
    base = dict(iters=4, microbatches=2, global_micro=2, precondition_frequency=2)
    full = run_distributed(
        run_tiny_gpt, 2, dict(base, save_at=(1, ckpt), position_embeddings=saved)
    )
    path = latest_checkpoint(ckpt)
    with pytest.raises(
        Exception, match=r"another choice of SOAP params.*mlfop-position-embeddings"
    ):
        run_distributed(run_tiny_gpt, 2, dict(base, load_from=path, position_embeddings=resumed))
    same = run_distributed(run_tiny_gpt, 2, dict(base, load_from=path, position_embeddings=saved))
    for r in (0, 1):
        assert _same(full[r]["params"], same[r]["params"])
        assert full[r]["losses"][2:] == same[r]["losses"]
