"""`python -m kino_engine.bench`: kino's Wan loop against diffusers' WanPipeline, same components, one run.

Reads a JSON spec from `--spec FILE` or stdin (what `kino bench` builds from the catalog):
  {"model": ModelSpec, "job": JobSpec without output, "warmupSteps": 2, "generations": 1,
   "references": ["diffusers", "diffusers-compiled"], "kinoRuntime": {cfg, attention, compile},
   "cacheDir": str | null, "provenance": {...}}
and prints one JSON line last on stdout: {"ok": true, "result": {...}} or {"ok": false, "error": {...}}.
Progress goes to stderr.

What is measured, identically for both systems (the same module objects, in one process):
- per forward: CUDA events recorded by hooks on the transformer around every forward call made
  during the timed generation (so each system is measured as its own loop calls the model);
- per step: the time between consecutive step ends (an event recorded at each step's end), the first
  step measured from the first forward's start;
- per generation: wall time of text encode + all steps + VAE decode + MP4 encode (the same PyAV
  encoder for both; diffusers returns float frames, converted to uint8 inside its timed region);
- peak VRAM: torch.cuda.max_memory_allocated over the timed generation (reserved reported too).
Each system first runs a short warm-up generation (`warmupSteps` steps) so one-time costs (cuBLAS and
cuDNN handles, kernel selection) stay out of the timed run. Weights are random (timings don't depend
on their values). This module decides nothing about where results are recorded: the control plane
adds the command, the commit and the file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .floor import measure_floor
from .pipelines.wan import WanT2V
from .protocol import JobSpec, parse_job_spec, parse_model_spec
from .runtime.memory import synchronize
from .runtime.optimize import optimize
from .runtime.options import RuntimeOptions
from .tool_answer import answer, read_spec
from .video import StreamingMp4Writer, encode_mp4


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    """GPU, driver and library versions: what a number needs to mean something."""
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "kinoEngine": __version__,
        "host": platform.node(),
        "cpuCount": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpuMemoryBytes"] = props.total_memory
        env["capability"] = f"{props.major}.{props.minor}"
        env["driver"] = _driver_version()
    return env


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - the driver version is informative, never required
        return None


class Clock:
    """Records timestamps on the device's stream (CUDA events) or the host clock (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1000.0
        return end - start


class LoopProbe:
    """Hooks on the transformer and a step-end callback: per-forward and per-step times of one run."""

    def __init__(self, transformer: torch.nn.Module, clock: Clock):
        self.clock = clock
        self.transformer = transformer
        self.forwards: list[tuple[Any, Any]] = []
        self.batches: list[int] = []
        self.step_ends: list[Any] = []
        self._open: Any = None
        self._handles: list[Any] = []

    def __enter__(self) -> LoopProbe:
        def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.batches.append(int(hidden.shape[0]) if hidden is not None else 1)
            self._open = self.clock.mark()

        def after(*_: Any) -> None:
            self.forwards.append((self._open, self.clock.mark()))

        self._handles = [
            self.transformer.register_forward_pre_hook(before, with_kwargs=True),
            self.transformer.register_forward_hook(after),
        ]
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def step_end(self) -> None:
        self.step_ends.append(self.clock.mark())

    def summary(self) -> dict[str, Any]:
        if self.clock.cuda:
            torch.cuda.synchronize()
        forward_s = [self.clock.seconds(a, b) for a, b in self.forwards]
        starts = [self.forwards[0][0], *self.step_ends[:-1]] if self.forwards else []
        step_s = [self.clock.seconds(a, b) for a, b in zip(starts, self.step_ends)]
        batch = statistics.mode(self.batches) if self.batches else 1
        return {
            "forward": _stats(forward_s),
            # A forward of batch 2 (CFG batched) does the work of two of batch 1.
            "forwardBatch": batch,
            "step": _stats(step_s),
            "denoiseS": sum(step_s),
        }


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "medianS": statistics.median(values),
        "minS": min(values),
        "maxS": max(values),
        "meanS": statistics.fmean(values),
    }


def _memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory_peak(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"peakVramBytes": None, "peakReservedBytes": None}
    return {
        "peakVramBytes": torch.cuda.max_memory_allocated(device),
        "peakReservedBytes": torch.cuda.max_memory_reserved(device),
    }


def run_kino(model: WanT2V, job: JobSpec, video_path: str) -> dict[str, Any]:
    """One kino generation (text encode, denoise, decode, MP4 encode), probed."""
    device = model.device
    clock = Clock(device)
    _memory_reset(device)
    with LoopProbe(model.transformer, clock) as probe:
        started = time.perf_counter()
        # The MP4 is encoded on a thread while the VAE decodes (as the engine does): phase "decode"
        # runs until the last chunk reached the encoder, "encode" is only what the encoder still
        # needed after that; wallS is what the overlap shortens.
        with StreamingMp4Writer(video_path, job.fps or model.fps) as writer:
            video = model.generate(job, on_step=lambda i, n, ms: probe.step_end(), on_frames=writer.write)
            encode_start = time.perf_counter()
            writer.finish()
        ended = time.perf_counter()
    return {
        "wallS": ended - started,
        "phasesS": {name: ms / 1000.0 for name, ms in video.phase_ms.items()} | {"encode": ended - encode_start},
        **probe.summary(),
        **_memory_peak(device),
    }


def diffusers_pipeline(model: WanT2V) -> Any:
    """diffusers' WanPipeline over the very same component objects (default settings otherwise)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=model.tokenizer,
        text_encoder=model.text_encoder,
        transformer=model.transformer,
        vae=model.vae,
        scheduler=model.make_scheduler(None),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(model: WanT2V, pipe: Any, job: JobSpec, video_path: str) -> dict[str, Any]:
    """One diffusers WanPipeline generation, probed the same way, encoded with the same encoder."""
    device = model.device
    clock = Clock(device)
    pipe.scheduler = model.make_scheduler(job.shift)
    _memory_reset(device)

    def on_step_end(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        probe.step_end()
        return kwargs

    with LoopProbe(model.transformer, clock) as probe:
        started = time.perf_counter()
        frames = pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            height=job.height,
            width=job.width,
            num_frames=job.frames,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
            callback_on_step_end=on_step_end,
        ).frames[0]  # (F, H, W, 3) float in [0, 1]
        encode_start = time.perf_counter()
        encode_mp4((np.asarray(frames) * 255).round().astype(np.uint8), video_path, job.fps or model.fps)
        ended = time.perf_counter()
    return {
        "wallS": ended - started,
        "phasesS": {"pipeline": encode_start - started, "encode": ended - encode_start},
        **probe.summary(),
        **_memory_peak(device),
    }


def run_diffusers_plain_blocks(model: WanT2V, pipe: Any, job: JobSpec, video_path: str) -> dict[str, Any]:
    """`run_diffusers` over kino's compiled transformer with kino's fusions undone (diffusers' own
    blocks, compiled with inductor's own heuristics): diffusers at its best documented settings."""
    fusions = model.runtime.fusions
    with fusions.disabled() if fusions is not None else contextlib.nullcontext():
        return run_diffusers(model, pipe, job, video_path)


def _ratio(kino: float | None, reference: float | None) -> float | None:
    if kino is None or reference is None or reference == 0:
        return None
    return kino / reference


#: The reference systems the bench knows: diffusers' WanPipeline as it comes ("diffusers"), and the
#: same pipeline at its best documented settings ("diffusers-compiled": the transformer's repeated
#: blocks compiled and the fastest exact attention backend), which it gets by running over the
#: transformer after kino optimized it (the same torch.compile of the same blocks, the same backend),
#: with kino's fusions undone (runtime/fuse.py), so its blocks are diffusers' own.
REFERENCES = ("diffusers", "diffusers-compiled")


def _runtime_options(values: dict[str, Any] | None, cache_dir: str | None) -> RuntimeOptions:
    values = values or {}
    return RuntimeOptions(
        cfg=values.get("cfg", "auto"),
        attention=values.get("attention", "auto"),
        compile=bool(values.get("compile", False)),
        fuse=bool(values.get("fuse", True)),
        cache_dir=Path(cache_dir) if cache_dir else None,
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    model_spec = parse_model_spec(spec["model"])
    job = parse_job_spec({**spec["job"], "output": {"video": None, "framesDir": None}})
    warmup_steps = int(spec.get("warmupSteps", 2))
    generations = int(spec.get("generations", 1))
    references = [r for r in spec.get("references", ["diffusers"]) if r in REFERENCES]
    kino_options = _runtime_options(spec.get("kinoRuntime"), spec.get("cacheDir"))

    log(f"building {model_spec.name} ({model_spec.source.kind}) on {model_spec.device} in {model_spec.dtype}")
    started = time.perf_counter()
    # Built plain (eager, torch's default attention, sequential CFG) so that diffusers' default run
    # sees the model as diffusers would load it; kino's optimizations are applied after that run.
    plain = RuntimeOptions(cfg="sequential", attention="default", compile=False, fuse=False)
    model = WanT2V.load(model_spec, runtime=plain)
    synchronize(model.device)
    load_s = time.perf_counter() - started
    device = model.device
    result: dict[str, Any] = {
        "environment": environment(device),
        "spec": spec,
        "loadS": load_s,
        "latentShape": list(model.initial_latents(job).shape),
        "videoTokens": _video_tokens(model, job),
    }
    pipe = diffusers_pipeline(model) if references else None
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ("kino", *REFERENCES)}
    warm = replace(job, steps=warmup_steps)

    def optimize_kino() -> None:
        log(f"kino: optimize {kino_options} and prewarm")
        begun = time.perf_counter()
        model.runtime = optimize(model.transformer, device, model.dtype, kino_options)
        result["kinoPrewarmS"] = model.prewarm(job) / 1000.0
        result["kinoOptimizeS"] = time.perf_counter() - begun
        result["kinoAttention"] = {str(k): v.backend.name for k, v in model.runtime.choices.items()}

    with tempfile.TemporaryDirectory(prefix="kino-bench-") as scratch:
        # Phases in order: diffusers as it comes, then kino's optimizations applied in place, then
        # diffusers over the optimized transformer. Each system warms up right before it is timed.
        phases: list[tuple[str, Callable[[JobSpec, str], dict[str, Any]], Callable[[], None] | None]] = []
        if "diffusers" in references:
            phases.append(("diffusers", lambda j, p: run_diffusers(model, pipe, j, p), None))
        phases.append(("kino", lambda j, p: run_kino(model, j, p), optimize_kino))
        if "diffusers-compiled" in references:
            phases.append(("diffusers-compiled", lambda j, p: run_diffusers_plain_blocks(model, pipe, j, p), None))
        for name, go, before in phases:
            if before is not None:
                before()
            log(f"warm-up: {name}, {warmup_steps} steps")
            begun = time.perf_counter()
            go(warm, os.path.join(scratch, f"warm-{name}.mp4"))
            result.setdefault("warmupS", {})[name] = time.perf_counter() - begun
            for round_index in range(generations):
                log(f"timed generation {round_index + 1}/{generations}: {name}, {job.steps} steps")
                measured = go(job, os.path.join(scratch, f"{name}-{round_index}.mp4"))
                log(f"  {name}: {measured['wallS']:.2f} s wall, {measured['step'].get('medianS', 0):.3f} s/step")
                runs[name].append(measured)
    result["runs"] = {k: v for k, v in runs.items() if v}
    result["summary"] = _summary(runs)
    if device.type == "cuda" and spec.get("floor", True):
        log("measuring the floor: the forward's GEMMs and attention alone")
        floor = measure_floor(model.transformer.config, result["videoTokens"], model.transformer.dtype)
        result["floor"] = floor
        for key, per in (("forwardS", 1), ("stepS", 2 if job.guidance > 1.0 else 1)):
            entry = result["summary"][key]
            entry["floor"] = floor["floorS"] * per
            entry["kinoOverFloor"] = _ratio(entry["kino"], entry["floor"])
            entry["diffusersOverFloor"] = _ratio(entry["diffusers"], entry["floor"])
            entry["diffusersCompiledOverFloor"] = _ratio(entry["diffusersCompiled"], entry["floor"])
    return result


def _video_tokens(model: WanT2V, job: JobSpec) -> int:
    _, patch_h, patch_w = model.transformer.config.patch_size
    patch_t = model.transformer.config.patch_size[0]
    latent_t = (job.frames - 1) // model.vae_scale_temporal + 1
    return (
        (latent_t // patch_t)
        * (job.height // model.vae_scale_spatial // patch_h)
        * (job.width // model.vae_scale_spatial // patch_w)
    )


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the timed generations, and kino / diffusers ratios (< 1 means kino is faster)."""

    def median(name: str, pick: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = [v for v in (pick(r) for r in runs.get(name, [])) if v is not None]
        return statistics.median(values) if values else None

    picks: dict[str, Callable[[dict[str, Any]], float | None]] = {
        # Per forward of batch 1: a batched-CFG forward counts as two.
        "forwardS": lambda r: r["forward"].get("medianS") and r["forward"]["medianS"] / r.get("forwardBatch", 1),
        "stepS": lambda r: r["step"].get("medianS"),
        "generationS": lambda r: r["wallS"],
        "peakVramBytes": lambda r: r["peakVramBytes"],
    }
    out: dict[str, Any] = {}
    for key, pick in picks.items():
        kino, ref, best = median("kino", pick), median("diffusers", pick), median("diffusers-compiled", pick)
        out[key] = {
            "kino": kino,
            "diffusers": ref,
            "ratio": _ratio(kino, ref),
            "diffusersCompiled": best,
            "ratioCompiled": _ratio(kino, best),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.bench")
    parser.add_argument("--spec", help="the spec as a JSON file (default: read it from stdin)")
    args = parser.parse_args(argv)
    return answer(lambda: run(read_spec(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
