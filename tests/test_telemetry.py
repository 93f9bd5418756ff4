"""NVML telemetry says once that it is off on a machine without NVML and never fails."""

from __future__ import annotations

import logging

import pytest

from mlfop_megatron.launch.telemetry import GPUTelemetry


def test_without_nvml_telemetry_is_off_with_one_message(caplog):
    try:
        import pynvml

        pynvml.nvmlInit()
        pytest.skip("NVML is available here; this test covers machines without it")
    except Exception:
        pass
    with caplog.at_level(logging.WARNING):
        telemetry = GPUTelemetry()
    assert not telemetry.enabled and telemetry.reason
    assert telemetry.sample() == {} and telemetry.sample() == {}
    messages = [r.getMessage() for r in caplog.records if "telemetry is off" in r.getMessage()]
    assert len(messages) == 1
