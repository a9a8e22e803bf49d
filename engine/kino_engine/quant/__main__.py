"""`python -m kino_engine.quant <command> ...`: the quantization tools.

  quantize SRC DST --mode MODE [--device cpu|cuda] [--dtype bfloat16] [--shard-gib 2] [--no-hash]
      Write kino's pre-quantized checkpoint of SRC (a diffusers pipeline folder, or its transformer
      folder) at DST (which must not exist), streaming the transformer through `device`.
  measure-load SRC --mode MODE [--device cpu|cuda]
      Load SRC the way the engine would (a kino-quantized folder: load_quantized_transformer; a
      bf16/fp32 one: stream_quantize to MODE) and report the peak host RSS during the load against
      the bound 1.2 x quantized bytes + largest shard; exits 1 when the bound is broken.

The last stdout line is one JSON object, {"ok": true, "result": ...} or {"ok": false, "error": ...}
(see tool_answer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import torch

from ..runtime.memory import module_bytes
from ..system import resolve_device, torch_dtype
from ..tool_answer import answer
from .formats import MODES
from .peak import measure_peak_rss
from .skeleton import empty_model
from .store import DEFAULT_SHARD_BYTES, is_quantized, load_quantized_transformer, quantize_checkpoint
from .stream import inspect_transformer, stream_quantize

#: The memory claim the streaming loaders are held to: peak host RSS growth during a load.
RAM_FACTOR = 1.2


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    manifest = quantize_checkpoint(
        args.src,
        args.dst,
        args.mode,
        resolve_device(args.device),
        dtype=torch_dtype(args.dtype),
        max_shard_bytes=int(args.shard_gib * 2**30),
        hash_source=not args.no_hash,
    )
    return {
        "path": os.path.abspath(args.dst),
        "mode": manifest.mode,
        "modules": len(manifest.modules),
        "bytes": sum(f.bytes for f in manifest.files),
        "files": [f.name for f in manifest.files],
        "seconds": round(time.perf_counter() - started, 3),
    }


def measure_load(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    component = inspect_transformer(args.src)
    largest_shard = max(os.path.getsize(p) for p in component.weight_files)
    # Warm-up outside the measurement: the first skeleton imports the model class's modules (tens of
    # MB of code and tables, paid once per process, not per load).
    empty_model(component.config)
    started = time.perf_counter()
    if is_quantized(args.src):
        model, peak = measure_peak_rss(lambda: load_quantized_transformer(args.src, device))
        how = "load_quantized_transformer"
    else:
        (model, _), peak = measure_peak_rss(lambda: stream_quantize(args.src, args.mode, device))
        how = f"stream_quantize({args.mode})"
    seconds = time.perf_counter() - started
    quantized = module_bytes(model)
    bound = RAM_FACTOR * quantized + largest_shard
    result = {
        "how": how,
        "device": str(device),
        "seconds": round(seconds, 3),
        "peakRssIncreaseBytes": peak.increase_bytes,
        "baselineRssBytes": peak.baseline_bytes,
        "quantizedBytes": quantized,
        "largestShardBytes": largest_shard,
        "checkpointBytes": component.weight_bytes,
        "boundBytes": int(bound),
        "withinBound": peak.increase_bytes <= bound,
    }
    if device.type == "cuda":
        result["vramPeakBytes"] = int(torch.cuda.max_memory_allocated(device))
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.quant")
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quantize", help="write a pre-quantized checkpoint")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--mode", choices=MODES, required=True)
    q.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    q.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    q.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    q.add_argument("--no-hash", action="store_true", help="do not hash the source files into the manifest")
    m = commands.add_parser("measure-load", help="peak host RAM of a streamed or pre-quantized load")
    m.add_argument("src")
    m.add_argument("--mode", choices=MODES, default="fp8")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "quantize":
        return answer(lambda: quantize(args))
    outcome: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        outcome.update(measure_load(args))
        return outcome

    status = answer(work)
    return status if status or outcome.get("withinBound") else 1


if __name__ == "__main__":
    sys.exit(main())
