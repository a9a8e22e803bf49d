"""The denoising hot path on the tiny models (CPU, float32): batched guidance equals the sequential
path, the tabulated UniPC step equals diffusers' step, no host-syncing op runs in a step after the
first, the loop's buffers are reused step after step, and RuntimeOptions refuses bad values by name.

Tolerances (float32): latents after the loop within atol 1e-4 + rtol 1e-4 between batched and
sequential guidance and between the tabulated and library scheduler step (batch-2 GEMMs and
host-combined coefficients differ from the plain path by float rounding only); frames within 1
uint8 level.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from kino_engine.pipelines import wan as wan_module
from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec
from kino_engine.runtime import hotloop
from kino_engine.runtime.hotloop import GuidanceBuffers, TabulatedUniPC, make_stepper, tabulate_unipc
from kino_engine.runtime.options import RuntimeOptions
from kino_engine.runtime.syncs import SyncDetector

ATOL = RTOL = 1e-4

_models: dict[tuple[str, str], WanT2V] = {}


def _model(path: Path, cfg: str = "auto") -> WanT2V:
    key = (str(path), cfg)
    if key not in _models:
        spec = ModelSpec("hotpath", CheckpointSource(str(path)), device="cpu", dtype="float32")
        _models[key] = WanT2V.load(spec, runtime=RuntimeOptions(cfg=cfg))  # type: ignore[arg-type]
    return _models[key]


def _job(steps: int = 6, guidance: float = 5.0, seed: int = 3) -> JobSpec:
    return JobSpec(
        prompt="a red car on the beach", negative_prompt="blurry, bad", width=80, height=48, frames=9,
        steps=steps, guidance=guidance, shift=None, seed=seed, fps=None,
    )


def _denoise(model: WanT2V, job: JobSpec, **kwargs: object) -> torch.Tensor:
    cond = model.encode_prompt(job.prompt)
    uncond = model.encode_prompt(job.negative_prompt) if job.guidance > 1.0 else None
    return model.denoise(cond, uncond, job, **kwargs)  # type: ignore[arg-type]


def test_batched_guidance_matches_sequential(tiny_checkpoint: Path) -> None:
    job = _job()
    batched_model, sequential_model = _model(tiny_checkpoint, "batched"), _model(tiny_checkpoint, "sequential")
    assert batched_model.forward_batch(job) == 2 and sequential_model.forward_batch(job) == 1, (
        "cfg='batched' must run one forward of batch 2 and 'sequential' two of batch 1"
    )
    batched, sequential = _denoise(batched_model, job), _denoise(sequential_model, job)
    assert batched.std() > 0.1, "the latents are flat: the comparison would prove nothing"
    assert torch.allclose(batched, sequential, atol=ATOL, rtol=RTOL), (
        f"batched guidance drifted from two forwards by {(batched - sequential).abs().max():.3g}: cond/uncond "
        "swapped in the stacked batch, embeddings mis-stacked, or the guidance formula changed"
    )
    frames_b, frames_s = batched_model.decode(batched), sequential_model.decode(sequential)
    diff = np.abs(frames_b.astype(np.int16) - frames_s.astype(np.int16)).max()
    assert diff <= 1, f"batched and sequential guidance give frames {diff} uint8 levels apart"


def test_unguided_job_runs_batch_one(tiny_checkpoint: Path) -> None:
    assert _model(tiny_checkpoint, "batched").forward_batch(_job(guidance=1.0)) == 1, (
        "an unguided job must not pay for a batch-2 forward"
    )


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_tabulated_unipc_matches_diffusers_step(tiny_checkpoint: Path, steps: int) -> None:
    model = _model(tiny_checkpoint)
    generator = torch.Generator().manual_seed(steps)
    shape = (1, 4, 3, 6, 10)
    x0 = torch.randn(shape, generator=generator)
    velocities = [torch.randn(shape, generator=generator) for _ in range(steps)]
    results = []
    for tabulate in (True, False):
        scheduler = model.make_scheduler(None)
        scheduler.set_timesteps(steps, device="cpu")
        scheduler.set_begin_index(0)
        step, kind = make_stepper(scheduler, steps, tabulate=tabulate)
        assert kind == ("tabulated" if tabulate else "library"), f"Wan's UniPC was stepped by the {kind} path"
        x = x0
        for v in velocities:
            x = step(v, x)
        results.append(x)
    tabulated, library = results
    assert torch.allclose(tabulated, library, atol=ATOL, rtol=RTOL), (
        f"the tabulated UniPC step differs from diffusers' by {(tabulated - library).abs().max():.3g} after "
        f"{steps} steps: a coefficient row, the history rotation or the corrector is wrong"
    )


def test_tabulation_leaves_the_scheduler_alone(tiny_checkpoint: Path) -> None:
    scheduler = _model(tiny_checkpoint).make_scheduler(None)
    scheduler.set_timesteps(5, device="cpu")
    scheduler.set_begin_index(0)
    rows = tabulate_unipc(scheduler, 5)
    assert len(rows) == 5 and scheduler.step_index is None and scheduler.model_outputs[-1] is None, (
        "tabulating stepped the job's own scheduler: it must work on a copy"
    )


class _PerStepSyncs:
    """Enters a SyncDetector at the end of the first step and counts its records at every later step."""

    def __init__(self) -> None:
        self.detector = SyncDetector()
        self.per_step: list[list[str]] = []
        self._seen = 0

    def on_step(self, i: int, n: int, ms: float) -> None:
        if i == 1:
            self.detector.__enter__()  # warm-up step done: watch from here on
            return
        self.per_step.append(self.detector.syncs[self._seen :])
        self._seen = len(self.detector.syncs)

    def close(self) -> None:
        self.detector.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("checkpoint", "cfg", "guidance"),
    [
        ("tiny_checkpoint", "batched", 5.0),  # UniPC (tabulated), one batch-2 forward
        ("tiny_checkpoint", "sequential", 5.0),
        ("tiny_checkpoint", "batched", 1.0),
        ("variant_checkpoint", "batched", 4.0),  # FlowMatchEulerDiscrete (diffusers' own step)
    ],
)
def test_no_host_syncs_after_the_first_step(
    checkpoint: str, cfg: str, guidance: float, request: pytest.FixtureRequest
) -> None:
    model = _model(request.getfixturevalue(checkpoint), cfg)
    job = _job(steps=5, guidance=guidance)
    watch = _PerStepSyncs()
    try:
        _denoise(model, job, on_step=watch.on_step)
    finally:
        watch.close()
    assert len(watch.per_step) == job.steps - 1, "on_step was not called once per step"
    syncs = [Counter(step) for step in watch.per_step]
    assert all(not step for step in syncs), (
        f"host-syncing ops inside denoising steps 2..{job.steps}: {syncs}. Each stalls the GPU once per step "
        "(a .item()/bool() on a device tensor, a tensor index, nonzero, a linalg error check, or a copy across devices)"
    )


def test_sync_detector_sees_deliberate_syncs() -> None:
    x = torch.randn(8)
    with SyncDetector() as detector:
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
        torch.linalg.solve(torch.eye(2) * 2.0, torch.ones(2))
    names = Counter(detector.syncs)
    assert names["aten::_local_scalar_dense"] >= 2, f"the detector missed .item()/bool(): {names}"
    solves = names["aten::linalg_solve"] + names["aten::_linalg_check_errors"]  # the op, or its check outside inference mode
    assert names["aten::nonzero"] == 1 and solves == 1, f"the detector missed ops: {names}"


def test_sync_detector_sees_diffusers_unipc_step(tiny_checkpoint: Path) -> None:
    """The library UniPC step calls torch.linalg.solve (a host read on a GPU); the detector must see it,
    or the zero-sync test above could pass with the untabulated step."""
    scheduler = _model(tiny_checkpoint).make_scheduler(None)
    scheduler.set_timesteps(4, device="cpu")
    scheduler.set_begin_index(0)
    step, _ = make_stepper(scheduler, 4, tabulate=False)
    x = torch.randn(1, 4, 2, 2, 2)
    with SyncDetector() as detector:
        for _ in range(4):
            x = step(torch.randn_like(x), x)
    solves = {"aten::linalg_solve", "aten::_linalg_check_errors"}  # the op, or its check outside inference mode
    assert solves & set(detector.syncs), f"the detector saw {detector.syncs} in diffusers' UniPC step"


def test_stepper_reuses_its_buffers(tiny_checkpoint: Path) -> None:
    scheduler = _model(tiny_checkpoint).make_scheduler(None)
    steps = 12
    scheduler.set_timesteps(steps, device="cpu")
    scheduler.set_begin_index(0)
    stepper = TabulatedUniPC(tabulate_unipc(scheduler, steps))
    x = torch.randn(1, 4, 3, 6, 10)
    pool_sizes, pointers = [], []
    for _ in range(steps):
        x = stepper(torch.randn_like(x), x)
        pool_sizes.append(len(stepper.pool))
        pointers.append(x.data_ptr())
    assert len(set(pool_sizes[3:])) == 1, f"the stepper kept allocating after warm-up: pool sizes {pool_sizes}"
    assert set(pointers[3:]) <= {b.data_ptr() for b in stepper.pool}, "steps return memory the pool does not own"
    assert pool_sizes[-1] <= 2 * (len(stepper.hist) + 2), f"the pool grew to {pool_sizes[-1]} buffers"


def test_guidance_buffers_are_reused() -> None:
    latents = torch.randn(1, 4, 3, 6, 10)
    cond, uncond = torch.randn(1, 7, 5), torch.randn(1, 7, 5)
    buffers = GuidanceBuffers(latents, cond, uncond, batch=2, dtype=torch.float32)
    x_ptr, g_ptr = buffers.x.data_ptr(), buffers.guided.data_ptr()
    for _ in range(3):
        x = buffers.load(torch.randn_like(latents))
        out = torch.randn(2, *latents.shape[1:])
        guided = buffers.guide(out[0:1], out[1:2], 5.0)
        assert x.data_ptr() == x_ptr and guided.data_ptr() == g_ptr, "the guidance buffers were reallocated"
        assert torch.equal(x[0], x[1]), "the batch-2 input must hold the same latents twice"
        assert torch.equal(guided, out[1:2] + 5.0 * (out[0:1] - out[1:2])), "guidance differs from diffusers' formula"
    assert torch.equal(buffers.embeds[0:1], cond) and torch.equal(buffers.embeds[1:2], uncond), (
        "the stacked embeddings must be (cond, uncond) in that order"
    )


def test_loop_uses_the_tabulated_step_for_unipc(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds: list[str] = []
    original = hotloop.make_stepper

    def spy(scheduler: object, steps: int, tabulate: bool = True) -> object:
        step, kind = original(scheduler, steps, tabulate)  # type: ignore[arg-type]
        kinds.append(kind)
        return step, kind

    monkeypatch.setattr(wan_module, "make_stepper", spy)
    _denoise(_model(tiny_checkpoint), _job(steps=2))
    assert kinds == ["tabulated"], f"the loop stepped Wan's UniPC with {kinds}: the syncing library step"


def test_step_events_report_every_step_in_order(tiny_checkpoint: Path) -> None:
    seen: list[tuple[int, int]] = []
    _denoise(_model(tiny_checkpoint), _job(steps=4), on_step=lambda i, n, ms: seen.append((i, n)) or None)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)], f"progress events out of order or missing: {seen}"


def test_prewarm_runs_one_forward_at_the_job_shape(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_checkpoint, "batched")
    shapes: list[tuple[int, ...]] = []
    original = model.transformer.forward
    monkeypatch.setattr(
        model.transformer, "forward", lambda **kw: shapes.append(tuple(kw["hidden_states"].shape)) or original(**kw)
    )
    model.prewarm(_job())
    assert shapes == [(2, *model.latent_shape(_job())[1:])], f"prewarm ran forwards of shapes {shapes}"
    shapes.clear()
    model.prewarm(_job(), jobs=3)
    assert shapes == [(6, *model.latent_shape(_job())[1:])], (
        f"a prewarm for a batch of 3 guided jobs must run one forward of 6 rows (the batch's shape), ran {shapes}"
    )
    sequential = _model(tiny_checkpoint, "sequential")
    shapes.clear()
    original_seq = sequential.transformer.forward
    monkeypatch.setattr(
        sequential.transformer, "forward", lambda **kw: shapes.append(tuple(kw["hidden_states"].shape)) or original_seq(**kw)
    )
    sequential.prewarm(_job(), jobs=2)
    assert shapes == [(2, *model.latent_shape(_job())[1:])] * 2, f"sequential guidance: two forwards of the J rows, ran {shapes}"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cfg": "twice"}, "cfg"),
        ({"attention": "sage"}, "attention"),
        ({"compile": "yes"}, "compile"),
        ({"cache_dir": "/tmp/x"}, "cache_dir"),
        ({"max_steps_ahead": 0}, "max_steps_ahead"),
    ],
)
def test_runtime_options_name_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"RuntimeOptions.{field} "):
        RuntimeOptions(**kwargs)


class _FakeEvent:
    """A CUDA event stand-in: completes after `ready_after` queries; counts synchronize calls."""

    synchronized = 0
    queries = 0
    ready_after = 3

    def __init__(self, enable_timing: bool = False):
        self._asked = 0

    def record(self) -> None:
        pass

    def query(self) -> bool:
        _FakeEvent.queries += 1
        self._asked += 1
        return self._asked > _FakeEvent.ready_after

    def synchronize(self) -> None:
        _FakeEvent.synchronized += 1

    def elapsed_time(self, other: "_FakeEvent") -> float:
        return 1.0


def test_step_timer_polls_instead_of_synchronizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ahead of the GPU by more than max_ahead, the timer waits by polling the oldest step's event:
    no cudaEventSynchronize inside the loop (only `finish`, after the loop, may wait)."""
    from kino_engine.runtime import hotloop

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(hotloop, "POLL_S", 0.0)
    _FakeEvent.synchronized = _FakeEvent.queries = 0
    reported: list[int] = []
    timer = hotloop.StepTimer(torch.device("cuda"), 6, lambda i, n, ms: reported.append(i), max_ahead=1)
    for index in range(6):
        timer.begin(index)
        timer.end(index)
        assert len(timer._pending) <= 1, "the host ran more than max_ahead steps ahead"
    assert _FakeEvent.synchronized == 0, "the step timer synchronized inside the loop"
    assert _FakeEvent.queries > 6, "the timer never had to wait: the test does not exercise the bound"
    timer.finish()
    assert _FakeEvent.synchronized == 0, "the end-of-loop drain synchronized instead of polling"
    assert reported == [1, 2, 3, 4, 5, 6]
