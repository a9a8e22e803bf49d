"""`python -m kino_engine.quant.forward_bench --config JSON --size WxH --frames N`: one transformer
forward per precision mode, on one random-weight model, in one process.

Modes (`--modes`, a comma list; default bf16,lowbit,fp8,fp8+lowbit), run in this order on the same
module objects so every mode sees the same weights — the bf16-linear ones first, since quantizing
the linears cannot be undone:
  bf16           exact (cuDNN attention): the reference, always run first
  lowbit         bf16 linears + kino's low-bit self-attention (INT8 QK, FP8 PV; Triton)
  cudnn          bf16 linears + FP8 self-attention through cuDNN ("fp8-cudnn"; needs nvidia-cudnn-frontend)
  fp8            FP8 linears
  fp8+lowbit     FP8 linears + low-bit self-attention
  fp8+cudnn      FP8 linears + FP8 self-attention through cuDNN (issue 6's target mode)
Each mode is compiled (regional, the blocks; `--no-compile` for eager) and timed with CUDA events
over `--repeats` forwards after `--warmup`; its output is compared with the bf16 output on the same
inputs (relative L2). Inputs: latents ~ N(0, 1) of the job's latent shape, text embeddings ~ N(0, 1)
(512 x text_dim), timestep 500. Prints one JSON line ({"ok": true, "result": ...}, tool_answer.py).
Measures on CUDA (FP8 tensor cores: sm89+); `--device cpu` runs the same code paths, for tests.
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


def _time(fn: Callable[[], torch.Tensor], warmup: int, repeats: int, cuda: bool) -> tuple[list[float], torch.Tensor]:
    """Seconds per call: CUDA events on a GPU, the wall clock on the CPU (tests run it there)."""
    out = fn()
    for _ in range(max(0, warmup - 1)):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if not cuda:
            started = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - started)
            continue
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

    device = torch.device(args.device)
    cuda = device.type == "cuda"
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
        backend = torch.nn.attention.SDPBackend.CUDNN_ATTENTION if cuda else torch.nn.attention.SDPBackend.MATH
        with torch.inference_mode(), torch.nn.attention.sdpa_kernel(backend):
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    results: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None

    def measure(mode: str) -> None:
        nonlocal reference
        if args.compile:
            torch._dynamo.reset()
            compile_blocks(model, True)
        started = time.perf_counter()
        times, out = _time(forward, args.warmup, args.repeats, cuda)
        out = out.float()
        entry: dict[str, Any] = {
            "mode": mode,
            "forwardS": statistics.median(times),
            "minS": min(times),
            "maxS": max(times),
            "wallS": time.perf_counter() - started,
            "peakVramBytes": int(torch.cuda.max_memory_allocated(device)) if cuda else None,
        }
        if reference is None:
            reference = out
        else:
            entry["relL2VsBf16"] = float((out - reference).norm() / reference.norm())
            entry["speedupVsBf16"] = results[0]["forwardS"] / entry["forwardS"]
        results.append(entry)
        log(f"{mode}: {entry['forwardS']:.3f} s/forward {entry.get('relL2VsBf16', '')}")

    from .cudnn_fp8 import require_cudnn_fp8, sdpa_cudnn_fp8

    modes = parse_modes(args.modes)
    if any("cudnn" in m for m in modes):
        require_cudnn_fp8(device)

    def attention(kind: str) -> None:
        uninstall_lowbit_attention(model)
        if kind == "lowbit":
            install_lowbit_attention(model, "int8", "fp8")
        elif kind == "cudnn":
            install_lowbit_attention(model, attend=sdpa_cudnn_fp8)

    report = None
    for mode in modes:
        name, linears, kind = MODES[mode]
        if linears == "fp8" and report is None:
            uninstall_lowbit_attention(model)
            report = quantize_module(model, "fp8")
        attention(kind)
        measure(name)
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
        "latents": list(latent),
        "tokens": latent[2] * (latent[3] // 2) * (latent[4] // 2),
        "quantized": None if report is None else report.to_json(),
        "modes": results,
    }


#: key -> (name in the report, the linears, the self-attention); run in this order, every bf16-linear
#: mode before the linears are quantized.
MODES: dict[str, tuple[str, str, str]] = {
    "bf16": ("bf16", "bf16", "exact"),
    "lowbit": ("bf16 linears + low-bit attention (int8 QK, fp8 PV)", "bf16", "lowbit"),
    "cudnn": ("bf16 linears + fp8 attention (cuDNN)", "bf16", "cudnn"),
    "fp8": ("fp8 linears", "fp8", "exact"),
    "fp8+lowbit": ("fp8 linears + low-bit attention (int8 QK, fp8 PV)", "fp8", "lowbit"),
    "fp8+cudnn": ("fp8 linears + fp8 attention (cuDNN)", "fp8", "cudnn"),
}


def parse_modes(text: str) -> list[str]:
    """The asked modes in MODES' order, bf16 (the reference) first whether asked or not."""
    asked = {m.strip() for m in text.split(",") if m.strip()}
    unknown = asked - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; known: {', '.join(MODES)}")
    return [m for m in MODES if m == "bf16" or m in asked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.quant.forward_bench")
    parser.add_argument("--config", required=True, help="a diffusers WanTransformer3DModel config as JSON")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the same code paths slowly (tests)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks (tests)")
    parser.add_argument("--modes", default="bf16,lowbit,fp8,fp8+lowbit", help=f"comma list of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    return answer(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
