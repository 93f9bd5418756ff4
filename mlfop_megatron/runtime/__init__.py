"""Run-time support for CPU runs: CUDA emulation, strict device checks, the gloo process spawner.

Used by the CPU demo, the benchmarks, the Megatron-LM example and the tests; not needed on GPUs.
"""
