"""GPU energy from NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, in mJ).

``EnergyMeter.for_device(device)`` gives a meter whose ``read_j()`` returns the counter in joules,
or None when there is no counter (CPU, no NVML, a GPU without the counter). Callers take the
difference of two reads around a batch; nothing is ever estimated.

The counter is the whole GPU's, not this process's: other processes' work on the same GPU during
the batch is in the difference too, and a per-item figure is the batch's energy split evenly over
its items. ``other_processes()`` counts the other processes NVML sees on the GPU, so every
measurement can say whether it had the GPU to itself.
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


    def other_processes(self) -> int | None:
        """Processes other than this one holding a compute or graphics context on the GPU (None: unknown)."""
        if self.handle is None:
            return None
        import os

        import pynvml

        try:
            procs = [*pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle),
                     *pynvml.nvmlDeviceGetGraphicsRunningProcesses(self.handle)]
        except (pynvml.NVMLError, AttributeError) as exc:  # AttributeError: an NVML binding without the call
            log.warning("gpu_processes_unavailable", device=str(self.device), error=str(exc))
            return None
        return len({p.pid for p in procs} - {os.getpid()})


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device, matched by UUID (robust to CUDA_VISIBLE_DEVICES)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if uuid:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)
