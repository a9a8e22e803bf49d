"""Which layers of a model may be stored in low bits: a policy per architecture, as data.

A `QuantPolicy` is two tuples of `fnmatch` patterns over qualified module names (as in
`model.named_modules()`): an nn.Linear is quantized when its name matches an `include` pattern and
no `exclude` pattern. Anything that is not an nn.Linear is never quantized (norms, convolutions,
embeddings, the modulation tables, which are bare parameters). `exclude` wins over `include`, so a
sensitive module stays in the model dtype even if a broad include pattern would catch it.

Wan 2.1 (diffusers' WanTransformer3DModel): only the per-block projections of self-attention
(attn1) and cross-attention (attn2) and the two FFN linears are quantized; they hold ~99% of the
weights and FLOPs. The patch embedding, the time/text condition embedders (including time_proj,
which makes every block's modulation), the norms, the rotary tables, the modulation tables
(scale_shift_table) and the output projection stay in bf16: they are small, and their errors are
not averaged away by a residual stream (a modulation error scales every token of a block alike).
Image (I2V) projections (attn2.add_k_proj/add_v_proj) are not listed, so they stay exact too.

This module knows nothing about formats or kernels.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch


@dataclass(frozen=True)
class QuantPolicy:
    """Which nn.Linear modules of one architecture are quantized."""

    #: The model class this policy was written for (checked by `policy_for`).
    architecture: str
    #: fnmatch patterns of qualified module names that may be quantized.
    include: tuple[str, ...]
    #: fnmatch patterns that are never quantized, whatever `include` says.
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.include:
            raise ValueError("QuantPolicy.include: empty, so the policy would quantize nothing")
        for field in ("include", "exclude"):
            patterns = getattr(self, field)
            if isinstance(patterns, str) or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"QuantPolicy.{field}: must be a tuple of non-empty patterns, got {patterns!r}")

    def selects(self, name: str) -> bool:
        """Whether a module called `name` is quantized (if it is an nn.Linear)."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def linears(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
        """(name, module) for each nn.Linear of `model` the policy quantizes, in module order."""
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and self.selects(name):
                yield name, module

    def to_json(self) -> dict[str, object]:
        return {"architecture": self.architecture, "include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> QuantPolicy:
        return cls(
            architecture=str(data["architecture"]),
            include=tuple(data["include"]),  # type: ignore[arg-type]
            exclude=tuple(data.get("exclude", ())),  # type: ignore[arg-type]
        )


_WAN_BLOCK_LINEARS = (
    "blocks.*.attn1.to_q",
    "blocks.*.attn1.to_k",
    "blocks.*.attn1.to_v",
    "blocks.*.attn1.to_out.0",
    "blocks.*.attn2.to_q",
    "blocks.*.attn2.to_k",
    "blocks.*.attn2.to_v",
    "blocks.*.attn2.to_out.0",
    "blocks.*.ffn.net.0.proj",
    "blocks.*.ffn.net.2",
)

#: Module names (patterns) that stay in the model dtype in every Wan transformer.
WAN_SENSITIVE = (
    "patch_embedding",
    "condition_embedder",
    "condition_embedder.*",  # time_embedder, time_proj, text_embedder, image_embedder
    "rope",
    "norm_out",
    "proj_out",
    "*norm*",  # blocks.*.norm1/2/3, attn*.norm_q/norm_k/norm_added_k
    "*.add_k_proj",
    "*.add_v_proj",
)

WAN_T2V_POLICY = QuantPolicy(
    architecture="WanTransformer3DModel", include=_WAN_BLOCK_LINEARS, exclude=WAN_SENSITIVE
)

#: Model class name -> its policy.
POLICIES: Mapping[str, QuantPolicy] = {WAN_T2V_POLICY.architecture: WAN_T2V_POLICY}


def policy_for(model_or_class: torch.nn.Module | type | str) -> QuantPolicy:
    """The registered policy for a model (instance, class or class name); ValueError if none."""
    if isinstance(model_or_class, str):
        name = model_or_class
    elif isinstance(model_or_class, type):
        name = model_or_class.__name__
    else:
        name = type(model_or_class).__name__
    if name not in POLICIES:
        raise ValueError(f"no quantization policy for {name}; known: {sorted(POLICIES)}")
    return POLICIES[name]
