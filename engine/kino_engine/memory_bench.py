"""`python -m kino_engine.memory_bench`: one model, many memory plans, measured phase by phase.

Reads a JSON spec from `--spec FILE` or stdin (what `kino bench --memory` builds with the planner):
  {"model": ModelSpec (no memory: built resident), "job": JobSpec without output,
   "warmupSteps": 1, "timedSteps": 2,
   "cases": [{"label": str, "memory": MemorySpec, "vaeDecode": {...}, "cfg": "batched"|"sequential"}],
   "provenance": {...}}
and prints one JSON line last on stdout: {"ok": true, "result": {...}} (tool_answer.py).

The model is built once. For each case the components are placed as the case's plan says (after
undoing the previous case's placement), the plan's VRAM budget is enforced in this process, and the
three phases run at the job's shape (a transformer streamed from disk is written to a scratch file
under the runtime's cacheDir first, which `placeS` includes: the model has random weights and no
files):
- text encode: both prompts, timed, its peak device memory; embeddings are reused by the next phases;
- denoise: `warmupSteps + timedSteps` steps; per step the device time (CUDA events, the loop's own
  step timer); the untimed warm-up steps cover compilation and the first streamed copies;
- decode: the full latents through the VAE in the plan's mode, timed, its peak.
Each phase's peak is torch's max_memory_allocated since that phase began. An out-of-memory error ends
the case there and is recorded with its phase (the planner must never produce one). The final
latents of each case are compared with the first case's (run it resident): placements are exact, so
the difference must be 0 for the same CFG mode and text-encoder device, float rounding otherwise
(both the latents and the prompt embeddings are compared).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any

import torch

from .bench import environment
from .pipelines.wan import WanT2V
from .protocol import JobSpec, parse_job_spec, parse_memory_plan, parse_model_spec
from .runtime.memory import PeakRam, free_device_memory, reset_vram_peak, synchronize, vram_peak
from .runtime.disk import DiskBlocks
from .runtime.placement import MemoryPlan
from .tool_answer import answer, read_spec


def log(message: str) -> None:
    print(f"[memory-bench] {message}", file=sys.stderr, flush=True)


def _reset(device: torch.device) -> None:
    """Start a phase: earlier GPU work finished, the peak counter reset."""
    synchronize(device)
    reset_vram_peak(device)


def run_case(
    model: WanT2V, job: JobSpec, memory: MemoryPlan, warmup: int, timed: int
) -> tuple[dict[str, Any], Any, Any]:
    device = model.device
    result: dict[str, Any] = {"phases": {}}
    ram = PeakRam()
    ram.start()
    started = time.perf_counter()
    model.replace(memory)
    result["placeS"] = time.perf_counter() - started
    result["pinnedBytes"] = model.placer.pinned_bytes
    result["deviceBytesAfterPlace"] = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    phase = "textEncode"
    latents = None
    cond = None
    try:
        _reset(device)
        t0 = time.perf_counter()
        cond = model.encode_prompt(job.prompt)
        uncond = model.encode_prompt(job.negative_prompt) if job.guidance > 1.0 else None
        synchronize(device)
        result["phases"]["textEncode"] = {"seconds": time.perf_counter() - t0, "peakVramBytes": vram_peak(device)}

        phase = "denoise"
        _reset(device)
        step_ms: list[float] = []
        t0 = time.perf_counter()
        steps_job = dataclasses.replace(job, steps=warmup + timed)
        latents = model.denoise(cond, uncond, steps_job, on_step=lambda i, n, ms: step_ms.append(ms))
        synchronize(device)
        timed_ms = step_ms[warmup:]
        result["phases"]["denoise"] = {
            "seconds": time.perf_counter() - t0,
            "peakVramBytes": vram_peak(device),
            "stepS": [ms / 1000.0 for ms in step_ms],
            "secondsPerStep": statistics.median(timed_ms) / 1000.0 if timed_ms else None,
            "forwardBatch": model.forward_batch(job),
        }

        phase = "decode"
        _reset(device)
        t0 = time.perf_counter()
        with model.vae_decode_mode(job):
            frames = 0
            for chunk in model.decode_stream(latents):
                frames += int(chunk.shape[0])
        synchronize(device)
        result["phases"]["decode"] = {"seconds": time.perf_counter() - t0, "peakVramBytes": vram_peak(device), "frames": frames}
        result["oom"] = None
    except torch.OutOfMemoryError as exc:
        result["oom"] = {"phase": phase, "message": str(exc).splitlines()[0][:300]}
        log(f"out of memory in {phase}")
        latents = None
        free_device_memory()
    embeds = cond.float().cpu() if cond is not None else None
    peaks = [p["peakVramBytes"] for p in result["phases"].values() if p.get("peakVramBytes") is not None]
    result["peakVramBytes"] = max(peaks) if peaks else None
    result["peakRamBytes"] = ram.peak()
    streamer = model.placer.streamer
    if streamer is not None:
        source = streamer.source
        result["streamer"] = {
            "source": source.kind,
            "blockBytes": streamer.block_bytes,
            "slots": streamer.slots_count,
            "copies": streamer.copies,
            "resyncs": streamer.resyncs,
            # From disk: the bytes read from the files (a float32 checkpoint run in bf16 reads twice
            # the block bytes) and the staging ring's host bytes.
            "bytesRead": source.bytes_read if isinstance(source, DiskBlocks) else None,
            "stagingBytes": source.host_bytes if isinstance(source, DiskBlocks) else None,
        }
    return result, latents, embeds


def run(spec: dict[str, Any]) -> dict[str, Any]:
    model_spec = parse_model_spec(spec["model"])
    job = parse_job_spec({**spec["job"], "output": {"video": None, "framesDir": None}})
    warmup, timed = int(spec.get("warmupSteps", 1)), int(spec.get("timedSteps", 2))
    log(f"building {model_spec.name} on {model_spec.device}")
    started = time.perf_counter()
    model = WanT2V.load(model_spec, runtime=model_spec.runtime)
    load_s = time.perf_counter() - started
    model.check_job(job)
    cases_out: list[dict[str, Any]] = []
    reference = None
    for index, case in enumerate(spec["cases"]):
        label = case["label"]
        memory = parse_memory_plan(case["memory"], f"cases[{index}].memory")
        raw_job = {**spec["job"], "output": {"video": None, "framesDir": None}}
        if case.get("vaeDecode") is not None:
            raw_job["vaeDecode"] = case["vaeDecode"]
        if case.get("cfg") is not None:
            raw_job["cfg"] = case["cfg"]
        case_job = parse_job_spec(raw_job)
        log(f"case {label}: te {memory.text_encoder.kind}, transformer {memory.transformer}, vae {memory.vae.kind}, "
            f"budget {memory.vram_budget}, decode {case_job.vae_decode}, cfg {case_job.cfg}")
        out, latents, embeds = run_case(model, case_job, memory, warmup, timed)
        if latents is not None and embeds is not None:
            if reference is None:
                reference = (latents.float().cpu(), embeds)
            else:
                out["latentsMaxAbsDiffVsFirst"] = (latents.float().cpu() - reference[0]).abs().max().item()
                # A text encoder on the CPU computes in other kernels: its embeddings differ by rounding,
                # and the latents then differ for that reason, not because of where weights live.
                out["embedsMaxAbsDiffVsFirst"] = (embeds - reference[1]).abs().max().item()
        out["label"] = label
        cases_out.append(out)
        d = out["phases"].get("denoise", {})
        log(f"  -> {d.get('secondsPerStep')} s/step, peak {out['peakVramBytes']}, pinned {out['pinnedBytes']}, oom {out['oom']}")
    model.placer.release()
    return {
        "environment": environment(model.device),
        "loadS": load_s,
        "job": spec["job"],
        "warmupSteps": warmup,
        "timedSteps": timed,
        "cases": cases_out,
        "provenance": spec.get("provenance"),
        "spec": spec,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.memory_bench")
    parser.add_argument("--spec", help="the spec as a JSON file (default: read it from stdin)")
    args = parser.parse_args(argv)
    return answer(lambda: run(read_spec(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
