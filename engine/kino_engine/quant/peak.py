"""Peak host memory (RSS) while something runs: how the loaders' memory claims are checked.

`measure_peak_rss(fn)` runs `fn()` and returns its result with a `PeakRss`: the resident set size
just before, and the highest it reached during the call. On Linux the kernel's own high-water mark
(VmHWM, reset through /proc/self/clear_refs; see runtime.memory.PeakRam) catches every page; a
sampling thread (psutil, every `interval_s`) covers systems without it. RSS counts the touched pages
of memory-mapped files too, so a safetensors shard being read counts while it is open.

This module measures; it decides nothing.
"""

from __future__ import annotations

import gc
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from ..runtime.memory import PeakRam, rss_bytes

T = TypeVar("T")


@dataclass(frozen=True)
class PeakRss:
    #: RSS right before the call.
    baseline_bytes: int
    #: The highest RSS seen during the call.
    peak_bytes: int

    @property
    def increase_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)


def measure_peak_rss(fn: Callable[[], T], interval_s: float = 0.002) -> tuple[T, PeakRss]:
    """`fn()`'s result and the peak RSS of this process while it ran."""
    gc.collect()
    peak = PeakRam()
    peak.start()
    baseline = rss_bytes()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak.sample()

    sampler = threading.Thread(target=sample, name="kino-peak-rss", daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, PeakRss(baseline, peak.peak())
