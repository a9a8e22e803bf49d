"""A test client for the real worker process: a socketpair on fd 3, every request sent and every
message received validated against src/protocol/engine.schema.json (Draft 2020-12)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from conftest import engine_env
from jsonschema import Draft202012Validator

PROTOCOL_FD = 3


class WorkerProcess:
    def __init__(self, schema: dict):
        self.request_validator = Draft202012Validator(schema["request"])
        self.message_validator = Draft202012Validator(schema["message"])
        self.result_validators = {k: Draft202012Validator(v) for k, v in schema["results"].items()}
        self.messages: list[dict] = []  # every message received, in order
        self._types: dict[str, str] = {}  # request id -> type, to pick the result schema
        self._buffer = b""
        ours, theirs = socket.socketpair()
        self.socket = ours
        self.stderr = tempfile.TemporaryFile()
        self.stdout = tempfile.TemporaryFile()
        # The worker's end must be fd 3 exactly, as Node arranges it: a small launcher moves it there
        # (dup2 leaves it inheritable) and execs the worker, with nothing else of ours open.
        child_fd = theirs.fileno()
        launcher = (
            "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
            "os.execv(sys.executable, [sys.executable, '-m', 'kino_engine.worker'])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", launcher, str(child_fd)],
            env=engine_env(KINO_PROTOCOL_FD=str(PROTOCOL_FD)),
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            stderr=self.stderr,
            pass_fds=(child_fd,),
        )
        theirs.close()

    # ---- sending ----

    def send(self, request: dict, *, valid: bool = True) -> None:
        if valid:
            errors = list(self.request_validator.iter_errors(request))
            assert not errors, f"the test sent a request the schema refuses: {errors[0].message}"
            self._types[request["id"]] = request["type"]
        self.send_raw(json.dumps(request).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.socket.sendall(data)

    # ---- receiving ----

    def receive(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no message from the worker within {timeout}s; stderr:\n{self.stderr_text()}"
            self.socket.settimeout(remaining)
            chunk = self.socket.recv(1 << 16)
            assert chunk, f"the worker closed the protocol socket; stderr:\n{self.stderr_text()}"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        self._validate(message)
        self.messages.append(message)
        return message

    def _validate(self, message: dict) -> None:
        errors = list(self.message_validator.iter_errors(message))
        assert not errors, f"the worker sent a message the schema refuses ({errors[0].message}): {message}"
        if message["type"] == "result" and message["id"] in self._types:
            kind = self._types[message["id"]]
            errors = list(self.result_validators[kind].iter_errors(message["result"]))
            assert not errors, f"the {kind} result breaks its schema ({errors[0].message}): {message['result']}"

    def answer(self, request_id: str, timeout: float = 60.0) -> tuple[dict, list[dict]]:
        """The result or error for `request_id`, and the events it streamed before it."""
        events: list[dict] = []
        while True:
            message = self.receive(timeout)
            if message["id"] != request_id:
                raise AssertionError(f"a message for another request arrived while waiting for {request_id}: {message}")
            if message["type"] == "event":
                events.append(message["event"])
            else:
                return message, events

    def request(self, request: dict, timeout: float = 60.0) -> tuple[dict, list[dict]]:
        self.send(request)
        return self.answer(request["id"], timeout)

    # ---- lifecycle ----

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def stdout_text(self) -> str:
        self.stdout.seek(0)
        return self.stdout.read().decode(errors="replace")

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def load_request(request_id: str, path: str) -> dict:
    return {
        "type": "load",
        "id": request_id,
        "model": {"name": "tiny", "source": {"kind": "checkpoint", "path": path}, "device": "cpu", "dtype": "float32"},
    }


def generate_request(request_id: str, **job: Any) -> dict:
    spec = {
        "prompt": "a red car on the beach",
        "negativePrompt": "blurry",
        "width": 64,
        "height": 48,
        "frames": 5,
        "steps": 3,
        "guidance": 5.0,
        "shift": None,
        "seed": 0,
        "fps": None,
        "output": {"video": None, "framesDir": None},
    }
    spec.update(job)
    return {"type": "generate", "id": request_id, "job": spec}


def generate_batch_request(request_id: str, jobs: list[tuple[str, dict[str, Any]]]) -> dict:
    """A generate_batch of jobs (job id, JobSpec fields over generate_request's defaults)."""
    return {
        "type": "generate_batch",
        "id": request_id,
        "jobs": [{"id": job_id, "job": generate_request(job_id, **fields)["job"]} for job_id, fields in jobs],
    }
