"""`QuantLinear`: an nn.Linear replacement that stores its weight in a low-bit format (see formats).

State: `qweight` (N out, K in) in the mode's dtype and `scale` (N,) float32 as persistent buffers,
`bias` (N,) as a parameter in the model's dtype (or None). State-dict keys are therefore
`<name>.qweight`, `<name>.scale`, `<name>.bias`.

Kernels, chosen from the device and the operands' dtypes, never from tensor values:

  fp8           CUDA sm89+ with bf16 activations and K, N multiples of 16: torch._scaled_mm with
                row-wise scales (scale_a (M, 1), scale_b (1, N), bf16 out, bias fused). Elsewhere an
                emulation of the same math: the same per-token FP8 activations, the FP8 values (exact
                in bf16 and fp32, and so are their products) multiplied by a matmul in the activation
                dtype (float32 accumulation), both scales applied in float32 after. So CPU tests check
                the real numerics; besides the summation order, bf16 activations add one rounding of
                the sum to bf16 before the scales (a 2**-9 relative step, far below FP8's 2**-4).
  fp8-weight    the weight dequantized (float32 product, one rounding) to the activation dtype, F.linear.
  int8          the same as fp8-weight with an int8 weight.
  int8-dynamic  torch._int_mm (exact int32 accumulation; CPU and CUDA) of per-token int8 activations and
                the int8 weight, scales applied in float32. CUDA's _int_mm wants M > 16 (smaller inputs
                are zero-padded: a shape decision, fixed per compiled graph) and K, N multiples of 8
                (other layers multiply in float64, which is exact too: every sum stays below 2**53).

Whether the device can run _scaled_mm is decided when the module is built or moved (`_apply`), and
kept as a plain bool, so forward has no Python branch on tensor values and no host sync. `.to(dtype)`
and friends never cast the quantized storage (nn.Module would otherwise turn an FP8 weight into bf16).

It knows nothing about which layers of a model should be quantized (see policy).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .formats import (
    FP8_DTYPE,
    WEIGHT_DTYPE,
    check_mode,
    dequantize_weight,
    quantize_rows_fp8,
    quantize_rows_int8,
    quantize_weight,
)

#: Activation dtypes the FP8 emulation multiplies in (FP8 and int8 values are exact in both); other
#: dtypes (float16, whose range a K-long sum of 448 x 448 products overflows) go through float32.
_EMULATION_DTYPES = (torch.bfloat16, torch.float32)
#: CUDA's _int_mm needs more than this many rows.
_INT_MM_MIN_ROWS = 16


@functools.lru_cache(maxsize=None)
def scaled_mm_supported(device: torch.device) -> bool:
    """Whether torch._scaled_mm's row-wise FP8 recipe runs on `device` (probed once per device).

    Needs CUDA compute capability 8.9 (Ada) or newer; some newer GPUs/cuBLAS versions refuse row-wise
    scales, so a tiny call decides rather than a capability table.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    a = torch.zeros(32, 32, dtype=FP8_DTYPE, device=device)
    try:
        torch._scaled_mm(
            a,
            a.t(),
            scale_a=torch.ones(32, 1, device=device),
            scale_b=torch.ones(1, 32, device=device),
            bias=torch.zeros(32, dtype=torch.bfloat16, device=device),
            out_dtype=torch.bfloat16,
        )
    except RuntimeError:
        return False
    return True


class QuantLinear(torch.nn.Module):
    """y = x W^T + b with W stored quantized; see the module docstring for the modes' math."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        """Empty storage (uninitialized; fill it from a checkpoint or use `from_linear`). `dtype` is the bias's."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.mode = check_mode(mode)
        self.register_buffer(
            "qweight", torch.empty(out_features, in_features, dtype=WEIGHT_DTYPE[mode], device=device)
        )
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.use_scaled_mm = False
        self._resolve_kernel()

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: torch.nn.Linear, mode: str) -> QuantLinear:
        """Quantize `linear`'s weight (on its device); the bias is kept as is (same dtype, shared storage)."""
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            mode,
            bias=linear.bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        qweight, scale = quantize_weight(weight, mode)
        module.qweight = qweight
        module.scale = scale
        if linear.bias is not None:
            module.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        module._resolve_kernel()
        return module

    def extra_repr(self) -> str:
        kernel = "scaled_mm" if self.use_scaled_mm else "torch"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}, kernel={kernel}"
        )

    def _resolve_kernel(self) -> None:
        device = self.qweight.device
        self.use_scaled_mm = (
            self.mode == "fp8"
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
            and scaled_mm_supported(device)
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # nn.Module.to(dtype)/.half()/.bfloat16() cast every floating tensor, and FP8 counts as one:
        # the quantized storage keeps its dtype (only its device follows), the bias follows the model.
        kept = {"qweight": self.qweight, "scale": self.scale}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        self._resolve_kernel()
        return self

    # ---- forward ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K), M = all leading dims
        if self.mode == "fp8":
            y = self._fp8(x2)
        elif self.mode == "int8-dynamic":
            y = self._int8_dynamic(x2)
        else:  # fp8-weight, int8: weight-only
            y = F.linear(x2, dequantize_weight(self.qweight, self.scale, x.dtype), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def _bias_is(self, dtype: torch.dtype) -> bool:
        return self.bias is None or self.bias.dtype == dtype

    def _epilogue(self, acc: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """acc (M, N) * x_scale (M, 1) * w_scale (1, N) + bias, in float32, rounded once to `dtype`."""
        y = acc.float() * x_scale * self.scale.unsqueeze(0)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_rows_fp8(x)  # (M, K) e4m3, (M, 1) float32
        if self.use_scaled_mm and x.dtype == torch.bfloat16 and self._bias_is(torch.bfloat16):
            return torch._scaled_mm(
                xq.contiguous(),
                self.qweight.t(),  # (K, N), column-major as _scaled_mm requires
                scale_a=x_scale,
                scale_b=self.scale.unsqueeze(0),  # (1, N)
                bias=self.bias,
                out_dtype=torch.bfloat16,
            )
        compute = x.dtype if x.dtype in _EMULATION_DTYPES else torch.float32
        acc = xq.to(compute) @ self.qweight.to(compute).t()  # (M, N): FP8 x FP8 products, exact in `compute`
        return self._epilogue(acc, x_scale, x.dtype)

    def _int8_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_rows_int8(x)  # (M, K) int8, (M, 1) float32
        if self.in_features % 8 or self.out_features % 8:
            acc = xq.double() @ self.qweight.double().t()  # (M, N), exact
        else:
            rows = xq.shape[0]
            if xq.is_cuda and rows <= _INT_MM_MIN_ROWS:
                xq = F.pad(xq, (0, 0, 0, _INT_MM_MIN_ROWS + 1 - rows))
            acc = torch._int_mm(xq, self.qweight.t())[:rows]  # (M, N) int32, exact
        return self._epilogue(acc, x_scale, x.dtype)
