"""Exact scaled-dot-product attention backends, chosen by name from a registry and resolved once.

Contract: `resolve_backend(name, shape, device, ...)` turns a RuntimeOptions.attention name into one
registered `AttentionBackend`; "auto" measures every backend available on the device once on the
model's real self-attention shape (B, heads, N tokens, head dim) with CUDA events, keeps the fastest,
logs the timings, and caches the choice in `<cache_dir>/attention.json` keyed by GPU name, torch
version, shape and dtype, so a second process does not measure again. `install(transformer, policy)`
applies the choice from outside the model: it wraps the transformer's forward in
`torch.nn.attention.sdpa_kernel([...])`, which every `F.scaled_dot_product_attention` call inside it
(diffusers' Wan attention goes through `dispatch_attention_fn` -> its "native" backend -> SDPA) obeys.

Why a forward wrapper and not diffusers' `transformer.set_attention_backend("_native_cudnn")`: that API
also sets a process-global active backend, and its cuDNN path copies q/k/v with `.contiguous()` on
every call; the context costs nothing and leaves diffusers' registry alone. The same backend serves
self- and cross-attention (one context around the whole forward).

All backends here are exact attention (no approximation); their outputs differ by float rounding only.
This module knows nothing about denoising, schedulers or the protocol.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger("kino.attention")

#: (B, heads, N, head_dim): the shape attention is measured at.
AttentionShape = tuple[int, int, int, int]


@dataclass(frozen=True)
class AttentionBackend:
    """One exact SDPA backend: the torch kernels it allows (None = torch chooses) and where it runs."""

    name: str
    kernels: tuple[SDPBackend, ...] | None
    devices: frozenset[str]

    def context(self) -> AbstractContextManager:
        """The context that restricts SDPA to this backend's kernels (a no-op for "default")."""
        return sdpa_kernel(list(self.kernels)) if self.kernels is not None else nullcontext()


_ANY = frozenset({"cpu", "cuda"})
_CUDA = frozenset({"cuda"})

#: The registry, by name. Tests may pass their own mapping to `resolve_backend`.
BACKENDS: Mapping[str, AttentionBackend] = {
    "default": AttentionBackend("default", None, _ANY),
    "math": AttentionBackend("math", (SDPBackend.MATH,), _ANY),
    "cudnn": AttentionBackend("cudnn", (SDPBackend.CUDNN_ATTENTION,), _CUDA),
    "flash": AttentionBackend("flash", (SDPBackend.FLASH_ATTENTION,), _CUDA),
    "efficient": AttentionBackend("efficient", (SDPBackend.EFFICIENT_ATTENTION,), _CUDA),
}
#: What "auto" measures on a GPU (math is exact but never fastest there; "default" is one of these).
AUTO_CANDIDATES: tuple[str, ...] = ("cudnn", "flash", "efficient")

#: Measures one backend at a shape: milliseconds per call, or raises RuntimeError if unsupported.
Measure = Callable[[AttentionBackend, AttentionShape, torch.dtype, torch.device], float]


def available(device: torch.device, registry: Mapping[str, AttentionBackend] = BACKENDS) -> list[str]:
    """Names of the registered backends that can run on `device`."""
    return [name for name, backend in registry.items() if device.type in backend.devices]


def cache_key(device: torch.device, shape: AttentionShape, dtype: torch.dtype) -> str:
    """The JSON cache key: GPU name, torch version, shape and dtype (a choice is only valid for all four)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    b, h, n, d = shape
    return f"{gpu}|torch {torch.__version__}|B{b} H{h} N{n} D{d}|{str(dtype).removeprefix('torch.')}"


def measure_with_events(
    backend: AttentionBackend, shape: AttentionShape, dtype: torch.dtype, device: torch.device, repeats: int = 5
) -> float:
    """Median ms of one SDPA call under `backend` on random q/k/v of `shape`, timed with CUDA events."""
    if device.type != "cuda":
        raise RuntimeError("attention is measured on CUDA devices only")
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, generator=generator) for _ in range(3))
    times: list[float] = []
    with backend.context():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # warm-up; raises if unsupported
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            end.record()
            end.synchronize()  # measuring, not denoising: a sync here is the point
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        log.warning("ignoring unreadable attention cache %s: %s", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Merge one entry into the JSON cache, atomically (a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    data[key] = entry
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".attention-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Resolution:
    """The chosen backend and why: "named", "cpu", "cache" or "measured" (with the timings in ms)."""

    backend: AttentionBackend
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)


def resolve_backend(
    name: str,
    shape: AttentionShape,
    dtype: torch.dtype,
    device: torch.device,
    cache_dir: Path | None = None,
    registry: Mapping[str, AttentionBackend] = BACKENDS,
    measure: Measure = measure_with_events,
) -> Resolution:
    """A backend name (or "auto") -> one registered backend that runs on `device`, logged with its reason."""
    if name != "auto":
        if name not in registry:
            raise ValueError(f"RuntimeOptions.attention: unknown backend {name!r}; known: {sorted(registry)}")
        backend = registry[name]
        if device.type not in backend.devices:
            raise ValueError(
                f"RuntimeOptions.attention: {name!r} does not run on {device.type}; "
                f"available there: {available(device, registry)}"
            )
        return Resolution(backend, "named")
    if device.type != "cuda":
        log.info("attention: auto on %s -> default (only default/math run there; nothing to measure)", device.type)
        return Resolution(registry["default"], "cpu")
    key = cache_key(device, shape, dtype)
    path = cache_dir / "attention.json" if cache_dir is not None else None
    cached = _read_cache(path).get(key) if path is not None else None
    if isinstance(cached, dict) and cached.get("backend") in registry:
        log.info("attention: auto -> %s (cached in %s for %s)", cached["backend"], path, key)
        return Resolution(registry[cached["backend"]], "cache", dict(cached.get("timings_ms", {})))
    timings = _measure_all(shape, dtype, device, registry, measure)
    best = min(timings, key=timings.__getitem__) if timings else "default"
    log.info("attention: auto -> %s at %s, measured ms: %s", best, key, timings or "none ran; torch chooses")
    if path is not None:
        _write_cache(path, key, {"backend": best, "timings_ms": timings})
    return Resolution(registry[best], "measured", timings)


def _measure_all(
    shape: AttentionShape,
    dtype: torch.dtype,
    device: torch.device,
    registry: Mapping[str, AttentionBackend],
    measure: Measure,
) -> dict[str, float]:
    timings: dict[str, float] = {}
    for name in AUTO_CANDIDATES:
        if name not in registry or device.type not in registry[name].devices:
            continue
        try:
            timings[name] = float(measure(registry[name], shape, dtype, device))
        except RuntimeError as error:  # this GPU/dtype/shape has no such kernel: not a candidate
            log.info("attention: %s unavailable at %s: %s", name, shape, str(error).splitlines()[0][:200])
    return timings


class AttentionPolicy:
    """The backend the transformer's forward runs under; set once per shape before the first forward."""

    def __init__(self, backend: AttentionBackend):
        self.backend = backend
        self.resolved_for: set[AttentionShape] = set()

    def context(self) -> AbstractContextManager:
        return self.backend.context()


def install(module: torch.nn.Module, policy: AttentionPolicy) -> None:
    """Run `module.forward` under `policy`'s SDPA context, from outside (an instance attribute wraps it).

    Idempotent: a second install replaces the policy instead of nesting wrappers.
    """
    original = getattr(module.forward, "__kino_original_forward__", module.forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with policy.context():
            return original(*args, **kwargs)

    forward.__kino_original_forward__ = original  # type: ignore[attr-defined]
    forward.__kino_attention_policy__ = policy  # type: ignore[attr-defined]
    module.forward = forward  # type: ignore[method-assign]


def installed_policy(module: torch.nn.Module) -> AttentionPolicy | None:
    """The policy `install` put on `module`, if any."""
    return getattr(module.forward, "__kino_attention_policy__", None)

