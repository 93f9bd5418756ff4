"""megatron-core 0.19's HybridModel (GPTModel's successor) under ML-FOP-SOAP.

The tiny GPT built as a HybridModel with pattern ``*-`` per block (Megatron's migration guide:
one GPT block = an attention layer then an MLP layer) holds the same weights under GPT-equivalent
names; trained with ML-FOP-SOAP (folding on, SOAP state sharded over DP=2) it must follow the
GPTModel run. The optimizer sees the same matrices (qkv, proj, fc1, fc2 -> SOAP; embeddings,
output layer, norms -> Adam), so the two runs execute the same math.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from mlfop_megatron.runtime.spawn import run_distributed  # noqa: E402
from tests.support.mlfop_runs import run_tiny_gpt  # noqa: E402
from tests.support.tiny_hybrid import gpt_equivalent_name, hybrid_available  # noqa: E402

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not hybrid_available(), reason="megatron.core.models.hybrid needs megatron-core >= 0.19"
    ),
]

SPEC = {"iters": 4, "microbatches": 4, "global_micro": 4, "lr": 1e-2, "precondition_frequency": 2}


def test_hybrid_model_trains_like_the_equivalent_gpt_model():
    gpt = run_distributed(run_tiny_gpt, 2, dict(SPEC, arch="gpt"))
    hybrid = run_distributed(run_tiny_gpt, 2, dict(SPEC, arch="hybrid"))
    for rank in range(2):
        ref, got = gpt[rank], hybrid[rank]
        params = {gpt_equivalent_name(n): p for n, p in got["params"].items()}
        assert sorted(params) == sorted(ref["params"])
        # Same weights, samples, reductions and kernels in the same order: bitwise (measured).
        for name, value in ref["params"].items():
            assert torch.equal(params[name], value), name
        assert got["losses"] == ref["losses"]
        assert got["losses"][-1] < got["losses"][0]
        assert got["state_bytes"] == ref["state_bytes"]  # same matrices went to SOAP
