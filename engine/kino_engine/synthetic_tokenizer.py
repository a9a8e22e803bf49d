"""A T5-style tokenizer of any vocabulary size, built in memory (no download, no sentencepiece file).

Random-weight models still need token ids below the text encoder's vocabulary size, and tiny test
checkpoints need a tokenizer that `AutoTokenizer.from_pretrained` loads back. This builds a Unigram
model with the `tokenizers` library (through transformers' T5Tokenizer, which wraps exactly that)
with T5's special-token layout: <pad>=0, </s>=1, <unk>=2, then "▁" and synthetic pieces (single
characters, word-start characters, then letter n-grams) until the requested size, and no sentinel
(<extra_id_*>) tokens. Texts tokenize into varied ids, which is all a random-weight model needs.
"""

from __future__ import annotations

import itertools
import string
from typing import Iterator

from transformers import T5Tokenizer

SPECIALS = ("<pad>", "</s>", "<unk>")
MIN_VOCAB = len(SPECIALS) + 1


def _pieces() -> Iterator[str]:
    yield "▁"
    singles = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    yield from singles
    yield from ("▁" + c for c in singles)
    for n in itertools.count(2):
        grams = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=n)]
        yield from ("▁" + g for g in grams)
        yield from grams


def synthetic_t5_tokenizer(vocab_size: int, model_max_length: int = 512) -> T5Tokenizer:
    """A T5Tokenizer with exactly `vocab_size` tokens (at least 4)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"a synthetic tokenizer needs at least {MIN_VOCAB} tokens, got {vocab_size}")
    vocab: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS]
    for piece in itertools.islice(_pieces(), vocab_size - len(SPECIALS)):
        # Longer pieces score higher per character, so Unigram prefers them: texts take fewer tokens.
        vocab.append((piece, -2.0 if piece == "▁" else -10.0 + len(piece)))
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"synthetic tokenizer has {len(tokenizer)} tokens, wanted {vocab_size}")
    return tokenizer
