"""`python -m kino_engine.worker`: serves the engine protocol on file descriptor 3.

Contract:
- `KINO_PROMPT_CACHE_BYTES` sets the byte budget of the prompt-embedding cache (default 512 MiB).
- The descriptor is `KINO_PROTOCOL_FD` (default 3): one bidirectional unix socket (Node's extra
  stdio 'pipe' is a socketpair). Newline-delimited JSON both ways; see protocol.py.
- A reader thread reads requests. `cancel` is answered at once from that thread (`{cancelled}`:
  True if the target generate, or job of a generate_batch, queued or running, will end with
  CANCELLED). `shutdown` cancels the
  running and queued jobs at once, then is answered, in order, after them; the process exits 0.
  Every other request runs in arrival order on the main thread and gets exactly one `result` or
  `error`, after any number of `event`s with its id. A `generate_batch` answers each of its jobs
  under the job's own id the same way (as soon as that job ends), then itself.
- A line that is not a valid request is answered with BAD_REQUEST (id "?" when it has no usable id)
  and the worker carries on.
- End of stream on the descriptor: the running job is cancelled and the process exits 0.
- Failures: the traceback goes to stderr (the control plane keeps its tail), the answer carries the
  code; after a failed or cancelled job device memory is released.
- fd 1 is pointed at stderr, so whatever libraries print ends up in the same log and never near
  the protocol; kino's own logging goes to stderr.

It knows nothing about models: it moves requests to engine.Engine and answers back.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import traceback
from functools import partial
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .cancel import CancelToken
from .protocol import (
    UNKNOWN_REQUEST_ID,
    CancelRequest,
    Channel,
    ClearCacheRequest,
    EngineFailure,
    GenerateBatchRequest,
    GenerateRequest,
    HelloRequest,
    LoadRequest,
    PrewarmRequest,
    ProbeRequest,
    Request,
    ShutdownRequest,
    decode_line,
    error_message,
    event_message,
    parse_request,
    request_id_of,
    result_message,
)
from .runtime.memory import free_device_memory

if TYPE_CHECKING:
    from .batch import Answer
    from .engine import Engine

log = logging.getLogger("kino_engine.worker")

_EOF = object()


@dataclass
class _Queued:
    request: Request
    token: CancelToken
    #: A generate_batch's: one token per job, in order.
    job_tokens: list[CancelToken] = field(default_factory=list)


class Worker:
    """Serves one channel with one engine until shutdown or end of stream."""

    def __init__(self, channel: Channel, engine: Engine):
        self.channel = channel
        self.engine = engine
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._jobs: dict[str, CancelToken] = {}  # generate ids and batch job ids, queued or running
        self._stopping = False

    # ---- sending ----

    def _send(self, message: Mapping[str, Any]) -> None:
        try:
            self.channel.send(message)
        except ValueError as exc:  # not JSON (NaN, an odd type): a bug in the engine
            log.exception("could not serialize a %s message", message.get("type"))
            if message.get("type") == "result":  # an event is dropped; a result becomes an error
                failure = EngineFailure("INTERNAL", f"the engine produced an invalid result: {exc}")
                self._send(error_message(str(message["id"]), failure))
        except OSError as exc:
            log.warning("the control plane is gone (%s); dropping a message", exc)

    def _emitter(self, request_id: str) -> Callable[[Mapping[str, Any]], None]:
        return lambda event: self._send(event_message(request_id, event))

    # ---- the reader thread ----

    def _read_loop(self) -> None:
        try:
            while True:
                line = self.channel.read_line()
                if line is None:
                    break
                try:
                    self._accept(line)
                except Exception:  # never let the reader die: the main thread would wait forever
                    log.exception("handling a request line failed")
        except OSError as exc:
            log.warning("reading the protocol descriptor failed: %s", exc)
        finally:
            self._stop_everything()
            self._queue.put(_EOF)

    def _accept(self, line: bytes) -> None:
        obj: Any = None
        try:
            obj = decode_line(line)
            request = parse_request(obj)
        except EngineFailure as failure:
            log.warning("bad request: %s", failure.message)
            self._send(error_message(request_id_of(obj) or UNKNOWN_REQUEST_ID, failure))
            return
        except Exception as exc:  # a bug in parsing: answer INTERNAL under the request's id
            log.exception("parsing a request failed")
            failure = EngineFailure("INTERNAL", f"parsing the request failed: {type(exc).__name__}: {exc}")
            self._send(error_message(request_id_of(obj) or UNKNOWN_REQUEST_ID, failure))
            return
        if isinstance(request, CancelRequest):
            with self._lock:
                token = self._jobs.get(request.target)
            cancelled = token is not None and token.request()
            log.info("cancel %s: %s", request.target, "honoured" if cancelled else "nothing to cancel")
            self._send(result_message(request.id, {"cancelled": cancelled}))
            return
        item = _Queued(request, CancelToken())
        if isinstance(request, GenerateRequest):
            with self._lock:
                self._jobs[request.id] = item.token
        if isinstance(request, GenerateBatchRequest) and not self._register_batch(request, item):
            return
        if isinstance(request, ShutdownRequest):
            self._stop_everything()
        self._queue.put(item)

    def _register_batch(self, request: GenerateBatchRequest, item: _Queued) -> bool:
        """Gives each job of the batch a cancel token under its id; refuses ids already in flight."""
        with self._lock:
            clash = next((k for k, job in enumerate(request.jobs) if job.id in self._jobs), None)
            if clash is None:
                item.job_tokens = [CancelToken() for _ in request.jobs]
                self._jobs.update({job.id: token for job, token in zip(request.jobs, item.job_tokens)})
        if clash is not None:
            name = f"jobs.{clash}.id"
            failure = EngineFailure(
                "BAD_REQUEST", f"{name}: {request.jobs[clash].id!r} is the id of a job in flight", field=name
            )
            self._send(error_message(request.id, failure))
        return clash is None

    def _stop_everything(self) -> None:
        with self._lock:
            self._stopping = True
            tokens = list(self._jobs.values())
        for token in tokens:
            token.request()

    # ---- the main thread ----

    def serve(self) -> int:
        """Run until shutdown or end of stream; returns the process exit status."""
        threading.Thread(target=self._read_loop, name="kino-protocol-reader", daemon=True).start()
        while True:
            item = self._queue.get()
            if item is _EOF:
                log.info("end of stream on the protocol descriptor: exiting")
                return 0
            request = item.request
            if isinstance(request, ShutdownRequest):
                self._send(result_message(request.id, {}))
                log.info("shutdown")
                return 0
            self._execute(request, item)

    def _execute(self, request: Request, item: _Queued) -> None:
        log.info("%s %s", request.type, request.id)
        failed = False
        try:
            with self._lock:
                stopping = self._stopping
            if stopping and not isinstance(request, (GenerateRequest, GenerateBatchRequest)):
                raise EngineFailure("CANCELLED", f"{request.type} skipped: the engine is shutting down")
            result = self._dispatch(request, item)
        except EngineFailure as failure:
            failed = True
            self._forget(request.id)
            self._report(request.id, failure)
        except Exception as exc:  # a bug in the worker itself; the engine classifies its own
            failed = True
            self._forget(request.id)
            self._report(request.id, EngineFailure("INTERNAL", f"{type(exc).__name__}: {exc}"), exc)
        else:
            self._forget(request.id)
            self._send(result_message(request.id, result))
            # A batch whose jobs did not all complete may have left memory behind (an OOM in a decode).
            if isinstance(request, GenerateBatchRequest):
                failed = any(job["status"] != "completed" for job in result["jobs"])
        finally:
            self._forget(request.id)
            for job in request.jobs if isinstance(request, GenerateBatchRequest) else ():
                self._forget(job.id)  # answered already (the engine settles each); never left to clash
        if failed:
            # Outside the except blocks: the failure's traceback (and the tensors its frames held)
            # is gone, so the memory can actually be returned.
            free_device_memory()

    def _forget(self, request_id: str) -> None:
        # Before the answer goes out: a cancel that arrives after it must find nothing to cancel.
        with self._lock:
            self._jobs.pop(request_id, None)

    def _settle(self, request_id: str, answer: Answer) -> None:
        """Answers one job of a batch, as `_execute` answers a request."""
        self._forget(request_id)
        if isinstance(answer, EngineFailure):
            self._report(request_id, answer)
        else:
            self._send(result_message(request_id, answer))

    def _report(self, request_id: str, failure: EngineFailure, exc: BaseException | None = None) -> None:
        if failure.code == "CANCELLED":
            log.info("%s cancelled (%s)", request_id, failure.message)
        else:
            cause = exc or failure.__cause__ or failure
            print(f"kino-engine: request {request_id} failed with {failure.code}:", file=sys.stderr)
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
            sys.stderr.flush()
        self._send(error_message(request_id, failure))

    def _dispatch(self, request: Request, item: _Queued) -> dict[str, Any]:
        from .batch import BatchMember

        emit = self._emitter(request.id)
        token = item.token
        if isinstance(request, HelloRequest):
            return self.engine.hello(request)
        if isinstance(request, LoadRequest):
            return self.engine.load(request.model, emit)
        if isinstance(request, GenerateRequest):
            return self.engine.generate(request.job, emit, token)
        if isinstance(request, GenerateBatchRequest):
            members = [
                BatchMember(job.id, job.job, self._emitter(job.id), job_token, partial(self._settle, job.id))
                for job, job_token in zip(request.jobs, item.job_tokens)
            ]
            return self.engine.generate_batch(members)
        if isinstance(request, ClearCacheRequest):
            return self.engine.clear_cache()
        if isinstance(request, ProbeRequest):
            return self.engine.probe(request.quick, emit)
        if isinstance(request, PrewarmRequest):
            return self.engine.prewarm(request.job, request.jobs)
        raise EngineFailure("BAD_REQUEST", f"{request.type} cannot be queued", field="type")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main() -> int:
    fd = int(os.environ.get("KINO_PROTOCOL_FD", "3"))
    # Anything printed to stdout (libraries do) goes to stderr, the log the control plane keeps.
    sys.stdout.flush()
    os.dup2(2, 1)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="kino-engine %(levelname)s %(message)s")
    try:
        channel = Channel.from_fd(fd)
    except OSError as exc:
        log.error("protocol descriptor %d is not open (%s): start the worker through kino", fd, exc)
        return 2
    _quiet_libraries()
    from .engine import Engine
    from .system import configure_cpu_threads

    threads = configure_cpu_threads()
    log.info("engine ready on fd %d (pid %d, %d CPU threads)", fd, os.getpid(), threads)
    cache_bytes = os.environ.get("KINO_PROMPT_CACHE_BYTES")
    engine = Engine() if cache_bytes is None else Engine(prompt_cache_bytes=int(cache_bytes))
    return Worker(channel, engine).serve()


if __name__ == "__main__":
    sys.exit(main())
