"""The worker's request handling in-process, over a socketpair, with a scripted engine: ordering,
cancellation of queued jobs, and what happens to messages that cannot be serialized."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Iterator

import pytest
from jsonschema import Draft202012Validator
from worker_client import generate_request

from kino_engine.cancel import CancelToken
from kino_engine.protocol import Channel, EngineFailure, step_event
from kino_engine.worker import Worker


class ScriptedEngine:
    """Generates by sleeping in steps; `hello` answers a NaN when asked for protocol 2."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def hello(self, request: Any) -> dict:
        return {"value": float("nan")} if request.protocol == 2 else {"protocol": 1}

    def load(self, spec: Any, emit: Any) -> dict:
        raise AssertionError("not used")

    def generate(self, job: Any, emit: Any, cancel: CancelToken) -> dict:
        if cancel.is_cancelled():
            raise EngineFailure("CANCELLED", "cancelled before it started")
        self.started.append(job.prompt)
        emit(step_event(1, 2, float("nan"), None, 1))  # unserializable: must be dropped, not answered
        for i in range(job.steps):
            if cancel.is_cancelled():
                raise EngineFailure("CANCELLED", f"cancelled before step {i + 1}", phase="denoise")
            time.sleep(0.01)
        cancel.close()
        return {"prompt": job.prompt}


class Peer:
    """The control plane's end: one buffered reader for the whole test (lines must not be lost)."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(20)
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.received: list[dict] = []

    def send(self, *requests: dict) -> None:
        self.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))

    def read(self, count: int) -> list[dict]:
        messages = [json.loads(self.reader.readline()) for _ in range(count)]
        self.received.extend(messages)
        return messages


@pytest.fixture
def served(schema: dict) -> Iterator[tuple[Peer, ScriptedEngine]]:
    ours, theirs = socket.socketpair()
    engine = ScriptedEngine()
    worker = Worker(Channel.from_fd(theirs.detach()), engine)  # type: ignore[arg-type]
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(worker.serve()), daemon=True)
    thread.start()
    peer = Peer(ours)
    yield peer, engine
    peer.reader.close()
    ours.close()
    thread.join(10)
    assert status == [0], "the worker must return 0 at end of stream"
    validator = Draft202012Validator(schema["message"])
    for message in peer.received:
        validator.validate(message)


def test_cancel_of_a_queued_job_skips_it(served) -> None:
    peer, engine = served
    peer.send(
        generate_request("running", prompt="first", steps=300),
        generate_request("queued", prompt="second", steps=3),
        {"type": "cancel", "id": "c", "target": "queued"},
    )
    messages = peer.read(1)
    assert messages[0] == {"type": "result", "id": "c", "result": {"cancelled": True}}, (
        "cancel must be answered at once by the reader thread, even while a job runs"
    )
    by_id = {m["id"]: m for m in peer.read(2)}
    assert by_id["running"]["type"] == "result", "cancelling another job must not touch the running one"
    assert by_id["queued"]["error"]["code"] == "CANCELLED"
    assert engine.started == ["first"], "a job cancelled while queued must never start"


def test_unserializable_messages(served) -> None:
    peer, _ = served
    peer.send({"type": "hello", "id": "nan", "protocol": 2}, generate_request("g", prompt="p", steps=1))
    first, second = peer.read(2)
    assert first["type"] == "error" and first["error"]["code"] == "INTERNAL", (
        f"a result that is not JSON must become an INTERNAL error, not a broken line: {first}"
    )
    assert second == {"type": "result", "id": "g", "result": {"prompt": "p"}}, (
        f"an unserializable event must be dropped, leaving exactly one answer: {second}"
    )
