"""A `generate_batch`: several jobs of one shape as one denoising loop, each answered on its own.

Order: every job is checked (geometry, outputs; one that fails is answered at once and left out);
their prompts are encoded (text_encode: the texts the prompt cache misses, all jobs' in one encoder
call; hits and misses counted per job); the loop runs
the rest as one batch (denoise: each forward carries J x CFG rows; the step events go to every job
still in it, its previews to each job that asks for them); then each job is decoded and written in
turn (decode, encode, its own outputs) and answered with its own result. Every job sees the phase events a `generate` sends, in the same order.

Cancellation is per job. Between steps, and before each job's decode, a job whose token was
cancelled is answered CANCELLED at once; its rows keep computing until the loop ends (a stacked batch
cannot shed rows without new buffers and a new forward shape) and are never decoded or written. The
loop stops early only when every job is cancelled. A job being decoded or written is cancelled at its
last cancellation point (job_run.py), as a `generate` is; a job waiting for its turn to decode is
answered when its turn comes.

Failures: one of the shared phases (text_encode, denoise: an OOM in the loop) fails every job not
yet answered with it, and the batch too; one of a job's own phases (decode, encode) fails that job
alone. Every member is answered exactly once, before `run_batch` returns or raises.

It knows nothing of threads or framing: answers go to each member's `settle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from .cancel import CancelToken
from .job_run import JobRun, run_classified
from .pipelines.wan import OnFrames, PhaseClock, WanT2V, WanVideo
from .protocol import Emit, EngineFailure, JobSpec, Phase
from .runtime.memory import PeakRam, reset_vram_peak
from .runtime.preview import Preview
from .video import check_outputs

Answer = dict[str, Any] | EngineFailure
Status = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True)
class BatchMember:
    """One job of a batch and where its answers go."""

    id: str
    job: JobSpec
    emit: Emit
    token: CancelToken
    #: Called once, with the job's `generate` result or the EngineFailure that ended it.
    settle: Callable[[Answer], None]


def run_batch(model: WanT2V, members: Sequence[BatchMember]) -> dict[str, Any]:
    """Runs the batch; returns {jobs: [{id, status}]} once every member was answered.
    Raises EngineFailure when a shared phase fails (every member not yet answered gets it first)."""
    return _Batch(model, members).run()


class _Batch:
    def __init__(self, model: WanT2V, members: Sequence[BatchMember]):
        self.model = model
        self.members = list(members)
        ram = PeakRam()
        ram.start()
        reset_vram_peak(model.device)
        self.runs = [JobRun(model, m.job, m.emit, m.token, ram) for m in self.members]
        self.status: list[Status | None] = [None] * len(self.members)
        #: The shared phase running, for classifying a failure of the batch.
        self.phase: Phase | None = None

    def run(self) -> dict[str, Any]:
        try:
            run_classified(lambda: self.phase, self._run)
        except EngineFailure as failure:
            if failure.code != "CANCELLED" or self._open():
                for k in self._open():
                    self._settle(k, failure)
                raise
            # The loop stopped because every job in it was cancelled (and answered): the batch ends normally.
        return {"jobs": [{"id": m.id, "status": s} for m, s in zip(self.members, self.status)]}

    # ---- the phases ----

    def _run(self) -> None:
        model = self.model
        for k, member in enumerate(self.members):
            if member.token.is_cancelled():
                self._settle(k, EngineFailure("CANCELLED", "cancelled before it started"))
                continue
            try:
                model.check_job(member.job)
                check_outputs(member.job.output)
            except EngineFailure as failure:
                self._settle(k, failure)
        if not self._open():
            return
        shared = PhaseClock(model.device, self._on_phase)
        with shared.run("text_encode"):
            embeds = self._encode(self._open())
        rows = [k for k in self._open() if k in embeds]
        guided = self.members[rows[0]].job.guidance > 1.0
        with shared.run("denoise"):
            latents = model.denoise_batch(
                [embeds[k][0] for k in rows],
                [embeds[k][1] for k in rows] if guided else None,  # type: ignore[misc]
                [self.members[k].job for k in rows],
                on_step=self._on_step,
                is_cancelled=lambda: self._drop_cancelled("during denoising (its rows ran on, unused)"),
                on_preview=lambda r, preview: self._on_preview(rows[r], preview),
            )  # (J, C, F', H', W'), row r is job rows[r]'s
        del embeds
        for r, k in enumerate(rows):
            if self.status[k] is None and not self._drop_cancelled("before its decode", only=k):
                self._finish(k, latents[r : r + 1], shared, len(rows))

    def _encode(self, jobs: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Every job's (prompt, negative prompt or None) embeddings from one encoder call for all the
        texts the cache misses; each job is credited with its own texts' hits and misses."""
        texts: list[str] = []
        owners: list[int] = []
        for k in jobs:
            job = self.members[k].job
            mine = [job.prompt, job.negative_prompt] if job.guidance > 1.0 else [job.prompt]
            texts += mine
            owners += [k] * len(mine)
        counted = getattr(self.model.encode_prompts, "counted", None)
        if counted is not None:
            answers = counted(texts)
        else:  # no cache installed: every text is encoded (and none is counted)
            answers = [(value, None) for value in self.model.encode_prompts(texts)]
        mine_by_job: dict[int, list[torch.Tensor]] = {k: [] for k in jobs}
        for k, (value, hit) in zip(owners, answers):
            mine_by_job[k].append(value)
            if hit is not None:
                self.runs[k].count_prompt(hit)
        return {k: (values[0], values[1] if len(values) > 1 else None) for k, values in mine_by_job.items()}

    def _finish(self, k: int, latents: torch.Tensor, shared: PhaseClock, size: int) -> None:
        """Job k's decode and outputs, answered with its result or its own failure."""
        run, job, model = self.runs[k], self.members[k].job, self.model
        clock = shared.fork(run.on_phase)

        def produce(on_frames: OnFrames | None) -> WanVideo:
            return model.decode_video(latents, job, clock, on_frames)

        try:
            result = run_classified(lambda: run.phase, lambda: run.finish(produce, batch_size=size))
        except EngineFailure as failure:
            self._settle(k, failure)
        else:
            self._settle(k, result)

    # ---- the members ----

    def _open(self) -> list[int]:
        """The jobs not answered yet."""
        return [k for k, s in enumerate(self.status) if s is None]

    def _settle(self, k: int, answer: Answer) -> None:
        if self.status[k] is not None:
            return
        if isinstance(answer, EngineFailure):
            self.status[k] = "cancelled" if answer.code == "CANCELLED" else "failed"
        else:
            self.status[k] = "completed"
        self.members[k].settle(answer)

    def _drop_cancelled(self, when: str, only: int | None = None) -> bool:
        """Answers CANCELLED to each open job (or job `only`) whose token was cancelled. True when
        that leaves none of them open (for the loop: every job is gone, so it may stop)."""
        jobs = self._open() if only is None else [only]
        for k in jobs:
            if self.members[k].token.is_cancelled():
                self._settle(k, EngineFailure("CANCELLED", f"cancelled {when}", phase=self.runs[k].phase))
        return all(self.status[k] is not None for k in jobs)

    def _on_phase(self, phase: Phase, state: Literal["start", "end"], ms: float | None) -> None:
        self.phase = phase
        for k in self._open():
            self.runs[k].on_phase(phase, state, ms)

    def _on_step(self, i: int, n: int, ms: float) -> None:
        for k in self._open():
            self.runs[k].on_step(i, n, ms)

    def _on_preview(self, k: int, preview: Preview) -> None:
        if self.status[k] is None:
            self.runs[k].on_preview(preview)
