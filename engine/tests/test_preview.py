"""Previews while denoising: the latent -> RGB fit, the tap's schedule and images, and that previews
change nothing of the loop (same latents, no host syncs), alone and in a batch."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, EngineFailure, JobSpec, ModelSpec, PreviewSpec, parse_job_spec
from kino_engine.runtime.options import RuntimeOptions
from kino_engine.runtime.preview import LatentRgb, PreviewTap, fit_clips, fit_latent_rgb
from kino_engine.runtime.syncs import SyncDetector

_models: dict[str, WanT2V] = {}


def _model(path: Path, cfg: str = "batched") -> WanT2V:
    key = f"{path}:{cfg}"
    if key not in _models:
        spec = ModelSpec("preview", CheckpointSource(str(path)), device="cpu", dtype="float32")
        _models[key] = WanT2V.load(spec, runtime=RuntimeOptions(cfg=cfg))  # type: ignore[arg-type]
    return _models[key]


def _job(preview: PreviewSpec | None, steps: int = 5, seed: int = 3, prompt: str = "a red car on the beach") -> JobSpec:
    return JobSpec(
        prompt=prompt, negative_prompt="blurry", width=80, height=48, frames=9, steps=steps,
        guidance=5.0, shift=None, seed=seed, fps=None, preview=preview,
    )


def _embeds(model: WanT2V, job: JobSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_prompt(job.prompt), model.encode_prompt(job.negative_prompt)


def _png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB", f"a preview must be an RGB PNG, got {image.format} {image.mode}"
    return np.asarray(image)


# ---- the fit ----


def test_fit_recovers_a_linear_encoder_exactly() -> None:
    """An 'encoder' that is linear in the patch colours: the fit must find its inverse (the least
    squares, the patch pooling and the latent-frame pairing are all exercised)."""
    generator = torch.Generator().manual_seed(0)
    mix = torch.randn((3, 6), generator=generator, dtype=torch.float64)  # colours -> 6 channels
    offset = torch.randn(6, generator=generator, dtype=torch.float64)
    scale_s, scale_t = 4, 2

    def encode(video: torch.Tensor) -> torch.Tensor:  # (N, 3, F, H, W) in [-1, 1]
        frames = video[:, :, ::scale_t]  # the first frame, then one per scale_t (static clips)
        colours = F.avg_pool3d(frames.double() * 0.5 + 0.5, (1, scale_s, scale_s))  # (N, 3, F', h, w)
        return torch.einsum("nkfhw,kc->ncfhw", colours, mix) + offset.view(1, 6, 1, 1, 1)

    rgb = fit_latent_rgb(encode, scale_s, scale_t)
    assert rgb.weight.shape == (6, 3) and rgb.bias.shape == (3,)
    assert rgb.rms_error < 1e-5, f"the fit of an exactly linear encoder left an RMS error of {rgb.rms_error:.3g}"
    colours = torch.rand((50, 3), generator=generator, dtype=torch.float64)
    latents = (colours @ mix + offset).float()
    assert torch.allclose(rgb.apply(latents), colours.float(), atol=1e-4), "the fitted map does not invert the encoder"


def test_fit_clips_cover_the_colour_cube() -> None:
    clips = fit_clips(16, 8, 5)
    assert clips.shape == (16, 3, 5, 8, 8)
    assert clips.min() == -1.0 and clips.max() == 1.0, "the pure colours must reach both ends of [-1, 1]"
    assert torch.equal(clips[:, :, 0], clips[:, :, -1]), "the clips must be static (the fit pairs every latent frame with frame 0)"
    assert len({tuple(c) for c in clips[:8, :, 0, 0, 0].tolist()}) == 8, "the 8 corners of the RGB cube must all be there"


def test_model_fit_is_computed_once_per_model(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint)
    first = model.latent_rgb()
    assert first.weight.shape == (model.latent_channels, 3)
    assert model.latent_rgb() is first, "the latent -> RGB map must be fitted once per loaded model, then reused"


# ---- the loop ----


def test_previews_arrive_at_the_due_steps_and_change_nothing(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint)
    job = _job(PreviewSpec(2), steps=5)
    cond, uncond = _embeds(model, job)
    got: list[tuple[int, object]] = []
    with_previews = model.denoise(cond, uncond, job, on_preview=lambda r, p: got.append((r, p)))
    without = model.denoise(cond, uncond, _job(None, steps=5))
    assert torch.equal(with_previews, without), "taking previews changed the latents: it must only read them"
    assert [(r, p.step, p.steps) for r, p in got] == [(0, 2, 5), (0, 4, 5), (0, 5, 5)], (  # type: ignore[attr-defined]
        "previews must come every `every` steps and at the last, in order"
    )
    _, _, _, height, width = model.latent_shape(job)
    for _, preview in got:
        assert (preview.width, preview.height) == (width, height)  # type: ignore[attr-defined]
        assert _png(preview.png).shape == (height, width, 3)  # type: ignore[attr-defined]


def test_a_preview_is_the_projected_clean_estimate(tiny_checkpoint: Path) -> None:
    """At one step, the image is the middle latent frame of x_t - sigma_t * v through the fitted map."""
    model = _model(tiny_checkpoint)
    rgb = model.latent_rgb()
    shape = (2, model.latent_channels, 3, 6, 10)
    generator = torch.Generator().manual_seed(5)
    latents, velocity = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    sigmas = [0.9, 0.5, 0.1]
    got: list[tuple[int, object]] = []
    tap = PreviewTap(rgb, [PreviewSpec(1), None], sigmas, shape, torch.device("cpu"), lambda r, p: got.append((r, p)))
    tap.capture(1, latents, velocity)
    tap.finish()
    assert [r for r, _ in got] == [0], "only the job row that asked for previews gets one"
    x0 = latents[0, :, 1] - 0.5 * velocity[0, :, 1]  # (C, H', W'), middle frame, sigma of step index 1
    expected = (rgb.apply(x0.permute(1, 2, 0)) * 255).clamp(0, 255).round().to(torch.uint8).numpy()
    image = _png(got[0][1].png)  # type: ignore[attr-defined]
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1, "the preview is not the projected x0 estimate"


def test_previews_add_no_host_syncs(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint)
    job = _job(PreviewSpec(1), steps=4)
    cond, uncond = _embeds(model, job)
    model.latent_rgb()  # fitted outside the watched steps (once per model)
    detector = SyncDetector()
    per_step: list[list[str]] = []
    seen = 0

    def on_step(i: int, n: int, ms: float) -> None:
        nonlocal seen
        if i == 1:
            detector.__enter__()
            return
        per_step.append(detector.syncs[seen:])
        seen = len(detector.syncs)

    previews: list[int] = []
    try:
        model.denoise(cond, uncond, job, on_step=on_step, on_preview=lambda r, p: previews.append(p.step))
    finally:
        detector.__exit__(None, None, None)
    assert previews == [1, 2, 3, 4]
    assert all(not s for s in per_step), f"previews made host-syncing ops inside steps: {[Counter(s) for s in per_step]}"


def test_batch_rows_get_their_own_previews(tiny_checkpoint: Path) -> None:
    """Two jobs in one loop, one asking every 2 steps, one every 3: each gets its own schedule, and its
    images are those it gets alone (up to the GEMMs' rounding at batch 2)."""
    model = _model(tiny_checkpoint)
    jobs = [_job(PreviewSpec(2), seed=3), _job(PreviewSpec(3), seed=11, prompt="a blue boat at night")]
    embeds = [_embeds(model, j) for j in jobs]
    got: list[tuple[int, int, np.ndarray]] = []
    model.denoise_batch(
        [e[0] for e in embeds], [e[1] for e in embeds], jobs,
        on_preview=lambda r, p: got.append((r, p.step, _png(p.png))),
    )
    assert sorted((r, s) for r, s, _ in got) == [(0, 2), (0, 4), (0, 5), (1, 3), (1, 5)]
    for row, job in enumerate(jobs):
        alone: dict[int, np.ndarray] = {}
        model.denoise(*embeds[row], job, on_preview=lambda r, p: alone.__setitem__(p.step, _png(p.png)))
        for r, step, image in got:
            if r == row:
                diff = np.abs(image.astype(int) - alone[step].astype(int)).max()
                assert diff <= 2, f"job {row}'s batched preview at step {step} differs from its own by {diff} levels"


def test_cancelled_loop_sends_no_previews_after_it(tiny_checkpoint: Path) -> None:
    model = _model(tiny_checkpoint)
    job = _job(PreviewSpec(1), steps=5)
    cond, uncond = _embeds(model, job)
    steps: list[int] = []
    previews: list[int] = []
    with pytest.raises(EngineFailure) as failure:
        model.denoise(
            cond, uncond, job,
            on_step=lambda i, n, ms: steps.append(i),
            is_cancelled=lambda: len(steps) >= 2,
            on_preview=lambda r, p: previews.append(p.step),
        )
    assert failure.value.code == "CANCELLED"
    assert previews == [1, 2], f"previews after the cancellation point: {previews}"


# ---- the protocol ----


@pytest.mark.parametrize(("preview", "field"), [({"every": 0}, "job.preview.every"), ({"every": 1.5}, "job.preview.every"), ({}, "job.preview.every"), (3, "job.preview")])
def test_bad_preview_spec_names_the_field(preview: object, field: str) -> None:
    job = {
        "prompt": "p", "negativePrompt": "", "width": 64, "height": 64, "frames": 5, "steps": 2, "guidance": 1.0,
        "shift": None, "seed": 0, "fps": None, "output": {"video": None, "framesDir": None}, "preview": preview,
    }
    with pytest.raises(EngineFailure) as failure:
        parse_job_spec(job)
    assert failure.value.code == "BAD_REQUEST" and failure.value.field == field, (failure.value.code, failure.value.field)


def test_preview_spec_schedule() -> None:
    spec = PreviewSpec(4)
    assert [s for s in range(1, 11) if spec.due(s, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if PreviewSpec(10).due(s, 3)] == [3], "an `every` beyond the steps still previews the last"


def test_latent_rgb_apply_shapes() -> None:
    rgb = LatentRgb(torch.eye(4, 3), torch.zeros(3), 0.0)
    assert rgb.apply(torch.ones((2, 5, 4))).shape == (2, 5, 3)
