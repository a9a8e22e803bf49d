"""Builds a model with random weights directly on its target device, fast and seeded.

`build_random(make, device=, dtype=, seed=)` runs the model's constructor under a `torch.device`
context with `dtype` as the default dtype (so every tensor is born where and as it will live: no
meta-then-materialize, no float32 copy of a bf16 model), then draws every weight matrix / kernel
(parameters of 2 or more dimensions) from N(0, 0.02) in place with a seeded generator. Biases and
norm weights keep their constructor init. Modules the model class declares as fp32-only
(`_keep_in_fp32_modules`, read as data, the way diffusers and transformers apply them when loading)
are then cast to float32. The global RNG is left as it was.

It knows nothing about Wan: any diffusers or transformers model class works.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)

INIT_STD = 0.02


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fp32_module_names(module: torch.nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Names of submodules the model class keeps in float32 when loaded in `dtype`."""
    if dtype == torch.float32:
        return ()
    names = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if hasattr(module, "_keep_in_fp32_modules_strict"):
        # transformers: the plain list applies to float16 only, the strict one to bf16 as well.
        if dtype != torch.float16:
            names = []
        names += list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    return tuple(names)


def load_dtype(name: str, stored: torch.dtype, dtype: torch.dtype, fp32_modules: tuple[str, ...]) -> torch.dtype:
    """The dtype a checkpoint tensor `name` stored as `stored` takes when its model loads in `dtype`
    (as `from_pretrained(dtype=...)` casts it): float32 under the modules the class keeps in float32
    (`fp32_module_names`), `dtype` for other floating tensors, non-floating ones as stored."""
    if not stored.is_floating_point:
        return stored
    return torch.float32 if any(m in name.split(".") for m in fp32_modules) else dtype


def keep_fp32_modules(module: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Cast, in place, floating parameters and buffers under any module named in `names` to fp32."""
    if not names:
        return
    for prefix, owner in module.named_modules():
        parts = prefix.split(".") if prefix else []
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(owner, kind)
            for name, tensor in tensors.items():
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float32:
                    continue
                if any(n in parts + [name] for n in names):
                    if kind == "_parameters":
                        tensor.data = tensor.data.float()
                    else:
                        tensors[name] = tensor.float()


def randomize_(module: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Draw every parameter of 2+ dimensions from N(0, std) in place, deterministically from `seed`."""
    by_device: dict[torch.device, torch.Generator] = {}
    for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if param.dim() < 2 or param.device.type == "meta":
            continue
        generator = by_device.get(param.device)
        if generator is None:
            generator = by_device[param.device] = torch.Generator(param.device).manual_seed(seed)
        with torch.no_grad():
            param.normal_(0.0, std, generator=generator)


def build_random(make: Callable[[], M], *, device: torch.device, dtype: torch.dtype, seed: int) -> M:
    """`make()` run on `device` in `dtype`, weights randomized, fp32 modules kept, in eval mode."""
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)  # constructor inits (biases, norms) become a function of the seed too
        module = make()
    randomize_(module, seed)
    keep_fp32_modules(module, fp32_module_names(module, dtype))
    module.eval().requires_grad_(False)
    return module


def size_on_meta(make: Callable[[], torch.nn.Module], dtype: torch.dtype) -> int:
    """Bytes `build_random(make, dtype=dtype)` will allocate, computed on the meta device (instant)."""
    with default_dtype(dtype), torch.device("meta"):
        module = make()
    keep_fp32_modules(module, fp32_module_names(module, dtype))
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
