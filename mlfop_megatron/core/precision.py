"""Full fp32 matmuls around the SOAP math: TF32 off while the optimizer launches kernels.

TF32 keeps 10 mantissa bits: rotations, factor updates and the power step of the QR refresh
computed in it lose ~1e-3 relative accuracy, far above the n * eps thresholds that decide a
factor's null space and the robust eigh's retries. Training scripts (and NGC containers)
often turn TF32 on for the model's GEMMs; :func:`fp32_matmuls` turns it off for the calls that
launch optimizer work and restores it after. The flags are read on the host when a kernel is
launched, so kernels launched inside the block on a side stream are covered too; setting them
costs no device work and no host sync.

``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1`` (set by some NGC images) makes cuBLAS use TF32 whatever
these flags say; :func:`check_tf32_override` refuses it on CUDA runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

TF32_OVERRIDE_ENV = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"


@contextmanager
def fp32_matmuls() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN and "highest" fp32 matmul precision inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def check_tf32_override(device: torch.device) -> None:
    """Refuse a CUDA run whose environment forces TF32 in cuBLAS (the flags cannot undo it)."""
    if device.type != "cuda" or os.environ.get(TF32_OVERRIDE_ENV, "") in ("", "0"):
        return
    raise RuntimeError(
        f"{TF32_OVERRIDE_ENV}={os.environ[TF32_OVERRIDE_ENV]} forces TF32 in every cuBLAS "
        "matmul, also ML-FOP-SOAP's rotations, factor updates and basis refresh, whose "
        "null-space thresholds need full fp32. Unset it (NGC images set it: "
        f"`unset {TF32_OVERRIDE_ENV}` or `export {TF32_OVERRIDE_ENV}=0` before launching); "
        "to keep TF32 for the model's GEMMs, set torch.backends.cuda.matmul.allow_tf32 = True "
        "in the training script instead: the optimizer turns it off around its own math"
    )
