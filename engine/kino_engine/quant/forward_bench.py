"""`python -m kino_engine.quant.forward_bench --config JSON --size WxH --frames N`: one transformer
forward per precision mode, on one random-weight model, in one process.

Modes, applied in this order to the same module objects (so every mode sees the same weights):
  bf16 (exact, cuDNN attention) -> fp8 linears -> fp8 linears + low-bit self-attention (INT8 QK, FP8 PV)
  and, separately measured on the exact linears, low-bit attention alone (installed, then removed).
Each mode is compiled (regional, the blocks) and timed with CUDA events over `--repeats` forwards after
`--warmup`; its output is compared with the bf16 output on the same inputs (relative L2). Inputs:
latents ~ N(0, 1) of the job's latent shape, text embeddings ~ N(0, 1) (512 x text_dim), timestep 500.
Prints one JSON line ({"ok": true, "result": ...}, tool_answer.py). Needs CUDA (FP8 tensor cores: sm89+).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable

import torch

from ..random_weights import build_random
from ..runtime.compile import compile_blocks
from ..tool_answer import answer


def log(message: str) -> None:
    print(f"[forward-bench] {message}", file=sys.stderr, flush=True)


def _time(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> tuple[list[float], torch.Tensor]:
    out = fn()
    for _ in range(max(0, warmup - 1)):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel

    from . import install_lowbit_attention, quantize_module, uninstall_lowbit_attention

    device = torch.device("cuda")
    config = json.loads(args.config)
    width, height = (int(v) for v in args.size.split("x"))
    latent = (1, int(config["in_channels"]), (args.frames - 1) // 4 + 1, height // 8, width // 8)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(latent, generator=gen, device=device).to(torch.bfloat16)
    text = torch.randn((1, 512, int(config["text_dim"])), generator=gen, device=device).to(torch.bfloat16)
    t = torch.full((1,), 500.0, device=device)
    log(f"building {config.get('num_layers')} layers, latents {latent}")
    model = build_random(lambda: WanTransformer3DModel.from_config(config), device=device, dtype=torch.bfloat16, seed=0)

    def forward() -> torch.Tensor:
        with torch.inference_mode(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    results: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None

    def measure(mode: str) -> None:
        nonlocal reference
        torch._dynamo.reset()
        compile_blocks(model, True)
        started = time.perf_counter()
        times, out = _time(forward, args.warmup, args.repeats)
        out = out.float()
        entry: dict[str, Any] = {
            "mode": mode,
            "forwardS": statistics.median(times),
            "minS": min(times),
            "maxS": max(times),
            "wallS": time.perf_counter() - started,
            "peakVramBytes": int(torch.cuda.max_memory_allocated(device)),
        }
        if reference is None:
            reference = out
        else:
            entry["relL2VsBf16"] = float((out - reference).norm() / reference.norm())
            entry["speedupVsBf16"] = results[0]["forwardS"] / entry["forwardS"]
        results.append(entry)
        log(f"{mode}: {entry['forwardS']:.3f} s/forward {entry.get('relL2VsBf16', '')}")

    measure("bf16")
    install_lowbit_attention(model, "int8", "fp8")
    measure("bf16 linears + low-bit attention (int8 QK, fp8 PV)")
    uninstall_lowbit_attention(model)
    report = quantize_module(model, "fp8")
    measure("fp8 linears")
    install_lowbit_attention(model, "int8", "fp8")
    measure("fp8 linears + low-bit attention (int8 QK, fp8 PV)")
    return {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "latents": list(latent),
        "tokens": latent[2] * (latent[3] // 2) * (latent[4] // 2),
        "quantized": report.to_json(),
        "modes": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.quant.forward_bench")
    parser.add_argument("--config", required=True, help="a diffusers WanTransformer3DModel config as JSON")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    return answer(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
