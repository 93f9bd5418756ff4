"""Per-step GPU telemetry through NVML (nvidia-ml-py), optional and silent when unavailable.

On a machine without NVML (no driver, no GPU, package missing) it says once that GPU telemetry
is off and every sample is empty, so the training loop never needs a special case.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


class GPUTelemetry:
    """Samples memory, utilisation and power of this rank's GPU (LOCAL_RANK) each step."""

    def __init__(self, device_index: int | None = None) -> None:
        self.handle: Any = None
        self.reason = ""
        index = int(os.environ.get("LOCAL_RANK", "0")) if device_index is None else device_index
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, no device, ...
            self.reason = f"{type(exc).__name__}: {exc}"
            logger.warning("GPU telemetry is off (%s); training carries on", self.reason)

    @property
    def enabled(self) -> bool:
        """Whether NVML is available (a GPU handle was opened)."""
        return self.handle is not None

    def sample(self) -> dict[str, float]:
        """{'gpu/memory_used_gib', 'gpu/utilization_pct', 'gpu/power_w'} or {} when off."""
        if self.handle is None:
            return {}
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(self.handle)
        util = nvml.nvmlDeviceGetUtilizationRates(self.handle)
        power_mw = nvml.nvmlDeviceGetPowerUsage(self.handle)
        return {
            "gpu/memory_used_gib": memory.used / 2**30,
            "gpu/utilization_pct": float(util.gpu),
            "gpu/power_w": power_mw / 1000.0,
        }
