"""The per-architecture policy (which layers are quantized) and `quantize_module` on diffusers' real
Wan transformer: the sensitive modules stay exact, and the quantized model's output stays close."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from diffusers import WanTransformer3DModel

from kino_engine.quant import MODES, QuantLinear, QuantPolicy, WAN_T2V_POLICY, policy_for, quantize_module
from kino_engine.quant.formats import relative_l2
from kino_engine.quant.policy import WAN_SENSITIVE
from quant_helpers import QUANT_TINY, forward, forward_without_blocks, tiny_inputs, tiny_transformer

#: Per mode, bounds on the quantized tiny transformer's error against the float32 one:
#:  - `output`: relative L2 of the whole output;
#:  - `blocks`: the error relative to what the transformer blocks add to the output (output minus the
#:    output with every block an identity), which is the part quantization touches and the honest
#:    yardstick (on this toy the blocks move the output by ~17%, so `output` alone would hide a lot).
#: Measured on this toy (torch 2.11, CPU): fp8 0.59% / 3.3%, fp8-weight 0.46% / 2.6%, int8 0.07% / 0.38%,
#: int8-dynamic 0.13% / 0.72%; the bounds leave ~1.6x room.
OUTPUT_BOUNDS = {
    "fp8": {"output": 0.01, "blocks": 0.05},
    "fp8-weight": {"output": 0.008, "blocks": 0.04},
    "int8": {"output": 0.002, "blocks": 0.01},
    "int8-dynamic": {"output": 0.003, "blocks": 0.015},
}
BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def test_wan_policy_names_exactly_the_block_linears() -> None:
    for block in (0, 17, 39):
        for linear in BLOCK_LINEARS:
            assert WAN_T2V_POLICY.selects(f"blocks.{block}.{linear}"), f"blocks.{block}.{linear} should be quantized"
    for sensitive in (
        "patch_embedding", "proj_out", "norm_out", "rope",
        "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
        "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
        "condition_embedder.text_embedder.linear_2", "condition_embedder.image_embedder.ff.net.0.proj",
        "blocks.0.norm2", "blocks.3.attn1.norm_q", "blocks.3.attn2.norm_k",
        "blocks.3.attn2.add_k_proj", "blocks.3.attn2.add_v_proj",
    ):
        assert not WAN_T2V_POLICY.selects(sensitive), f"{sensitive} must stay in the model dtype"


def test_exclude_wins_over_include_and_bad_policies_are_refused() -> None:
    policy = QuantPolicy("M", include=("*",), exclude=("head", "*.norm"))
    assert policy.selects("blocks.0.fc") and not policy.selects("head") and not policy.selects("blocks.1.norm")
    with pytest.raises(ValueError, match="include: empty"):
        QuantPolicy("M", include=())
    with pytest.raises(ValueError, match="tuple of non-empty patterns"):
        QuantPolicy("M", include="blocks.*")  # type: ignore[arg-type]
    assert QuantPolicy.from_json(WAN_T2V_POLICY.to_json()) == WAN_T2V_POLICY


def test_policy_lookup_by_model_class() -> None:
    assert policy_for(WanTransformer3DModel) is WAN_T2V_POLICY
    assert policy_for("WanTransformer3DModel") is WAN_T2V_POLICY
    with pytest.raises(ValueError, match="no quantization policy for Linear"):
        policy_for(torch.nn.Linear(2, 2))


def test_every_pattern_matches_the_diffusers_model() -> None:
    """Catches a diffusers rename: a pattern that matches nothing would silently leave layers in bf16."""
    model = tiny_transformer()
    linears = [name for name, module in model.named_modules() if type(module) is torch.nn.Linear]
    selected = [name for name, _ in WAN_T2V_POLICY.linears(model)]
    assert len(selected) == len(BLOCK_LINEARS) * QUANT_TINY["num_layers"]
    for pattern in WAN_T2V_POLICY.include:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in linears), f"include {pattern!r} matches no nn.Linear"
    kept = set(linears) - set(selected)
    assert kept == {
        "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
        "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
        "condition_embedder.text_embedder.linear_2", "proj_out",
    }
    assert all(any(fnmatch.fnmatchcase(n, p) for p in WAN_SENSITIVE) for n in kept)


@pytest.mark.parametrize("mode", MODES)
def test_quantize_module_keeps_the_sensitive_modules(mode: str) -> None:
    model = tiny_transformer().to(torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = quantize_module(model, mode)
    n = len(BLOCK_LINEARS) * QUANT_TINY["num_layers"]
    assert report.layers == {mode: n, "unquantized": 6}
    assert len(report.quantized) == n and report.bytes_after < report.bytes_before
    assert report.to_json()["layers"] == report.layers
    after = model.state_dict()
    for name in before:
        if name.startswith(("patch_embedding", "condition_embedder", "proj_out", "scale_shift_table")) or (
            ".norm" in name or name.endswith("scale_shift_table")
        ):
            assert torch.equal(after[name], before[name]) and after[name].dtype == before[name].dtype, f"{name} changed"
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, torch.nn.Linear)):
            assert isinstance(module, QuantLinear) == WAN_T2V_POLICY.selects(name), f"{name}: wrong storage"
    assert model.dtype == torch.bfloat16, "diffusers' model.dtype must still read the model dtype"
    assert isinstance(model.patch_embedding, torch.nn.Conv3d) and model.proj_out.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        quantize_module(model, mode)  # nothing left to quantize


@pytest.mark.parametrize("mode", MODES)
def test_quantized_tiny_wan_output_error_is_bounded(mode: str) -> None:
    model, inputs = tiny_transformer(), tiny_inputs()
    exact = forward(model, inputs)
    blocks_part = exact - forward_without_blocks(model, inputs)
    quantize_module(model, mode)
    out = forward(model, inputs)
    output_error = relative_l2(out, exact)
    blocks_error = float((out - exact).norm() / blocks_part.norm())
    bound = OUTPUT_BOUNDS[mode]
    assert output_error < bound["output"], f"{mode}: output relative L2 {output_error:.4f} >= {bound['output']}"
    assert blocks_error < bound["blocks"], f"{mode}: error / blocks' contribution {blocks_error:.4f} >= {bound['blocks']}"
    assert blocks_error > 1e-3, f"{mode}: no error at all: were the blocks quantized?"
