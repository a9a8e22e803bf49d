"""The planner's hardware profile of this machine, measured: the `probe` request, and standalone
`python -m kino_engine.probe [--quick | --full]` (one JSON answer line, as tool_answer.py prints).

What `measure(quick)` returns, with ProbeResult's field names (src/protocol/engine.ts), for the
engine's current CUDA device, or for the host alone where there is none (GPU fields null or empty):

- memory: the device's total and free bytes; the host's RAM, its cgroup limit, RLIMIT_MEMLOCK, and
  the pinned-memory cap kino plans with (`pinned_limit` says why it is half the RAM);
- copies: host→device and device→host from page-locked memory (a placement.HostBuffer, registered
  the way the placement registers the weights it streams), and host→device from pageable memory;
- bf16 GEMMs (tokens × width)·(width × width) at Wan's widths, 1536 (1.3B) and 5120 (14B), with
  32760 tokens (832×480×81 after the VAE and the patch);
- exact self-attention (SDPA) at 12 and 40 heads × 32760 tokens × 128, with each GPU backend that
  runtime/attention.py's `auto` chooses from; the fastest is kept;
- the host CPU's GEMM at a text-encoder shape (512 tokens × 4096), bf16 as a CPU-placed encoder runs
  (float32 where bf16 cannot run);
- the disk: sequential positional reads (as the disk tier reads blocks, runtime/weight_files.py) of a
  file written in the temporary folder, synced and dropped from the page cache first, so the rate is
  the disk's and not memory's; null where that folder is RAM-backed (tmpfs) or has no room.

How: CUDA events around each sample (perf_counter on the host), warm-up calls first, the median of
the samples; a sample repeats a call shorter than 5 ms (a 1536-wide GEMM takes about 0.5 ms on an
H100), and samples stop early once a measurement has spent its time budget (a slow CPU). `quick` keeps
the GPU's GEMM shapes (each takes milliseconds, and a smaller product under-measures the rate the
model reaches) but takes fewer repeats, a 256 MiB copy, the 1.3B attention shape only and a smaller
CPU product: about 2 s against about 10 s, most of it CUDA's start-up and the attention.

It knows nothing about models or the protocol's framing; `emit`, where given, receives debug log
events as measurements finish.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil
import torch
import torch.nn.functional as F

from .protocol import log_event
from .runtime.attention import AUTO_CANDIDATES, BACKENDS, AttentionBackend
from .runtime.disk import RAM_FILESYSTEMS, filesystem_type
from .runtime.placement import HostBuffer
from .system import driver_version

#: The share of the host's RAM (or of the cgroup's limit) kino pins at most; see `pinned_limit`.
PINNED_FRACTION = 0.5
#: Timed samples a measurement keeps at least, whatever its budget.
MIN_REPEATS = 3
#: Seconds a timed sample lasts at least: shorter calls are repeated inside it.
SAMPLE_S = 0.005
MiB = 1 << 20

Emit = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True)
class ProbeSizes:
    """What one probe mode measures."""

    #: Bytes of each timed copy (less where the host or the device has less to spare).
    transfer_bytes: int
    #: (M tokens, N out, K in) of each device GEMM.
    gemms: tuple[tuple[int, int, int], ...]
    #: (heads, tokens, head dim) of each self-attention.
    attention: tuple[tuple[int, int, int], ...]
    #: (M, N, K) of the host's GEMM.
    cpu_gemm: tuple[int, int, int]
    #: Timed calls per measurement (after the warm-up), at most.
    repeats: int
    #: Seconds a measurement may spend on its repeats before it stops at MIN_REPEATS or more.
    budget_s: float
    #: Bytes of the file whose sequential read is timed (less where the disk has less room).
    disk_bytes: int = 256 * MiB


WAN_TOKENS = 32760  # 832×480×81: 21 latent frames × 30 × 52 patches
FULL = ProbeSizes(
    transfer_bytes=1024 * MiB,
    gemms=((WAN_TOKENS, 1536, 1536), (WAN_TOKENS, 5120, 5120)),
    attention=((12, WAN_TOKENS, 128), (40, WAN_TOKENS, 128)),
    cpu_gemm=(512, 4096, 4096),
    repeats=10,
    budget_s=1.5,
    disk_bytes=1024 * MiB,
)
QUICK = ProbeSizes(
    transfer_bytes=256 * MiB,
    gemms=FULL.gemms,
    attention=FULL.attention[:1],
    cpu_gemm=(256, 2048, 2048),
    repeats=5,
    budget_s=0.3,
)

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


# ---- memory facts ----


def pinned_limit(host_ram: int, cgroup_limit: int | None) -> int:
    """Host bytes kino may page-lock: half of the host's RAM, or of its cgroup's limit where lower.

    RLIMIT_MEMLOCK does not bound it: CUDA's pinned memory (cudaHostAlloc, cudaHostRegister) is locked
    by the NVIDIA driver, which does not charge that limit (it governs mlock(2) and RDMA registration;
    containers often set it to 64 KiB or 8 MiB, and CUDA pins gigabytes there), so it is reported,
    not applied. What does bound it: pinned pages can be neither swapped nor reclaimed, and the rest
    of a generation still needs pageable memory (the loader's shard buffer, the page cache that
    safetensors' mmap reads through, decoded frames, other processes), so pinning past about half
    the RAM invites the out-of-memory killer. A cgroup charges pinned pages to its limit like any
    other. The presets follow the same rule (h100-80gb: 128 of 256 GiB).
    """
    ceiling = host_ram if cgroup_limit is None else min(host_ram, cgroup_limit)
    return int(ceiling * PINNED_FRACTION)


def cgroup_memory_limit(host_ram: int) -> int | None:
    """The memory limit of this process's cgroup (v2, else v1) where it is below `host_ram`; else None."""
    paths = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, path = line.split(":", 2)
            if hierarchy == "0":  # cgroup v2: "0::/the/group"
                paths.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.max")
    except (OSError, ValueError):
        pass
    paths += ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
    limits = []
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # not "max"; v1 writes a huge number for no limit, which the comparison drops
            limits.append(int(text))
    below = [limit for limit in limits if limit < host_ram]
    return min(below) if below else None


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ---- timing ----


def median_seconds(call: Callable[[], Any], sizes: ProbeSizes, *, cuda: bool, warmup: int = 2) -> float:
    """Median seconds of one `call` after `warmup` calls: CUDA events on the device, perf_counter on the host.

    A call shorter than SAMPLE_S is repeated inside each timed sample (and the sample divided), so
    that launching it from Python, which the GPU would otherwise wait on, is not counted as its time.
    """
    for _ in range(warmup):
        call()
    inner = max(1, min(100, math.ceil(SAMPLE_S / _sample(call, 1, cuda))))
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(sizes.repeats):
        times.append(_sample(call, inner, cuda) / inner)
        if len(times) >= MIN_REPEATS and time.perf_counter() - started > sizes.budget_s:
            break
    # A timer can read 0 for a call below its resolution; the rate must stay finite.
    return max(statistics.median(times), 1e-9)


def _sample(call: Callable[[], Any], count: int, cuda: bool) -> float:
    """Seconds of `count` back-to-back calls."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(count):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for _ in range(count):
        call()
    return time.perf_counter() - t0


# ---- measurements ----


def gemm_measure(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, sizes: ProbeSizes) -> dict[str, Any]:
    """(M×K)·(K×N) as F.linear computes a layer: activations times the transposed (N×K) weight."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    cuda = device.type == "cuda"
    seconds = median_seconds(lambda: F.linear(x, w), sizes, cuda=cuda, warmup=2 if cuda else 1)
    return {"m": m, "n": n, "k": k, "dtype": _DTYPE_NAMES[dtype], "seconds": seconds, "flopsPerS": 2.0 * m * n * k / seconds}


def cpu_gemm_measure(sizes: ProbeSizes) -> dict[str, Any]:
    """The host's GEMM in bf16, or in float32 where this build cannot multiply bf16 on the CPU."""
    m, n, k = sizes.cpu_gemm
    cpu = torch.device("cpu")
    try:
        return gemm_measure(m, n, k, cpu, torch.bfloat16, sizes)
    except RuntimeError:
        return gemm_measure(m, n, k, cpu, torch.float32, sizes)


def attention_measure(
    heads: int,
    tokens: int,
    head_dim: int,
    device: torch.device,
    sizes: ProbeSizes,
    candidates: tuple[str, ...] = AUTO_CANDIDATES,
    registry: Mapping[str, AttentionBackend] = BACKENDS,
) -> dict[str, Any]:
    """Self-attention with each candidate backend; the fastest is kept (torch's default if none runs)."""
    shape = (1, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4.0 * heads * tokens * tokens * head_dim

    def timed(name: str) -> float | None:
        backend = registry[name]

        def call() -> None:
            with backend.context():
                F.scaled_dot_product_attention(q, k, v)

        try:
            return median_seconds(call, sizes, cuda=device.type == "cuda")
        except RuntimeError:  # no such kernel for this device, dtype or shape
            return None

    seconds = {name: timed(name) for name in candidates}
    if all(s is None for s in seconds.values()):
        seconds["default"] = timed("default")
    ran = {name: s for name, s in seconds.items() if s is not None}
    if not ran:
        raise RuntimeError(f"no SDPA backend runs {heads} heads x {tokens} tokens x {head_dim} in bfloat16")
    best = min(ran, key=ran.__getitem__)
    return {
        "heads": heads,
        "tokens": tokens,
        "headDim": head_dim,
        "dtype": "bfloat16",
        "backend": best,
        "seconds": ran[best],
        "flopsPerS": flops / ran[best],
        "byBackend": {name: (None if s is None else flops / s) for name, s in seconds.items()},
    }


def transfer_measures(nbytes: int, device: torch.device, sizes: ProbeSizes) -> dict[str, float]:
    """Copy rates (bytes/s) between page-locked host memory and the device, and from pageable memory."""
    host = HostBuffer(nbytes, pin=True)
    try:
        on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
        pageable = torch.ones(nbytes, dtype=torch.uint8)  # written, so its pages exist before the timing
        h2d = median_seconds(lambda: on_device.copy_(host.buffer, non_blocking=True), sizes, cuda=True)
        d2h = median_seconds(lambda: host.buffer.copy_(on_device, non_blocking=True), sizes, cuda=True)
        h2d_pageable = median_seconds(lambda: on_device.copy_(pageable), sizes, cuda=True)
    finally:
        host.close()
    return {"h2dBytesPerS": nbytes / h2d, "d2hBytesPerS": nbytes / d2h, "h2dPageableBytesPerS": nbytes / h2d_pageable}


#: Bytes written or read per call when the disk is measured.
DISK_CHUNK = 16 * MiB


def disk_read_measure(folder: str, nbytes: int) -> float | None:
    """Bytes/s of one sequential read of an `nbytes` file written in `folder`: synced, then dropped from
    the page cache (POSIX_FADV_DONTNEED), so the bytes come from the disk. Random bytes, so a compressing
    filesystem cannot shortcut it. None for a RAM-backed folder or one with less than 4× the room."""
    if filesystem_type(folder) in RAM_FILESYSTEMS:
        return None
    nbytes = min(nbytes, shutil.disk_usage(folder).free // 4) // DISK_CHUNK * DISK_CHUNK
    if nbytes == 0:
        return None
    fd, path = tempfile.mkstemp(prefix="kino-probe-", suffix=".bin", dir=folder)
    try:
        chunk = os.urandom(DISK_CHUNK)
        with os.fdopen(fd, "wb") as f:
            for _ in range(nbytes // DISK_CHUNK):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        reader = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
            into = memoryview(bytearray(DISK_CHUNK))
            started = time.perf_counter()
            for offset in range(0, nbytes, DISK_CHUNK):
                os.preadv(reader, [into], offset)
            seconds = time.perf_counter() - started
        finally:
            os.close(reader)
    finally:
        os.unlink(path)
    return nbytes / seconds


def measure(quick: bool = False, emit: Emit | None = None) -> dict[str, Any]:
    """The ProbeResult of this machine: its current CUDA device, or the host alone without one."""
    started = time.perf_counter()
    sizes = QUICK if quick else FULL

    def note(message: str) -> None:
        if emit is not None:
            emit(log_event("debug", f"probe: {message}"))

    memory = psutil.virtual_memory()
    host_ram = int(memory.total)
    cgroup = cgroup_memory_limit(host_ram)
    result: dict[str, Any] = {
        "device": "cpu",
        "index": None,
        "name": cpu_name(),
        "capability": None,
        "driver": driver_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "vramTotalBytes": None,
        "vramFreeBytes": None,
        "hostRamBytes": host_ram,
        "hostRamAvailableBytes": int(memory.available),
        "memoryLimitBytes": cgroup,
        "memlockBytes": memlock_limit(),
        "pinnedLimitBytes": pinned_limit(host_ram, cgroup),
        "h2dBytesPerS": None,
        "d2hBytesPerS": None,
        "h2dPageableBytesPerS": None,
        "transferBytes": None,
        "gemm": [],
        "attention": [],
    }
    if torch.cuda.is_available():
        result.update(_measure_device(sizes, int(memory.available), note))
    result["cpuGemm"] = cpu_gemm_measure(sizes)
    note(f"CPU GEMM {result['cpuGemm']['flopsPerS'] / 1e12:.2f} TFLOP/s ({result['cpuGemm']['dtype']})")
    result["cpuThreads"] = torch.get_num_threads()
    result["diskReadBytesPerS"] = disk_read_measure(tempfile.gettempdir(), sizes.disk_bytes)
    disk = result["diskReadBytesPerS"]
    note(f"disk read {disk / 1e9:.2f} GB/s" if disk is not None else "disk read not measured (a RAM-backed temporary folder)")
    result["quick"] = quick
    result["ms"] = (time.perf_counter() - started) * 1000.0
    return result


def _measure_device(sizes: ProbeSizes, host_available: int, note: Callable[[str], None]) -> dict[str, Any]:
    index = torch.cuda.current_device()
    device = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)  # before anything here allocates
    # Each copy holds its bytes on the device and twice on the host: stay well inside both.
    nbytes = max(MiB, min(sizes.transfer_bytes, free // 4, host_available // 8) // MiB * MiB)
    out: dict[str, Any] = {
        "device": "cuda",
        "index": index,
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "vramTotalBytes": int(total),
        "vramFreeBytes": int(free),
        "transferBytes": nbytes,
    }
    out.update(transfer_measures(nbytes, device, sizes))
    note(f"H2D {out['h2dBytesPerS'] / 1e9:.1f} GB/s pinned, {out['h2dPageableBytesPerS'] / 1e9:.1f} pageable; D2H {out['d2hBytesPerS'] / 1e9:.1f}")
    out["gemm"] = [gemm_measure(m, n, k, device, torch.bfloat16, sizes) for m, n, k in sizes.gemms]
    note("GEMM " + ", ".join(f"{g['m']}x{g['n']}x{g['k']} {g['flopsPerS'] / 1e12:.0f} TFLOP/s" for g in out["gemm"]))
    torch.cuda.empty_cache()
    out["attention"] = [attention_measure(h, n, d, device, sizes) for h, n, d in sizes.attention]
    note("attention " + ", ".join(f"{a['heads']}x{a['tokens']}x{a['headDim']} {a['backend']} {a['flopsPerS'] / 1e12:.0f} TFLOP/s" for a in out["attention"]))
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.probe", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats, smaller copies (about 2 s)")
    mode.add_argument("--full", action="store_true", help="the full measurement (about 10 s; the default)")
    args = parser.parse_args(argv)
    from .system import configure_cpu_threads
    from .tool_answer import answer

    configure_cpu_threads()  # as the worker does: the CPU rate is the one a job would get
    return answer(lambda: measure(quick=args.quick, emit=lambda event: print(event["message"], file=sys.stderr)))


if __name__ == "__main__":
    sys.exit(main())
