"""Memory accounting: module sizes, process RSS and its per-job peak, device memory counters.

`PeakRam` measures a job's peak resident set size. On Linux it resets the kernel's high-water mark
(VmHWM, by writing "5" to /proc/self/clear_refs) at the start and reads it at the end, so peaks inside
a phase are caught; elsewhere it falls back to the largest of the samples taken at step and phase
boundaries. Device counters are torch's (allocated bytes, not what nvidia-smi shows).

This module decides nothing; it measures.
"""

from __future__ import annotations

import gc

import psutil
import torch

_PROCESS = psutil.Process()


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return int(_PROCESS.memory_info().rss)


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRam:
    """Peak RSS over a span: `start()`, `sample()` at boundaries, `peak()` at the end."""

    def __init__(self) -> None:
        self._max = 0
        self._hwm_reset = False

    def start(self) -> None:
        self._hwm_reset = _reset_hwm()
        self._max = rss_bytes()

    def sample(self) -> int:
        now = rss_bytes()
        self._max = max(self._max, now)
        return now

    def peak(self) -> int:
        self.sample()
        hwm = _read_hwm_bytes() if self._hwm_reset else None
        return max(self._max, hwm or 0)


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def vram_allocated(device: torch.device) -> int | None:
    """Bytes torch has allocated on `device` now; None off CUDA."""
    return int(torch.cuda.memory_allocated(device)) if is_cuda(device) else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings must cover it, not its launch); a no-op off CUDA."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def reset_vram_peak(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def vram_peak(device: torch.device) -> int | None:
    """Peak bytes allocated on `device` since the last reset; None off CUDA."""
    return int(torch.cuda.max_memory_allocated(device)) if is_cuda(device) else None


def free_device_memory() -> None:
    """Return cached device memory after a job ends, fails or is cancelled."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on the meta device too)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
