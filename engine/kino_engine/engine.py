"""The engine in-process: hello, load and generate, each returning its protocol result dict.

`Engine` holds at most one loaded model. Every failure leaves as `EngineFailure` with a protocol
code and the phase it happened in: OOM for device or host memory exhaustion, INTERNAL (chained to
the original exception, whose traceback the caller prints) for anything unexpected. Events go to
the `emit` callback; cancellation comes through a `CancelToken` (see cancel.py).

It knows nothing about sockets, threads or message framing (worker.py does), nor about the
denoising math (pipelines/wan.py does).
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

import torch

from .cancel import CancelToken
from .protocol import (
    PROTOCOL_VERSION,
    Emit,
    EngineFailure,
    HelloRequest,
    JobSpec,
    ModelSpec,
    Phase,
    load_event,
    log_event,
    phase_event,
    step_event,
)
from .pipelines.wan import WanT2V
from .probe import measure
from .runtime.memory import (
    PeakRam,
    free_device_memory,
    module_bytes,
    parameter_count,
    reset_vram_peak,
    vram_allocated,
    vram_peak,
)
from .runtime.embed_cache import (
    DEFAULT_BUDGET_BYTES,
    PromptEmbeddingCache,
    encoder_identity,
    install_prompt_cache,
)
from .system import hello_info
from .video import StreamingMp4Writer, check_outputs, write_outputs

T = TypeVar("T")


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def run_classified(phase: Callable[[], Phase | None], work: Callable[[], T]) -> T:
    """`work()`, with any exception turned into an EngineFailure carrying the phase it happened in."""
    try:
        return work()
    except EngineFailure as failure:
        if failure.phase is None:
            failure.phase = phase()
        raise
    except (torch.OutOfMemoryError, MemoryError) as exc:
        where = phase()
        raise EngineFailure(
            "OOM", f"out of memory during {where or 'the request'}: {exc}".strip(), phase=where
        ) from exc
    except Exception as exc:
        raise EngineFailure("INTERNAL", f"{type(exc).__name__}: {exc}", phase=phase()) from exc


class Engine:
    """hello / load / generate / clear_cache in-process; one model at a time.

    Prompt embeddings are cached across generates (runtime/embed_cache.py): a warm request with the
    same prompts skips the text encoder. The cache is emptied when the model is unloaded or replaced,
    after an OOM, and on clear_cache.
    """

    def __init__(self, prompt_cache_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.model: WanT2V | None = None
        self.spec: ModelSpec | None = None
        self.prompt_cache = PromptEmbeddingCache(prompt_cache_bytes)

    def hello(self, request: HelloRequest) -> dict[str, Any]:
        if request.protocol != PROTOCOL_VERSION:
            raise EngineFailure(
                "UNSUPPORTED_PROTOCOL",
                f"the control plane speaks engine protocol {request.protocol}, this engine "
                f"(kino_engine) speaks {PROTOCOL_VERSION}: install matching versions of kino and its engine",
                field="protocol",
            )
        return {"protocol": PROTOCOL_VERSION, **hello_info()}

    def unload(self) -> None:
        self.model = None
        self.spec = None
        self.prompt_cache.clear()
        free_device_memory()

    def clear_cache(self) -> dict[str, Any]:
        """Drops the cached prompt embeddings and returns their memory to the device."""
        freed = self.prompt_cache.clear()
        free_device_memory()
        return {"freedBytes": freed}

    def probe(self, quick: bool, emit: Emit) -> dict[str, Any]:
        """This machine's measured hardware profile (probe.py); the loaded model, if any, stays."""
        try:
            return run_classified(lambda: None, lambda: measure(quick, emit))
        finally:
            free_device_memory()

    def load(self, spec: ModelSpec, emit: Emit) -> dict[str, Any]:
        # The previous model goes first: two full models rarely fit in one device at once.
        self.unload()
        started = time.perf_counter()
        emit(phase_event("load", "start"))

        def progress(component: str, done: int, total: int) -> None:
            emit(load_event(component, done, total))

        model = run_classified(lambda: "load", lambda: WanT2V.load(spec, progress, runtime=spec.runtime, memory=spec.memory))
        if model.vae.dtype != model.dtype:
            emit(log_event("info", f"VAE kept in {str(model.vae.dtype).removeprefix('torch.')} while the model runs "
                                   f"in {spec.dtype}: Wan's VAE is run in float32 (as diffusers' Wan examples do)"))
        install_prompt_cache(model, self.prompt_cache, encoder_identity(spec.name, model.text_encoder, model.dtype, model.device))
        load_ms = _ms_since(started)
        emit(phase_event("load", "end", load_ms))
        self.model, self.spec = model, spec
        return {
            "name": spec.name,
            "device": spec.device,
            "dtype": spec.dtype,
            "fps": model.fps,
            "vaeScaleSpatial": model.vae_scale_spatial,
            "vaeScaleTemporal": model.vae_scale_temporal,
            "components": component_infos(model),
            "loadMs": load_ms,
            "memory": {
                "pinnedBytes": model.placer.pinned_bytes,
                "vramBudget": model.placer.plan.vram_budget,
                "deviceWeightBytes": vram_allocated(model.device),
            },
        }

    def generate(self, job: JobSpec, emit: Emit, cancel: CancelToken | None = None) -> dict[str, Any]:
        token = cancel or CancelToken()
        if token.is_cancelled():
            raise EngineFailure("CANCELLED", "cancelled before it started")
        model = self.model
        if model is None:
            raise EngineFailure("MODEL_NOT_LOADED", "generate before load: send a load request first")
        current: list[Phase | None] = [None]
        try:
            return run_classified(lambda: current[0], lambda: self._generate(model, job, emit, token, current))
        except EngineFailure as failure:
            if failure.code == "OOM":
                self.prompt_cache.clear()  # the worker frees device memory next; give it the embeddings too
            raise

    def _generate(
        self, model: WanT2V, job: JobSpec, emit: Emit, token: CancelToken, current: list[Phase | None]
    ) -> dict[str, Any]:
        model.check_job(job)
        check_outputs(job.output)
        started = time.perf_counter()
        cache_before = self.prompt_cache.stats()
        ram = PeakRam()
        ram.start()
        reset_vram_peak(model.device)

        def on_phase(phase: Phase, state: str, ms: float | None) -> None:
            current[0] = phase
            ram.sample()
            emit(phase_event(phase, state, ms))  # type: ignore[arg-type]

        def on_step(i: int, n: int, ms: float) -> None:
            emit(step_event(i, n, ms, vram_allocated(model.device), ram.sample()))

        fps = job.fps if job.fps is not None else model.fps
        if job.output.video is not None and job.output.frames_dir is None:
            # Only an MP4: the encoder runs on its own thread while the VAE decodes, chunk by chunk.
            # With the overlap, "decode" is the time until the last chunk reached the encoder and
            # "encode" only what the encoder still needed after it; the wall time (totalMs) is what
            # the overlap shortens.
            with StreamingMp4Writer(job.output.video, fps) as writer:
                video = model.generate(
                    job, on_phase=on_phase, on_step=on_step, is_cancelled=token.is_cancelled, on_frames=writer.write
                )
                if not token.close():  # the last cancellation point: the writer removes its temporary
                    raise EngineFailure("CANCELLED", "cancelled after decoding", phase="decode")
                on_phase("encode", "start", None)
                encode_started = time.perf_counter()
                writer.finish()
            encode_ms = _ms_since(encode_started)
        else:
            video = model.generate(job, on_phase=on_phase, on_step=on_step, is_cancelled=token.is_cancelled)
            if not token.close():  # the last cancellation point: after it, the job runs to its end
                raise EngineFailure("CANCELLED", "cancelled after decoding", phase="decode")
            on_phase("encode", "start", None)
            encode_started = time.perf_counter()
            write_outputs(video.frames, job.output, fps)
            encode_ms = _ms_since(encode_started)
        on_phase("encode", "end", encode_ms)
        cache_after = self.prompt_cache.stats()
        count, height, width = video.shape
        denoise_ms = video.phase_ms["denoise"]
        return {
            "frames": int(count),
            "width": int(width),
            "height": int(height),
            "fps": fps,
            "output": {"video": job.output.video, "framesDir": job.output.frames_dir},
            "timings": {
                "textEncodeMs": video.phase_ms["text_encode"],
                "denoiseMs": denoise_ms,
                "decodeMs": video.phase_ms["decode"],
                "encodeMs": encode_ms,
                "totalMs": _ms_since(started),
            },
            "secondsPerStep": denoise_ms / 1000.0 / job.steps,
            "peakVramBytes": _max_or_none(vram_peak(model.device), *video.phase_peak_vram.values()),
            "phasePeakVramBytes": _phase_peaks(video.phase_peak_vram) if model.device.type == "cuda" else None,
            "peakRamBytes": ram.peak(),
            "cache": {
                "promptHits": cache_after.hits - cache_before.hits,
                "promptMisses": cache_after.misses - cache_before.misses,
            },
        }


def _max_or_none(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _phase_peaks(peaks: dict[str, int]) -> dict[str, int]:
    """The protocol's names for the pipeline's per-phase peaks."""
    names = {"text_encode": "textEncode", "denoise": "denoise", "decode": "decode"}
    return {names[k]: v for k, v in peaks.items() if k in names}


def component_infos(model: WanT2V) -> list[dict[str, Any]]:
    """Name, class, parameter count and bytes of each component, weights first."""
    infos = [
        {
            "name": name,
            "className": type(module).__name__,
            "parameters": parameter_count(module),
            "bytes": module_bytes(module),
        }
        for name, module in (
            ("text_encoder", model.text_encoder),
            ("transformer", model.transformer),
            ("vae", model.vae),
        )
    ]
    infos.append({"name": "tokenizer", "className": type(model.tokenizer).__name__, "parameters": 0, "bytes": 0})
    infos.append({"name": "scheduler", "className": model.scheduler_class.__name__, "parameters": 0, "bytes": 0})
    return infos
