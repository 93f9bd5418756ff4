"""The SOAP step alone on one DP rank's blocks of the digits model (CPU, one thread).

The matrices one of two DP ranks owns in the digits demo (hidden 128, 4 layers: qkv, proj,
fc1, fc2 of two layers), slowly drifting gradients (an AR(1) walk, so that the drift gate
refreshes a fraction of the sides, as in training), the package's SOAP defaults (folding off)
or any ``--option value`` of SOAPConfig. Prints the median wall time of ``step()`` over 20
steps after 10 warm-up steps and the refreshes done / skipped.

Comparing two versions of the code side by side (the same script, the same machine)::

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old python -m benchmarks.soap_step_digits   # run from another directory
    python -m benchmarks.soap_step_digits
"""

from __future__ import annotations

import argparse
import ast
import statistics
import time
from collections.abc import Sequence

import torch

LAYER_SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512)]  # qkv, proj, fc1, fc2
SHAPES = LAYER_SHAPES * 2  # one of two DP ranks' share of the 4 layers


def drift(walk: list[torch.Tensor], gen: torch.Generator) -> None:
    """One step of the slowly drifting gradients: an AR(1) walk, in place."""
    for w in walk:
        w.mul_(0.98).add_(torch.randn(w.shape, generator=gen), alpha=0.2)


def run(options: dict[str, object], steps: int = 20, warmup: int = 10) -> tuple[float, int, int]:
    """(median ms per step, refreshes done, refreshes skipped) over ``steps`` timed steps."""
    from mlfop_megatron.optim.mlfop_soap import MLFOPSOAP

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in SHAPES]
    walk = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = MLFOPSOAP(params, **options)

    def next_grads() -> None:
        drift(walk, gen)
        for p, w in zip(params, walk):
            p.grad = w.clone()

    for _ in range(warmup):
        next_grads()
        opt.step()
    done, skipped = opt.counters.refreshes_done, opt.counters.refreshes_skipped
    times = []
    for _ in range(steps):
        next_grads()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return (
        1e3 * statistics.median(times),
        opt.counters.refreshes_done - done,
        opt.counters.refreshes_skipped - skipped,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``--name value`` SOAPConfig options, run, print one line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _, rest = ap.parse_known_args(argv)
    options: dict[str, object] = {}
    for name, value in zip(rest[::2], rest[1::2]):
        try:
            options[name.lstrip("-").replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name.lstrip("-").replace("-", "_")] = value
    torch.set_num_threads(1)
    ms, done, skipped = run(options)
    print(f"SOAP step {ms:.1f} ms (median of 20), refreshed {done}, skipped {skipped}, {options}")


if __name__ == "__main__":
    main()
