"""Multi-tensor kernels: the torch path against per-tensor references; apex vs torch on a GPU."""

from __future__ import annotations

import pytest
import torch

from mlfop_megatron.megatron import fused_kernels as fk


def _tensors(dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5), (64, 33), (1,), (2, 3, 4)]
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def test_cpu_lists_take_the_torch_path():
    assert fk.backend(_tensors()) == "torch"
    assert fk.fused_adam_class(_tensors()) is None
    groups = [{"params": [torch.nn.Parameter(t) for t in _tensors()], "weight_decay": 0.1}]
    assert type(fk.make_adamw(groups, 1e-3, (0.9, 0.95), 1e-8)) is torch.optim.AdamW


def test_scale_copy_zero_axpby_match_per_tensor_reference():
    xs = _tensors()
    ref = [x * 0.37 for x in xs]
    fk.scale_(xs, 0.37)
    assert all(torch.equal(a, b) for a, b in zip(xs, ref))

    dst = [torch.empty_like(x, dtype=torch.bfloat16) for x in xs]
    fk.copy_(xs, dst)  # fp32 main -> bf16 model: one round-to-nearest per element
    assert all(torch.equal(d, x.to(torch.bfloat16)) for d, x in zip(dst, xs))

    ys, out = _tensors(seed=1), [torch.empty_like(x) for x in xs]
    fk.axpby(0.5, xs, -2.0, ys, out)
    for o, x, y in zip(out, xs, ys):
        torch.testing.assert_close(o, 0.5 * x - 2.0 * y, rtol=0, atol=1e-6)

    fk.zero_(xs)
    assert all(int(torch.count_nonzero(x)) == 0 for x in xs)


def test_l2_norm_matches_reference_and_edge_cases():
    xs = _tensors()
    ref = torch.sqrt(sum(x.double().pow(2).sum() for x in xs))
    torch.testing.assert_close(fk.l2_norm(xs).double(), ref, rtol=1e-6, atol=0)
    assert float(fk.l2_norm([])) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        fk.copy_(xs, xs[:2])


@pytest.mark.gpu
def test_apex_and_torch_paths_agree_on_cuda():
    if not fk.apex_available():
        pytest.skip("apex (with its amp_C CUDA extension) is not installed")
    for dtype in (torch.float32, torch.bfloat16):
        xs, ys = _tensors(dtype, "cuda"), _tensors(dtype, "cuda", seed=1)
        assert fk.backend(xs) == "apex"
        results = {}
        for force_torch in (False, True):
            fk.set_force_torch(force_torch)
            try:
                a = [x.clone() for x in xs]
                fk.scale_(a, 0.37)
                out = [torch.empty_like(x) for x in xs]
                fk.axpby(0.5, xs, -2.0, ys, out)
                copied = [torch.empty_like(x, dtype=torch.float32) for x in xs]
                fk.copy_(xs, copied)
                results[force_torch] = (a, out, copied, fk.l2_norm(xs))
            finally:
                fk.set_force_torch(False)
        (a1, o1, c1, n1), (a2, o2, c2, n2) = results[False], results[True]
        assert all(torch.equal(x, y) for x, y in zip(a1, a2)), dtype
        assert all(torch.equal(x, y) for x, y in zip(c1, c2)), dtype
        for x, y in zip(o1, o2):  # both compute a*x+b*y in fp32 and round once
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(n1.float(), n2.float(), rtol=1e-5, atol=0)

    params = [torch.nn.Parameter(t) for t in _tensors(torch.float32, "cuda")]
    adam = fk.make_adamw([{"params": params, "weight_decay": 0.1}], 1e-3, (0.9, 0.95), 1e-8)
    assert type(adam).__name__ == "FusedAdam"
