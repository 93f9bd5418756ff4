"""Resume bit-exactness, NaN/Inf step skipping and eigh failure fallbacks."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from mlfop_megatron.config import REFERENCE_SOAP
from mlfop_megatron.optim import MLFOPSOAP


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train(model, opt, steps, k, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(k):
            x = torch.randn(5, 6, generator=gen).to(next(model.parameters()).dtype)
            model(x).pow(2).mean().backward()
            opt.accumulate()
        opt.step()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = [copy.deepcopy(opt.state[p]) for p in model.parameters()]
    return params, state


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        va, vb = a[key], b[key]
        assert type(va) is type(vb)
        if torch.is_tensor(va):
            assert va.dtype == vb.dtype and torch.equal(va, vb), key
        else:
            assert va == vb, key


@pytest.mark.parametrize("folding", [True, False], ids=["folding", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_bit_exactly(dtype, folding):
    model = tiny_model().to(dtype)
    opts = dict(accumulation_steps=4, enabled=folding, precondition_frequency=3)
    opt = MLFOPSOAP(model.parameters(), **opts)
    train(model, opt, steps=7, k=4, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, steps=6, k=4, seed=2)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = tiny_model(seed=99).to(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = MLFOPSOAP(resumed.parameters(), **opts)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 7
    for p in resumed.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.float32  # not cast to the param dtype
    train(resumed, opt2, steps=6, k=4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), resumed.parameters()):
        assert_state_equal(opt.state[pa], opt2.state[pb])


def test_state_dict_inside_window_is_refused():
    model = tiny_model()
    opt = MLFOPSOAP(model.parameters(), accumulation_steps=2, enabled=True)
    model(torch.randn(2, 6)).sum().backward()
    opt.accumulate()
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        opt.state_dict()


@pytest.mark.parametrize("folding", [True, False], ids=["folding", "plain"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_micro_step_skips_the_step_without_touching_state(bad, folding):
    model = tiny_model()
    opt = MLFOPSOAP(
        model.parameters(), accumulation_steps=4, enabled=folding, precondition_frequency=2
    )
    train(model, opt, steps=3, k=4, seed=5)
    params, state = snapshot(model, opt)
    for micro in range(4):
        model(torch.randn(5, 6)).pow(2).mean().backward()
        if micro == 2:
            next(model.parameters()).grad[0, 0] = bad
        opt.accumulate()
    opt.step()
    assert opt.stats()["skipped_steps"] == 1
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
    for p, before in zip(model.parameters(), state):
        assert_state_equal(opt.state[p], before)
    train(model, opt, steps=2, k=4, seed=6)  # training carries on
    assert opt.stats()["steps"] == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_eigh_fp32_failure_retries_in_fp64(monkeypatch):
    real = torch.linalg.eigh

    def fail_fp32(mat, *args, **kwargs):
        if mat.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected fp32 failure")
        return real(mat, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fail_fp32)
    model = tiny_model()
    opt = MLFOPSOAP(model.parameters(), refresh_method="eigh", precondition_frequency=2)
    train(model, opt, steps=5, k=1, seed=0)
    stats = opt.stats()
    assert stats["eigh_fp64_retries"] > 0 and stats["eigh_failures"] == 0
    w = model[0].weight
    q = opt.state[w]["QL"]
    assert q.dtype == torch.float32
    assert torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-5)


def test_eigh_total_failure_keeps_previous_basis(monkeypatch):
    model = tiny_model()
    opt = MLFOPSOAP(model.parameters(), refresh_method="eigh", precondition_frequency=2)
    train(model, opt, steps=2, k=1, seed=0)
    w = model[0].weight
    basis_before = opt.state[w]["QL"].clone()

    def always_fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fail)
    train(model, opt, steps=4, k=1, seed=1)  # crosses two refreshes
    stats = opt.stats()
    assert stats["eigh_failures"] >= 2
    assert torch.equal(opt.state[w]["QL"], basis_before)
    for p in model.parameters():
        for value in opt.state[p].values():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all()


def test_eigh_failure_on_first_step_uses_identity(monkeypatch):
    def always_fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", always_fail)
    model = tiny_model()
    opt = MLFOPSOAP(model.parameters(), **REFERENCE_SOAP)  # no QR refresh in the 3 steps
    train(model, opt, steps=3, k=1, seed=0)
    w = model[0].weight
    assert torch.equal(opt.state[w]["QL"], torch.eye(8))
    assert all(torch.isfinite(p).all() for p in model.parameters())
