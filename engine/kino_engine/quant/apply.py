"""`quantize_module(model, mode, policy)`: swap a loaded model's eligible nn.Linear layers for
`QuantLinear`s in place, one layer at a time, and report what changed.

Each layer is quantized on the device its weight lives on; the original weight is released when its
module is replaced, so the extra memory at any moment is one layer's temporaries. The result is
exactly what `stream_quantize` and `load_quantized_transformer` build for the same weights.

This module knows nothing about files (see store, stream).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..runtime.memory import module_bytes
from .formats import check_mode
from .linear import QuantLinear
from .policy import QuantPolicy, policy_for

log = logging.getLogger("kino.quant")


@dataclass(frozen=True)
class QuantReport:
    """What quantization did to one model."""

    mode: str
    #: Bytes of the model's parameters and buffers before and after.
    bytes_before: int
    bytes_after: int
    #: Number of nn.Linear layers per storage: {mode: quantized, "unquantized": kept in the model dtype}.
    layers: dict[str, int] = field(default_factory=dict)
    #: Qualified names of the quantized layers, in module order.
    quantized: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "bytesBefore": self.bytes_before,
            "bytesAfter": self.bytes_after,
            "layers": dict(self.layers),
        }


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule called `name` (dotted) of `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_linears(model: torch.nn.Module) -> dict[str, int]:
    """{mode: QuantLinear count per mode, "unquantized": plain nn.Linear count}."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            counts[module.mode] = counts.get(module.mode, 0) + 1
        elif isinstance(module, torch.nn.Linear):
            counts["unquantized"] = counts.get("unquantized", 0) + 1
    return counts


@torch.no_grad()
def quantize_module(model: torch.nn.Module, mode: str, policy: QuantPolicy | None = None) -> QuantReport:
    """Quantize `model`'s linears selected by `policy` (default: the registered policy of its class)."""
    check_mode(mode)
    policy = policy or policy_for(model)
    before = module_bytes(model)
    names = [name for name, _ in policy.linears(model)]
    if not names:
        raise ValueError(f"policy {policy.architecture} selects no nn.Linear of this {type(model).__name__}")
    for name in names:
        set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), mode))
    report = QuantReport(mode, before, module_bytes(model), count_linears(model), tuple(names))
    log.info(
        "quant: %d linears -> %s, %.1f -> %.1f MiB (%s)",
        len(names), mode, before / 2**20, report.bytes_after / 2**20, report.layers,
    )
    return report
