"""The digits demo as a package: a unified image+text GPT trained through ML-FOP-SOAP.

Modules, one job each: ``data`` (the token stream and its samplers), ``spec`` (run sizes,
defaults, metric columns, lr schedule), ``devices``, ``model`` (GPTModel in Megatron's DDP
and the optimizer from the package's factory), ``steps`` (micro-batches, the modality-balanced
loss, Megatron's schedule), ``diagnostics`` (per-modality gradients and metric columns),
``rundir`` (metrics files and checkpoints), ``train`` (one rank's loop), ``plots`` and ``cli``.
Run it with ``python examples/train_digits.py``; import it as ``examples.digits`` from the
repository root (``python -m benchmarks.sample_efficiency``).
"""
