"""`python -m kino_engine.serving_bench --spec FILE`: the serving figures of a warm engine (issue 5),
measured through the real worker process and its protocol, as the server drives it.

Spec (JSON): {"model": ModelSpec, "ttfs": {"job": JobSpec without output, "runs": K},
              "throughput": [{"job": JobSpec without output, "rounds": R, "batch": J}, ...],
              "provenance": {...}}
Prints one JSON line last on stdout ({"ok": true, "result": ...}, tool_answer.py).

What is measured (host times are the client's monotonic clock, taken when a message arrives):
- **time to first step**: for K requests with distinct prompts (the text encoder runs) and K with one
  repeated prompt (the prompt cache answers): arrival of step 1's event − that step's own GPU time
  (CUDA events, the event's `ms`) − the moment the request was written. That is the time from the
  request to the first denoising step starting on the GPU. Also request → `denoise` phase start.
- **batched against sequential**: for each throughput case, after a warm-up of both forms (so compile
  at both batch sizes is paid), R rounds of: J jobs as one `generate_batch` (request → the last
  job's result), and the same J jobs as J `generate` requests written back to back (the first request
  → the last result). Throughput = jobs per second; the ratio is batched over sequential. Each job
  decodes and encodes its own video in both forms.
The worker is started as the control plane starts it (a socketpair on fd 3) and shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .tool_answer import answer, read_spec

PROTOCOL_FD = 3


def log(message: str) -> None:
    print(f"[serving-bench] {message}", file=sys.stderr, flush=True)


class WorkerPipe:
    """The engine worker as a child process on fd 3, newline-delimited JSON each way."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.socket = ours
        self._buffer = b""
        launcher = (
            "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
            "os.execv(sys.executable, [sys.executable, '-m', 'kino_engine.worker'])"
        )
        engine_dir = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=f"{engine_dir}{os.pathsep}{path}" if path else engine_dir)
        env.update(PYTHONUNBUFFERED="1", KINO_PROTOCOL_FD=str(PROTOCOL_FD))
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(theirs.fileno())],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self._counter = 0

    def next_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{self._counter}"

    def send(self, request: dict[str, Any]) -> float:
        """Write one request; returns the monotonic time it was written."""
        data = json.dumps(request).encode() + b"\n"
        sent = time.monotonic()
        self.socket.sendall(data)
        return sent

    def receive(self, timeout: float) -> tuple[float, dict[str, Any]]:
        """(arrival time, message), waiting at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message from the worker within {timeout:.0f} s")
            self.socket.settimeout(remaining)
            chunk = self.socket.recv(1 << 16)
            if not chunk:
                raise RuntimeError(f"the worker closed its protocol socket (exit status {self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return time.monotonic(), json.loads(line)

    def until_answered(self, ids: set[str], timeout: float) -> dict[str, list[tuple[float, dict[str, Any]]]]:
        """Every message for `ids` until each has its result or error; an error raises."""
        seen: dict[str, list[tuple[float, dict[str, Any]]]] = {i: [] for i in ids}
        open_ids = set(ids)
        while open_ids:
            arrived, message = self.receive(timeout)
            target = message.get("id")
            if target not in seen:
                continue  # e.g. the batch's own summary result, or an unrelated log
            seen[target].append((arrived, message))
            if message["type"] == "error":
                raise RuntimeError(f"{target}: {message['error']}")
            if message["type"] == "result":
                open_ids.discard(target)
        return seen

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(request)
        return self.until_answered({request["id"]}, timeout)[request["id"]][-1][1]["result"]

    def close(self) -> None:
        try:
            self.send({"id": "shutdown", "type": "shutdown"})
            self.process.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a dead or stuck worker is killed below
            pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.socket.close()


def _job(base: dict[str, Any], folder: str, name: str, **changes: Any) -> dict[str, Any]:
    return {**base, **changes, "output": {"video": os.path.join(folder, f"{name}.mp4"), "framesDir": None}}


def _stats(values: list[float]) -> dict[str, Any]:
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def time_to_first_step(worker: WorkerPipe, base: dict[str, Any], runs: int, folder: str, distinct: bool) -> dict[str, Any]:
    ttfs, to_denoise, totals = [], [], []
    for k in range(runs):
        prompt = f"{base['prompt']} (variation {k})" if distinct else base["prompt"]
        request_id = worker.next_id("ttfs")
        sent = worker.send({"id": request_id, "type": "generate", "job": _job(base, folder, request_id, prompt=prompt)})
        messages = worker.until_answered({request_id}, 600)[request_id]
        events = [(t, m["event"]) for t, m in messages if m["type"] == "event"]
        step = next((t, e) for t, e in events if e["kind"] == "step" and e["i"] == 1)
        denoise = next(t for t, e in events if e["kind"] == "phase" and e["phase"] == "denoise" and e["state"] == "start")
        ttfs.append((step[0] - step[1]["ms"] / 1000.0 - sent) * 1000.0)
        to_denoise.append((denoise - sent) * 1000.0)
        totals.append((messages[-1][0] - sent) * 1000.0)
        log(f"ttfs ({'new' if distinct else 'cached'} prompt): {ttfs[-1]:.1f} ms (denoise start {to_denoise[-1]:.1f} ms)")
    return {"ttfsMs": _stats(ttfs), "toDenoiseStartMs": _stats(to_denoise), "requestMs": _stats(totals)}


def throughput(worker: WorkerPipe, base: dict[str, Any], rounds: int, batch: int, folder: str) -> dict[str, Any]:
    def jobs(tag: str) -> list[dict[str, Any]]:
        return [_job(base, folder, f"{tag}-{j}", prompt=f"{base['prompt']} ({j})", seed=base["seed"] + j) for j in range(batch)]

    def batched(tag: str) -> float:
        batch_id = worker.next_id(tag)
        members = [{"id": f"{batch_id}.{j}", "job": job} for j, job in enumerate(jobs(batch_id))]
        sent = worker.send({"id": batch_id, "type": "generate_batch", "jobs": members})
        seen = worker.until_answered({m["id"] for m in members}, 1200)
        return max(msgs[-1][0] for msgs in seen.values()) - sent

    def sequential(tag: str) -> float:
        ids, first = [], None
        for job in jobs(tag):
            request_id = worker.next_id(tag)
            sent = worker.send({"id": request_id, "type": "generate", "job": job})
            first = sent if first is None else first
            ids.append(request_id)
        seen = worker.until_answered(set(ids), 1200)
        assert first is not None
        return max(msgs[-1][0] for msgs in seen.values()) - first

    log(f"throughput {base['width']}x{base['height']}x{base['frames']}, {base['steps']} steps: warm-up of both forms")
    batched("warm-batched")
    sequential("warm-sequential")
    b, s = [], []
    for r in range(rounds):
        b.append(batched("batched"))
        s.append(sequential("sequential"))
        log(f"round {r + 1}: {batch} jobs batched {b[-1]:.2f} s, sequential {s[-1]:.2f} s")
    bm, sm = statistics.median(b), statistics.median(s)
    return {
        "job": {k: base[k] for k in ("width", "height", "frames", "steps", "guidance")},
        "jobs": batch,
        "batchedS": _stats(b),
        "sequentialS": _stats(s),
        "batchedJobsPerS": batch / bm,
        "sequentialJobsPerS": batch / sm,
        "throughputRatio": sm / bm,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from .bench import environment
    from .protocol import PROTOCOL_VERSION, parse_model_spec

    model = spec["model"]
    device = parse_model_spec(model).device  # validated here, before a worker starts
    worker = WorkerPipe()
    result: dict[str, Any] = {"spec": spec}
    try:
        with tempfile.TemporaryDirectory(prefix="kino-serving-bench-") as folder:
            worker.call({"id": "hello", "type": "hello", "protocol": PROTOCOL_VERSION}, 120)
            started = time.monotonic()
            result["load"] = worker.call({"id": "load", "type": "load", "model": model}, 1800)
            result["loadS"] = time.monotonic() - started
            ttfs = spec["ttfs"]
            log("warm-up generation at the time-to-first-step shape")
            warm = worker.next_id("warm")
            worker.call({"id": warm, "type": "generate", "job": _job(ttfs["job"], folder, warm)}, 1800)
            result["timeToFirstStep"] = {
                "newPrompt": time_to_first_step(worker, ttfs["job"], int(ttfs["runs"]), folder, distinct=True),
                "cachedPrompt": time_to_first_step(worker, ttfs["job"], int(ttfs["runs"]), folder, distinct=False),
            }
            result["throughput"] = [
                throughput(worker, case["job"], int(case["rounds"]), int(case["batch"]), folder)
                for case in spec.get("throughput", [])
            ]
    finally:
        worker.close()
    import torch

    result["environment"] = environment(torch.device(device))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kino_engine.serving_bench")
    parser.add_argument("--spec", help="the spec as a JSON file (default: stdin)")
    args = parser.parse_args(argv)
    return answer(lambda: run(read_spec(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
