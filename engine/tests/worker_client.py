"""A test client for the real worker process: a socketpair on fd 3, every request sent and every
message received validated against src/protocol/engine.schema.json (Draft 2020-12)."""

from __future__ import annotations

import subprocess
import tempfile
from typing import Any

from conftest import engine_env
from jsonschema import Draft202012Validator
from kino_engine.worker_pipe import WorkerPipe


class WorkerProcess:
    def __init__(self, schema: dict):
        self.request_validator = Draft202012Validator(schema["request"])
        self.message_validator = Draft202012Validator(schema["message"])
        self.result_validators = {k: Draft202012Validator(v) for k, v in schema["results"].items()}
        self.messages: list[dict] = []  # every message received, in order
        self._types: dict[str, str] = {}  # request id -> type, to pick the result schema
        self.stderr = tempfile.TemporaryFile()
        self.stdout = tempfile.TemporaryFile()
        # The worker's end is fd 3 exactly, as Node arranges it (the engine's own client starts it).
        self.pipe = WorkerPipe(engine_env(), stdout=self.stdout, stderr=self.stderr)
        self.socket = self.pipe.socket
        self.process = self.pipe.process

    # ---- sending ----

    def send(self, request: dict, *, valid: bool = True) -> None:
        if valid:
            errors = list(self.request_validator.iter_errors(request))
            assert not errors, f"the test sent a request the schema refuses: {errors[0].message}"
            self._types[request["id"]] = request["type"]
        self.pipe.send(request)

    def send_raw(self, data: bytes) -> None:
        self.pipe.send_raw(data)

    # ---- receiving ----

    def receive(self, timeout: float = 30.0) -> dict:
        try:
            _, message = self.pipe.receive(timeout)
        except (TimeoutError, ConnectionError) as exc:
            raise AssertionError(f"{exc}; stderr:\n{self.stderr_text()}") from None
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
