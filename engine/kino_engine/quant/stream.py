"""`stream_quantize(src, mode, device)`: a bf16/fp32 diffusers transformer checkpoint loaded straight
into its quantized form, shard by shard and tensor by tensor, never whole in host memory.

The model is built as a skeleton (parameters on meta, see skeleton) with the policy's linears as
empty `QuantLinear`s. Each shard is opened with safetensors' `safe_open` (memory-mapped); each tensor
is read, moved to `device`, cast to the load dtype (as `from_pretrained(dtype=...)` would cast it;
modules the class keeps in float32 stay float32), quantized there if it is the weight of a selected
linear, and put in place; the source tensor is dropped before the next one is read. Peak host memory
is therefore about what stays resident (the quantized model when `device` is the CPU, almost nothing
when it is a GPU) + the open shard's touched pages + one tensor and its temporaries.

The result equals `from_pretrained(dtype)` followed by `quantize_module(model, mode, policy)` bit for
bit (the same cast, then the same quantizer; the tests hold it to that).

Failures: the folder's layout and every shard's header are checked first (EngineFailure
BAD_CHECKPOINT, via checkpoint's validation); a tensor the model does not have, a shape that differs,
or a tensor the checkpoint lacks is BAD_CHECKPOINT too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open

from ..checkpoint import WeightedComponent, _weighted
from ..protocol import EngineFailure
from ..random_weights import fp32_module_names, load_dtype
from ..runtime.memory import module_bytes
from .apply import QuantReport, count_linears
from .formats import check_mode, quantize_weight
from .policy import QuantPolicy, policy_for
from .skeleton import assign, empty_model, finish, model_class, slot_of, swap_in_quantized

TRANSFORMER = "transformer"
WEIGHTS_STEM = "diffusion_pytorch_model"

#: (bytes read so far, total bytes of the source weights)
OnProgress = Callable[[int, int], None]


def transformer_folder(path: str) -> str:
    """The transformer folder for a pipeline root (has model_index.json) or a transformer folder itself."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return os.path.join(path, TRANSFORMER)
    return path


def inspect_transformer(path: str) -> WeightedComponent:
    """The validated transformer component (config + safetensors files, headers checked) at `path`."""
    folder = transformer_folder(path)
    parent, name = os.path.split(folder)
    # checkpoint._weighted validates one diffusers component folder (config.json, single-file or
    # sharded safetensors, every header); it raises EngineFailure(BAD_CHECKPOINT) naming the file.
    return _weighted(parent, name, WEIGHTS_STEM)


def bad_checkpoint(message: str) -> EngineFailure:
    return EngineFailure("BAD_CHECKPOINT", message, phase="load", field="model.source.path")


class Progress:
    """Reports bytes read: per tensor while a file is read, the file's full size once it is done."""

    def __init__(self, total: int, callback: OnProgress | None):
        self.total, self.callback = total, callback
        self.files_done = self.in_file = 0

    def tensor(self, tensor: torch.Tensor) -> None:
        self.in_file += tensor.numel() * tensor.element_size()
        self._report(self.files_done + self.in_file)

    def file(self, path: str) -> None:
        self.files_done += os.path.getsize(path)
        self.in_file = 0
        self._report(self.files_done)

    def _report(self, done: int) -> None:
        if self.callback is not None:
            self.callback(min(done, self.total), self.total)


class Streamed(NamedTuple):
    model: torch.nn.Module
    report: QuantReport


@dataclass(frozen=True)
class _LoadPlan:
    """Per source tensor name: what happens to it."""

    #: "<linear>.weight" -> "<linear>" for the linears to quantize.
    quantized_weights: dict[str, str]
    #: Module names the class keeps in float32 when loaded in the load dtype.
    fp32_modules: tuple[str, ...]
    dtype: torch.dtype

    def target_dtype(self, name: str, source: torch.dtype) -> torch.dtype:
        return load_dtype(name, source, self.dtype, self.fp32_modules)


def unquantized_bytes(model: torch.nn.Module, plan: _LoadPlan) -> int:
    """Bytes the (still unquantized) skeleton would take loaded in the plan's dtypes."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.numel() * plan.target_dtype(name, t.dtype).itemsize for name, t in tensors)


@torch.no_grad()
def stream_quantize(
    src: str,
    mode: str,
    device: torch.device | str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    policy: QuantPolicy | None = None,
    on_progress: OnProgress | None = None,
) -> Streamed:
    """Load the transformer at `src` (pipeline root or transformer folder) quantized to `mode` on `device`.

    Kept tensors are cast to `dtype` (float32 where the class keeps modules in float32); the policy
    defaults to the registered one for the config's model class. Returns (model, report); the
    report's bytes_before is what the model would take unquantized in `dtype`.
    """
    check_mode(mode)
    device = torch.device(device)
    component = inspect_transformer(src)
    config = dict(component.config)
    try:
        cls = model_class(config)
    except ValueError as exc:
        raise bad_checkpoint(f"{component.folder}/config.json: {exc}") from None
    policy = policy or policy_for(cls)
    model = empty_model(config)
    selected = [name for name, _ in policy.linears(model)]
    plan = _LoadPlan({f"{name}.weight": name for name in selected}, fp32_module_names(model, dtype), dtype)
    bytes_before = unquantized_bytes(model, plan)
    swap_in_quantized(model, {name: mode for name in selected}, dtype)
    progress = Progress(component.weight_bytes, on_progress)
    for path in component.weight_files:
        with safe_open(path, framework="pt", device="cpu") as shard:
            for name in shard.keys():
                source = shard.get_tensor(name)
                _place(model, name, source, plan, mode, device, path)
                progress.tensor(source)
                del source  # the only reference: freed before the next tensor is read
        progress.file(path)
    try:
        model = finish(model, device)
    except ValueError as exc:
        raise bad_checkpoint(f"{component.folder}: {exc}") from None
    report = QuantReport(mode, bytes_before, module_bytes(model), count_linears(model), tuple(selected))
    return Streamed(model, report)


def _place(
    model: torch.nn.Module, name: str, source: torch.Tensor, plan: _LoadPlan, mode: str, device: torch.device, path: str
) -> None:
    """Cast (and quantize, for a selected linear's weight) one source tensor and put it in place."""
    linear = plan.quantized_weights.get(name)
    try:
        if linear is not None:
            expected = (slot_of(model, f"{linear}.qweight")).shape
            if tuple(source.shape) != tuple(expected):
                raise ValueError(f"the model expects shape {tuple(expected)}, the file has {tuple(source.shape)}")
            weight = source.to(device=device, dtype=plan.target_dtype(name, source.dtype))
            qweight, scale = quantize_weight(weight, mode)
            assign(model, f"{linear}.qweight", qweight)
            assign(model, f"{linear}.scale", scale)
        else:
            # copy=True: safe_open's CPU tensors are views of the shard's memory map, and one kept
            # view would keep every page of the shard read so far resident after the shard closes.
            assign(model, name, source.to(device=device, dtype=plan.target_dtype(name, source.dtype), copy=True))
    except (KeyError, ValueError) as exc:
        raise bad_checkpoint(f"{path}: tensor {name!r}: {exc}") from None
