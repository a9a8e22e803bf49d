"""The low-bit number formats and their quantizers: pure tensor math, no modules, no devices.

Modes (what a `QuantLinear` stores and computes):

  fp8           weights FP8 e4m3 with one float32 scale per output channel; activations quantized to
                e4m3 per token (row) on the fly, scale = amax(row) / 448; the GEMM multiplies the two
                FP8 operands and applies both scales in float32 (torch._scaled_mm's row-wise recipe).
  fp8-weight    weights as in fp8; activations stay in their dtype; the weight is dequantized on use.
  int8          weights INT8, symmetric, one float32 scale per output channel (amax / 127, round to
                nearest); dequantized on use. Weight-only on purpose: its math is the same on every
                device (the layer *is* the dequantized weight), where int8 activations would add an
                error of their own (see int8-dynamic).
  int8-dynamic  weights as in int8; activations quantized to int8 per token (amax / 127); the GEMM is
                an exact int32 accumulation (torch._int_mm) scaled in float32 afterwards.

Scales are *dequantization* factors: value ~= q * scale. Every quantizer here is elementwise plus
one reduction, with no data-dependent Python control flow (no `.item()`), so torch.compile fuses it.
An all-zero row gets a tiny positive scale (not 0), so it quantizes to zeros instead of NaNs.

This module knows nothing about nn.Module, checkpoints or kernels.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

QuantMode = Literal["fp8", "fp8-weight", "int8", "int8-dynamic"]
MODES: tuple[str, ...] = get_args(QuantMode)

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3fn value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
#: Symmetric int8 range: -127..127 (never -128, so negation is exact and the scale is symmetric).
INT8_MAX = 127.0
#: Smallest amax a scale is computed from: an all-zero row quantizes to zeros, never 0/0.
AMAX_FLOOR = 1e-12

#: The dtype each mode stores its weight in.
WEIGHT_DTYPE: dict[str, torch.dtype] = {
    "fp8": FP8_DTYPE,
    "fp8-weight": FP8_DTYPE,
    "int8": torch.int8,
    "int8-dynamic": torch.int8,
}


def check_mode(mode: str) -> str:
    """`mode` if it is a known QuantMode; ValueError naming the known ones otherwise."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    return mode


def _row_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row dequantization scale (..., 1) float32: amax over the last dim / qmax."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    return amax.clamp(min=AMAX_FLOOR) / qmax


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> (q (..., K) e4m3fn, scale (..., 1) float32), one scale per row (token or channel)."""
    scale = _row_scale(x, FP8_MAX)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) -> (q (..., K) int8 in [-127, 127], scale (..., 1) float32), round to nearest even."""
    scale = _row_scale(x, INT8_MAX)
    q = torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear weight (N out, K in) -> (qweight (N, K) in the mode's dtype, scale (N,) float32)."""
    quantize = quantize_rows_fp8 if WEIGHT_DTYPE[check_mode(mode)] == FP8_DTYPE else quantize_rows_int8
    q, scale = quantize(weight)
    return q, scale.squeeze(-1).contiguous()


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) quantized weight and (N,) scales -> the (N, K) weight in `dtype` (product in float32)."""
    return (qweight.float() * scale.unsqueeze(-1)).to(dtype)


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (a measurement, so a host read is fine here)."""
    expected64 = expected.detach().double()
    return float((actual.detach().double() - expected64).norm() / expected64.norm().clamp(min=1e-300))
