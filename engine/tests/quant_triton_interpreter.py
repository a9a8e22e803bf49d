"""Runs the low-bit attention Triton kernel on the CPU under Triton's interpreter, for the tests.

Usage (a subprocess: TRITON_INTERPRET must be set before triton is imported):
  TRITON_INTERPRET=1 python quant_triton_interpreter.py QK,PV,N,D ...
prints one JSON list: per case, the kernel's relative L2 error against the torch emulation and exact SDPA.

Triton 3.6's interpreter has three bugs this run works around, none of which touches the GPU path:
its scalar `__index__` fails under NumPy >= 2.3 (int() of a 1-element 1-d array), its float -> fp8
rounding does not carry into the exponent (124 rounds to 64 in e4m3), and its tl.dot reads bf16
operands as their uint16 bit patterns. The shims below convert and multiply through torch instead,
so the kernel's own indexing, masking and softmax recurrence are what the test checks.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

_TORCH = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8e4nv": torch.float8_e4m3fn,
    "fp8e5": torch.float8_e5m2, "fp64": torch.float64,
}
_INT = {8: (np.int8, torch.int8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32), 64: (np.int64, torch.int64)}


def _as_torch(data: np.ndarray, dtype: tl.dtype) -> torch.Tensor:
    """The interpreter's array (fp8 and bf16 held as raw bits) as a torch tensor of the real dtype."""
    np_int, _ = _INT[dtype.primitive_bitwidth]
    return torch.from_numpy(np.ascontiguousarray(data).view(np_int)).view(_TORCH[dtype.name])


def _convert_float(data, input_dtype, output_dtype, rounding_mode):  # noqa: ANN001, ANN202, ARG001
    np_int, torch_int = _INT[output_dtype.primitive_bitwidth]
    out = _as_torch(data, input_dtype).to(_TORCH[output_dtype.name])  # round to nearest even, carried
    return out.view(torch_int).numpy().view(np_int).view(f"uint{output_dtype.primitive_bitwidth}")


_original_dot = interpreter.InterpreterBuilder.create_dot


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001, ANN202
    if a.dtype.is_floating() and a.dtype.primitive_bitwidth <= 16:
        a_data = _as_torch(a.data, a.dtype).float().numpy()
        b_data = _as_torch(b.data, b.dtype).float().numpy()
        return interpreter.TensorHandle(np.matmul(a_data, b_data).astype(d.data.dtype) + d.data, d.dtype.scalar)
    return _original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


_original_patch = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):  # noqa: ANN001, ANN202
    _original_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._convert_float = _convert_float
interpreter.InterpreterBuilder.create_dot = _create_dot
interpreter._patch_lang_tensor = _patch_lang_tensor


def run(qk: str, pv: str, n: int, head_dim: int) -> dict[str, object]:
    from kino_engine.quant.attention import attention_emulated, attention_triton, quantize_attention_inputs
    from kino_engine.quant.formats import relative_l2
    from kino_engine.quant.selfcheck import attention_inputs

    q, k, v = attention_inputs((1, 2, n, head_dim), seed=n)
    x = quantize_attention_inputs(q, k, v, qk, pv)  # type: ignore[arg-type]
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    emulated = attention_emulated(x, block_n=64)
    kernel = attention_triton(x, (64, 64, 4, 1))
    return {
        "qk": qk, "pv": pv, "n": n, "d": head_dim,
        "kernel_vs_emulation": relative_l2(kernel, emulated),
        "kernel_vs_exact": relative_l2(kernel, exact),
        "finite": bool(torch.isfinite(kernel).all()),
        "shape": list(kernel.shape),
    }


def main(cases: list[str]) -> None:
    """Each case is QK,PV,N,D (e.g. int8,fp8,200,64); prints one JSON list."""
    results = []
    for case in cases:
        qk, pv, n, d = case.split(",")
        results.append(run(qk, pv, int(n), int(d)))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
