"""The engine in-process: hello, load, generate and generate_batch, each returning its protocol result dict.

`Engine` holds at most one loaded model. Every failure leaves as `EngineFailure` with a protocol
code and the phase it happened in: OOM for device or host memory exhaustion, INTERNAL (chained to
the original exception, whose traceback the caller prints) for anything unexpected. Events go to
the `emit` callback; cancellation comes through a `CancelToken` (see cancel.py). A job's events,
outputs and result are job_run.py's; a batch's orchestration is batch.py's.

It knows nothing about sockets, threads or message framing (worker.py does), nor about the
denoising math (pipelines/wan.py does).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from .batch import BatchMember, run_batch
from .cancel import CancelToken
from .job_run import JobRun, ms_since, run_classified
from .protocol import (
    PROTOCOL_VERSION,
    Emit,
    EngineFailure,
    HelloRequest,
    JobSpec,
    ModelSpec,
    load_event,
    log_event,
    phase_event,
)
from .pipelines.wan import OnFrames, WanT2V, WanVideo
from .probe import measure
from .runtime.memory import (
    PeakRam,
    free_device_memory,
    module_bytes,
    parameter_count,
    reset_vram_peak,
    vram_allocated,
)
from .runtime.embed_cache import (
    DEFAULT_BUDGET_BYTES,
    PromptEmbeddingCache,
    encoder_identity,
    install_prompt_cache,
)
from .system import hello_info
from .video import check_outputs


class Engine:
    """hello / load / generate / generate_batch / clear_cache in-process; one model at a time.

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

    def prewarm(self, job: JobSpec, jobs: int = 1) -> dict[str, Any]:
        """One forward at the job's shape for `jobs` jobs (WanT2V.prewarm): compile, autotune and the
        attention choice are paid now, not by the first request of that shape."""
        model = self.model
        if model is None:
            raise EngineFailure("MODEL_NOT_LOADED", "prewarm before load: send a load request first")
        ms = run_classified(lambda: "denoise", lambda: model.prewarm(job, jobs))
        return {"ms": ms, "jobs": jobs}

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
        load_ms = ms_since(started)
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
        ram = PeakRam()
        ram.start()
        reset_vram_peak(model.device)
        run = JobRun(model, job, emit, token, ram)
        try:
            return run_classified(lambda: run.phase, lambda: self._generate(model, job, run))
        except EngineFailure as failure:
            if failure.code == "OOM":
                self.prompt_cache.clear()  # the worker frees device memory next; give it the embeddings too
            raise

    def _generate(self, model: WanT2V, job: JobSpec, run: JobRun) -> dict[str, Any]:
        model.check_job(job)
        check_outputs(job.output)

        def produce(on_frames: OnFrames | None) -> WanVideo:
            with run.counting(self.prompt_cache):
                return model.generate(
                    job, on_phase=run.on_phase, on_step=run.on_step, is_cancelled=run.token.is_cancelled,
                    on_frames=on_frames, on_preview=lambda row, preview: run.on_preview(preview),
                )

        return run.finish(produce)

    def generate_batch(self, members: Sequence[BatchMember]) -> dict[str, Any]:
        """Several jobs of one shape as one denoising loop (batch.py); each member is answered through
        its `settle`, then this returns the batch's summary. Raises (after answering every member
        not yet answered with it) when the batch as a whole fails."""
        model = self.model
        if model is None:
            failure = EngineFailure("MODEL_NOT_LOADED", "generate_batch before load: send a load request first")
            for member in members:
                member.settle(failure)
            raise failure
        try:
            return run_batch(model, members)
        except EngineFailure as failure:
            if failure.code == "OOM":
                self.prompt_cache.clear()  # the worker frees device memory next; give it the embeddings too
            raise


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
