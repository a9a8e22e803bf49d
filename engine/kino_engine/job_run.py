"""One job's side of a generation: its events, its measurements, its outputs and its result.

`JobRun` turns the pipeline's callbacks into the job's protocol events (phase, step, preview), samples the
process's RAM, counts the prompt cache's hits and misses around the job's text encoding, and
`finish`es the job: the decode (streamed into an MP4 encoder when the job asks for an MP4 only), the
last cancellation point, the outputs written, and the `generate` result dict. A job run alone and
each job of a batch go through it. `run_classified` turns any exception into an EngineFailure with
the phase it happened in.

It knows nothing of threads or framing (worker.py), nor of the loop's math (pipelines/wan.py).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, TypeVar

import torch

from .cancel import CancelToken
from .pipelines.wan import OnFrames, WanT2V, WanVideo
from .protocol import Emit, EngineFailure, JobSpec, Phase, phase_event, preview_event, step_event
from .runtime.embed_cache import PromptEmbeddingCache
from .runtime.memory import PeakRam, vram_allocated, vram_peak
from .runtime.preview import Preview
from .video import StreamingMp4Writer, write_outputs

T = TypeVar("T")

#: Decodes the job's latents into a video, handing chunks to the callback when given one.
Produce = Callable[[OnFrames | None], WanVideo]


def ms_since(started: float) -> float:
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


class JobRun:
    """One job from its first phase to its result. `ram` may be shared by the jobs of a batch."""

    def __init__(self, model: WanT2V, job: JobSpec, emit: Emit, token: CancelToken, ram: PeakRam):
        self.model = model
        self.job = job
        self.emit = emit
        self.token = token
        self.ram = ram
        self.started = time.perf_counter()
        #: The phase the job is in (the last one started), for classifying a failure.
        self.phase: Phase | None = None
        self.prompt_hits = 0
        self.prompt_misses = 0

    def on_phase(self, phase: Phase, state: str, ms: float | None) -> None:
        self.phase = phase
        self.ram.sample()
        self.emit(phase_event(phase, state, ms))  # type: ignore[arg-type]

    def on_step(self, i: int, n: int, ms: float) -> None:
        self.emit(step_event(i, n, ms, vram_allocated(self.model.device), self.ram.sample()))

    def on_preview(self, preview: Preview) -> None:
        self.emit(preview_event(preview.step, preview.steps, preview.width, preview.height, preview.png))

    def count_prompt(self, hit: bool) -> None:
        """One of the job's texts was served from the prompt cache (hit) or encoded (miss)."""
        if hit:
            self.prompt_hits += 1
        else:
            self.prompt_misses += 1

    @contextlib.contextmanager
    def counting(self, cache: PromptEmbeddingCache) -> Iterator[None]:
        """Adds the cache's hits and misses within the block to the job's."""
        before = cache.stats()
        try:
            yield
        finally:
            after = cache.stats()
            self.prompt_hits += after.hits - before.hits
            self.prompt_misses += after.misses - before.misses

    def finish(self, produce: Produce, batch_size: int = 1) -> dict[str, Any]:
        """Decodes (`produce`), passes the job's last cancellation point, writes its outputs and
        returns its `generate` result. Raises EngineFailure(CANCELLED) if it was cancelled before."""
        job, token = self.job, self.token
        fps = job.fps if job.fps is not None else self.model.fps
        if job.output.video is not None and job.output.frames_dir is None:
            # Only an MP4: the encoder runs on its own thread while the VAE decodes, chunk by chunk.
            # With the overlap, "decode" is the time until the last chunk reached the encoder and
            # "encode" only what the encoder still needed after it; the wall time (totalMs) is what
            # the overlap shortens.
            with StreamingMp4Writer(job.output.video, fps) as writer:
                video = produce(writer.write)
                if not token.close():  # the last cancellation point: the writer removes its temporary
                    raise EngineFailure("CANCELLED", "cancelled after decoding", phase="decode")
                self.on_phase("encode", "start", None)
                encode_started = time.perf_counter()
                writer.finish()
            encode_ms = ms_since(encode_started)
        else:
            video = produce(None)
            if not token.close():  # the last cancellation point: after it, the job runs to its end
                raise EngineFailure("CANCELLED", "cancelled after decoding", phase="decode")
            self.on_phase("encode", "start", None)
            encode_started = time.perf_counter()
            write_outputs(video.frames, job.output, fps)
            encode_ms = ms_since(encode_started)
        self.on_phase("encode", "end", encode_ms)
        return self._result(video, fps, encode_ms, batch_size)

    def _result(self, video: WanVideo, fps: float, encode_ms: float, batch_size: int) -> dict[str, Any]:
        job, device = self.job, self.model.device
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
                "totalMs": ms_since(self.started),
            },
            "secondsPerStep": denoise_ms / 1000.0 / job.steps,
            "peakVramBytes": _max_or_none(vram_peak(device), *video.phase_peak_vram.values()),
            "phasePeakVramBytes": _phase_peaks(video.phase_peak_vram) if device.type == "cuda" else None,
            "peakRamBytes": self.ram.peak(),
            "cache": {"promptHits": self.prompt_hits, "promptMisses": self.prompt_misses},
            "batchSize": batch_size,
        }


def _max_or_none(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _phase_peaks(peaks: dict[str, int]) -> dict[str, int]:
    """The protocol's names for the pipeline's per-phase peaks."""
    names = {"text_encode": "textEncode", "denoise": "denoise", "decode": "decode"}
    return {names[k]: v for k, v in peaks.items() if k in names}
