"""The engine protocol, Python side: framing, typed requests, messages and the error type.

Contract (mirrors src/protocol/engine.ts, the source of truth; engine.schema.json is its export):

- Framing: one JSON object per line (UTF-8, `\\n`-terminated) in both directions over one
  bidirectional file descriptor (a unix socketpair the control plane passes as fd 3).
- Requests are parsed into frozen dataclasses whose `__post_init__` checks every field, so a request
  built in-process (tests, benchmarks) is held to the same rules as one read from the pipe. A bad
  request raises `EngineFailure("BAD_REQUEST", ..., field="job.width")` naming the field.
- Messages sent back are plain dicts with the camelCase field names of the schemas.

This module knows nothing about models, tensors or threads (the Channel's lock aside).
"""

from __future__ import annotations

import base64

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, Callable, Literal, Mapping, Sequence, Union

from .runtime.options import RuntimeOptions
from .runtime.placement import ALLOWED as PLACEMENTS_ALLOWED
from .runtime.placement import SOURCES as PLACEMENT_SOURCES
from .runtime.placement import MemoryPlan, Placement

PROTOCOL_VERSION = 1

#: The id used to answer a line that carries no usable request id (unparseable JSON, missing id).
UNKNOWN_REQUEST_ID = "?"

ERROR_CODES = (
    "BAD_REQUEST",
    "UNSUPPORTED_PROTOCOL",
    "BAD_CHECKPOINT",
    "MODEL_NOT_LOADED",
    "DEVICE_UNAVAILABLE",
    "OOM",
    "CANCELLED",
    "OUTPUT_UNWRITABLE",
    "ENCODER_FAILED",
    "INTERNAL",
)
PHASES = ("load", "text_encode", "denoise", "decode", "encode")
DEVICES = ("cuda", "cpu")
DTYPES = ("bfloat16", "float16", "float32")
ID_MAX_LENGTH = 128

ErrorCode = Literal[
    "BAD_REQUEST",
    "UNSUPPORTED_PROTOCOL",
    "BAD_CHECKPOINT",
    "MODEL_NOT_LOADED",
    "DEVICE_UNAVAILABLE",
    "OOM",
    "CANCELLED",
    "OUTPUT_UNWRITABLE",
    "ENCODER_FAILED",
    "INTERNAL",
]
Phase = Literal["load", "text_encode", "denoise", "decode", "encode"]


class EngineFailure(Exception):
    """A failure with a protocol error code; the worker answers it as an `error` message.

    `phase` is the phase the job was in, `field` the request field at fault (e.g. "job.output.video").
    """

    def __init__(self, code: ErrorCode, message: str, phase: Phase | None = None, field: str | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown engine error code {code!r}")
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.phase = phase
        self.field = field

    def with_field_prefix(self, prefix: str) -> EngineFailure:
        """The same failure with `field` made absolute under `prefix` ("width" -> "job.width")."""
        full = prefix if self.field is None else f"{prefix}.{self.field}"
        return EngineFailure(self.code, self.message, self.phase, full)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "phase": self.phase, "field": self.field}


def _bad(field_name: str, message: str) -> EngineFailure:
    return EngineFailure("BAD_REQUEST", f"{field_name}: {message}", field=field_name)


# ---- field checks (used by __post_init__; JSON numbers may arrive as integral floats) ----


def _check_str(value: Any, name: str, *, min_length: int = 0, max_length: int | None = None) -> None:
    if not isinstance(value, str):
        raise _bad(name, f"expected a string, got {type(value).__name__}")
    if len(value) < min_length:
        raise _bad(name, f"must have at least {min_length} character(s)")
    if max_length is not None and len(value) > max_length:
        raise _bad(name, f"must have at most {max_length} characters")


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _check_int(value: Any, name: str, *, minimum: int | None = None) -> None:
    if not _is_int(value):
        raise _bad(name, f"expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _bad(name, f"must be >= {minimum}, got {value!r}")


def _check_number(value: Any, name: str, *, minimum: float | None = None, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise _bad(name, f"must be >= {minimum}, got {value!r}")
    if positive and value <= 0:
        raise _bad(name, f"must be > 0, got {value!r}")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _bad(name, f"expected one of {', '.join(choices)}, got {value!r}")


def _check_config(value: Any, name: str) -> None:
    if not isinstance(value, Mapping):
        raise _bad(name, f"expected an object, got {type(value).__name__}")


def _frozen_config(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # A read-only view over a private copy: request objects are immutable once checked.
    return MappingProxyType(json.loads(json.dumps(dict(value))))


# ---- request payload types ----


@dataclass(frozen=True)
class CheckpointSource:
    """A diffusers-format checkpoint folder (model_index.json, transformer/, vae/, ...)."""

    path: str
    kind: Literal["checkpoint"] = "checkpoint"

    def __post_init__(self) -> None:
        _check_str(self.path, "path", min_length=1)


@dataclass(frozen=True)
class SchedulerSpec:
    """A diffusers scheduler by class name, with its config dict."""

    class_name: str
    config: Mapping[str, Any]

    def __post_init__(self) -> None:
        _check_str(self.class_name, "className", min_length=1)
        _check_config(self.config, "config")
        object.__setattr__(self, "config", _frozen_config(self.config))


@dataclass(frozen=True)
class WanArchitecture:
    """A Wan 2.1 T2V architecture: the config dicts of each component (diffusers/transformers)."""

    transformer: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    scheduler: SchedulerSpec
    #: Vocabulary size of the synthetic tokenizer built for random-weight runs.
    tokenizer_vocab_size: int
    family: Literal["wan2.1-t2v"] = "wan2.1-t2v"

    def __post_init__(self) -> None:
        _check_choice(self.family, "family", ("wan2.1-t2v",))
        for name, value in (("transformer", self.transformer), ("vae", self.vae), ("textEncoder", self.text_encoder)):
            _check_config(value, name)
        object.__setattr__(self, "transformer", _frozen_config(self.transformer))
        object.__setattr__(self, "vae", _frozen_config(self.vae))
        object.__setattr__(self, "text_encoder", _frozen_config(self.text_encoder))
        if not isinstance(self.scheduler, SchedulerSpec):
            raise _bad("scheduler", "expected a SchedulerSpec")
        _check_int(self.tokenizer_vocab_size, "tokenizerVocabSize", minimum=1)


@dataclass(frozen=True)
class RandomSource:
    """A full architecture built with random weights ~ N(0, 0.02), seeded."""

    architecture: WanArchitecture
    seed: int
    kind: Literal["random"] = "random"

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, WanArchitecture):
            raise _bad("architecture", "expected a WanArchitecture")
        _check_int(self.seed, "seed", minimum=0)


ModelSource = Union[CheckpointSource, RandomSource]


@dataclass(frozen=True)
class ModelSpec:
    """What `load` builds: a display name, where the weights come from, device and precision."""

    name: str
    source: ModelSource
    device: Literal["cuda", "cpu"]
    dtype: Literal["bfloat16", "float16", "float32"]
    #: The hot path's options; None takes RuntimeOptions() (batched CFG, measured attention, no compile).
    runtime: RuntimeOptions | None = None
    #: Where each component lives and the device bytes allowed (the planner's plan); None: all resident.
    memory: MemoryPlan | None = None

    def __post_init__(self) -> None:
        _check_str(self.name, "name", min_length=1)
        if self.runtime is not None and not isinstance(self.runtime, RuntimeOptions):
            raise _bad("runtime", "expected RuntimeOptions")
        if self.memory is not None and not isinstance(self.memory, MemoryPlan):
            raise _bad("memory", "expected a MemoryPlan")
        if not isinstance(self.source, (CheckpointSource, RandomSource)):
            raise _bad("source", "expected a CheckpointSource or a RandomSource")
        _check_choice(self.device, "device", DEVICES)
        _check_choice(self.dtype, "dtype", DTYPES)


@dataclass(frozen=True)
class JobOutput:
    """Where the job's frames go: an MP4 path and/or a PNG folder; None for none."""

    video: str | None
    frames_dir: str | None

    def __post_init__(self) -> None:
        if self.video is not None:
            _check_str(self.video, "video", min_length=1)
        if self.frames_dir is not None:
            _check_str(self.frames_dir, "framesDir", min_length=1)


@dataclass(frozen=True)
class PreviewSpec:
    """Previews while a job denoises: one every `every` steps, and one at the last step."""

    every: int

    def __post_init__(self) -> None:
        _check_int(self.every, "every", minimum=1)
        object.__setattr__(self, "every", int(self.every))

    def due(self, step: int, steps: int) -> bool:
        """Whether a preview is taken at `step` (1-based) of `steps`."""
        return step % self.every == 0 or step == steps


@dataclass(frozen=True)
class VaeDecode:
    """How the VAE decodes: whole (streamed frame by frame where possible) or in spatial tiles."""

    mode: Literal["full", "tiled"] = "full"
    #: "tiled": tile side in pixels (a multiple of 32); tiles overlap by a quarter.
    tile: int | None = None

    def __post_init__(self) -> None:
        _check_choice(self.mode, "mode", ("full", "tiled"))
        if self.mode == "tiled":
            _check_int(self.tile, "tile", minimum=64)
            if int(self.tile) % 32:  # type: ignore[arg-type]
                raise _bad("tile", f"must be a multiple of 32, got {self.tile!r}")
            object.__setattr__(self, "tile", int(self.tile))  # type: ignore[arg-type]
        elif self.tile is not None:
            raise _bad("tile", "only a tiled decode takes a tile size")


@dataclass(frozen=True)
class JobSpec:
    """One text-to-video generation."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    steps: int
    #: Classifier-free guidance scale; > 1 runs the negative prompt too.
    guidance: float
    #: Flow shift; None keeps the checkpoint scheduler's own.
    shift: float | None
    seed: int
    #: Frames per second of the video; None takes the model's.
    fps: float | None
    output: JobOutput = field(default_factory=lambda: JobOutput(None, None))
    #: The VAE's decode mode (the plan's); None: full.
    vae_decode: VaeDecode | None = None
    #: Guidance as one batch-2 forward or two forwards (the plan's); None: the model's runtime option.
    cfg: Literal["batched", "sequential"] | None = None
    #: Previews while it denoises (not a batch shape field); None: none.
    preview: PreviewSpec | None = None

    def __post_init__(self) -> None:
        _check_str(self.prompt, "prompt")
        _check_str(self.negative_prompt, "negativePrompt")
        for name, value in (("width", self.width), ("height", self.height), ("frames", self.frames), ("steps", self.steps)):
            _check_int(value, name, minimum=1)
        _check_number(self.guidance, "guidance", minimum=0)
        if self.shift is not None:
            _check_number(self.shift, "shift", positive=True)
        _check_int(self.seed, "seed", minimum=0)
        if self.fps is not None:
            _check_number(self.fps, "fps", positive=True)
        if not isinstance(self.output, JobOutput):
            raise _bad("output", "expected a JobOutput")
        if self.vae_decode is not None and not isinstance(self.vae_decode, VaeDecode):
            raise _bad("vaeDecode", "expected a VaeDecode")
        if self.cfg is not None:
            _check_choice(self.cfg, "cfg", ("batched", "sequential"))
        if self.preview is not None and not isinstance(self.preview, PreviewSpec):
            raise _bad("preview", "expected a PreviewSpec")
        for name in ("width", "height", "frames", "steps", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "guidance", float(self.guidance))
        for name in ("shift", "fps"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))


#: The JobSpec fields every job of a batch shares (their JSON keys are the same): one denoising loop
#: runs them together, so they must agree on the latent shape, the schedule, the guidance and how
#: guidance is batched. Prompts, seeds, outputs, fps and the VAE's decode mode stay each job's own.
BATCH_SHAPE_FIELDS = ("width", "height", "frames", "steps", "guidance", "shift", "cfg")


def batch_mismatch(jobs: Sequence[JobSpec]) -> tuple[int, str] | None:
    """The first (index, field) where a job's shape differs from the first job's; None if they all agree."""
    for index, job in enumerate(jobs[1:], start=1):
        for name in BATCH_SHAPE_FIELDS:
            if getattr(job, name) != getattr(jobs[0], name):
                return index, name
    return None


# ---- requests ----


@dataclass(frozen=True)
class HelloRequest:
    id: str
    protocol: int
    type: Literal["hello"] = "hello"


@dataclass(frozen=True)
class LoadRequest:
    id: str
    model: ModelSpec
    type: Literal["load"] = "load"


@dataclass(frozen=True)
class GenerateRequest:
    id: str
    job: JobSpec
    type: Literal["generate"] = "generate"


@dataclass(frozen=True)
class PrewarmRequest:
    """Run one transformer forward at a job's shape for `jobs` jobs of it (a batch's rows), so the
    attention choice, compilation and autotuning happen before the first request of that shape; the
    previews' colour map is fitted too when the job asks for previews. Answered with {ms, jobs}."""

    id: str
    job: JobSpec
    jobs: int = 1
    type: Literal["prewarm"] = "prewarm"

    def __post_init__(self) -> None:
        _check_int(self.jobs, "jobs", minimum=1)
        object.__setattr__(self, "jobs", int(self.jobs))


@dataclass(frozen=True)
class BatchJob:
    """One job of a batch: its own id (its events, its answer and a cancel's target) and its spec."""

    id: str
    job: JobSpec


@dataclass(frozen=True)
class GenerateBatchRequest:
    """Several jobs of one shape (BATCH_SHAPE_FIELDS) as one denoising loop.

    Each job is answered under its own id, as a `generate` would be (events, then one result or
    error, a cancelled one as soon as it stops), and the batch request itself last, with a summary.
    """

    id: str
    jobs: tuple[BatchJob, ...]
    type: Literal["generate_batch"] = "generate_batch"

    def __post_init__(self) -> None:
        if not self.jobs:
            raise _bad("jobs", "must hold at least one job")
        seen = {self.id}
        for index, member in enumerate(self.jobs):
            if member.id in seen:
                name = f"jobs.{index}.id"
                raise _bad(name, f"{member.id!r} is used twice: the batch and each of its jobs need distinct ids")
            seen.add(member.id)
        mismatch = batch_mismatch([member.job for member in self.jobs])
        if mismatch is not None:
            index, name = mismatch
            first, other = getattr(self.jobs[0].job, name), getattr(self.jobs[index].job, name)
            raise _bad(
                f"jobs.{index}.job.{name}",
                f"must equal jobs.0.job.{name} ({first!r}) for the jobs to share one denoising loop, got {other!r}",
            )


@dataclass(frozen=True)
class CancelRequest:
    id: str
    #: The id of the generate request to cancel.
    target: str
    type: Literal["cancel"] = "cancel"


@dataclass(frozen=True)
class ClearCacheRequest:
    """Drop the engine's cached prompt embeddings (answered with {freedBytes})."""

    id: str
    type: Literal["clear_cache"] = "clear_cache"


@dataclass(frozen=True)
class ShutdownRequest:
    id: str
    type: Literal["shutdown"] = "shutdown"


@dataclass(frozen=True)
class ProbeRequest:
    """Measure this machine's hardware profile (answered with a ProbeResult, see probe.py)."""

    id: str
    #: Fewer repeats, a smaller copy and one attention shape (about 2 s) instead of the full set.
    quick: bool
    type: Literal["probe"] = "probe"

    def __post_init__(self) -> None:
        if not isinstance(self.quick, bool):
            raise _bad("quick", f"expected a boolean, got {self.quick!r}")


Request = Union[
    HelloRequest, LoadRequest, GenerateRequest, GenerateBatchRequest, CancelRequest, ClearCacheRequest,
    ShutdownRequest, ProbeRequest, PrewarmRequest,
]


# ---- parsing JSON objects into requests ----


def _get(obj: Mapping[str, Any], key: str, path: str, *, optional: bool = False) -> Any:
    if key in obj:
        return obj[key]
    if optional:
        return None
    raise _bad(f"{path}.{key}" if path else key, "is required")


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(path, f"expected an object, got {type(value).__name__}")
    return value


def _build(prefix: str, cls: Callable[..., Any], /, **kwargs: Any) -> Any:
    """`cls(**kwargs)`, with the field of any BAD_REQUEST from its checks made absolute under `prefix`."""
    try:
        return cls(**kwargs)
    except EngineFailure as failure:
        raise failure.with_field_prefix(prefix) from None


def _fields(obj: Mapping[str, Any], path: str, names: Mapping[str, str]) -> dict[str, Any]:
    """Attribute name -> value for each required JSON key in `names` (attribute -> JSON key)."""
    return {attr: _get(obj, key, path) for attr, key in names.items()}


def parse_model_spec(value: Any, path: str = "model") -> ModelSpec:
    obj = _object(value, path)
    source_path = f"{path}.source"
    source_obj = _object(_get(obj, "source", path), source_path)
    kind = _get(source_obj, "kind", source_path)
    source: ModelSource
    if kind == "checkpoint":
        source = _build(source_path, CheckpointSource, path=_get(source_obj, "path", source_path))
    elif kind == "random":
        arch_path = f"{source_path}.architecture"
        arch = _object(_get(source_obj, "architecture", source_path), arch_path)
        sched_path = f"{arch_path}.scheduler"
        sched = _object(_get(arch, "scheduler", arch_path), sched_path)
        scheduler = _build(sched_path, SchedulerSpec, **_fields(sched, sched_path, {"class_name": "className", "config": "config"}))
        names = {
            "family": "family",
            "transformer": "transformer",
            "vae": "vae",
            "text_encoder": "textEncoder",
            "tokenizer_vocab_size": "tokenizerVocabSize",
        }
        architecture = _build(arch_path, WanArchitecture, scheduler=scheduler, **_fields(arch, arch_path, names))
        source = _build(source_path, RandomSource, architecture=architecture, seed=_get(source_obj, "seed", source_path))
    else:
        raise _bad(f"{source_path}.kind", f"expected 'checkpoint' or 'random', got {kind!r}")
    runtime = _parse_runtime(obj["runtime"], f"{path}.runtime") if obj.get("runtime") is not None else None
    memory = parse_memory_plan(obj["memory"], f"{path}.memory") if obj.get("memory") is not None else None
    return _build(
        path, ModelSpec, source=source, runtime=runtime, memory=memory,
        **_fields(obj, path, {"name": "name", "device": "device", "dtype": "dtype"}),
    )


def _parse_runtime(value: Any, path: str) -> RuntimeOptions:
    obj = _object(value, path)
    cache_dir = _get(obj, "cacheDir", path)
    if cache_dir is not None:
        _check_str(cache_dir, f"{path}.cacheDir", min_length=1)
    try:
        return RuntimeOptions(
            cfg=_get(obj, "cfg", path),
            attention=_get(obj, "attention", path),
            compile=_get(obj, "compile", path),
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
            weights=obj.get("weights") or "exact",
            attention_precision=obj.get("attentionPrecision") or "exact",
            fuse=obj.get("fuse", True),
        )
    except ValueError as exc:
        raise _bad(path, str(exc)) from exc


def _parse_placement(value: Any, path: str, component: str) -> Placement:
    obj = _object(value, path)
    kind = _get(obj, "kind", path)
    _check_choice(kind, f"{path}.kind", PLACEMENTS_ALLOWED[component])
    if kind != "streamed":
        return Placement(kind)
    resident = _get(obj, "residentBlocks", path)
    prefetch = _get(obj, "prefetch", path)
    _check_int(resident, f"{path}.residentBlocks", minimum=0)
    _check_int(prefetch, f"{path}.prefetch", minimum=1)
    source = _get(obj, "source", path, optional=True)
    if source is not None:
        _check_choice(source, f"{path}.source", PLACEMENT_SOURCES)
    return Placement(kind, int(resident), int(prefetch), source or "ram")


def parse_memory_plan(value: Any, path: str) -> MemoryPlan:
    obj = _object(value, path)
    keys = {"text_encoder": "textEncoder", "transformer": "transformer", "vae": "vae"}
    placements = {attr: _parse_placement(_get(obj, key, path), f"{path}.{key}", attr) for attr, key in keys.items()}
    budget = _get(obj, "vramBudget", path, optional=True)
    if budget is not None:
        _check_int(budget, f"{path}.vramBudget", minimum=1)
        budget = int(budget)
    return MemoryPlan(vram_budget=budget, **placements)


def parse_job_spec(value: Any, path: str = "job") -> JobSpec:
    obj = _object(value, path)
    out_path = f"{path}.output"
    out = _object(_get(obj, "output", path), out_path)
    output = _build(out_path, JobOutput, **_fields(out, out_path, {"video": "video", "frames_dir": "framesDir"}))
    names = {
        "prompt": "prompt",
        "negative_prompt": "negativePrompt",
        "width": "width",
        "height": "height",
        "frames": "frames",
        "steps": "steps",
        "guidance": "guidance",
        "shift": "shift",
        "seed": "seed",
        "fps": "fps",
    }
    decode = _get(obj, "vaeDecode", path, optional=True)
    vae_decode = None
    if decode is not None:
        decode_path = f"{path}.vaeDecode"
        decode_obj = _object(decode, decode_path)
        vae_decode = _build(
            decode_path, VaeDecode, mode=_get(decode_obj, "mode", decode_path), tile=decode_obj.get("tile")
        )
    cfg = _get(obj, "cfg", path, optional=True)
    preview_value = _get(obj, "preview", path, optional=True)
    preview = None
    if preview_value is not None:
        preview_path = f"{path}.preview"
        preview_obj = _object(preview_value, preview_path)
        preview = _build(preview_path, PreviewSpec, every=_get(preview_obj, "every", preview_path))
    return _build(
        path, JobSpec, output=output, vae_decode=vae_decode, cfg=cfg, preview=preview, **_fields(obj, path, names)
    )


def parse_batch_jobs(value: Any, path: str = "jobs") -> tuple[BatchJob, ...]:
    if not isinstance(value, list):
        raise _bad(path, f"expected an array of {{id, job}}, got {type(value).__name__}")
    members = []
    for index, item in enumerate(value):
        item_path = f"{path}.{index}"
        member = _object(item, item_path)
        member_id = _get(member, "id", item_path)
        _check_str(member_id, f"{item_path}.id", min_length=1, max_length=ID_MAX_LENGTH)
        members.append(BatchJob(member_id, parse_job_spec(_get(member, "job", item_path), f"{item_path}.job")))
    return tuple(members)


def parse_request(obj: Any) -> Request:
    """A typed request from a decoded JSON object; raises EngineFailure(BAD_REQUEST) naming the field."""
    obj = _object(obj, "request")
    request_id = request_id_of(obj)
    if request_id is None:
        raise _bad("id", f"expected a string of 1 to {ID_MAX_LENGTH} characters")
    kind = obj.get("type")
    if kind == "hello":
        protocol = _get(obj, "protocol", "")
        _check_int(protocol, "protocol")
        return HelloRequest(id=request_id, protocol=int(protocol))
    if kind == "load":
        return LoadRequest(id=request_id, model=parse_model_spec(_get(obj, "model", "")))
    if kind == "generate":
        return GenerateRequest(id=request_id, job=parse_job_spec(_get(obj, "job", "")))
    if kind == "generate_batch":
        return GenerateBatchRequest(id=request_id, jobs=parse_batch_jobs(_get(obj, "jobs", "")))
    if kind == "cancel":
        target = _get(obj, "target", "")
        _check_str(target, "target", min_length=1, max_length=ID_MAX_LENGTH)
        return CancelRequest(id=request_id, target=target)
    if kind == "clear_cache":
        return ClearCacheRequest(id=request_id)
    if kind == "shutdown":
        return ShutdownRequest(id=request_id)
    if kind == "probe":
        return ProbeRequest(id=request_id, quick=_get(obj, "quick", ""))
    if kind == "prewarm":
        jobs = _get(obj, "jobs", "", optional=True)
        return _build("", PrewarmRequest, id=request_id, job=parse_job_spec(_get(obj, "job", "")), jobs=1 if jobs is None else jobs)
    raise _bad(
        "type",
        f"unknown request type {kind!r} "
        "(expected hello, load, generate, generate_batch, cancel, clear_cache, shutdown, probe or prewarm)",
    )


def request_id_of(obj: Any) -> str | None:
    """The request's id if it has a valid one, else None (used to answer malformed requests)."""
    if not isinstance(obj, Mapping):
        return None
    value = obj.get("id")
    if isinstance(value, str) and 1 <= len(value) <= ID_MAX_LENGTH:
        return value
    return None


# ---- messages (engine -> control plane) ----


def result_message(request_id: str, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "result", "id": request_id, "result": dict(result)}


def error_message(request_id: str, failure: EngineFailure) -> dict[str, Any]:
    return {"type": "error", "id": request_id, "error": failure.to_json()}


def event_message(request_id: str, event: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "event", "id": request_id, "event": dict(event)}


def phase_event(phase: Phase, state: Literal["start", "end"], ms: float | None = None) -> dict[str, Any]:
    return {"kind": "phase", "phase": phase, "state": state, "ms": ms}


def step_event(i: int, n: int, ms: float, vram_bytes: int | None, ram_bytes: int) -> dict[str, Any]:
    """`i` is the 1-based index of the step just finished, of `n`."""
    return {"kind": "step", "i": i, "n": n, "ms": ms, "vramBytes": vram_bytes, "ramBytes": ram_bytes}


def preview_event(i: int, n: int, width: int, height: int, png: bytes) -> dict[str, Any]:
    """A preview taken at the 1-based step `i` of `n`: a width x height RGB PNG."""
    return {
        "kind": "preview",
        "i": i,
        "n": n,
        "width": width,
        "height": height,
        "png": base64.b64encode(png).decode("ascii"),
    }


def load_event(component: str, loaded_bytes: int, total_bytes: int) -> dict[str, Any]:
    return {"kind": "load", "component": component, "bytes": loaded_bytes, "totalBytes": total_bytes}


def log_event(level: Literal["debug", "info", "warn"], message: str) -> dict[str, Any]:
    return {"kind": "log", "level": level, "message": message}


#: Callback through which the engine streams events of the request being served.
Emit = Callable[[Mapping[str, Any]], None]


# ---- framing ----


class Channel:
    """Newline-delimited JSON over a pair of binary streams; `send` is safe from any thread."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO):
        self._reader = reader
        self._writer = writer
        self._lock = threading.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        """A channel over one bidirectional descriptor (a socket from a socketpair, as Node passes)."""
        reader = open(fd, "rb", buffering=1 << 16, closefd=True)
        writer = open(os.dup(fd), "wb", buffering=1 << 16, closefd=True)
        return cls(reader, writer)

    def read_line(self) -> bytes | None:
        """The next non-empty line, or None at end of stream."""
        while True:
            line = self._reader.readline()
            if not line:
                return None
            if line.strip():
                return line

    def send(self, message: Mapping[str, Any]) -> None:
        # allow_nan=False: NaN/Infinity are not JSON; a bug that produces them must fail here, loudly.
        data = (json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            self._writer.write(data)
            self._writer.flush()


def decode_line(line: bytes) -> Any:
    """The JSON value of one line; raises EngineFailure(BAD_REQUEST) if it is not JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineFailure("BAD_REQUEST", f"a request line is not valid JSON: {exc}") from None
