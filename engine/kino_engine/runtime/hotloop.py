"""The denoising loop's hot-path parts: per-step timing without syncs, a sync-free scheduler step,
and the preallocated guidance buffers.

Contract (for one loop; nothing here outlives it):
- `StepTimer` times each step with CUDA events and reports it once its end event has completed
  (`event.query()`), so the host never waits for the GPU to report progress. It lets the host run at
  most `max_ahead` steps ahead of the GPU (then it polls the oldest step's end event, sleeping
  between polls, while the GPU still has queued work: this bounds the lag of progress and
  cancellation without idling the GPU and without a host synchronization call). On CPU it uses perf_counter, as the work is synchronous there.
- `make_stepper(scheduler, steps)` returns the scheduler's step as a function (v, x) -> x'. For
  UniPCMultistepScheduler (Wan 2.1's) diffusers' `step` forces host syncs on a GPU every step: it
  moves CPU sigmas to the device (`self.sigmas[i].to(device)`, a blocking pageable copy) and the
  corrector calls `torch.linalg.solve`, which reads its error flag on the host. Its update is linear
  in the state (sample, model output, the converted outputs it keeps, the last sample), with
  coefficients that depend only on the sigmas, so `tabulate_unipc` runs diffusers' own `step` once
  per job on a CPU twin with unit vectors as inputs, which yields each step's coefficients (float64);
  the device then applies them with a few multiply-adds into reused buffers. Other schedulers
  (FlowMatchEulerDiscrete keeps its sigmas on the device and is sync-free) run through `step`.
- `GuidanceBuffers` holds the model input, the stacked (cond, uncond) embeddings and the guided
  velocity, allocated once per loop and refilled with `copy_`; one loop may run several jobs of one
  shape (a batch), each with its own latents and embeddings.

Shapes: latents x (J, C, F', H', W') float32, J jobs (1 alone); model input (B, C, F', H', W') in
the model dtype, B = 2J for batched guidance, else J; embeddings (B, L, D). The steppers are
elementwise with per-step scalar coefficients, so they step J stacked latents as J separate ones.
This module knows nothing about models or the protocol.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

log = logging.getLogger("kino.hotloop")

OnStep = Callable[[int, int, float], None]

#: How long the step timer sleeps between polls of an event when the host is too far ahead.
POLL_S = 0.0005


def wait_polling(event: torch.cuda.Event) -> None:
    """Waits for `event` by polling it (`query()`, POLL_S sleeps): no host synchronization call."""
    while not event.query():
        time.sleep(POLL_S)


class StepTimer:
    """Per-step milliseconds for progress events, read without stalling the GPU."""

    def __init__(self, device: torch.device, total: int, on_step: OnStep | None, max_ahead: int = 2):
        self.device = device
        self.total = total
        self.on_step = on_step
        self.max_ahead = max_ahead
        self._cuda = device.type == "cuda"
        self._pending: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._begin: tuple[torch.cuda.Event, ...] | float = 0.0

    def begin(self, index: int) -> None:
        """Mark the start of step `index` (0-based) on the device's stream."""
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._begin = (start,)
        else:
            self._begin = time.perf_counter()

    def end(self, index: int) -> None:
        """Mark its end; report every finished step; wait only when more than `max_ahead` are in flight."""
        if not self._cuda:
            assert isinstance(self._begin, float)
            self._report(index, (time.perf_counter() - self._begin) * 1000.0)
            return
        assert isinstance(self._begin, tuple)
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self._pending.append((index, self._begin[0], stop))
        # With more than max_ahead steps in flight the host waits for the oldest, while the GPU still
        # has max_ahead steps queued behind it: that idles the host, not the GPU.
        self._drain(keep=self.max_ahead)

    def finish(self) -> None:
        """Report the steps still in flight (waits for them: the loop is over)."""
        self._drain(keep=0)

    def _drain(self, keep: int) -> None:
        """Report the finished steps in order, waiting for the oldest until at most `keep` are in flight.

        It waits by polling the end event (`query()` and a POLL_S sleep), not cudaEventSynchronize, so
        the loop makes no host synchronization at all, at the cost of <= POLL_S of lag."""
        while self._pending:
            index, start, stop = self._pending[0]
            if not stop.query():
                if len(self._pending) <= keep:
                    return
                wait_polling(stop)
            self._pending.pop(0)
            self._report(index, start.elapsed_time(stop))

    def _report(self, index: int, ms: float) -> None:
        if self.on_step is not None:
            self.on_step(index + 1, self.total, ms)


# ---- the scheduler step ----

Stepper = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UniPCRow:
    """One UniPC step as linear combinations over the slots [x, v, h_0..h_{K-1}, last].

    x: the sample before the step; v: the model output; h_k: the converted outputs the scheduler
    keeps (model_outputs); last: its last_sample. None: that slot is empty after the step.
    """

    prev: tuple[float, ...]
    hist: tuple[tuple[float, ...] | None, ...]
    last: tuple[float, ...] | None


def supports_tabulation(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler` is a UniPC whose step is linear in its inputs (no thresholding, no solver_p)."""
    from diffusers import UniPCMultistepScheduler

    return (
        type(scheduler) is UniPCMultistepScheduler
        and not scheduler.config.thresholding
        and getattr(scheduler, "solver_p", None) is None
    )


def tabulate_unipc(scheduler: SchedulerMixin, steps: int) -> list[UniPCRow]:
    """Each step's coefficients, from diffusers' own `step` run on a CPU twin with unit-vector inputs.

    `scheduler` must have had set_timesteps and set_begin_index(0); it is not modified.
    """
    twin = copy.deepcopy(scheduler)
    twin.timesteps = twin.timesteps.cpu()
    twin.sigmas = twin.sigmas.cpu()
    order = len(twin.model_outputs)
    width = order + 3  # x, v, h_0..h_{K-1}, last
    unit = torch.eye(width, dtype=torch.float64)  # row j: slot j as a (batch 1, `width` channels) tensor

    def row(t: torch.Tensor | None) -> tuple[float, ...] | None:
        return None if t is None else tuple(t.reshape(width).tolist())

    rows = []
    for i in range(steps):
        twin.model_outputs = [None if h is None else unit[2 + k : 3 + k] for k, h in enumerate(twin.model_outputs)]
        twin.last_sample = None if twin.last_sample is None else unit[width - 1 : width]
        prev = twin.step(unit[1:2], twin.timesteps[i], unit[0:1], return_dict=False)[0]
        rows.append(UniPCRow(row(prev), tuple(row(h) for h in twin.model_outputs), row(twin.last_sample)))
    return rows


class TabulatedUniPC:
    """Applies `tabulate_unipc`'s rows on the device: no host reads, no new buffers after warm-up.

    Differs from diffusers' `step` by float rounding only: the coefficients are combined in float64
    on the host, and the products with a bf16 model output are taken in float32 (diffusers rounds
    sigma * v to bf16 first), so this is at least as precise.
    """

    def __init__(self, rows: list[UniPCRow]):
        self.rows = rows
        self.index = 0
        order = len(rows[0].hist) if rows else 0
        self.hist: list[torch.Tensor | None] = [None] * order
        self.last: torch.Tensor | None = None
        self.pool: list[torch.Tensor] = []  # float32 latent-shaped buffers this stepper owns

    def __call__(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One step: model output v (J, C, F', H', W') any float dtype, sample x float32 -> the next sample."""
        row = self.rows[self.index]
        slots = [x, v, *self.hist, self.last]
        state = [x, *self.hist, self.last]  # what the buffers hold now; v never becomes state by alias
        taken: list[torch.Tensor] = []
        hist = [self._combine(c, slots, state, taken) for c in row.hist]
        last = self._combine(row.last, slots, state, taken)
        prev = self._combine(row.prev, slots, state, taken)
        self.hist, self.last = hist, last
        self.index += 1
        assert prev is not None
        return prev

    def _combine(
        self,
        coefs: tuple[float, ...] | None,
        slots: list[torch.Tensor | None],
        state: list[torch.Tensor | None],
        taken: list[torch.Tensor],
    ) -> torch.Tensor | None:
        if coefs is None:
            return None
        terms = [(c, slots[j]) for j, c in enumerate(coefs) if c != 0.0]
        if len(terms) == 1 and terms[0][0] == 1.0 and terms[0][1] is not slots[1]:
            return terms[0][1]  # a slot carried over unchanged (h_1 -> h_0): alias, no copy
        terms.sort(key=lambda term: term[1].dtype != torch.float32)  # start from a float32 term
        out = self._take(slots[0], state, taken)
        first_coef, first = terms[0]
        if first.dtype == torch.float32:
            torch.mul(first, first_coef, out=out)
        else:
            out.copy_(first).mul_(first_coef)  # upcast before multiplying: float32 math
        for coef, tensor in terms[1:]:
            out.add_(tensor, alpha=coef)  # in-place into float32: computed in float32
        return out

    def _take(self, like: torch.Tensor, state: list[torch.Tensor | None], taken: list[torch.Tensor]) -> torch.Tensor:
        """A pool buffer that no slot of the current state and no output of this step uses."""
        busy = {id(t) for t in state if t is not None} | {id(t) for t in taken}
        for buffer in self.pool:
            if id(buffer) not in busy:
                taken.append(buffer)
                return buffer
        buffer = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        self.pool.append(buffer)
        taken.append(buffer)
        return buffer


def make_stepper(scheduler: SchedulerMixin, steps: int, tabulate: bool = True) -> tuple[Stepper, str]:
    """The step function for this job and its kind ("tabulated" or "library")."""
    if tabulate and supports_tabulation(scheduler):
        return TabulatedUniPC(tabulate_unipc(scheduler, steps)), "tabulated"
    timesteps = scheduler.timesteps
    counter = iter(range(steps))

    def library_step(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scheduler.step(v, timesteps[next(counter)], x, return_dict=False)[0]

    return library_step, "library"


# ---- guidance ----


class GuidanceBuffers:
    """Model input, embeddings and guided velocity for the J jobs of one loop (a batch; J = 1 alone),
    allocated once and refilled in place.

    `batch` rows per job: 2 stacks (cond, uncond) for one forward, 1 serves unguided and sequential
    jobs. The rows run half by half, [cond_0 .. cond_{J-1}, uncond_0 .. uncond_{J-1}], so a forward's
    output splits into its cond and uncond halves by slicing (no gather) and each half lines up with
    the latents' rows.
    """

    def __init__(
        self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, batch: int, dtype: torch.dtype
    ):
        self.jobs = latents.shape[0]  # J
        self.stacked = batch == 2
        self.batch = batch * self.jobs  # rows per forward, B = J * batch
        shape = (self.batch, *latents.shape[1:])
        self.x = torch.empty(shape, dtype=dtype, device=latents.device)  # (B, C, F', H', W')
        halves = [cond] if batch == 1 else [cond, uncond]
        self.embeds = torch.empty((self.batch, *cond.shape[1:]), dtype=dtype, device=cond.device)  # (B, L, D)
        for k, embeds in enumerate(halves):
            assert embeds is not None and embeds.shape[0] == self.jobs
            self.embeds[k * self.jobs : (k + 1) * self.jobs].copy_(embeds)
        self.uncond = uncond.to(dtype) if uncond is not None and batch == 1 else None  # (J, L, D)
        self.guided = torch.empty(latents.shape, dtype=dtype, device=latents.device)  # (J, C, F', H', W')

    def load(self, latents: torch.Tensor) -> torch.Tensor:
        """Copy the float32 latents (J, ...) into the model-dtype input (B, ...), once per half."""
        self.x.view(self.batch // self.jobs, *latents.shape).copy_(latents)
        return self.x

    def halves(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A stacked forward's output (B, ...) as its (cond, uncond) halves, (J, ...) each."""
        return out[: self.jobs], out[self.jobs :]

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """uncond + scale * (cond - uncond) into a reused buffer, with diffusers' dtype and rounding."""
        torch.sub(cond, uncond, out=self.guided)
        return self.guided.mul_(scale).add_(uncond)
