"""The prompt-embedding cache: LRU under a byte budget, and a warm request on a loaded engine that
neither re-encodes its prompts nor reloads anything, with frames identical to the uncached path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kino_engine.job_run as job_run_module
from kino_engine.engine import Engine
from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec
from kino_engine.runtime.embed_cache import PromptEmbeddingCache, tensor_bytes, uninstall_prompt_cache

MIB = 1024 * 1024


def _embedding(mib: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((1, mib * MIB // 4), value, dtype=torch.float32)


def test_lru_under_a_byte_budget() -> None:
    cache = PromptEmbeddingCache(budget_bytes=3 * MIB)
    calls: list[str] = []

    def encode(text: str) -> torch.Tensor:
        calls.append(text)
        return _embedding(1, float(len(text)))

    a = cache.get_or_encode("enc", "a", encode)
    assert cache.get_or_encode("enc", "a", encode) is a, "a hit hands back the cached tensor"
    cache.get_or_encode("enc", "bb", encode)
    cache.get_or_encode("enc", "ccc", encode)
    cache.get_or_encode("enc", "a", encode)  # 'a' becomes the most recently used
    cache.get_or_encode("enc", "dddd", encode)  # over budget: evicts 'bb', the least recently used
    assert calls == ["a", "bb", "ccc", "dddd"]
    cache.get_or_encode("enc", "a", encode)
    cache.get_or_encode("enc", "bb", encode)
    assert calls[-1] == "bb", "the least recently used entry must be the one evicted"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (3, 5, 3, 3 * MIB)
    cache.get_or_encode("other encoder", "a", encode)
    assert calls[-1] == "a", "another encoder's identity must never be served this one's entries"
    assert cache.clear() == 3 * MIB
    assert cache.stats().bytes == 0 and cache.stats().entries == 0


def test_an_entry_over_the_budget_is_returned_but_not_kept() -> None:
    cache = PromptEmbeddingCache(budget_bytes=MIB)
    big = cache.get_or_encode("enc", "big", lambda _: _embedding(2))
    assert tensor_bytes(big) == 2 * MIB
    assert cache.stats().entries == 0
    with pytest.raises(ValueError):
        PromptEmbeddingCache(budget_bytes=-1)


def _job(prompt: str = "a fox in the snow", guidance: float = 5.0) -> JobSpec:
    return JobSpec(
        prompt=prompt, negative_prompt="blurry", width=32, height=32, frames=5, steps=2,
        guidance=guidance, shift=None, seed=3, fps=None,
    )


class _Capture:
    """Stands in for write_outputs: keeps the frames each generate produced."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def __call__(self, frames: np.ndarray, output: Any, fps: float) -> None:
        self.frames.append(frames.copy())


def test_a_warm_request_skips_the_encoder_and_the_load(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    capture = _Capture()
    monkeypatch.setattr(job_run_module, "write_outputs", capture)
    loads: list[Any] = []
    real_load = WanT2V.load.__func__  # type: ignore[attr-defined]

    def counting_load(cls: type, *args: Any, **kwargs: Any) -> WanT2V:
        loads.append(args)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(WanT2V, "load", classmethod(counting_load))
    engine = Engine()
    engine.load(ModelSpec("tiny", CheckpointSource(str(tiny_checkpoint)), device="cpu", dtype="float32"), lambda e: None)
    model = engine.model
    assert model is not None
    encoder_calls: list[int] = []
    model.text_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    transformer, vae, encoder = model.transformer, model.vae, model.text_encoder

    first = engine.generate(_job(), lambda e: None)
    second = engine.generate(_job(), lambda e: None)
    assert first["cache"] == {"promptHits": 0, "promptMisses": 2}, "a cold request encodes the prompt and the negative one"
    assert second["cache"] == {"promptHits": 2, "promptMisses": 0}, "a warm request must be served from the cache"
    assert len(encoder_calls) == 2, f"the text encoder ran {len(encoder_calls)} times for two distinct texts"
    assert len(loads) == 1, "a second generate must not load anything"
    assert engine.model is model and (model.transformer, model.vae, model.text_encoder) == (transformer, vae, encoder), (
        "no component may be rebuilt between requests"
    )
    np.testing.assert_array_equal(capture.frames[1], capture.frames[0], "cached embeddings must give the same video")

    # The uncached path (the model's own encode_prompt) gives the very same frames.
    uninstall_prompt_cache(model)
    uncached = model.generate(_job())
    assert len(encoder_calls) == 4
    np.testing.assert_array_equal(uncached.frames, capture.frames[0], "the cache must not change the result")

    freed = engine.clear_cache()["freedBytes"]
    assert freed == 2 * 512 * model.text_encoder.config.d_model * 4, "two float32 (1, 512, D) embeddings were cached"
    assert engine.clear_cache() == {"freedBytes": 0}


def test_reloading_empties_the_cache(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_run_module, "write_outputs", _Capture())
    engine = Engine()
    spec = ModelSpec("tiny", CheckpointSource(str(tiny_checkpoint)), device="cpu", dtype="float32")
    engine.load(spec, lambda e: None)
    engine.generate(_job(guidance=1.0), lambda e: None)
    engine.load(spec, lambda e: None)
    result = engine.generate(_job(guidance=1.0), lambda e: None)
    assert result["cache"] == {"promptHits": 0, "promptMisses": 1}, (
        "embeddings of a replaced model must not be served to the new one"
    )
