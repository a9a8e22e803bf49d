"""A client of the real engine worker process, for tools that drive it as the control plane does.

The worker (`python -m kino_engine.worker`) is started with its end of a socketpair as file descriptor
3, exactly as Node arranges it (an extra stdio 'pipe'), and spoken to in newline-delimited JSON both
ways. Each message is returned with the client's monotonic time of its arrival, which is what the
serving figures are made of (serving_bench.py). `shutdown` ends the worker through the protocol and
kills it only when it does not exit.

It knows nothing of what the requests mean beyond ids, `event`/`result`/`error` and `shutdown`: no
validation (the engine's tests add the protocol's JSON Schema on top, tests/worker_client.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .protocol import EngineFailure

#: The descriptor the worker reads its protocol on (KINO_PROTOCOL_FD), as the control plane passes it.
PROTOCOL_FD = 3

#: The engine's folder: put on the worker's PYTHONPATH, since the engine is never pip-installed.
ENGINE_DIR = Path(__file__).resolve().parent.parent

#: Moves the inherited socket to fd 3 (dup2 leaves it inheritable) and execs the worker, with nothing
#: else of ours open in it.
_LAUNCHER = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
    "os.execv(sys.executable, [sys.executable, '-m', 'kino_engine.worker'])"
)

Arrival = tuple[float, dict[str, Any]]
Output = int | IO[Any] | None


class WorkerGone(ConnectionError):
    """The worker closed its end of the protocol socket (it exited or crashed)."""


def worker_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the engine importable and output unbuffered."""
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{ENGINE_DIR}{os.pathsep}{path}" if path else str(ENGINE_DIR)
    env.update(PYTHONUNBUFFERED="1", KINO_PROTOCOL_FD=str(PROTOCOL_FD))
    return env


class WorkerPipe:
    """One worker process and our end of its protocol socket."""

    def __init__(self, env: Mapping[str, str] | None = None, stdout: Output = subprocess.DEVNULL, stderr: Output = None):
        """Starts the worker; `stdout`/`stderr` as subprocess takes them (stderr default: ours)."""
        ours, theirs = socket.socketpair()
        self.socket = ours
        self._buffer = b""
        self._counter = 0
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(theirs.fileno())],
                env=worker_env(env), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def next_id(self, prefix: str) -> str:
        """A request id not used before by this client: "<prefix>-<n>"."""
        self._counter += 1
        return f"{prefix}-{self._counter}"

    def send(self, request: Mapping[str, Any]) -> float:
        """Writes one request; returns the monotonic time it was written."""
        return self.send_raw(json.dumps(request).encode() + b"\n")

    def send_raw(self, data: bytes) -> float:
        sent = time.monotonic()
        self.socket.sendall(data)
        return sent

    def receive(self, timeout: float) -> Arrival:
        """(arrival time, message), waiting at most `timeout` seconds.

        Raises TimeoutError when nothing complete arrives in time, WorkerGone at end of stream."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message from the worker within {timeout:.0f} s")
            self.socket.settimeout(remaining)
            try:
                chunk = self.socket.recv(1 << 16)
            except socket.timeout:
                continue  # the deadline check above raises
            if not chunk:
                raise WorkerGone(f"the worker closed its protocol socket (exit status {self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return time.monotonic(), json.loads(line)

    def until_answered(self, ids: set[str], timeout: float) -> dict[str, list[Arrival]]:
        """Every message for `ids` until each has its result; `timeout` is per message.

        A message for another id is passed over (a batch's own summary, answered after its jobs).
        An error for one of `ids` raises it as the EngineFailure it reports (code, phase, field)."""
        seen: dict[str, list[Arrival]] = {i: [] for i in ids}
        open_ids = set(ids)
        while open_ids:
            arrived, message = self.receive(timeout)
            target = message.get("id")
            if target not in seen:
                continue
            seen[target].append((arrived, message))
            if message["type"] == "error":
                error = message["error"]
                raise EngineFailure(error["code"], f"{target}: {error['message']}", error.get("phase"), error.get("field"))
            if message["type"] == "result":
                open_ids.discard(target)
        return seen

    def call(self, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Sends `request` and returns its result (its events are dropped)."""
        self.send(request)
        return self.until_answered({request["id"]}, timeout)[request["id"]][-1][1]["result"]

    def shutdown(self, timeout: float = 60.0) -> int:
        """Asks the worker to shut down (it cancels what runs), waits for it, kills it if it does not
        exit in `timeout` seconds; returns its exit status. Safe to call again."""
        if self.process.poll() is None and self.socket.fileno() != -1:
            try:
                self.send({"id": "shutdown", "type": "shutdown"})
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass  # a dead socket or a stuck worker: killed below
        if self.process.poll() is None:
            self.process.kill()
        status = self.process.wait()
        self.socket.close()
        return status
