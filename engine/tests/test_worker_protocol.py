"""The real worker process (`python -m kino_engine.worker`) speaking the protocol on fd 3: every
request sent and every message received is validated against the checked-in JSON Schema."""

from __future__ import annotations

import base64

import json
import time
from pathlib import Path
from typing import Iterator

import av
import pytest
from worker_client import WorkerProcess, generate_request, load_request


@pytest.fixture(scope="module")
def worker(schema: dict) -> Iterator[WorkerProcess]:
    """One worker for the tests that load and generate; each test loads what it needs."""
    process = WorkerProcess(schema)
    yield process
    process.close()


def _phases(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["phase"], e["state"]) for e in events if e["kind"] == "phase"]


def _error(message: dict) -> dict:
    assert message["type"] == "error", f"expected an error, got {message}"
    return message["error"]


def test_fresh_worker_refuses_what_it_cannot_do_and_keeps_serving(schema: dict, tiny_checkpoint: Path) -> None:
    process = WorkerProcess(schema)
    try:
        error = _error(process.request({"type": "hello", "id": "h0", "protocol": 999})[0])
        assert error["code"] == "UNSUPPORTED_PROTOCOL" and error["field"] == "protocol", (
            f"a protocol mismatch must be refused by hello: {error}"
        )
        hello, _ = process.request({"type": "hello", "id": "h1", "protocol": 1})
        assert hello["type"] == "result" and hello["result"]["protocol"] == 1
        assert hello["result"]["encoder"]["h264"] is True, "libx264 is in this environment's PyAV; hello must say so"

        error = _error(process.request(generate_request("g0"))[0])
        assert error["code"] == "MODEL_NOT_LOADED", f"generate before load must say so: {error}"

        process.send_raw(b"this is not json\n")
        error = _error(process.answer("?")[0])
        assert error["code"] == "BAD_REQUEST", f"a non-JSON line must be answered BAD_REQUEST under id '?': {error}"

        process.send({"type": "teleport", "id": "t1"}, valid=False)
        error = _error(process.answer("t1")[0])
        assert (error["code"], error["field"]) == ("BAD_REQUEST", "type"), f"unknown request types: {error}"

        bad = generate_request("g1", width=-5)
        process.send(bad, valid=False)
        error = _error(process.answer("g1")[0])
        assert (error["code"], error["field"]) == ("BAD_REQUEST", "job.width"), f"the field must be named: {error}"

        error = _error(process.request(generate_request("g2"))[0])
        assert error["code"] == "MODEL_NOT_LOADED", "the worker must keep serving after malformed requests"

        cuda = load_request("l0", str(tiny_checkpoint))
        cuda["model"]["device"] = "cuda"
        error = _error(process.request(cuda)[0])
        assert (error["code"], error["field"]) == ("DEVICE_UNAVAILABLE", "model.device"), (
            f"cuda on a machine without it must be DEVICE_UNAVAILABLE: {error}"
        )

        shutdown, _ = process.request({"type": "shutdown", "id": "s"})
        assert shutdown == {"type": "result", "id": "s", "result": {}}
        assert process.wait() == 0, "shutdown must exit with status 0"
        assert process.stdout_text() == "", (
            "the worker's stdout must stay empty (it is pointed at stderr): library prints would land there"
        )
    finally:
        process.close()


def test_load_generate_writes_a_valid_mp4(worker: WorkerProcess, tiny_checkpoint: Path, tmp_path: Path) -> None:
    loaded, events = worker.request(load_request("load-1", str(tiny_checkpoint)))
    assert loaded["type"] == "result", f"loading the tiny checkpoint failed: {loaded}"
    result = loaded["result"]
    assert (result["vaeScaleSpatial"], result["vaeScaleTemporal"], result["fps"]) == (8, 4, 16)
    names = [c["name"] for c in result["components"]]
    assert {"transformer", "vae", "text_encoder"} <= set(names), f"components missing from LoadResult: {names}"
    progress = [e for e in events if e["kind"] == "load"]
    assert progress and progress[-1]["bytes"] == progress[-1]["totalBytes"] > 0, (
        f"load progress must end at its total: {progress}"
    )

    video = tmp_path / "out.mp4"
    frames_dir = tmp_path / "frames"
    answer, events = worker.request(
        generate_request("gen-1", frames=9, width=96, height=64, steps=4, fps=12.0, preview={"every": 3},
                         output={"video": str(video), "framesDir": str(frames_dir)})
    )
    assert answer["type"] == "result", f"generate failed: {answer}"
    result = answer["result"]
    assert (result["frames"], result["width"], result["height"], result["fps"]) == (9, 96, 64, 12.0)
    assert result["peakVramBytes"] is None and result["peakRamBytes"] > 0
    expected = [(p, s) for p in ("text_encode", "denoise", "decode", "encode") for s in ("start", "end")]
    assert _phases(events) == expected, f"phase events out of order: {_phases(events)}"
    steps = [e for e in events if e["kind"] == "step"]
    assert [(s["i"], s["n"]) for s in steps] == [(i, 4) for i in range(1, 5)], "one step event per step, 1-based"
    assert all(s["vramBytes"] is None and s["ramBytes"] > 0 for s in steps)
    previews = [e for e in events if e["kind"] == "preview"]
    assert [(p["i"], p["n"], p["width"], p["height"]) for p in previews] == [(3, 4, 12, 8), (4, 4, 12, 8)], (
        "previews every 3 steps and at the last, at the latents' resolution (96x64 / 8)"
    )
    assert all(base64.b64decode(p["png"]).startswith(b"\x89PNG\r\n\x1a\n") for p in previews)

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p", (
            f"the MP4 must be H.264/yuv420p, got {stream.codec_context.name}/{stream.codec_context.pix_fmt}"
        )
        assert (stream.codec_context.width, stream.codec_context.height) == (96, 64)
        assert float(stream.average_rate) == pytest.approx(12.0), "the job's fps must reach the container"
    assert len(decoded) == 9, f"the MP4 has {len(decoded)} frames, expected 9: the encoder was not flushed"
    assert sorted(p.name for p in frames_dir.iterdir()) == [f"frame_{i:05d}.png" for i in range(9)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "out.mp4"], "temporaries were left behind"


def test_cancel_mid_generation_then_serve_the_next(worker: WorkerProcess, tiny_checkpoint: Path) -> None:
    assert worker.request(load_request("load-2", str(tiny_checkpoint)))[0]["type"] == "result"
    worker.send(generate_request("long", steps=2000, frames=5, width=64, height=48))
    first_step = None
    while first_step is None:
        message = worker.receive()
        assert message["id"] == "long" and message["type"] == "event", f"unexpected {message}"
        if message["event"]["kind"] == "step":
            first_step = message["event"]
    worker.send({"type": "cancel", "id": "c1", "target": "long"})
    answers: dict[str, dict] = {}
    steps_after_cancel = 0
    while len(answers) < 2:
        message = worker.receive()
        if message["type"] == "event":
            steps_after_cancel += 1
        else:
            answers[message["id"]] = message
    assert answers["c1"]["result"] == {"cancelled": True}, f"cancel of a running job: {answers['c1']}"
    error = _error(answers["long"])
    assert (error["code"], error["phase"]) == ("CANCELLED", "denoise"), f"the job must end CANCELLED: {error}"
    assert steps_after_cancel < 50, f"{steps_after_cancel} steps ran after the cancel: it is not checked between steps"

    assert worker.request({"type": "cancel", "id": "c2", "target": "long"})[0]["result"] == {"cancelled": False}, (
        "cancelling a finished job must answer cancelled: false"
    )
    answer, _ = worker.request(generate_request("after-cancel"))
    assert answer["type"] == "result", f"the worker must serve the next generate after a cancel: {answer}"


def test_bad_checkpoint_is_reported_and_unloads(worker: WorkerProcess, tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert worker.request(load_request("load-3", str(tiny_checkpoint)))[0]["type"] == "result"
    missing = tmp_path / "not-a-checkpoint"
    missing.mkdir()
    error = _error(worker.request(load_request("load-bad", str(missing)))[0])
    assert error["code"] == "BAD_CHECKPOINT" and "model_index.json" in error["message"], (
        f"a folder without model_index.json must be BAD_CHECKPOINT naming the file: {error}"
    )
    error = _error(worker.request(generate_request("gen-after-bad"))[0])
    assert error["code"] == "MODEL_NOT_LOADED", "a failed load must leave no model behind (the old one was unloaded)"


def test_invalid_job_geometry_and_unwritable_output(worker: WorkerProcess, tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert worker.request(load_request("load-4", str(tiny_checkpoint)))[0]["type"] == "result"
    error = _error(worker.request(generate_request("odd", frames=6))[0])
    assert (error["code"], error["field"]) == ("BAD_REQUEST", "job.frames"), f"frames must be 4k+1: {error}"
    error = _error(worker.request(generate_request("narrow", width=72))[0])
    assert (error["code"], error["field"]) == ("BAD_REQUEST", "job.width"), f"width must be a multiple of 16: {error}"
    target = tmp_path / "no-such-dir" / "out.mp4"
    started = time.monotonic()
    error = _error(worker.request(generate_request("unwritable", output={"video": str(target), "framesDir": None}))[0])
    assert (error["code"], error["field"]) == ("OUTPUT_UNWRITABLE", "job.output.video"), error
    assert time.monotonic() - started < 5, "an impossible destination must fail before the work, not after"
    assert not target.parent.exists()


def test_shutdown_mid_job_cancels_it_and_exits(schema: dict, tiny_checkpoint: Path) -> None:
    process = WorkerProcess(schema)
    try:
        assert process.request(load_request("l", str(tiny_checkpoint)))[0]["type"] == "result"
        process.send(generate_request("long", steps=2000))
        while not (lambda m: m["type"] == "event" and m["event"]["kind"] == "step")(process.receive()):
            pass
        process.send({"type": "shutdown", "id": "bye"})
        answers = {}
        while len(answers) < 2:
            message = process.receive()
            if message["type"] != "event":
                answers[message["id"]] = message
        assert _error(answers["long"])["code"] == "CANCELLED", "shutdown must cancel the running job"
        assert answers["bye"]["result"] == {}
        assert process.wait() == 0
    finally:
        process.close()


def test_end_of_stream_stops_a_running_job_and_exits_zero(schema: dict, tiny_checkpoint: Path) -> None:
    process = WorkerProcess(schema)
    try:
        assert process.request(load_request("l", str(tiny_checkpoint)))[0]["type"] == "result"
        process.send(generate_request("long", steps=2000))
        process.receive()
        process.socket.close()
        started = time.monotonic()
        assert process.wait(30) == 0, "EOF on the protocol socket must exit with status 0"
        assert time.monotonic() - started < 15, "the running job must stop at EOF, not run its 2000 steps"
    finally:
        process.close()


def test_every_message_of_this_module_was_schema_checked(worker: WorkerProcess) -> None:
    # The client validates as it receives; this guards the guard: it must have seen real traffic.
    kinds = {(m["type"], m.get("event", {}).get("kind")) for m in worker.messages}
    expected = {("result", None), ("error", None), ("event", "phase"), ("event", "step"), ("event", "preview"), ("event", "load")}
    assert expected <= kinds, (
        f"the module's traffic lacks some message kinds, so their validation went untested: {kinds}"
    )
    json.dumps(worker.messages)


def test_prewarm_runs_at_a_batch_shape_and_needs_a_model(schema: dict, tiny_checkpoint: Path) -> None:
    process = WorkerProcess(schema)
    try:
        answer, _ = process.request({"type": "prewarm", "id": "early", "job": generate_request("x")["job"]})
        assert _error(answer)["code"] == "MODEL_NOT_LOADED", answer
        loaded, _ = process.request(load_request("load", str(tiny_checkpoint)))
        assert loaded["type"] == "result", loaded
        job = generate_request("x", preview={"every": 1})["job"]
        answer, _ = process.request({"type": "prewarm", "id": "warm", "job": job, "jobs": 2})
        assert answer["type"] == "result" and answer["result"]["jobs"] == 2 and answer["result"]["ms"] > 0, answer
        after, _ = process.request(generate_request("after", steps=1))
        assert after["type"] == "result", f"the worker must serve on after a prewarm: {after}"
    finally:
        process.close()
