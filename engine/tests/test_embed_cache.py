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


def test_many_texts_are_looked_up_together_and_missing_ones_encoded_in_one_call() -> None:
    cache = PromptEmbeddingCache()
    calls: list[list[str]] = []

    def encode_many(texts: list[str]) -> list[torch.Tensor]:
        calls.append(list(texts))
        return [_embedding(1, float(len(t))) for t in texts]

    cache.get_or_encode("enc", "a", lambda t: encode_many([t])[0])
    answers = cache.get_or_encode_many("enc", ["bb", "a", "ccc", "bb", ""], encode_many)
    assert calls[-1] == ["bb", "ccc", ""], "the distinct texts the cache misses, in order, in one encoder call"
    assert [hit for _, hit in answers] == [False, True, False, True, False], (
        "a cached text is a hit, and so is a text repeated after its first miss in the same call"
    )
    assert answers[0][0] is answers[3][0], "a repeated text is served the one embedding encoded for it"
    assert [float(v[0, 0]) for v, _ in answers] == [2.0, 1.0, 3.0, 2.0, 0.0], "embeddings came back out of order"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2, 4, 4)
    with pytest.raises(ValueError):
        cache.get_or_encode_many("enc", ["x", "y"], lambda texts: [_embedding(1)])


def test_the_encoder_runs_on_the_prompts_own_tokens(tiny_checkpoint: Path) -> None:
    """Not on 512 padded positions: a short prompt costs its length; the result is still (1, 512, D)
    and equals the 512-long run's (the pads are masked keys) up to rounding."""
    spec = ModelSpec("tiny", CheckpointSource(str(tiny_checkpoint)), device="cpu", dtype="float32")
    model = WanT2V.load(spec)
    lengths: list[int] = []
    hook = model.text_encoder.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        texts = ["a red car on the beach at sunset", "", "a cat"]
        batch = model.encode_prompts(texts)
        singles = [model.encode_prompt(t) for t in texts]
    finally:
        hook.remove()
    longest = max(len(model.tokenizer(t).input_ids) for t in texts)
    assert lengths[0] == longest < 64, f"the encoder ran on {lengths[0]} positions for texts of at most {longest} tokens"
    assert len(lengths) == 4, "encode_prompts must run the encoder once for all its texts"
    tokens = model.tokenizer(texts[:1], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        full = model.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    full = full.masked_fill(~tokens.attention_mask.bool().unsqueeze(-1), 0.0)
    for text, one, alone in zip(texts, batch, singles):
        assert one.shape == (1, 512, full.shape[-1]), f"{text!r}: embedding shape {tuple(one.shape)}"
        assert torch.allclose(one, alone, atol=1e-5), f"{text!r}: batched and single encodes differ"
    assert torch.allclose(batch[0], full, atol=1e-5), (
        f"the prompt's own tokens gave embeddings {float((batch[0] - full).abs().max()):.3g} from the 512-long run's"
    )
