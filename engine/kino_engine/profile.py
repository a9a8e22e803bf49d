"""`python -m kino_engine.profile`: one warm generation under torch.profiler, a Chrome trace and a digest.

Reads a JSON spec from `--spec FILE` or stdin (what `kino profile` builds; the bench spec's shape):
  {"model": ModelSpec, "job": JobSpec without output, "warmupSteps": 1, "provenance": {...}}
writes the Chrome trace to `--trace OUT.json` and prints one JSON line last on stdout:
{"ok": true, "result": {"environment", "spec", "loadS", "trace", "digest"}} or {"ok": false, "error"}.
Progress goes to stderr.

What runs: the model is loaded, its prompt cache installed as the engine does (so the profiled
generation is a warm request, as a second request to the worker would be), a warm-up generation of
`warmupSteps` steps with the same prompts runs untraced, then one generation of the job runs under
torch.profiler (CPU, plus CUDA on a GPU). Ranges named kino/generate, kino/text_encode,
kino/step N, kino/decode are opened from the outside through WanT2V.generate's callbacks: on_phase
for the phases, is_cancelled (called before each step and after the last) for the steps, as the host
runs them (record_function, and NVTX on CUDA for Nsight). A no-op on_step is passed, as the engine
always passes one, so the loop's own step timing is profiled as it runs when served.

The digest (`digest()`, a pure function of the trace's events) gives time by category, the top
kernels and, for every denoising step after the first, the host syncs and device allocations in it;
fields that only exist on a GPU are null on the CPU. It decides nothing about where results go.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from typing import Any, Iterable

import torch

from .bench import environment
from .pipelines.wan import WanT2V
from .protocol import JobSpec, parse_job_spec, parse_model_spec
from .runtime.embed_cache import PromptEmbeddingCache, encoder_identity, install_prompt_cache
from .tool_answer import answer, read_spec

#: Runtime/driver calls that block the host until the device is done.
SYNC_CALLS = frozenset(
    {
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "cudaEventSynchronize",
        "cudaMemcpy",  # the synchronous one; cudaMemcpyAsync is not counted
        "cuStreamSynchronize",
        "cuCtxSynchronize",
        "cuEventSynchronize",
    }
)
#: Ops that read a device value on the host (a sync on a GPU, whatever the runtime call it makes).
SCALAR_READS = ("aten::_local_scalar_dense", "aten::item")
STEP_RANGE = re.compile(r"^kino/step (\d+)$")
TOP_KERNELS = 15


def log(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)


# ---- the digest: a pure function of the trace ----


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _clip(events: list[dict[str, Any]], start: float, end: float) -> list[tuple[float, float]]:
    out = []
    for e in events:
        a, b = max(e["ts"], start), min(e["ts"] + e["dur"], end)
        if b > a:
            out.append((a, b))
    return out


def _inside(e: dict[str, Any], start: float, end: float) -> bool:
    return start <= e["ts"] and e["ts"] + e.get("dur", 0) <= end


def _memcpy_kind(name: str) -> str:
    for kind, tag in (("h2d", "HtoD"), ("d2h", "DtoH"), ("d2d", "DtoD")):
        if tag in name:
            return kind
    return "other"


def _scalar_reads(ops: list[dict[str, Any]]) -> int:
    """aten::_local_scalar_dense calls, plus aten::item calls that contain none (one read, counted once)."""
    dense = [e for e in ops if e["name"] == "aten::_local_scalar_dense"]
    items = [e for e in ops if e["name"] == "aten::item"]
    lone_items = [
        i for i in items
        if not any(d.get("tid") == i.get("tid") and _inside(d, i["ts"], i["ts"] + i["dur"]) for d in dense)
    ]
    return len(dense) + len(lone_items)


def digest(
    events: list[dict[str, Any]], cuda: bool, allocations: dict[int, dict[str, int]] | None = None
) -> dict[str, Any]:
    """Time by category, top kernels, and per-step host syncs and allocations of one profiled generation.

    `events` are a Chrome trace's traceEvents (kineto's categories: kernel, gpu_memcpy, gpu_memset,
    cuda_runtime, cuda_driver, cpu_op, user_annotation); times are in microseconds. `allocations`
    maps a step number to the allocator counters' growth during it (None on the CPU).
    """
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in complete:
        by_cat[e.get("cat", "")].append(e)
    ranges = {e["name"]: e for e in by_cat["user_annotation"] if str(e.get("name", "")).startswith("kino/")}
    whole = ranges.get("kino/generate")
    if whole is None:
        raise ValueError("the trace has no kino/generate range: was the generation profiled?")
    start, end = whole["ts"], whole["ts"] + whole["dur"]
    ms = lambda us: us / 1000.0  # noqa: E731
    kernels = [e for e in by_cat["kernel"] if _inside(e, start, end)]
    copies = [e for e in by_cat["gpu_memcpy"] if _inside(e, start, end)]
    memsets = [e for e in by_cat["gpu_memset"] if _inside(e, start, end)]
    cpu_ops = [e for e in by_cat["cpu_op"] if _inside(e, start, end)]
    runtime = [e for e in by_cat["cuda_runtime"] + by_cat["cuda_driver"] if _inside(e, start, end)]

    top_level: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for e in cpu_ops:
        top_level[e.get("tid")].append((e["ts"], e["ts"] + e["dur"]))
    cpu_ops_us = sum(_union_us(v) for v in top_level.values())

    kernel_us = sum(e["dur"] for e in kernels)
    memcpy_us: dict[str, float] = defaultdict(float)
    for e in copies:
        memcpy_us[_memcpy_kind(e["name"])] += e["dur"]
    busy_us = _union_us(_clip(kernels + copies + memsets, start, end))
    categories = {
        "wallMs": ms(whole["dur"]),
        "gpuKernelMs": ms(kernel_us) if cuda else None,
        "memcpyMs": {k: ms(memcpy_us.get(k, 0.0)) for k in ("h2d", "d2h", "d2d")} if cuda else None,
        "memsetMs": ms(sum(e["dur"] for e in memsets)) if cuda else None,
        "cpuOpsMs": ms(cpu_ops_us),
        # Wall time of the generation during which no kernel, copy or memset ran on the device.
        "gpuIdleMs": ms(whole["dur"] - busy_us) if cuda else None,
    }

    per_kernel: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        per_kernel[e["name"]].append(e["dur"])
    top_kernels = [
        {"name": name, "calls": len(durs), "totalMs": ms(sum(durs)), "percent": 100.0 * sum(durs) / kernel_us}
        for name, durs in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:TOP_KERNELS]
    ] if cuda and kernel_us > 0 else ([] if cuda else None)

    steps = sorted(
        ((int(m.group(1)), e) for name, e in ranges.items() if (m := STEP_RANGE.match(name))), key=lambda x: x[0]
    )
    step_rows = []
    for i, e in steps[1:]:  # the first step carries one-time work (scheduler set-up, the first noise)
        a, b = e["ts"], e["ts"] + e["dur"]
        syncs: dict[str, int] = defaultdict(int)
        for r in runtime:
            if r["name"] in SYNC_CALLS and _inside(r, a, b):
                syncs[r["name"]] += 1
        step_rows.append(
            {
                "step": i,
                "ms": ms(e["dur"]),
                "hostSyncs": sum(syncs.values()) if cuda else None,
                "syncsByName": dict(sorted(syncs.items())) if cuda else None,
                "scalarReads": _scalar_reads([o for o in cpu_ops if _inside(o, a, b)]),
                "allocations": (allocations or {}).get(i) if cuda else None,
            }
        )
    return {
        "device": "cuda" if cuda else "cpu",
        "categories": categories,
        "phasesMs": {
            phase: ms(ranges[f"kino/{phase}"]["dur"]) if f"kino/{phase}" in ranges else None
            for phase in ("text_encode", "denoise", "decode")
        },
        "topKernels": top_kernels,
        "stepsProfiled": len(steps),
        "steps": step_rows,
    }


# ---- running one profiled generation ----


class _Ranges:
    """Named ranges around the phases and each denoising step, opened from the loop's callbacks.

    Steps are delimited on the host by `is_cancelled`, which the loop calls before every step and
    once after the last: that is where the host moves on to the next step. (`on_step` cannot delimit
    them: on a GPU it reports a step only once the device has finished it, steps later.)
    """

    def __init__(self, device: torch.device, steps: int):
        self.cuda = device.type == "cuda"
        self.device = device
        self.steps = steps
        self._open: list[Any] = []
        self._in_denoise = False
        self._step = 0  # the step whose range is open, 0 for none
        #: Allocator counters at the start of step 1 and at each step's end (CUDA only).
        self.counters: list[dict[str, int]] = []

    def push(self, name: str) -> None:
        scope = torch.profiler.record_function(name)
        scope.__enter__()
        self._open.append(scope)
        if self.cuda:
            torch.cuda.nvtx.range_push(name)

    def pop(self) -> None:
        if self.cuda:
            torch.cuda.nvtx.range_pop()
        self._open.pop().__exit__(None, None, None)

    def _sample(self) -> None:
        if self.cuda:
            # Host-side counters of the caching allocator: no device sync needed to read them.
            stats = torch.cuda.memory_stats(self.device)
            self.counters.append(
                {
                    "requests": int(stats.get("allocation.all.allocated", 0)),
                    "cudaMallocs": int(stats.get("segment.all.allocated", 0)),
                    "retries": int(stats.get("num_alloc_retries", 0)),
                }
            )


    def on_phase(self, phase: str, state: str, _ms: float | None) -> None:
        if state == "start":
            self.push(f"kino/{phase}")
            self._in_denoise = phase == "denoise"
            return
        if phase == "denoise":
            if self._step:  # a loop that did not check after its last step: close that step here
                self.pop()
                self._sample()
                self._step = 0
            self._in_denoise = False
        self.pop()

    def is_cancelled(self) -> bool:
        if not self._in_denoise:
            return False
        if self._step == 0 and not self.counters:
            self._sample()  # the start of step 1
        done = self._step
        if done:
            self.pop()
            self._sample()
        if done < self.steps:
            self._step = done + 1
            self.push(f"kino/step {self._step}")
        else:
            self._step = 0
            self._in_denoise = False  # the check after the last step: nothing more to delimit
        return False

    def allocations(self) -> dict[int, dict[str, int]] | None:
        """Step number -> growth of the allocator counters during that step."""
        if not self.cuda:
            return None
        return {
            i: {k: after[k] - before[k] for k in after}
            for i, (before, after) in enumerate(zip(self.counters, self.counters[1:]), start=1)
        }


def profile_generation(model: WanT2V, job: JobSpec, trace_path: str) -> dict[str, Any]:
    """One generation under torch.profiler; writes the Chrome trace and returns the digest."""
    cuda = model.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(model.device)
    ranges = _Ranges(model.device, job.steps)
    with torch.profiler.profile(activities=activities) as prof:
        ranges.push("kino/generate")
        # A no-op on_step: the engine always passes one, so its step timing runs as it does when served.
        model.generate(job, on_phase=ranges.on_phase, on_step=lambda i, n, ms: None, is_cancelled=ranges.is_cancelled)
        ranges.pop()
    prof.export_chrome_trace(trace_path)
    with open(trace_path, encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    return digest(events, cuda, ranges.allocations())


def run(spec: dict[str, Any], trace_path: str) -> dict[str, Any]:
    model_spec = parse_model_spec(spec["model"])
    job = parse_job_spec({**spec["job"], "output": {"video": None, "framesDir": None}})
    warmup_steps = int(spec.get("warmupSteps", 1))
    log(f"building {model_spec.name} ({model_spec.source.kind}) on {model_spec.device} in {model_spec.dtype}")
    started = time.perf_counter()
    model = WanT2V.load(model_spec, runtime=model_spec.runtime)
    cache = PromptEmbeddingCache()
    install_prompt_cache(model, cache, encoder_identity(model_spec.name, model.text_encoder, model.dtype, model.device))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    load_s = time.perf_counter() - started
    # Compile, autotuning and the attention measurement happen here, not in the profiled run.
    log(f"prewarm: {model.prewarm(job):.0f} ms ({model.runtime.options})")
    log(f"warm-up: {warmup_steps} steps")
    model.generate(replace(job, steps=warmup_steps))
    before = cache.stats()
    log(f"profiled generation: {job.steps} steps")
    result = profile_generation(model, job, trace_path)
    after = cache.stats()
    result["promptCache"] = {"hits": after.hits - before.hits, "misses": after.misses - before.misses}
    log(f"trace written to {trace_path}")
    return {
        "environment": environment(model.device),
        "spec": spec,
        "loadS": load_s,
        "trace": os.path.abspath(trace_path),
        "digest": result,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.profile")
    parser.add_argument("--spec", help="the spec as a JSON file (default: read it from stdin)")
    parser.add_argument("--trace", help="where to write the Chrome trace (default: a temporary file, deleted)")
    args = parser.parse_args(argv)

    def work() -> dict[str, Any]:
        spec = read_spec(args.spec)
        if args.trace is not None:
            return run(spec, args.trace)
        with tempfile.TemporaryDirectory(prefix="kino-profile-") as scratch:
            result = run(spec, os.path.join(scratch, "trace.json"))
        result["trace"] = None
        return result

    return answer(work)


if __name__ == "__main__":
    sys.exit(main())
