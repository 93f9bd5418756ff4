"""Read the digits demo's checkpoints in tests (the package's dist_checkpointing format).

``<run>/checkpoint/<optimizer>/`` holds ``iter_NNNNNNN/`` (complete), the ``latest`` marker and
``run.json``; a save in progress (or killed) is an ``iter_NNNNNNN.tmp/`` folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mlfop_megatron.megatron.checkpointing import latest_checkpoint


def complete_step(folder: Path) -> int | None:
    """Step of the checkpoint resume would load from ``folder``, else None."""
    path = latest_checkpoint(str(folder))
    return None if path is None else int(Path(path).name.removeprefix("iter_"))


def temp_folders(folder: Path) -> list[Path]:
    """Temporary folders of saves in progress (or killed) in ``folder``."""
    try:
        return [p for p in folder.iterdir() if p.name.endswith(".tmp") and p.is_dir()]
    except FileNotFoundError:
        return []


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest complete checkpoint (model and optimizer), by key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = latest_checkpoint(str(folder))
    assert path is not None, f"no complete checkpoint in {folder}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, out)
        state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def assert_same_tensors(a: Path, b: Path) -> None:
    """The latest checkpoints of two runs hold bitwise-equal tensors under the same keys."""
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("decoder.") for k in ta) and any("optimizer" in k for k in ta)
    for key, value in ta.items():
        assert torch.equal(value, tb[key]), key
