"""Test-only helpers: tiny Megatron models, canned optimizer runs, reference implementations.

Not shipped in the wheel; importable as ``tests.support`` from a checkout (the repository root
on ``sys.path``: pytest puts it there because ``tests`` is a package).
"""
