"""QuantLinear in each mode: its error against the float layer is bounded, its FP8/INT8 arithmetic is
exactly the math the GPU kernels do, and it stays quantized (and compilable) whatever is done to it."""

from __future__ import annotations

import pytest
import torch

from kino_engine.quant.formats import (
    FP8_DTYPE,
    MODES,
    WEIGHT_DTYPE,
    dequantize_weight,
    quantize_rows_fp8,
    quantize_rows_int8,
    quantize_weight,
    relative_l2,
)
from kino_engine.quant.linear import QuantLinear
from kino_engine.quant.selfcheck import LINEAR_BOUNDS

#: Relative L2 error of the layer's output against the float32 layer (shared with the GPU self-check).
#: FP8 e4m3 keeps 3 mantissa bits (~2.4% RMS per element); with both operands quantized the errors add
#: in quadrature (~3.7%). INT8 per-channel on Gaussian weights is ~0.8%.
BOUNDS = LINEAR_BOUNDS


def _layer(seed: int = 0, k: int = 256, n: int = 192) -> torch.nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(k, n)
    with torch.no_grad():
        # Output channels of different magnitudes: a per-tensor scale would fail these, per-channel must not.
        row_scale = torch.exp(torch.randn(n, 1, generator=generator))
        layer.weight.copy_(0.02 * torch.randn(n, k, generator=generator) * row_scale)
        layer.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return layer.requires_grad_(False)


def _activations(seed: int = 1, k: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Tokens of very different norms (per-token scales must follow them), 2 leading dims.
    return torch.randn(3, 41, k, generator=generator) * torch.exp(0.5 * torch.randn(3, 41, 1, generator=generator))


@pytest.mark.parametrize("mode", MODES)
def test_error_against_the_float_layer_is_bounded(mode: str) -> None:
    layer, x = _layer(), _activations()
    expected = layer(x)
    quantized = QuantLinear.from_linear(layer, mode)
    assert quantized.qweight.dtype == WEIGHT_DTYPE[mode] and quantized.scale.dtype == torch.float32
    error = relative_l2(quantized(x), expected)
    assert error < BOUNDS[mode], f"{mode}: relative L2 {error:.4f} >= {BOUNDS[mode]}"
    assert error > 1e-4, f"{mode}: error {error:.2e} is suspiciously small: is the weight really quantized?"


@pytest.mark.parametrize("mode", MODES)
def test_bf16_activations_stay_within_the_bound(mode: str) -> None:
    layer, x = _layer(), _activations()
    expected = layer(x)
    quantized = QuantLinear.from_linear(layer.to(torch.bfloat16), mode)
    out = quantized(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    error = relative_l2(out, expected)
    assert error < BOUNDS[mode] + 0.005, f"{mode} in bf16: relative L2 {error:.4f}"


def test_fp8_is_scaled_mm_math() -> None:
    """The CPU path of "fp8" must compute what torch._scaled_mm computes on the GPU: per-token e4m3
    activations times per-channel e4m3 weights, exact products, both scales applied in float32."""
    layer, x = _layer(), _activations().reshape(-1, 256)
    quantized = QuantLinear.from_linear(layer, "fp8")
    xq, x_scale = quantize_rows_fp8(x)
    assert xq.dtype == FP8_DTYPE and x_scale.shape == (x.shape[0], 1)
    expected = (xq.double() @ quantized.qweight.double().t()) * x_scale.double() * quantized.scale.double() + layer.bias.double()
    error = relative_l2(quantized(x), expected)
    assert error < 1e-6, f"the fp8 emulation is not the scaled-mm math (relative L2 {error:.2e}): activations quantized differently?"


def test_int8_dynamic_accumulates_exactly() -> None:
    layer, x = _layer(), _activations().reshape(-1, 256)
    quantized = QuantLinear.from_linear(layer, "int8-dynamic")
    xq, x_scale = quantize_rows_int8(x)
    exact = (xq.long() @ quantized.qweight.long().t()).double()  # integer products, no rounding at all
    expected = exact * x_scale.double() * quantized.scale.double() + layer.bias.double()
    assert relative_l2(quantized(x), expected) < 1e-6


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_weight_quantization_round_trip(mode: str) -> None:
    weight = _layer().weight
    qweight, scale = quantize_weight(weight, mode)
    assert qweight.shape == weight.shape and scale.shape == (weight.shape[0],)
    assert torch.all(scale > 0)
    limit = {"fp8": 0.03, "int8": 0.01}[mode]
    error = relative_l2(dequantize_weight(qweight, scale, torch.float32), weight)
    assert error < limit, f"{mode} weight round trip relative L2 {error:.4f}"
    # Every row uses its full range: the largest |q| of each row is the format's maximum.
    top = qweight.float().abs().amax(dim=1)
    assert torch.all(top == (448.0 if mode == "fp8" else 127.0)), "scales are not per-row amax / max"


@pytest.mark.parametrize("mode", MODES)
def test_zero_rows_and_tokens_stay_finite(mode: str) -> None:
    layer = _layer()
    with torch.no_grad():
        layer.weight[3].zero_()
    x = _activations()
    x[0, 5].zero_()
    out = QuantLinear.from_linear(layer, mode)(x)
    assert torch.isfinite(out).all(), f"{mode}: an all-zero row or token produced NaN/inf"
    assert torch.allclose(out[..., 3], layer.bias[3].expand_as(out[..., 3])), "a zero weight row must give its bias"


@pytest.mark.parametrize("mode", MODES)
def test_dtype_casts_keep_the_quantized_storage(mode: str) -> None:
    quantized = QuantLinear.from_linear(_layer(), mode)
    qweight, scale = quantized.qweight.clone(), quantized.scale.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(), lambda m: m.to("cpu")):
        cast(quantized)
        assert quantized.qweight.dtype == WEIGHT_DTYPE[mode], "nn.Module.to(dtype) must not cast the quantized weight"
        assert quantized.scale.dtype == torch.float32, "scales stay float32"
        assert torch.equal(quantized.qweight.view(torch.uint8), qweight.view(torch.uint8))
        assert torch.equal(quantized.scale, scale), "a cast must not round the scales"
    assert quantized.bias.dtype == torch.float32, "the bias follows the model's dtype (last cast: float)"
    assert not quantized.use_scaled_mm, "no _scaled_mm off CUDA"


@pytest.mark.parametrize("mode", ["fp8", "int8-dynamic", "int8"])
def test_traces_as_one_graph(mode: str) -> None:
    """No host syncs or value-dependent branches: dynamo captures the whole forward (fullgraph)."""
    quantized = QuantLinear.from_linear(_layer(), mode)
    x = _activations()
    torch._dynamo.reset()
    compiled = torch.compile(quantized, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), quantized(x))


def test_from_linear_keeps_the_bias_and_shapes() -> None:
    layer = _layer(k=64, n=32)
    quantized = QuantLinear.from_linear(layer, "fp8")
    assert (quantized.in_features, quantized.out_features) == (64, 32)
    assert torch.equal(quantized.bias, layer.bias)
    no_bias = torch.nn.Linear(64, 32, bias=False)
    assert QuantLinear.from_linear(no_bias, "int8").bias is None
    assert set(QuantLinear.from_linear(layer, "int8").state_dict()) == {"qweight", "scale", "bias"}
    with pytest.raises(ValueError, match="unknown quantization mode"):
        QuantLinear.from_linear(layer, "fp4")


def test_int8_dynamic_layers_off_the_int_mm_grid_are_exact_too() -> None:
    layer = _layer(k=60, n=36)  # not multiples of 8: _int_mm refuses these shapes on CUDA
    x = _activations(k=60).reshape(-1, 60)
    quantized = QuantLinear.from_linear(layer, "int8-dynamic")
    xq, x_scale = quantize_rows_int8(x)
    expected = (xq.long() @ quantized.qweight.long().t()).double() * x_scale.double() * quantized.scale.double()
    assert relative_l2(quantized(x), expected + layer.bias.double()) < 1e-6
