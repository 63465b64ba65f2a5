"""GPU energy from NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, in mJ).

``EnergyMeter.for_device(device)`` gives a meter whose ``read_j()`` returns the counter in joules,
or None when there is no counter (CPU, no NVML, a GPU without the counter). Callers take the
difference of two reads around a batch; nothing is ever estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import torch

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EnergyMeter:
    handle: Any = None  # an NVML device handle, or None: no counter
    device: torch.device | None = None

    @classmethod
    def for_device(cls, device: torch.device) -> "EnergyMeter":
        if device.type != "cuda":
            return cls()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = _nvml_handle(pynvml, device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # fails early if the GPU has no counter
        except Exception as exc:  # noqa: BLE001 - any NVML problem means "no counter"
            log.info("energy_counter_unavailable", device=str(device), error=str(exc))
            return cls()
        return cls(handle, device)

    def read_j(self) -> float | None:
        """The counter in joules after the device finished its queued work, or None."""
        if self.handle is None:
            return None
        import pynvml

        torch.cuda.synchronize(self.device)
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0
        except pynvml.NVMLError as exc:
            log.warning("energy_read_failed", device=str(self.device), error=str(exc))
            return None


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device, matched by UUID (robust to CUDA_VISIBLE_DEVICES)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)
