"""Train a miniature Janus/Emu3-style unified image+text model on the digits corpus.

One megatron-core GPTModel predicts one token stream that mixes two tasks (see
``digits/data.py``): text -> image generation (loss on the 64 image tokens) and image -> text
understanding (loss on the caption words). It trains through the ML-FOP-SOAP Megatron
integration: ``FoldingDistributedDataParallel`` + ``get_mlfop_optimizer`` and Megatron's
``get_forward_backward_func`` schedules, exactly as a Megatron-LM job would. The code lives
in the ``digits`` package next to this file; this is its entry point.

CPU (spawns the gloo ranks itself, installs the CUDA emulation of mlfop_megatron/runtime/)::

    python examples/train_digits.py --nproc 2 --out runs/demo
    python examples/train_digits.py --nproc 2 --out runs/compare --compare
    python examples/train_digits.py --nproc 2 --out runs/ci --quick

GPUs (torchrun or srun set RANK/WORLD_SIZE; NCCL, one GPU per rank, TE layers if installed)::

    torchrun --nproc-per-node 8 examples/train_digits.py --tp 2 --out runs/gpu

Optimizers: ``mlfop`` (SOAP + multi-level FOP folding; ``--fold-structure``, ``--step-size``,
``--statistics-from`` choose the FoldingConfig variant; the demo's default, folding turned on
explicitly), ``soap`` (the same code with folding off, the package's default: plain SOAP on the
mean gradient), ``adamw`` (the factory's Adam-only path: torch AdamW
in Megatron's FP32Optimizer, with Megatron's plain DDP) and Megatron 0.19's own
``megatron-soap`` / ``megatron-muon`` (``get_megatron_optimizer``; need ``make setup-peers``).
Every optimizer enters through one table, ``digits/optimizers.py``. The loss is
modality-balanced: half the image token mean plus half the text token mean of the global
batch, whatever the micro-batch layout. Every run writes metrics.csv / metrics.jsonl (one row
per step), checkpoint/<optimizer>/ (per rank, written atomically; not for Megatron's peers),
loss.png / cosine.png / beta.png / grad.png and summary.json into ``--out``.
``--micro-batch-layout by-modality`` (the default) gives each micro-batch one task (image
first half of the step, text second half; ``mixed`` mixes them in every micro-batch); every
``--diag-every`` steps the optimizer reports its grad-group diagnostics (ours only), whose
per-modality panels of grad.png need the by-modality layout.
"""

from digits.cli import main

if __name__ == "__main__":
    main()
