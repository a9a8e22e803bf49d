"""The machine the engine runs on: versions, devices, host RAM, encoder, and device/dtype resolution.

`hello_info()` gathers the facts of a HelloResult (except the protocol version). `resolve_device`
turns a protocol device name into a torch device, or fails DEVICE_UNAVAILABLE. `configure_cpu_threads`
sizes torch's CPU thread pool to the CPUs this process may run on (cgroup/affinity aware).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from pathlib import Path
from typing import Any

import av
import diffusers
import psutil
import torch
import transformers

from . import __version__
from .protocol import EngineFailure

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """The torch device for a protocol device name; DEVICE_UNAVAILABLE if CUDA is asked and absent."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EngineFailure(
                "DEVICE_UNAVAILABLE",
                "model.device is cuda but torch sees no CUDA device here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use cpu or check the driver",
                phase="load",
                field="model.device",
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_cpu_threads() -> int:
    """Use every CPU this process may run on for intra-op work; returns the thread count."""
    threads = usable_cpus()
    torch.set_num_threads(threads)
    return threads


def encoder_info() -> dict[str, Any]:
    try:
        av.codec.Codec("libx264", "w")
        h264 = True
    except Exception:  # PyAV raises its own error types for an unknown codec, depending on the build
        h264 = False
    return {"name": "pyav", "version": av.__version__, "h264": h264}


def cuda_devices() -> list[dict[str, Any]]:
    devices = []
    if not torch.cuda.is_available():
        return devices
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "totalBytes": int(total),
                "freeBytes": int(free),
                "capability": f"{props.major}.{props.minor}",
            }
        )
    return devices


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version ("550.54.15"), or the CUDA driver API's ("cuda 12.4"); None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module(?: for [\w-]+)?\s+([0-9][0-9.]*)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    if not torch.cuda.is_available():
        return None
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:  # not Linux, or no libcuda where torch found a device: leave it unknown
        pass
    return None


def hello_info() -> dict[str, Any]:
    """Versions, devices and host RAM, with the HelloResult's field names (protocol excluded)."""
    memory = psutil.virtual_memory()
    return {
        "engineVersion": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "encoder": encoder_info(),
        "devices": cuda_devices(),
        "hostRamBytes": int(memory.total),
        "hostRamAvailableBytes": int(memory.available),
        "driver": driver_version(),
    }
