"""Random-weight models built from architecture configs (scaled down here: full size is for GPUs)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from kino_engine.engine import Engine
from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import EngineFailure, JobSpec, ModelSpec, RandomSource, SchedulerSpec, WanArchitecture
from kino_engine.random_weights import INIT_STD, build_random
from kino_engine.tiny import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE, WAN21_SCHEDULER_CONFIG

#: Wan 2.1's architecture with every size cut down; the structure (and config keys) are the real ones.
SMALL = WanArchitecture(
    transformer={**TINY_TRANSFORMER, "num_layers": 3, "num_attention_heads": 4, "ffn_dim": 64, "text_dim": 48},
    vae={**TINY_VAE, "base_dim": 8, "dim_mult": [1, 2, 2, 2]},
    text_encoder={**TINY_TEXT_ENCODER, "d_model": 48, "num_heads": 6, "vocab_size": 1000},
    scheduler=SchedulerSpec("UniPCMultistepScheduler", WAN21_SCHEDULER_CONFIG),
    tokenizer_vocab_size=900,
)
JOB = JobSpec(prompt="a fox in the snow", negative_prompt="blurry", width=64, height=48, frames=5, steps=3,
              guidance=5.0, shift=None, seed=4, fps=None)


def _spec(arch: WanArchitecture = SMALL, seed: int = 0, dtype: str = "float32") -> ModelSpec:
    return ModelSpec("small-random", RandomSource(arch, seed), device="cpu", dtype=dtype)


def test_random_architecture_loads_and_generates(tmp_path) -> None:
    engine = Engine()
    events: list[dict] = []
    result = engine.load(_spec(), events.append)
    progress = [e for e in events if e["kind"] == "load"]
    assert [e["component"] for e in progress] == ["text_encoder", "transformer", "vae", "tokenizer"]
    assert progress[-1]["bytes"] == progress[-1]["totalBytes"], (
        "the total announced before building (from the meta device) must equal what was built"
    )
    by_name = {c["name"]: c for c in result["components"]}
    assert by_name["transformer"]["className"] == "WanTransformer3DModel"
    assert by_name["transformer"]["parameters"] == sum(p.numel() for p in engine.model.transformer.parameters())
    assert len(engine.model.tokenizer) == 900

    answer = engine.generate(replace(JOB, output=replace(JOB.output, video=str(tmp_path / "r.mp4"))), lambda e: None)
    assert answer["frames"] == 5 and (tmp_path / "r.mp4").stat().st_size > 0


def test_weights_are_seeded_normal_and_biases_keep_their_init() -> None:
    model = WanT2V.load(_spec(seed=3))
    again = WanT2V.load(_spec(seed=3))
    other = WanT2V.load(_spec(seed=4))
    weight = model.transformer.blocks[0].ffn.net[0].proj.weight
    assert abs(weight.std().item() - INIT_STD) < 0.003 and abs(weight.mean().item()) < 0.003, (
        f"weight matrices must be ~N(0, {INIT_STD}), got std {weight.std().item():.4f}"
    )
    assert torch.equal(weight, again.transformer.blocks[0].ffn.net[0].proj.weight), "the same seed, other weights"
    assert not torch.equal(weight, other.transformer.blocks[0].ffn.net[0].proj.weight), "the seed is ignored"
    norm = model.transformer.blocks[0].norm2.weight
    assert torch.equal(norm, torch.ones_like(norm)), "norm weights must keep their constructor init (ones)"
    frames = model.generate(JOB).frames
    assert np.array_equal(frames, again.generate(JOB).frames), "equal seeds and jobs must give equal videos"


def test_bfloat16_build_keeps_fp32_modules_and_the_vae_in_float32() -> None:
    events: list[dict] = []
    engine = Engine()
    engine.load(_spec(dtype="bfloat16"), events.append)
    model = engine.model
    assert any(e["kind"] == "log" and "VAE kept in float32" in e["message"] for e in events), (
        "the automatic choice of a float32 VAE must be reported with its reason"
    )
    assert model.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.transformer.scale_shift_table.dtype == torch.float32, (
        "WanTransformer3DModel keeps scale_shift_table in fp32 (_keep_in_fp32_modules), as loading does"
    )
    assert model.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}, "the VAE runs in float32"
    assert model.generate(JOB).frames.shape == (5, 48, 64, 3)


def test_build_random_puts_tensors_on_the_target_device_in_dtype() -> None:
    module = build_random(lambda: torch.nn.Linear(8, 4), device=torch.device("cpu"), dtype=torch.float16, seed=0)
    assert module.weight.dtype == torch.float16 and module.weight.device.type == "cpu"
    assert not module.training and not module.weight.requires_grad


@pytest.mark.parametrize(
    ("arch", "field"),
    [
        (replace(SMALL, tokenizer_vocab_size=5000), "model.source.architecture.tokenizerVocabSize"),
        (replace(SMALL, scheduler=SchedulerSpec("NoSuchScheduler", {})), "model.source.architecture.scheduler.className"),
        (replace(SMALL, transformer={**SMALL.transformer, "patch_size": "big"}), "model.source.architecture.transformer"),
    ],
)
def test_bad_architectures_name_the_field(arch: WanArchitecture, field: str) -> None:
    with pytest.raises(EngineFailure) as caught:
        WanT2V.load(_spec(arch))
    assert (caught.value.code, caught.value.field) == ("BAD_REQUEST", field), caught.value.to_json()
