"""cuDNN's FP8 flash attention (cudnn-frontend's `sdpa_fp8`) at Wan's self-attention shapes, against
cuDNN bf16 SDPA as torch runs it: rate and error. Issue 6 needs attention near the FP8 tensor-core
rate (kino's Triton kernel only matches bf16's ~570 TFLOP/s on an H100); this measures whether the
"fp8-cudnn" `attention_precision` gets there, and at what error.

How the FP8 inputs are made (all exact except the FP8 rounding itself):
- K smoothed: its mean over the tokens (per head and channel) is subtracted; that adds one constant
  per query row to the logits, which softmax ignores;
- V smoothed: its mean over the tokens is subtracted and added back to the output (P's rows sum to 1);
- Q, K, V scaled per tensor to e4m3's range (448 / amax), the scales kept on the device (cuDNN takes
  the descales as device tensors: no host sync); P stored as P * 448 in e4m3 (scale_s).
Inputs: random N(0, 1), and the same with 4 outlier channels per head x 8 (per-tensor scales are
what outliers hurt). Layout: Wan's (B, S, H, D) storage, seen as (B, H, S, D).

Needs `pip install nvidia-cudnn-frontend` (carry the wheel: `pip download --no-deps --python-version
3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 nvidia-cudnn-frontend`).
It runs kino's own code (`kino_engine.quant.cudnn_fp8`, the "fp8-cudnn" attention_precision): the
cuDNN graph alone, and the op as the model calls it (quantization included).
Run on a CUDA machine: PYTHONPATH=engine python scripts/experiments/cudnn_fp8_attention.py > out.json
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kino_engine.floor import median_seconds

SHAPES = {"14b-1280x720x81": (1, 40, 75600, 128), "1.3b-832x480x81-cfg2": (2, 12, 32760, 128)}


def timed_ms(fn) -> float:
    """Median ms of `fn` over 5 runs after 2 warm-up runs (CUDA events; kino's floor timer)."""
    return median_seconds(fn, repeats=5, warmup=2) * 1000.0


def bshd(b: int, h: int, s: int, d: int, generator: torch.Generator, outliers: bool) -> torch.Tensor:
    """(B, H, S, D) views of (B, S, H, D) bf16 storage, as Wan's attention processor hands them over."""
    x = torch.randn((b, s, h, d), generator=generator, device="cuda", dtype=torch.float32)
    if outliers:
        x[..., :4] *= 8.0
    return x.to(torch.bfloat16).transpose(1, 2)


def run_shape(name: str, shape: tuple[int, int, int, int], outliers: bool) -> dict:
    b, h, s, d = shape
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v = (bshd(b, h, s, d, generator, outliers) for _ in range(3))
    flops = 4 * b * h * s * s * d
    res: dict = {"shape": [b, h, s, d], "outliers": outliers}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref_ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        ref = F.scaled_dot_product_attention(q, k, v).float()
    res["bf16"] = {"ms": round(ref_ms, 2), "tflops": round(flops / ref_ms / 1e9, 1)}

    from kino_engine.quant.cudnn_fp8 import _graph_for, quantize_inputs, runs_on, sdpa_cudnn_fp8

    if not runs_on(q.device):
        res["error"] = "kino's cudnn_fp8 says cuDNN's FP8 attention cannot run here (it would emulate)"
        return res
    # K, V smoothed and Q, K, V scaled per tensor: eager here; in the model it is part of the opaque op.
    res["quantizeMs"] = round(timed_ms(lambda: quantize_inputs(q, k, v)), 2)
    x = quantize_inputs(q, k, v)
    for key, run in (
        ("cudnn-graph", lambda: _graph_for(x.q, q.dtype)(x, torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device="cuda"))),
        ("kino-op", lambda: sdpa_cudnn_fp8(q, k, v)),  # the attention_precision "fp8-cudnn" op, quantization included
    ):
        try:
            ms = timed_ms(run)
            got = sdpa_cudnn_fp8(q, k, v).float()
            err = float((got - ref).norm() / ref.norm())
            res[key] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1), "vsBf16": round(ref_ms / ms, 3), "relL2": err}
        except Exception as exc:  # report and go on: what this cuDNN supports is part of the answer
            res[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        print(name, key, res[key], file=sys.stderr, flush=True)
    del q, k, v, x, ref
    torch.cuda.empty_cache()
    return res


def main() -> None:
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnnTorch": torch.backends.cudnn.version()}
    try:
        import cudnn

        out["cudnnFrontend"] = getattr(cudnn, "__version__", "?")
        out["cudnnBackend"] = cudnn.backend_version()
    except Exception as exc:
        out["error"] = f"cudnn frontend unavailable: {exc}"
        print(json.dumps(out))
        return
    for name, shape in SHAPES.items():
        for outliers in (False, True):
            key = f"{name}{'-outliers' if outliers else ''}"
            try:
                out[key] = run_shape(name, shape, outliers)
            except Exception as exc:  # one shape's failure (memory, an API detail) does not lose the others
                out[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
                torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
