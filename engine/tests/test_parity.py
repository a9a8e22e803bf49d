"""kino's own Wan loop against diffusers' WanPipeline on the same checkpoint: the frames must agree
to within one uint8 level (float32, CPU), for two differently built checkpoints, with and without
classifier-free guidance, with the checkpoint's shift and with an overriding one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VARIANT_SHIFT_KEY
from diffusers import WanPipeline

from kino_engine.pipelines.wan import WanT2V, clean_prompt
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec

PROMPT = "  A red  car &amp; a dog\non the beach at night,\t\u201cfoggy\u201d  "
NEGATIVE = "blurry, bad"


@dataclass(frozen=True)
class Case:
    checkpoint: str  # fixture name
    shift_key: str  # the scheduler config key a shift overrides on the diffusers side
    guidance: float
    shift: float | None
    steps: int
    seed: int


CASES = [
    Case("tiny_checkpoint", "flow_shift", guidance=5.0, shift=None, steps=6, seed=3),
    Case("tiny_checkpoint", "flow_shift", guidance=1.0, shift=7.0, steps=5, seed=11),
    Case("variant_checkpoint", VARIANT_SHIFT_KEY, guidance=4.0, shift=2.0, steps=5, seed=5),
    Case("variant_checkpoint", VARIANT_SHIFT_KEY, guidance=1.0, shift=None, steps=4, seed=0),
]


def _job(case: Case, width: int = 80, height: int = 48, frames: int = 9) -> JobSpec:
    return JobSpec(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, frames=frames, steps=case.steps,
        guidance=case.guidance, shift=case.shift, seed=case.seed, fps=None,
    )


_loaded: dict[str, tuple[WanT2V, WanPipeline]] = {}


def _models(path: Path) -> tuple[WanT2V, WanPipeline]:
    key = str(path)
    if key not in _loaded:
        kino = WanT2V.load(ModelSpec("parity", CheckpointSource(key), device="cpu", dtype="float32"))
        reference = WanPipeline.from_pretrained(key, dtype=torch.float32)
        reference.set_progress_bar_config(disable=True)
        _loaded[key] = (kino, reference)
    return _loaded[key]


def _diffusers_frames(pipe: WanPipeline, case: Case, job: JobSpec) -> np.ndarray:
    scheduler = pipe.scheduler
    if case.shift is not None:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **{case.shift_key: case.shift})
    try:
        out = pipe(
            prompt=job.prompt, negative_prompt=job.negative_prompt, height=job.height, width=job.width,
            num_frames=job.frames, num_inference_steps=job.steps, guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed), output_type="np",
        ).frames[0]
    finally:
        pipe.scheduler = scheduler
    return (out * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil converts


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.checkpoint}-g{c.guidance}-shift{c.shift}")
def test_frames_match_diffusers(case: Case, request: pytest.FixtureRequest) -> None:
    kino, reference = _models(request.getfixturevalue(case.checkpoint))
    job = _job(case)
    ours = kino.generate(job).frames
    theirs = _diffusers_frames(reference, case, job)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (job.frames, job.height, job.width, 3), (
        f"frame layout differs: kino {ours.shape} {ours.dtype}, diffusers {theirs.shape}: a transposed or "
        "mis-sized decode"
    )
    assert theirs.std() > 2.0, "the reference video is flat: the comparison would prove nothing"
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= 1, (
        f"kino's frames differ from diffusers' by up to {diff.max()} levels ({(diff > 1).mean():.1%} of values): "
        "the loop's math drifted (noise, scheduler/shift, CFG, prompt encoding, un-normalization or rounding)"
    )


def test_seed_and_shift_change_the_video(tiny_checkpoint: Path) -> None:
    kino, _ = _models(tiny_checkpoint)
    base = Case("tiny_checkpoint", "flow_shift", guidance=5.0, shift=None, steps=4, seed=1)
    frames = kino.generate(_job(base)).frames
    assert not np.array_equal(frames, kino.generate(_job(Case(**{**base.__dict__, "seed": 2}))).frames), (
        "two seeds gave the same video: the seed does not reach the noise"
    )
    assert not np.array_equal(frames, kino.generate(_job(Case(**{**base.__dict__, "shift": 9.0}))).frames), (
        "an overriding shift gave the checkpoint's video: job.shift is ignored"
    )
    assert np.array_equal(frames, kino.generate(_job(base)).frames), "the same job twice gave two videos"


def test_prompt_embeddings_match_diffusers(variant_checkpoint: Path) -> None:
    kino, reference = _models(variant_checkpoint)
    ours = kino.encode_prompt(PROMPT)
    with torch.no_grad():  # as WanPipeline.__call__ runs it (autograd picks other kernels)
        theirs, _ = reference.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=512)
    assert ours.shape == theirs.shape == (1, 512, 24), f"embedding shape {tuple(ours.shape)}: padding to 512 broke"
    # kino runs the encoder on the prompt's own tokens, diffusers on all 512 (pads masked): the same
    # math, GEMMs of another size, so float32 rounding apart.
    diff = (ours - theirs).abs().max()
    assert diff <= 1e-5 * theirs.abs().max(), (
        f"prompt embeddings differ by {diff:.3g}: cleaning, tokenization, the pads' mask or trimming drifted"
    )
    length = int(kino.tokenizer([clean_prompt(PROMPT)], return_tensors="pt").attention_mask.sum())
    assert torch.count_nonzero(ours[0, length:]) == 0 and torch.count_nonzero(ours[0, :length]) > 0, (
        "positions past the prompt must be exact zeros and the prompt itself not: the mask is misapplied"
    )


def test_clean_prompt_matches_wan() -> None:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in [PROMPT, "caf\u00c3\u00a9 &lt;b&gt;", "\u3000x\u00a0\u00a0y\x1c", ""]:
        assert clean_prompt(text) == prompt_clean(text), f"prompt cleaning differs from Wan's for {text!r}"
