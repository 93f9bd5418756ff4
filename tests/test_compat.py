"""Every private / version-dependent megatron-core name in compat.py resolves on this install.

Runs on each megatron-core version CI tests (0.16.1 and 0.19.2): a release that renames one of
them fails here by name instead of deep inside a training run.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("megatron.core")

from mlfop_megatron.megatron import compat  # noqa: E402
from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402


def test_installed_megatron_core_is_in_the_supported_range():
    version = compat.check_megatron_core_version(strict=True)
    assert compat.MIN_VERSION <= version < compat.MAX_VERSION_EXCLUSIVE
    # CI pins the version it means to test (Makefile MCORE); a mismatch means the venv is wrong.
    expected = os.environ.get("MLFOP_EXPECT_MCORE")
    if expected:
        assert ".".join(map(str, version)) == expected


@pytest.mark.parametrize("name", sorted(compat.PRIVATE_API_PROBES))
def test_private_api_resolves(name):
    assert compat.PRIVATE_API_PROBES[name]() is not None


def _ddp_instance_attributes() -> dict[str, object]:
    """Build a real Megatron DDP and read the instance attributes compat relies on."""
    from mlfop_megatron.runtime.megatron_parallel import init_megatron_parallel
    from tests.support.tiny_gpt import TinyGPTConfig, build_tiny_gpt

    init_megatron_parallel(seed=0)
    ddp = build_tiny_gpt(TinyGPTConfig())
    groups = compat.ddp_bucket_groups(ddp)
    return {
        "bucket_groups": len(groups),
        "buffers": len(compat.ddp_buffers(ddp)),
        "params_with_grad": len(compat.ddp_params_with_grad(ddp)),
        "params": sum(1 for p in ddp.parameters() if p.requires_grad),
        "is_last_microbatch": all(hasattr(g, "is_last_microbatch") for g in groups),
    }


@pytest.mark.distributed
def test_ddp_instance_attributes_resolve():
    (out,) = run_distributed(_ddp_instance_attributes, 1)
    assert out["bucket_groups"] >= 1 and out["buffers"] >= 1
    assert out["params_with_grad"] == out["params"]
    assert out["is_last_microbatch"]
