"""Jobs of one shape as one denoising loop (WanT2V.denoise_batch, batch.py, generate_batch), on the tiny
model on the CPU in float32: each job's latents and frames equal the job run alone; each job has its
own events, outputs, result and cancellation; a failure of the loop fails every job, a job's own
failure fails it alone; the batched loop stays free of host syncs; the real worker answers each job
under its own id.

Tolerances (float32): latents within atol 2e-5 + rtol 1e-5 of the job alone (measured 4e-6: only the
GEMMs' batch size differs, so only their rounding can); frames within 1 uint8 level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from worker_client import WorkerProcess, generate_batch_request, load_request

from kino_engine.batch import BatchMember
from kino_engine.cancel import CancelToken
from kino_engine.engine import Engine
from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, EngineFailure, JobOutput, JobSpec, ModelSpec
from kino_engine.runtime.options import RuntimeOptions
from kino_engine.runtime.syncs import SyncDetector

ATOL, RTOL = 2e-5, 1e-5

#: (prompt, negative prompt, seed) of the jobs the tests batch: different in everything a batch allows.
PROMPTS = [("a red car on the beach", "blurry, bad", 3), ("a dog at night", "", 11), ("the cat", "bad", 5)]

_models: dict[str, WanT2V] = {}


def _model(path: Path, cfg: str) -> WanT2V:
    if cfg not in _models:
        spec = ModelSpec("batch", CheckpointSource(str(path)), device="cpu", dtype="float32")
        _models[cfg] = WanT2V.load(spec, runtime=RuntimeOptions(cfg=cfg))  # type: ignore[arg-type]
    return _models[cfg]


def _job(k: int, steps: int = 5, guidance: float = 5.0, output: JobOutput | None = None) -> JobSpec:
    prompt, negative, seed = PROMPTS[k]
    return JobSpec(
        prompt=prompt, negative_prompt=negative, width=80, height=48, frames=9, steps=steps,
        guidance=guidance, shift=None, seed=seed, fps=None, output=output or JobOutput(None, None),
    )


@pytest.mark.parametrize(("cfg", "guidance", "rows_per_job"), [("batched", 5.0, 2), ("sequential", 5.0, 1), ("batched", 1.0, 1)])
def test_each_job_of_a_batch_denoises_as_it_would_alone(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, cfg: str, guidance: float, rows_per_job: int
) -> None:
    model = _model(tiny_checkpoint, cfg)
    jobs = [_job(k, guidance=guidance) for k in range(3)]
    embeds = [model.encode_job(job) for job in jobs]
    batches: list[int] = []
    original = model.transformer.forward
    monkeypatch.setattr(
        model.transformer, "forward", lambda **kw: batches.append(kw["hidden_states"].shape[0]) or original(**kw)
    )
    negatives = [e[1] for e in embeds] if guidance > 1.0 else None
    batched = model.denoise_batch([e[0] for e in embeds], negatives, jobs)  # type: ignore[arg-type]
    forwards_per_step = 2 if cfg == "sequential" else 1
    assert batches == [3 * rows_per_job] * (jobs[0].steps * forwards_per_step), (
        f"cfg={cfg}: the batch ran forwards of batch {batches}, expected {3 * rows_per_job} per forward: "
        "one forward must carry every job's rows"
    )
    monkeypatch.setattr(model.transformer, "forward", original)
    assert batched.shape == (3, *model.latent_shape(jobs[0])[1:])
    for k, job in enumerate(jobs):
        alone = model.denoise(embeds[k][0], embeds[k][1], job)
        assert alone.std() > 0.1, "the latents are flat: the comparison would prove nothing"
        assert torch.allclose(batched[k : k + 1], alone, atol=ATOL, rtol=RTOL), (
            f"job {k} of the batch drifted from the job alone by {(batched[k : k + 1] - alone).abs().max():.3g} "
            f"(cfg={cfg}, guidance={guidance}): rows or embeddings mis-stacked, cond/uncond halves crossed between "
            "jobs, one job's noise seeded with another's seed, or the stepper mixing rows"
        )


def test_the_batched_loop_makes_no_host_syncs_after_the_first_step(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint, "batched")
    jobs = [_job(k) for k in range(2)]
    embeds = [model.encode_job(job) for job in jobs]
    detector = SyncDetector()
    per_step: list[list[str]] = []

    def on_step(i: int, n: int, ms: float) -> None:
        if i == 1:
            detector.__enter__()  # warm-up step done: watch from here on
        else:
            per_step.append(list(detector.syncs))
            detector.syncs.clear()

    try:
        model.denoise_batch([e[0] for e in embeds], [e[1] for e in embeds], jobs, on_step=on_step)  # type: ignore[misc]
    finally:
        detector.__exit__(None, None, None)
    assert len(per_step) == jobs[0].steps - 1 and not any(per_step), (
        f"host-syncing ops inside batched denoising steps: {per_step}: stacking the jobs read a device value "
        "on the host (a per-row index, a .item())"
    )


def test_a_batch_of_jobs_of_different_shapes_is_refused(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint, "batched")
    jobs = [_job(0), _job(1, steps=6)]
    embeds = [model.encode_job(job) for job in jobs]
    with pytest.raises(ValueError, match="steps"):
        model.denoise_batch([e[0] for e in embeds], [e[1] for e in embeds], jobs)  # type: ignore[misc]


# ---- the engine: one answer per job ----


class Recorder:
    """A batch's members with their events and answers, and the order in which they were answered."""

    def __init__(self, jobs: list[JobSpec], on_event: Any = None):
        self.events: list[list[dict]] = [[] for _ in jobs]
        self.answers: list[Any] = [None] * len(jobs)
        self.order: list[tuple[int, int]] = []  # (job, events seen by every job so far) at each answer
        self.members = [
            BatchMember(f"job-{k}", job, self._emit(k, on_event), CancelToken(), self._settle(k))
            for k, job in enumerate(jobs)
        ]

    def _emit(self, k: int, on_event: Any) -> Any:
        def emit(event: dict) -> None:
            self.events[k].append(dict(event))
            if on_event is not None:
                on_event(self, k, event)

        return emit

    def _settle(self, k: int) -> Any:
        def settle(answer: Any) -> None:
            assert self.answers[k] is None, f"job {k} was answered twice"
            self.answers[k] = answer
            self.order.append((k, sum(len(e) for e in self.events)))

        return settle


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[Engine]:
    engine = Engine()
    spec = ModelSpec("tiny", CheckpointSource(str(tiny_checkpoint)), device="cpu", dtype="float32")
    engine.load(spec, lambda event: None)
    yield engine
    engine.unload()


def _frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])


def _phases(events: list[dict]) -> list[str]:
    return [f"{e['phase']}:{e['state']}" for e in events if e["kind"] == "phase"]


GENERATE_PHASES = [
    f"{phase}:{state}" for phase in ("text_encode", "denoise", "decode", "encode") for state in ("start", "end")
]


def test_each_job_of_a_batch_gets_its_own_events_outputs_and_result(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.clear_cache()
    jobs = [_job(k, output=JobOutput(None, str(tmp_path / f"batch-{k}"))) for k in range(2)]
    record = Recorder(jobs)
    encoder_calls: list[int] = []
    original = engine.model.text_encoder.forward
    monkeypatch.setattr(
        engine.model.text_encoder, "forward", lambda *a, **kw: encoder_calls.append(kw["input_ids"].shape[0]) or original(*a, **kw)
    )
    summary = engine.generate_batch(record.members)
    monkeypatch.undo()
    assert encoder_calls == [4], f"the batch's 4 texts must be encoded in one call, got calls of {encoder_calls}"
    assert summary == {"jobs": [{"id": "job-0", "status": "completed"}, {"id": "job-1", "status": "completed"}]}
    for k, job in enumerate(jobs):
        result = record.answers[k]
        assert isinstance(result, dict), f"job {k} failed: {result}"
        assert _phases(record.events[k]) == GENERATE_PHASES, f"job {k}'s phases differ from a generate's"
        steps = [(e["i"], e["n"]) for e in record.events[k] if e["kind"] == "step"]
        assert steps == [(i, job.steps) for i in range(1, job.steps + 1)], f"job {k}'s step events: {steps}"
        assert result["batchSize"] == 2 and result["output"]["framesDir"] == job.output.frames_dir
        assert result["cache"] == {"promptHits": 0, "promptMisses": 2}, (
            f"job {k}'s prompt cache counts must be its own prompts' (cleared cache, guidance 5): {result['cache']}"
        )
        alone_dir = tmp_path / f"alone-{k}"
        alone = engine.generate(_job(k, output=JobOutput(None, str(alone_dir))), lambda event: None)
        assert alone["batchSize"] == 1
        diff = np.abs(_frames(Path(job.output.frames_dir)).astype(np.int16) - _frames(alone_dir).astype(np.int16))
        assert diff.max() <= 1, f"job {k}'s frames are {diff.max()} uint8 levels from the job alone"
    assert [k for k, _ in record.order] == [0, 1], "jobs are decoded, written and answered in order"


def test_a_cancelled_job_is_answered_at_once_and_the_others_finish(engine: Engine, tmp_path: Path) -> None:
    def cancel_job_1_after_step_2(record: Recorder, k: int, event: dict) -> None:
        if k == 1 and event["kind"] == "step" and event["i"] == 2:
            assert record.members[1].token.request(), "a running batch job's cancel must be honoured"

    jobs = [_job(k, steps=6, output=JobOutput(str(tmp_path / f"v{k}.mp4"), None)) for k in range(3)]
    record = Recorder(jobs, cancel_job_1_after_step_2)
    summary = engine.generate_batch(record.members)
    assert [j["status"] for j in summary["jobs"]] == ["completed", "cancelled", "completed"]
    failure = record.answers[1]
    assert isinstance(failure, EngineFailure) and (failure.code, failure.phase) == ("CANCELLED", "denoise")
    assert record.order[0][0] == 1, f"the cancelled job must be answered first, during the loop: {record.order}"
    steps_0 = [e["i"] for e in record.events[0] if e["kind"] == "step"]
    steps_1 = [e["i"] for e in record.events[1] if e["kind"] == "step"]
    assert steps_1 == [1, 2] and steps_0 == list(range(1, 7)), (
        f"the cancelled job must get no step after the cancel, the others every step: {steps_1}, {steps_0}"
    )
    assert not (tmp_path / "v1.mp4").exists(), "a cancelled job's output must not be written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0.mp4", "v2.mp4"], "temporaries were left behind"
    assert record.members[0].token.request() is False, "a finished job's cancel must answer False"


def test_cancelling_every_job_stops_the_loop_and_ends_the_batch_normally(engine: Engine) -> None:
    def cancel_all_at_step_1(record: Recorder, k: int, event: dict) -> None:
        if event["kind"] == "step" and event["i"] == 1:
            record.members[k].token.request()

    jobs = [_job(k, steps=50) for k in range(2)]
    record = Recorder(jobs, cancel_all_at_step_1)
    summary = engine.generate_batch(record.members)
    assert [j["status"] for j in summary["jobs"]] == ["cancelled", "cancelled"]
    last_steps = [max(e["i"] for e in events if e["kind"] == "step") for events in record.events]
    assert last_steps == [1, 1], f"the loop ran on after every job was cancelled: {last_steps}"


def test_a_job_that_cannot_run_fails_alone(engine: Engine, tmp_path: Path) -> None:
    jobs = [
        _job(0, output=JobOutput(str(tmp_path / "ok.mp4"), None)),
        _job(1, output=JobOutput(str(tmp_path / "missing" / "x.mp4"), None)),
    ]
    record = Recorder(jobs)
    summary = engine.generate_batch(record.members)
    assert [j["status"] for j in summary["jobs"]] == ["completed", "failed"]
    failure = record.answers[1]
    assert isinstance(failure, EngineFailure) and failure.code == "OUTPUT_UNWRITABLE"
    assert failure.field == "job.output.video" and record.events[1] == [], "refused before any work, naming its field"
    assert record.order[0] == (1, 0), "the unwritable job is answered before the batch starts"
    assert record.answers[0]["batchSize"] == 1, "the batch ran with the one job left"


def test_a_failure_of_the_loop_fails_every_job(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    model = engine.model
    assert model is not None

    def out_of_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

    monkeypatch.setattr(model, "denoise_batch", out_of_memory)
    record = Recorder([_job(0), _job(1)])
    with pytest.raises(EngineFailure) as caught:
        engine.generate_batch(record.members)
    assert (caught.value.code, caught.value.phase) == ("OOM", "denoise")
    assert [(a.code, a.phase) for a in record.answers] == [("OOM", "denoise")] * 2, (
        f"every job of a batch whose loop failed must be answered with the failure: {record.answers}"
    )
    assert engine.prompt_cache.stats().entries == 0, "after an OOM the prompt cache must give its memory back"


def test_a_batch_before_load_fails_every_job() -> None:
    record = Recorder([_job(0)])
    with pytest.raises(EngineFailure, match="before load"):
        Engine().generate_batch(record.members)
    assert record.answers[0].code == "MODEL_NOT_LOADED"


# ---- the worker: one answer per job id, then the batch's ----


def _answers(process: WorkerProcess, batch_id: str) -> dict[str, dict]:
    """Every answer (result or error) by id until the batch's own."""
    answers: dict[str, dict] = {}
    while batch_id not in answers:
        message = process.receive()
        if message["type"] != "event":
            answers[message["id"]] = message
    return answers


def test_the_worker_answers_each_job_under_its_id_and_cancels_one(
    schema: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    process = WorkerProcess(schema)
    try:
        assert process.request(load_request("load", str(tiny_checkpoint)))[0]["type"] == "result"
        outputs = {job: str(tmp_path / f"{job}.mp4") for job in ("a", "b")}
        jobs = [(job, {"steps": 200, "seed": k, "output": {"video": out, "framesDir": None}})
                for k, (job, out) in enumerate(outputs.items())]
        process.send(generate_batch_request("batch", jobs))
        answers: dict[str, dict] = {}
        steps: dict[str, int] = {"a": 0, "b": 0}
        steps_of_a_after_b_answered = 0
        while "batch" not in answers:
            message = process.receive()
            if message["type"] == "event" and message["event"]["kind"] == "step":
                steps[message["id"]] += 1
                steps_of_a_after_b_answered += message["id"] == "a" and "b" in answers
                if message["id"] == "b" and message["event"]["i"] == 1:
                    process.send({"type": "cancel", "id": "cancel-b", "target": "b"})
            elif message["type"] != "event":
                assert message["id"] not in answers, f"{message['id']} was answered twice"
                answers[message["id"]] = message
        assert answers["cancel-b"]["result"] == {"cancelled": True}
        assert answers["b"]["type"] == "error" and answers["b"]["error"]["code"] == "CANCELLED"
        assert answers["a"]["type"] == "result" and answers["a"]["result"]["batchSize"] == 2
        assert steps["a"] == 200 and steps["b"] < 200 and steps_of_a_after_b_answered > 0, (
            f"b must be answered during the loop while a runs on: steps {steps}, "
            f"{steps_of_a_after_b_answered} of a's after b's answer"
        )
        assert answers["batch"]["result"] == {
            "jobs": [{"id": "a", "status": "completed"}, {"id": "b", "status": "cancelled"}]
        }
        assert Path(outputs["a"]).exists() and not Path(outputs["b"]).exists()

        clash = generate_batch_request("batch-2", [("x", {}), ("y", {"frames": 9})])
        process.send(clash, valid=False)
        error, _ = process.answer("batch-2")
        assert (error["error"]["code"], error["error"]["field"]) == ("BAD_REQUEST", "jobs.1.job.frames")
        process.send(generate_batch_request("batch-3", [("x", {}), ("y", {"seed": 4})]))
        answered = _answers(process, "batch-3")
        assert [answered[i]["type"] for i in ("x", "y", "batch-3")] == ["result"] * 3, (
            f"the worker must serve the next batch: {answered}"
        )
    finally:
        process.close()
