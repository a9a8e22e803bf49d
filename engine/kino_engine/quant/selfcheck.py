"""`python -m kino_engine.quant.selfcheck`: every low-bit kernel against exact bf16 on this GPU.

For Wan 2.1 14B's shapes (GEMM rows 75 600 = 1280x720x81 tokens; 5120 -> 5120 and 5120 -> 13 824;
self-attention 40 heads x 75 600 tokens x 128) it measures, per mode, the relative L2 error against
exact bf16 (cuBLAS F.linear, cuDNN SDPA) on random inputs and the time (CUDA events, median of
--repeats after warm-up; eager and torch.compile'd), and cross-checks the GPU kernels against the
torch emulations the CPU tests hold to their bounds (torch._scaled_mm vs the FP8 emulation, the
Triton attention vs `attention_emulated`) on smaller shapes. Prints one JSON object on stdout and
exits 1 when any error bound is broken (timings are reported, never judged: speed goals are checked
by benchmarks). Needs CUDA; bounds are the ones the CPU tests use (LINEAR_BOUNDS, ATTENTION_BOUNDS).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .attention import attention_emulated, attention_triton, kernel_supported, quantize_attention_inputs, sdpa_lowbit
from .formats import MODES
from .linear import QuantLinear

#: Relative L2 error of a quantized linear's output against the exact layer (randn activations,
#: N(0, 0.02) weights): FP8 e4m3 costs ~2.4% RMS per operand, INT8 per-channel ~0.8%.
LINEAR_BOUNDS = {"fp8": 0.045, "fp8-weight": 0.03, "int8": 0.01, "int8-dynamic": 0.015}
#: Relative L2 error of sdpa_lowbit against exact SDPA on `attention_inputs` (temperature 2).
ATTENTION_BOUNDS = {("int8", "fp8"): 0.025, ("int8", "bf16"): 0.012, ("fp8", "fp8"): 0.045, ("fp8", "bf16"): 0.04}
#: GPU kernels against their torch emulations (same math; summation order, exp2 and FP8 mma accumulator
#: precision differ): an indexing or scaling bug gives errors of order 1.
CROSS_CHECK_BOUND = 0.01

#: Wan 2.1 14B at 1280x720x81.
WAN14B_TOKENS, WAN14B_DIM, WAN14B_FFN, WAN14B_HEADS, WAN14B_HEAD_DIM = 75_600, 5120, 13_824, 40, 128


def attention_inputs(
    shape: tuple[int, int, int, int], seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (B, H, N, D) q, k, v shaped like a trained model's: unit-RMS channels (Wan RMS-normalizes
    q and k), scores of standard deviation `temperature` (peaked, not one-hot), a per-channel offset
    shared by all keys (what K smoothing removes) and a per-channel mean in V."""
    generator = torch.Generator(device).manual_seed(seed)
    b, h, _, d = shape

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=generator, device=device)

    q = temperature * randn(*shape)
    k = randn(*shape) + 2.0 * randn(b, h, 1, d)
    v = randn(*shape) + 0.5 * randn(b, h, 1, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def relative_l2_chunked(actual: torch.Tensor, expected: torch.Tensor, rows: int = 4096) -> float:
    """||actual - expected|| / ||expected|| accumulated in float64 over row chunks (no full-size copies)."""
    a, e = actual.reshape(-1, actual.shape[-1]), expected.reshape(-1, expected.shape[-1])
    diff = norm = 0.0
    for start in range(0, a.shape[0], rows):
        ea = e[start : start + rows].double()
        diff += float((a[start : start + rows].double() - ea).square().sum())
        norm += float(ea.square().sum())
    return math.sqrt(diff / max(norm, 1e-300))


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median/min/max milliseconds of `fn()` (CUDA events around each call, recorded back to back with
    no host sync between calls, read after one synchronize), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()  # measuring: one sync after all samples
    times = [start.elapsed_time(end) for start, end in events]
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _check(entry: dict[str, Any], error: float, bound: float) -> dict[str, Any]:
    entry.update({"relL2": error, "bound": bound, "ok": error <= bound})
    return entry


def _failed(entry: dict[str, Any], error: BaseException) -> dict[str, Any]:
    entry.update({"ok": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"})
    return entry


def _variants(fn: Callable[..., Any], compile_: bool) -> list[tuple[str, Callable[..., Any]]]:
    return [("eager", fn)] + ([("compiled", torch.compile(fn, fullgraph=True, dynamic=False))] if compile_ else [])


def check_gemms(
    device: torch.device, tokens: int, repeats: int, compile_: bool, dim: int = WAN14B_DIM, ffn: int = WAN14B_FFN
) -> list[dict[str, Any]]:
    """Each mode's QuantLinear against bf16 F.linear at (tokens, dim) -> dim and -> ffn."""
    out = []
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(tokens, dim, generator=generator, device=device, dtype=torch.bfloat16)
    for n in (dim, ffn):
        linear = torch.nn.Linear(dim, n, device=device, dtype=torch.bfloat16).requires_grad_(False)
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.02, generator=generator)
        flops = 2.0 * tokens * dim * n
        with torch.inference_mode():
            exact = linear(x)
            base = time_ms(lambda: linear(x), repeats)
            out.append({"gemm": [tokens, dim, n], "mode": "bf16", **base, "tflops": flops / base["ms"] / 1e9})
            for mode in MODES:
                entry: dict[str, Any] = {"gemm": [tokens, dim, n], "mode": mode}
                try:  # a self-check reports every failure rather than stopping at the first
                    layer = QuantLinear.from_linear(linear, mode)
                    entry["kernel"] = "scaled_mm" if layer.use_scaled_mm else "torch"
                    error = relative_l2_chunked(layer(x), exact)
                    for how, fn in _variants(layer, compile_):
                        timing = time_ms(lambda: fn(x), repeats)
                        timed = {**entry, "how": how, **timing, "tflops": flops / timing["ms"] / 1e9, "speedup": base["ms"] / timing["ms"]}
                        out.append(_check(timed, error, LINEAR_BOUNDS[mode] + 0.005))
                except Exception as failure:  # noqa: BLE001
                    out.append(_failed(entry, failure))
            del exact
    return out


def cross_check_scaled_mm(
    device: torch.device, rows: int = 8192, dim: int = WAN14B_DIM, ffn: int = WAN14B_FFN
) -> dict[str, Any]:
    """torch._scaled_mm's row-wise FP8 GEMM against the emulation of the same math (catches a scale
    applied to the wrong axis, which the error bound against bf16 alone might not)."""
    generator = torch.Generator(device).manual_seed(1)
    linear = torch.nn.Linear(dim, ffn, device=device, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=generator)
        linear.weight.mul_(torch.exp(torch.randn(ffn, 1, generator=generator, device=device)).bfloat16())
    x = torch.randn(rows, dim, generator=generator, device=device, dtype=torch.bfloat16)
    x = x * torch.exp(torch.randn(rows, 1, generator=generator, device=device)).bfloat16()
    entry: dict[str, Any] = {"check": "scaled_mm vs fp8 emulation"}
    try:
        layer = QuantLinear.from_linear(linear, "fp8")
        entry["kernel"] = "scaled_mm" if layer.use_scaled_mm else "torch"
        with torch.inference_mode():
            fast = layer(x)
            layer.use_scaled_mm = False
            emulated = layer(x)
        return _check(entry, relative_l2_chunked(fast, emulated), CROSS_CHECK_BOUND)
    except Exception as failure:  # noqa: BLE001
        return _failed(entry, failure)


def check_attention(
    device: torch.device, heads: int, tokens: int, repeats: int, compile_: bool, head_dim: int = WAN14B_HEAD_DIM
) -> list[dict[str, Any]]:
    """Each sdpa_lowbit variant against exact bf16 SDPA (torch's choice, and cuDNN) at (1, heads, tokens, head_dim)."""
    shape = (1, heads, tokens, head_dim)
    q, k, v = attention_inputs(shape, seed=2, device=device, dtype=torch.bfloat16)
    flops = 4.0 * heads * tokens * tokens * head_dim
    out = []
    with torch.inference_mode():
        exact_fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        exact = exact_fn()
        base = time_ms(exact_fn, repeats)
        out.append({"attention": list(shape), "variant": "exact bf16 (torch's choice)", **base, "tflops": flops / base["ms"] / 1e9})
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                cudnn = time_ms(exact_fn, repeats)
            out.append({"attention": list(shape), "variant": "exact bf16 cuDNN", **cudnn, "tflops": flops / cudnn["ms"] / 1e9})
            base = min(base, cudnn, key=lambda t: t["ms"])
        except RuntimeError as error:
            out.append({"attention": list(shape), "variant": "exact bf16 cuDNN", "error": str(error)[:200]})
        for (qk, pv), bound in ATTENTION_BOUNDS.items():
            entry: dict[str, Any] = {
                "attention": list(shape), "qk": qk, "pv": pv,
                "kernel": "triton" if kernel_supported(device) else "torch emulation",
            }
            try:
                lowbit = functools.partial(sdpa_lowbit, qk=qk, pv=pv)
                error = relative_l2_chunked(lowbit(q, k, v), exact)
                for how, fn in _variants(lowbit, compile_):
                    timing = time_ms(lambda: fn(q, k, v), repeats)
                    timed = {**entry, "how": how, **timing, "tflops": flops / timing["ms"] / 1e9, "speedup": base["ms"] / timing["ms"]}
                    out.append(_check(timed, error, bound))
            except Exception as failure:  # noqa: BLE001
                out.append(_failed(entry, failure))
    return out


def cross_check_attention(device: torch.device) -> list[dict[str, Any]]:
    """The Triton kernel against the torch emulation of the same algorithm, on shapes with a partial tile."""
    out = []
    for head_dim in (64, 128):
        q, k, v = attention_inputs((2, 3, 1000, head_dim), seed=3, device=device, dtype=torch.bfloat16)
        for qk, pv in ATTENTION_BOUNDS:
            entry: dict[str, Any] = {"check": "triton vs emulation", "d": head_dim, "qk": qk, "pv": pv}
            try:
                x = quantize_attention_inputs(q, k, v, qk, pv)  # type: ignore[arg-type]
                with torch.inference_mode():
                    kernel = attention_triton(x)
                    emulated = attention_emulated(x)
                out.append(_check(entry, relative_l2_chunked(kernel, emulated), CROSS_CHECK_BOUND))
            except Exception as failure:  # noqa: BLE001
                out.append(_failed(entry, failure))
    return out


def _environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.quant.selfcheck")
    parser.add_argument("--tokens", type=int, default=WAN14B_TOKENS, help="GEMM rows and attention tokens")
    parser.add_argument("--heads", type=int, default=WAN14B_HEADS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="time eager only (no torch.compile)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "the self-check needs a CUDA device"}))
        return 1
    device = torch.device("cuda", torch.cuda.current_device())
    compile_ = not args.no_compile
    report: dict[str, Any] = {"environment": _environment(device), "tokens": args.tokens, "heads": args.heads}
    report["gemm"] = check_gemms(device, args.tokens, args.repeats, compile_)
    report["crossChecks"] = [cross_check_scaled_mm(device)]
    torch.cuda.empty_cache()
    if kernel_supported(device):
        report["crossChecks"] += cross_check_attention(device)
        report["attention"] = check_attention(device, args.heads, args.tokens, args.repeats, compile_)
    else:  # the torch emulation at 75 600 tokens would take minutes per call: nothing worth timing
        report["attention"] = [{"skipped": "the Triton kernel needs compute capability 8.9+ and Triton"}]
    checked = [e for part in ("gemm", "crossChecks", "attention") for e in report[part] if "ok" in e]
    report["ok"] = all(e["ok"] for e in checked)
    report["failed"] = [e for e in checked if not e["ok"]]
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
