"""Shared pieces of the quantization tests: a tiny Wan transformer whose attention heads are 64 wide
(so the low-bit attention applies), its inputs, a sharded checkpoint of it, and state comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import WanTransformer3DModel

from kino_engine.tiny import TINY_TRANSFORMER

#: kino's tiny Wan transformer with heads 64 wide (the low-bit attention's smallest head dim; rotary
#: split 24 + 20 + 20) and a wider FFN.
QUANT_TINY: Mapping[str, Any] = {**TINY_TRANSFORMER, "attention_head_dim": 64, "ffn_dim": 256, "freq_dim": 32, "rope_max_seq_len": 64}


def tiny_transformer(seed: int = 0, config: Mapping[str, Any] = QUANT_TINY) -> WanTransformer3DModel:
    """The tiny transformer in float32 with its constructor's (seeded) initialization, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel.from_config(dict(config)).eval().requires_grad_(False)


def tiny_inputs(seed: int = 1, frames: int = 3, size: int = 8) -> dict[str, torch.Tensor]:
    """Latents (1, 16, F, H, W), a timestep and 16 text tokens: F*(H/2)*(W/2) video tokens."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 16, frames, size, size, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=generator),
    }


@torch.no_grad()
def forward(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's output in float32 for `inputs` cast to the model's dtype."""
    dtype = model.dtype  # diffusers' ModelMixin: the dtype of the first parameter not kept in float32
    cast = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 1 else v for k, v in inputs.items()}
    return model(**cast, return_dict=False)[0].float()


@torch.no_grad()
def forward_without_blocks(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The output with every transformer block made an identity: what the quantized layers do not touch."""
    hooks = [block.register_forward_hook(lambda module, args, out: args[0]) for block in model.blocks]
    try:
        return forward(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()


def save_sharded(folder: Path, dtype: torch.dtype, shard: str, seed: int = 0, config: Mapping[str, Any] = QUANT_TINY) -> Path:
    """tiny_transformer(seed) saved by diffusers in `dtype`, as shards of at most `shard` (e.g. "300KB")."""
    tiny_transformer(seed, config).to(dtype).save_pretrained(str(folder), max_shard_size=shard, safe_serialization=True)
    assert len(list(folder.glob("*.safetensors"))) >= 2, "the fixture should have several shards"
    assert list(folder.glob("*.safetensors.index.json")), "a sharded checkpoint has an index"
    return folder


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes (so FP8/NaN/-0 compare exactly)."""
    return tensor.detach().cpu().contiguous().view(torch.uint8)


def assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module, what: str) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert a.keys() == e.keys(), f"{what}: state names differ: {sorted(set(a) ^ set(e))[:5]}"
    for name in a:
        assert a[name].dtype == e[name].dtype, f"{what}: {name} is {a[name].dtype}, expected {e[name].dtype}"
        assert torch.equal(bits(a[name]), bits(e[name])), f"{what}: {name} differs bit-wise"
