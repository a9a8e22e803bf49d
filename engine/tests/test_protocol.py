"""Parsing requests into typed, checked dataclasses, and the Python side's agreement with the schema."""

from __future__ import annotations

import copy
import io
import json

import pytest
from jsonschema import Draft202012Validator
from worker_client import generate_batch_request, generate_request, load_request

from kino_engine.cancel import CancelToken
from kino_engine.protocol import (
    DTYPES,
    ERROR_CODES,
    PHASES,
    PROTOCOL_VERSION,
    Channel,
    BATCH_SHAPE_FIELDS,
    EngineFailure,
    GenerateBatchRequest,
    GenerateRequest,
    JobSpec,
    LoadRequest,
    RandomSource,
    decode_line,
    error_message,
    event_message,
    load_event,
    log_event,
    parse_request,
    phase_event,
    result_message,
    step_event,
)

RANDOM_LOAD = {
    "type": "load",
    "id": "r",
    "model": {
        "name": "wan-random",
        "source": {
            "kind": "random",
            "seed": 1,
            "architecture": {
                "family": "wan2.1-t2v",
                "transformer": {"num_layers": 2},
                "vae": {},
                "textEncoder": {"d_model": 8},
                "scheduler": {"className": "UniPCMultistepScheduler", "config": {"flow_shift": 3.0}},
                "tokenizerVocabSize": 100,
            },
        },
        "device": "cpu",
        "dtype": "bfloat16",
    },
}


def _bad(obj: dict) -> EngineFailure:
    with pytest.raises(EngineFailure) as caught:
        parse_request(obj)
    assert caught.value.code == "BAD_REQUEST"
    return caught.value


def test_codes_phases_and_version_match_the_schema(schema: dict) -> None:
    error_schema = next(s for s in schema["message"]["oneOf"] if s["properties"]["type"]["const"] == "error")
    error_props = error_schema["properties"]["error"]["properties"]
    assert list(ERROR_CODES) == error_props["code"]["enum"], "engine.ts's error codes changed: update protocol.py"
    assert list(PHASES) == error_props["phase"]["anyOf"][0]["enum"], "engine.ts's phases changed: update protocol.py"
    assert PROTOCOL_VERSION == schema["protocol"], "protocol version differs from engine.schema.json"
    load_schema = next(s for s in schema["request"]["oneOf"] if s["properties"]["type"]["const"] == "load")
    assert list(DTYPES) == load_schema["properties"]["model"]["properties"]["dtype"]["enum"]


def test_valid_requests_parse_into_typed_objects(schema: dict) -> None:
    validator = Draft202012Validator(schema["request"])
    generate = generate_request("g", shift=5, fps=24, guidance=1)
    for obj in (generate, load_request("l", "/x"), RANDOM_LOAD):
        validator.validate(obj)
    job = parse_request(generate)
    assert isinstance(job, GenerateRequest) and isinstance(job.job, JobSpec)
    assert (job.job.shift, job.job.fps, job.job.guidance) == (5.0, 24.0, 1.0)
    assert isinstance(job.job.guidance, float), "integral JSON numbers must become floats where floats are meant"
    load = parse_request(RANDOM_LOAD)
    assert isinstance(load, LoadRequest) and isinstance(load.model.source, RandomSource)
    arch = load.model.source.architecture
    assert arch.text_encoder["d_model"] == 8 and arch.scheduler.config["flow_shift"] == 3.0
    with pytest.raises(TypeError):
        arch.transformer["num_layers"] = 3  # type: ignore[index]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["job"].update(width=0), "job.width"),
        (lambda r: r["job"].update(frames=2.5), "job.frames"),
        (lambda r: r["job"].update(steps=True), "job.steps"),
        (lambda r: r["job"].update(shift=0), "job.shift"),
        (lambda r: r["job"].update(guidance=-1), "job.guidance"),
        (lambda r: r["job"].update(seed=-1), "job.seed"),
        (lambda r: r["job"].pop("negativePrompt"), "job.negativePrompt"),
        (lambda r: r["job"]["output"].update(video=""), "job.output.video"),
        (lambda r: r["job"]["output"].pop("framesDir"), "job.output.framesDir"),
        (lambda r: r.update(id=""), "id"),
        (lambda r: r.update(id="x" * 129), "id"),
    ],
)
def test_bad_generate_fields_are_named(mutate, field: str) -> None:
    request = generate_request("g")
    mutate(request)
    assert _bad(request).field == field


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("model", "device"), "tpu", "model.device"),
        (("model", "dtype"), "int8", "model.dtype"),
        (("model", "source", "kind"), "s3", "model.source.kind"),
        (("model", "source", "seed"), -2, "model.source.seed"),
        (("model", "source", "architecture", "family"), "ltx", "model.source.architecture.family"),
        (("model", "source", "architecture", "vae"), [], "model.source.architecture.vae"),
        (("model", "source", "architecture", "tokenizerVocabSize"), 0, "model.source.architecture.tokenizerVocabSize"),
        (("model", "source", "architecture", "scheduler", "className"), 3,
         "model.source.architecture.scheduler.className"),
    ],
)
def test_bad_load_fields_are_named(path: tuple[str, ...], value, field: str) -> None:
    request = copy.deepcopy(RANDOM_LOAD)
    target = request
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert _bad(request).field == field


def test_a_batch_parses_into_its_jobs(schema: dict) -> None:
    tiled = {"mode": "tiled", "tile": 64}
    jobs = [("j0", {"seed": 1, "prompt": "a"}), ("j1", {"seed": 2, "fps": 8, "vaeDecode": tiled})]
    request = generate_batch_request("b", jobs)
    Draft202012Validator(schema["request"]).validate(request)
    batch = parse_request(request)
    assert isinstance(batch, GenerateBatchRequest) and [j.id for j in batch.jobs] == ["j0", "j1"]
    assert [j.job.seed for j in batch.jobs] == [1, 2] and batch.jobs[1].job.fps == 8.0, (
        "seeds, prompts, fps and decode modes are each job's own"
    )
    batch_schema = next(s for s in schema["request"]["oneOf"] if s["properties"]["type"]["const"] == "generate_batch")
    job_fields = batch_schema["properties"]["jobs"]["items"]["properties"]["job"]["properties"]
    assert set(BATCH_SHAPE_FIELDS) <= set(job_fields), "a batch shape field is not a JobSpec field in engine.ts"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 80}, "jobs.1.job.width"),
        ({"height": 64}, "jobs.1.job.height"),
        ({"frames": 9}, "jobs.1.job.frames"),
        ({"steps": 4}, "jobs.1.job.steps"),
        ({"guidance": 4.0}, "jobs.1.job.guidance"),
        ({"shift": 3.0}, "jobs.1.job.shift"),
        ({"cfg": "sequential"}, "jobs.1.job.cfg"),
        ({"width": -5}, "jobs.1.job.width"),  # a job's own check comes first, named under its place
    ],
)
def test_a_batch_of_mismatched_shapes_is_refused_naming_the_field(fields: dict, field: str) -> None:
    failure = _bad(generate_batch_request("b", [("j0", {}), ("j1", fields)]))
    assert failure.field == field, f"{fields} must be refused naming {field}, got {failure.field}: {failure.message}"
    if fields.get("width") != -5:
        assert "share one denoising loop" in failure.message, failure.message


def test_malformed_batches_are_refused_naming_the_field() -> None:
    assert _bad({"id": "b", "type": "generate_batch", "jobs": []}).field == "jobs"
    assert _bad({"id": "b", "type": "generate_batch", "jobs": {"j": {}}}).field == "jobs"
    assert _bad(generate_batch_request("b", [("j0", {}), ("j0", {})])).field == "jobs.1.id"
    assert _bad(generate_batch_request("b", [("b", {})])).field == "jobs.0.id", "a job's id must differ from the batch's"
    missing = generate_batch_request("b", [("j0", {})])
    del missing["jobs"][0]["job"]
    assert _bad(missing).field == "jobs.0.job"


def test_other_malformed_requests() -> None:
    assert _bad({"id": "x", "type": "warp"}).field == "type"
    assert _bad({"id": "x", "type": "hello", "protocol": "1"}).field == "protocol"
    assert _bad({"id": "x", "type": "cancel"}).field == "target"
    assert _bad([1, 2]).field == "request"
    with pytest.raises(EngineFailure, match="not valid JSON"):
        decode_line(b"{nope\n")


def test_messages_conform_to_the_schema(schema: dict) -> None:
    validator = Draft202012Validator(schema["message"])
    for message in (
        result_message("a", {"cancelled": True}),
        error_message("a", EngineFailure("OOM", "out of memory", phase="denoise", field=None)),
        event_message("a", phase_event("decode", "end", 12.5)),
        event_message("a", step_event(1, 10, 3.2, None, 1024)),
        event_message("a", load_event("vae", 10, 20)),
        event_message("a", log_event("info", "hello")),
    ):
        validator.validate(message)
    with pytest.raises(ValueError):
        EngineFailure("NOT_A_CODE", "x")  # type: ignore[arg-type]


def test_channel_frames_lines_and_refuses_nan() -> None:
    reader = io.BytesIO(b'{"a": 1}\n\n  \n{"b": 2}\n')
    writer = io.BytesIO()
    channel = Channel(reader, writer)
    assert [decode_line(channel.read_line()), decode_line(channel.read_line())] == [{"a": 1}, {"b": 2}]
    assert channel.read_line() is None, "end of stream must read as None"
    channel.send({"x": "é"})
    assert writer.getvalue().endswith(b"\n") and json.loads(writer.getvalue()) == {"x": "é"}
    with pytest.raises(ValueError):
        channel.send({"ms": float("nan")})


def test_cancel_token_answers_truthfully() -> None:
    token = CancelToken()
    assert token.request() and token.is_cancelled()
    assert not token.close(), "close() after a request must report the job as cancelled"
    late = CancelToken()
    assert late.close() and not late.request(), "a cancel after the last cancellation point must answer false"
