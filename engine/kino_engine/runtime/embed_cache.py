"""Prompt-embedding cache: an identical prompt on the same text encoder is encoded once.

Contract:
- Keys are (encoder identity, exact prompt text). The identity names the model, the encoder's class,
  a hash of its config, the object itself (id), its dtype and device, so two models (or one model
  reloaded) never share entries; `Engine` also clears the cache whenever it unloads a model.
- Values are the (1, L, D) tensors the encoder returned, kept on their device. They are handed back
  as they are, not copied: callers must treat them as read-only (kino's loop only casts them, which
  makes a copy when the dtype differs).
- LRU under a byte budget (default 512 MiB): the least recently used entries are dropped until a new
  one fits; a single entry larger than the budget is returned but not kept.
- `hits` / `misses` count lookups since creation; `clear()` drops everything and says how many bytes
  it released.

It is installed from outside: `install_prompt_cache(model, cache, identity)` shadows the model's
`encode_prompts(texts)` (its one entry to the encoder; `encode_prompt(text)` goes through it) with an
instance attribute that consults the cache first and encodes the texts it misses in one call; the
model's code is not touched and `uninstall` restores it. Within one call a text repeated after its
first miss counts as a hit (it is encoded once). The wrapper's `counted(texts)` also says, per text,
whether it was a hit, for callers that attribute hits to jobs (a batch). It knows nothing about the
protocol or the denoising loop.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

#: Default byte budget: a Wan T5 embedding is 512 x 4096 x 2 bytes = 4 MiB in bf16, so ~128 prompts.
DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int


class PromptEmbeddingCache:
    """An LRU of prompt embeddings under a byte budget; safe to share between threads."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[Hashable, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_encode(self, identity: Hashable, text: str, encode: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The cached embedding of `text` for this encoder identity, or `encode(text)` kept for next time."""
        return self.get_or_encode_many(identity, [text], lambda texts: [encode(t) for t in texts])[0][0]

    def get_or_encode_many(
        self, identity: Hashable, texts: Sequence[str], encode_many: Callable[[list[str]], list[torch.Tensor]]
    ) -> list[tuple[torch.Tensor, bool]]:
        """(embedding, hit) per text, in order: the cached ones, and the others from one
        `encode_many(distinct missing texts)` call, kept for next time. A text repeated after its
        first miss in `texts` counts as a hit."""
        found: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        hits: list[bool] = []
        with self._lock:
            for text in texts:
                key = (identity, text)
                cached = self._entries.get(key)
                if cached is not None:
                    self._entries.move_to_end(key)
                    found[text] = cached
                if cached is not None or text in missing:
                    self.hits += 1
                    hits.append(True)
                else:
                    self.misses += 1
                    missing.append(text)
                    hits.append(False)
        if missing:
            encoded = encode_many(missing)  # outside the lock: encoding takes milliseconds to seconds
            if len(encoded) != len(missing):
                raise ValueError(f"encode_many returned {len(encoded)} embeddings for {len(missing)} texts")
            for text, value in zip(missing, encoded):
                self._put((identity, text), value)
                found[text] = value
        return [(found[text], hit) for text, hit in zip(texts, hits)]

    def _put(self, key: tuple[Hashable, str], value: torch.Tensor) -> None:
        size = tensor_bytes(value)
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= tensor_bytes(old)
            while self._entries and self._bytes + size > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(evicted)
            self._entries[key] = value
            self._bytes += size

    def clear(self) -> int:
        """Drops every entry; returns the bytes they held (device memory is returned by the caller's
        free_device_memory, once nothing else references the tensors)."""
        with self._lock:
            freed = self._bytes
            self._entries.clear()
            self._bytes = 0
        return freed

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._entries), self._bytes)


def encoder_identity(model_name: str, encoder: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    """What makes two encoders give the same embeddings for the same text (as far as a key can tell)."""
    config = getattr(encoder, "config", None)
    config_dict = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (model_name, type(encoder).__name__, digest, id(encoder), str(dtype), str(device))


def install_prompt_cache(model: Any, cache: PromptEmbeddingCache, identity: Hashable) -> None:
    """Routes `model.encode_prompts(texts)` (and so `encode_prompt`) through `cache` (an instance
    attribute over the class method)."""
    uninstall_prompt_cache(model)
    original = model.encode_prompts

    def counted(texts: Sequence[str]) -> list[tuple[torch.Tensor, bool]]:
        return cache.get_or_encode_many(identity, texts, original)

    def encode_prompts(texts: Sequence[str]) -> list[torch.Tensor]:
        return [value for value, _ in counted(texts)]

    encode_prompts.__wrapped__ = original  # type: ignore[attr-defined]
    encode_prompts.kino_prompt_cache = cache  # type: ignore[attr-defined]
    encode_prompts.counted = counted  # type: ignore[attr-defined]
    model.encode_prompts = encode_prompts


def uninstall_prompt_cache(model: Any) -> None:
    if hasattr(model.__dict__.get("encode_prompts"), "kino_prompt_cache"):
        del model.encode_prompts
