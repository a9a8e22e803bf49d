"""`python -m kino_engine.quant <command> ...`: the quantization tools.

  quantize SRC DST --mode MODE [--device cpu|cuda] [--dtype bfloat16] [--shard-gib 2] [--no-hash]
      Write kino's pre-quantized checkpoint of SRC (a diffusers pipeline folder, or its transformer
      folder) at DST (which must not exist), streaming the transformer through `device`.
  write-random DST --config JSON|FILE [--device cpu|cuda] [--dtype bfloat16] [--shard-gib 5] [--seed 0]
      Write a transformer folder with random weights ~ N(0, 0.02) for a diffusers transformer config
      (e.g. Wan 2.1 14B's, as src/catalog/wan21.ts defines it), sharded as diffusers shards: a source
      for measure-load where no real checkpoint is at hand (timings and memory do not depend on values).
  measure-load SRC --mode MODE|bf16 [--device cpu|cuda]
      Load SRC the way the engine would (a kino-quantized folder: load_quantized_transformer; a
      bf16/fp32 one: stream_quantize to MODE; --mode bf16: kino's plain loader) and report the peak
      host RSS during the load against the bound (1.2 x quantized bytes + largest shard; bf16 onto a
      GPU: 1.2 x the largest shard); exits 1 when the bound is broken.

The last stdout line is one JSON object, {"ok": true, "result": ...} or {"ok": false, "error": ...}
(see tool_answer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import torch

from ..pipelines.wan_components import pretrained
from ..protocol import EngineFailure
from ..random_weights import build_random
from ..runtime.memory import module_bytes
from ..system import resolve_device, torch_dtype
from ..tool_answer import answer
from .formats import MODES
from .peak import measure_peak_rss
from .skeleton import empty_model, model_class
from .store import DEFAULT_SHARD_BYTES, is_quantized, load_quantized_transformer, quantize_checkpoint, staged_folder
from .stream import inspect_transformer, stream_quantize

#: The memory claim the streaming loaders are held to: peak host RSS growth during a load.
RAM_FACTOR = 1.2


def _unwritable(error: OSError) -> EngineFailure:
    return EngineFailure("OUTPUT_UNWRITABLE", str(error))


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        manifest = quantize_checkpoint(
            args.src,
            args.dst,
            args.mode,
            resolve_device(args.device),
            dtype=torch_dtype(args.dtype),
            max_shard_bytes=int(args.shard_gib * 2**30),
            hash_source=not args.no_hash,
        )
    except (FileExistsError, PermissionError) as error:
        raise _unwritable(error) from None
    return {
        "path": os.path.abspath(args.dst),
        "mode": manifest.mode,
        "modules": len(manifest.modules),
        "bytes": sum(f.bytes for f in manifest.files),
        "files": [f.name for f in manifest.files],
        "seconds": round(time.perf_counter() - started, 3),
    }


def write_random(args: argparse.Namespace) -> dict[str, Any]:
    text = args.config if args.config.lstrip().startswith("{") else open(args.config, encoding="utf-8").read()
    config = json.loads(text)
    cls = model_class(config)
    model = build_random(
        lambda: cls.from_config(config), device=resolve_device(args.device), dtype=torch_dtype(args.dtype), seed=args.seed
    )
    model = model.to("cpu")  # diffusers writes shard by shard from host tensors
    try:
        with staged_folder(args.dst) as staging:
            model.save_pretrained(staging, max_shard_size=f"{int(args.shard_gib * 1024)}MB", safe_serialization=True)
    except (FileExistsError, PermissionError) as error:
        raise _unwritable(error) from None
    files = sorted(f for f in os.listdir(args.dst) if f.endswith(".safetensors"))
    return {
        "path": os.path.abspath(args.dst),
        "files": files,
        "bytes": sum(os.path.getsize(os.path.join(args.dst, f)) for f in files),
    }


def measure_load(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    component = inspect_transformer(args.src)
    largest_shard = max(os.path.getsize(p) for p in component.weight_files)
    # Warm-up outside the measurement: the first skeleton imports the model class's modules (tens of
    # MB of code and tables), and the first CUDA call creates the context (hundreds of MB of host
    # memory): both are paid once per process, not per load.
    empty_model(component.config)
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    if args.mode == "bf16":
        # kino's plain loader (pipelines/wan_components.pretrained): no quantization; onto a GPU the
        # shards go straight to the device, so the bound is the largest shard (nothing stays on the host).
        model, peak = measure_peak_rss(
            lambda: pretrained(model_class(component.config), component.folder, torch.bfloat16, device)
        )
        how = "pretrained(bf16)"
    elif is_quantized(args.src):
        model, peak = measure_peak_rss(lambda: load_quantized_transformer(args.src, device))
        how = "load_quantized_transformer"
    else:
        (model, _), peak = measure_peak_rss(lambda: stream_quantize(args.src, args.mode, device))
        how = f"stream_quantize({args.mode})"
    seconds = time.perf_counter() - started
    quantized = module_bytes(model)
    if args.mode == "bf16":
        # What stays on the host: nothing on a GPU, the whole model on the CPU.
        bound = (quantized if device.type == "cpu" else 0) + RAM_FACTOR * largest_shard
    else:
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
    r = commands.add_parser("write-random", help="a random-weight transformer checkpoint for a config")
    r.add_argument("dst")
    r.add_argument("--config", required=True, help="a diffusers transformer config: inline JSON or a file")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    r.add_argument("--shard-gib", type=float, default=5.0)
    r.add_argument("--seed", type=int, default=0)
    m = commands.add_parser("measure-load", help="peak host RAM of a streamed or pre-quantized load")
    m.add_argument("src")
    m.add_argument("--mode", choices=(*MODES, "bf16"), default="fp8", help="bf16: kino's plain loader, no quantization")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "quantize":
        return answer(lambda: quantize(args))
    if args.command == "write-random":
        return answer(lambda: write_random(args))
    outcome: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        outcome.update(measure_load(args))
        return outcome

    status = answer(work)
    return status if status or outcome.get("withinBound") else 1


if __name__ == "__main__":
    sys.exit(main())
