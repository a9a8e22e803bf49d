"""A model's skeleton without its weights, filled tensor by tensor: the loaders' shared primitives.

`empty_model(config)` constructs the diffusers model class named by `config["_class_name"]` with every
*parameter* on the meta device (no memory, no init cost) and every *buffer* real on the CPU: buffers
the class computes at construction and never saves (Wan's rotary tables, `persistent=False`) are then
already right. This is accelerate's `init_empty_weights(include_buffers=False)` in plain torch.
`swap_in_quantized(model, {name: mode}, bias_dtype)` turns the named nn.Linear layers into empty
`QuantLinear`s of the given mode.

`assign(model, name, tensor)` puts one loaded tensor into place (`name` as in the state dict);
`finish(model, device)` checks nothing is left on meta, moves the constructed buffers to the device
and returns the model in eval mode without gradients.

It knows nothing about files or formats on disk.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import diffusers
import torch

from .apply import set_submodule
from .linear import QuantLinear


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this context every nn.Parameter a module registers is moved to the meta device."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def model_class(config: Mapping[str, Any]) -> type[torch.nn.Module]:
    """The diffusers model class a config.json names in `_class_name`."""
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"config _class_name {name!r} is not a diffusers model class")
    return cls


def empty_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """The model of `config` with its parameters on meta and its buffers built on the CPU."""
    with parameters_on_meta():
        return model_class(config).from_config(dict(config))  # type: ignore[attr-defined]


def swap_in_quantized(model: torch.nn.Module, quantized: Mapping[str, str], bias_dtype: torch.dtype) -> None:
    """Replace the nn.Linear layers named in `quantized` {name: mode} by empty meta `QuantLinear`s."""
    for name, mode in quantized.items():
        linear = model.get_submodule(name)
        if type(linear) is not torch.nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__} in {type(model).__name__}, not an nn.Linear")
        replacement = QuantLinear(
            linear.in_features, linear.out_features, mode, linear.bias is not None, device="meta", dtype=bias_dtype
        )
        set_submodule(model, name, replacement)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(module_name) if module_name else model), attr
    except AttributeError:
        raise KeyError(f"{name} is not a parameter or buffer of {type(model).__name__}") from None


def slot_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor currently in the parameter/buffer slot `name` (a meta tensor before loading)."""
    owner, attr = _owner(model, name)
    if attr in owner._parameters and owner._parameters[attr] is not None:
        return owner._parameters[attr]  # type: ignore[return-value]
    if attr in owner._buffers and owner._buffers[attr] is not None:
        return owner._buffers[attr]  # type: ignore[return-value]
    raise KeyError(f"{name} is not a parameter or buffer of {type(model).__name__}")


def assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in the slot `name`, as it is (no copy, no cast); its shape must match the slot's."""
    slot = slot_of(model, name)
    if tuple(slot.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: the model expects shape {tuple(slot.shape)}, the file has {tuple(tensor.shape)}")
    owner, attr = _owner(model, name)
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor
    if isinstance(owner, QuantLinear):
        owner._resolve_kernel()


def missing(model: torch.nn.Module) -> list[str]:
    """State names still on the meta device (never loaded)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in tensors if tensor.device.type == "meta"]


def finish(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Refuse a partly loaded model; move what was built on the CPU to `device`; eval, no grad."""
    absent = missing(model)
    if absent:
        raise ValueError(f"{len(absent)} tensor(s) were not in the checkpoint, e.g. {absent[:3]}")
    return model.to(device).eval().requires_grad_(False)
