"""`python -m kino_engine.serving_bench --spec FILE`: the serving figures of a warm engine (issue 5),
measured through the real worker process and its protocol, as the server drives it. `kino
bench-serve` writes the spec (`--spec-only`) and records the answer (`--from`); on a machine without
Node, run this module on the spec and record its answer elsewhere.

Spec (JSON; a bad field is refused as BAD_REQUEST naming it before any worker starts):
    {"model": ModelSpec,
     "warmupSteps": n | null,      (steps of each warm-up generation and batch; null: the job's)
     "ttfs": {"job": JobSpec without output, "runs": K},
     "throughput": [{"job": JobSpec without output, "rounds": R, "batch": J >= 2}, ...],
     "provenance": {...}}
Prints one JSON line last on stdout ({"ok": true, "result": ...}, tool_answer.py). A failure the
worker reports keeps its code (OOM, BAD_CHECKPOINT, ...).

What is measured (host times are this client's monotonic clock, taken when a message arrives):
- **time to first step** at the ttfs job, after one warm-up generation of it: K requests with
  distinct prompts (the text encoder runs: a prompt-cache miss; the negative prompt is cached) and K
  with the warm-up's prompt (the cache answers both), one after another. For each: arrival of step
  1's event − that step's own GPU time (CUDA events, the event's `ms`) − the moment the request was
  written: the time from the request to the first denoising step starting on the GPU. It is an upper
  bound: the step timer reports a step once its end event has completed, polling every 0.5 ms while
  the host is ahead (runtime/hotloop.py). Also request → `denoise` phase start, the whole request,
  and the prompt cache's hits and misses as the results report them.
- **batched against sequential**, per throughput case: J jobs (prompts "<prompt> (j)", seeds
  seed + j) after a warm-up of both forms (compile at both forward batch sizes, the J prompts cached),
  then R rounds of: the J jobs as one `generate_batch` (request → the last job's result) and the same
  J jobs as J `generate` requests written back to back (the first request → the last result).
  Throughput = jobs per second; the ratio is batched over sequential; each form's denoising step time
  (the events' `ms`: one batched step carries all J jobs). Each job decodes and writes its own video
  in both forms, into a temporary folder removed at the end.
The worker is started as the control plane starts it (a socketpair on fd 3, worker_pipe.py) and is
shut down through the protocol at the end, after a failure too; the answer says how it exited.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import PROTOCOL_VERSION, EngineFailure, parse_job_spec, parse_model_spec
from .tool_answer import answer, read_spec
from .worker_pipe import Arrival, WorkerPipe

#: Seconds a load or a generation may go without any message from the worker.
LOAD_TIMEOUT_S = 1800.0
GENERATE_TIMEOUT_S = 1200.0


def log(message: str) -> None:
    print(f"[serving-bench] {message}", file=sys.stderr, flush=True)


# ---- the spec ----


@dataclass(frozen=True)
class ThroughputCase:
    #: A JobSpec without output, as JSON (validated by the protocol's parser).
    job: Mapping[str, Any]
    #: Timed rounds of each form (the report takes medians).
    rounds: int
    #: Jobs per round: one generate_batch of them against as many generates.
    batch: int


@dataclass(frozen=True)
class ServingSpec:
    #: The ModelSpec as JSON, sent to `load` as it is.
    model: Mapping[str, Any]
    #: Its device ("cuda" or "cpu"), for the environment in the answer.
    device: str
    #: Steps of each warm-up generation and batch; None: the job's.
    warmup_steps: int | None
    #: The job of the time-to-first-step requests (and of the first warm-up), without output.
    ttfs_job: Mapping[str, Any]
    #: Requests of each kind (new prompt, cached prompt).
    ttfs_runs: int
    throughput: tuple[ThroughputCase, ...]


def _bad(field: str, message: str) -> EngineFailure:
    return EngineFailure("BAD_REQUEST", message, field=field)


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(field, f"expected an object, got {type(value).__name__}")
    return value


def _count(obj: Mapping[str, Any], key: str, path: str, minimum: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(f"{path}.{key}" if path else key, f"expected a whole number >= {minimum}, got {value!r}")
    return value


def _job(value: Any, field: str) -> Mapping[str, Any]:
    job = _mapping(value, field)
    parse_job_spec({**job, "output": {"video": None, "framesDir": None}}, field)
    return job


def parse_spec(value: Any) -> ServingSpec:
    """The spec, checked field by field (EngineFailure BAD_REQUEST naming the field)."""
    spec = _mapping(value, "spec")
    model = _mapping(spec.get("model"), "model")
    device = parse_model_spec(model).device
    warmup = spec.get("warmupSteps")
    ttfs = _mapping(spec.get("ttfs"), "ttfs")
    cases = spec.get("throughput", [])
    if not isinstance(cases, list):
        raise _bad("throughput", f"expected a list, got {type(cases).__name__}")
    objects = [(f"throughput.{i}", _mapping(case, f"throughput.{i}")) for i, case in enumerate(cases)]
    return ServingSpec(
        model=model,
        device=device,
        warmup_steps=None if warmup is None else _count(spec, "warmupSteps", "", 1),
        ttfs_job=_job(ttfs.get("job"), "ttfs.job"),
        ttfs_runs=_count(ttfs, "runs", "ttfs", 1),
        throughput=tuple(
            ThroughputCase(job=_job(case.get("job"), f"{path}.job"), rounds=_count(case, "rounds", path, 1), batch=_count(case, "batch", path, 2))
            for path, case in objects
        ),
    )


# ---- the measurements ----


def _output(base: Mapping[str, Any], folder: str, name: str, **changes: Any) -> dict[str, Any]:
    """The job with `changes` and its video written as `<folder>/<name>.mp4`."""
    return {**base, **changes, "output": {"video": os.path.join(folder, f"{name}.mp4"), "framesDir": None}}


def _stats(values: list[float]) -> dict[str, Any]:
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def _events(messages: list[Arrival]) -> list[tuple[float, dict[str, Any]]]:
    return [(t, m["event"]) for t, m in messages if m["type"] == "event"]


def _step_ms(messages: list[Arrival]) -> list[float]:
    return [e["ms"] for _, e in _events(messages) if e["kind"] == "step"]


def _result(messages: list[Arrival]) -> dict[str, Any]:
    return messages[-1][1]["result"]


def time_to_first_step(worker: WorkerPipe, base: Mapping[str, Any], runs: int, folder: str, distinct: bool) -> dict[str, Any]:
    """K requests one after another; see the module's docstring."""
    ttfs, to_denoise, totals = [], [], []
    hits = misses = 0
    for k in range(runs):
        prompt = f"{base['prompt']} (variation {k})" if distinct else base["prompt"]
        request_id = worker.next_id("ttfs")
        sent = worker.send({"id": request_id, "type": "generate", "job": _output(base, folder, request_id, prompt=prompt)})
        messages = worker.until_answered({request_id}, GENERATE_TIMEOUT_S)[request_id]
        events = _events(messages)
        step_at, step = next((t, e) for t, e in events if e["kind"] == "step" and e["i"] == 1)
        denoise_at = next(t for t, e in events if e["kind"] == "phase" and e["phase"] == "denoise" and e["state"] == "start")
        ttfs.append((step_at - step["ms"] / 1000.0 - sent) * 1000.0)
        to_denoise.append((denoise_at - sent) * 1000.0)
        totals.append((messages[-1][0] - sent) * 1000.0)
        cache = _result(messages)["cache"]
        hits, misses = hits + cache["promptHits"], misses + cache["promptMisses"]
        log(f"ttfs ({'new' if distinct else 'cached'} prompt): {ttfs[-1]:.1f} ms (denoise start {to_denoise[-1]:.1f} ms)")
    return {
        "ttfsMs": _stats(ttfs),
        "toDenoiseStartMs": _stats(to_denoise),
        "requestMs": _stats(totals),
        "promptCache": {"hits": hits, "misses": misses},
    }


def throughput(worker: WorkerPipe, case: ThroughputCase, folder: str, warmup_steps: int | None) -> dict[str, Any]:
    """A warm-up of both forms, then R rounds of each; see the module's docstring."""
    base, batch = case.job, case.batch

    def jobs(tag: str, steps: int) -> list[dict[str, Any]]:
        return [
            _output(base, folder, f"{tag}-{j}", prompt=f"{base['prompt']} ({j})", seed=base["seed"] + j, steps=steps)
            for j in range(batch)
        ]

    def batched(tag: str, steps: int) -> tuple[float, list[float]]:
        batch_id = worker.next_id(tag)
        members = [{"id": f"{batch_id}.{j}", "job": job} for j, job in enumerate(jobs(batch_id, steps))]
        sent = worker.send({"id": batch_id, "type": "generate_batch", "jobs": members})
        seen = worker.until_answered({m["id"] for m in members}, GENERATE_TIMEOUT_S)
        sizes = {_result(messages)["batchSize"] for messages in seen.values()}
        if sizes != {batch}:
            raise EngineFailure("INTERNAL", f"the engine answered {batch} batched jobs with batch sizes {sorted(sizes)}, not one loop of {batch}")
        # One loop carries every job: each job's step events repeat the same times.
        return max(messages[-1][0] for messages in seen.values()) - sent, _step_ms(seen[members[0]["id"]])

    def sequential(tag: str, steps: int) -> tuple[float, list[float]]:
        ids: list[str] = []
        first: float | None = None
        for job in jobs(tag, steps):
            ids.append(worker.next_id(tag))
            sent = worker.send({"id": ids[-1], "type": "generate", "job": job})
            first = sent if first is None else first
        seen = worker.until_answered(set(ids), GENERATE_TIMEOUT_S)
        assert first is not None
        return max(messages[-1][0] for messages in seen.values()) - first, [ms for i in ids for ms in _step_ms(seen[i])]

    steps = base["steps"]
    log(f"throughput {base['width']}x{base['height']}x{base['frames']}, {steps} steps, {batch} jobs: warm-up of both forms")
    batched("warm-batched", warmup_steps or steps)
    sequential("warm-sequential", warmup_steps or steps)
    wall: dict[str, list[float]] = {"batched": [], "sequential": []}
    step_ms: dict[str, list[float]] = {"batched": [], "sequential": []}
    for r in range(case.rounds):
        for form, run in (("batched", batched), ("sequential", sequential)):
            seconds, ms = run(form, steps)
            wall[form].append(seconds)
            step_ms[form].extend(ms)
        log(f"round {r + 1}: {batch} jobs batched {wall['batched'][-1]:.2f} s, sequential {wall['sequential'][-1]:.2f} s")
    b, s = statistics.median(wall["batched"]), statistics.median(wall["sequential"])
    return {
        "job": {k: base[k] for k in ("width", "height", "frames", "steps", "guidance")},
        "jobs": batch,
        "batchedS": _stats(wall["batched"]),
        "sequentialS": _stats(wall["sequential"]),
        "batchedJobsPerS": batch / b,
        "sequentialJobsPerS": batch / s,
        "throughputRatio": s / b,
        "stepMs": {"batched": _stats(step_ms["batched"]), "sequential": _stats(step_ms["sequential"])},
    }


def run(raw_spec: Any) -> dict[str, Any]:
    spec = parse_spec(raw_spec)  # before a worker starts: a bad spec costs nothing
    worker = WorkerPipe()
    log(f"worker {worker.process.pid} started")
    result: dict[str, Any] = {"spec": raw_spec}
    try:
        with tempfile.TemporaryDirectory(prefix="kino-serving-bench-") as folder:
            worker.call({"id": "hello", "type": "hello", "protocol": PROTOCOL_VERSION}, 120)
            started = time.monotonic()
            result["load"] = worker.call({"id": "load", "type": "load", "model": spec.model}, LOAD_TIMEOUT_S)
            result["loadS"] = time.monotonic() - started
            log("warm-up generation at the time-to-first-step shape")
            warm = worker.next_id("warm")
            steps = spec.warmup_steps or spec.ttfs_job["steps"]
            worker.call({"id": warm, "type": "generate", "job": _output(spec.ttfs_job, folder, warm, steps=steps)}, LOAD_TIMEOUT_S)
            result["timeToFirstStep"] = {
                "newPrompt": time_to_first_step(worker, spec.ttfs_job, spec.ttfs_runs, folder, distinct=True),
                "cachedPrompt": time_to_first_step(worker, spec.ttfs_job, spec.ttfs_runs, folder, distinct=False),
            }
            result["throughput"] = [throughput(worker, case, folder, spec.warmup_steps) for case in spec.throughput]
    finally:
        status = worker.shutdown()
        log(f"worker {worker.process.pid} exited with status {status}")
    result["worker"] = {"pid": worker.process.pid, "exitStatus": status}
    import torch

    from .bench import environment

    result["environment"] = environment(torch.device(spec.device))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.serving_bench")
    parser.add_argument("--spec", help="the spec as a JSON file (default: stdin)")
    args = parser.parse_args(argv)
    return answer(lambda: run(read_spec(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
