"""The floor of a Wan transformer forward on this GPU: its matrix products and attention, measured alone.

floor = Σ over blocks (time of the block's linear layers as plain GEMMs at their real shapes
        + time of its self- and cross-attention with the fastest exact SDPA backend),
measured here, now, with CUDA events (median of repeats, after a warm-up). Everything else a forward
does (norms, RoPE, modulation, patch embedding, the head) is what a good runtime fuses away, so a
forward's time over this floor is its overhead. FLOP counts per block, N video tokens, L text tokens,
d model width, f FFN width: linear = N·(12d² + 4d·f) + 4·L·d²; self-attention 4·N²·d; cross 4·N·L·d.

It needs a CUDA device; it knows nothing about kino's loop and only reads the transformer's config.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .runtime.attention import AUTO_CANDIDATES, BACKENDS, AttentionBackend


@dataclass(frozen=True)
class WanShape:
    """The sizes that set a Wan block's work."""

    tokens: int  # N
    text_tokens: int  # L
    width: int  # d
    ffn: int  # f
    heads: int
    layers: int
    batch: int = 1

    @classmethod
    def of(cls, config: Any, tokens: int, text_tokens: int = 512, batch: int = 1) -> WanShape:
        heads = int(config.num_attention_heads)
        return cls(
            tokens=tokens,
            text_tokens=text_tokens,
            width=heads * int(config.attention_head_dim),
            ffn=int(config.ffn_dim),
            heads=heads,
            layers=int(config.num_layers),
            batch=batch,
        )

    def linear_flops(self) -> float:
        n, L, d, f = self.tokens, self.text_tokens, self.width, self.ffn
        return self.batch * self.layers * (n * (12 * d * d + 4 * d * f) + 4 * L * d * d)

    def attention_flops(self) -> float:
        n, L, d = self.tokens, self.text_tokens, self.width
        return self.batch * self.layers * (4 * n * n * d + 4 * n * L * d)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn` over `repeats` runs, after `warmup` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times)


def block_gemm_seconds(shape: WanShape, dtype: torch.dtype, repeats: int = 5) -> float:
    """One block's linear layers as plain GEMMs (activations x weightᵀ) at their real shapes."""
    n, L, d, f, b = shape.tokens, shape.text_tokens, shape.width, shape.ffn, shape.batch
    x = torch.randn(b * n, d, device="cuda", dtype=dtype)
    h = torch.randn(b * n, f, device="cuda", dtype=dtype)
    text = torch.randn(b * L, d, device="cuda", dtype=dtype)
    w_dd = [torch.randn(d, d, device="cuda", dtype=dtype) * 0.02 for _ in range(6)]  # q k v o, cross q o
    w_kv = [torch.randn(d, d, device="cuda", dtype=dtype) * 0.02 for _ in range(2)]  # cross k v (text)
    w_up = torch.randn(f, d, device="cuda", dtype=dtype) * 0.02
    w_down = torch.randn(d, f, device="cuda", dtype=dtype) * 0.02

    def block() -> None:
        for w in w_dd:
            F.linear(x, w)
        for w in w_kv:
            F.linear(text, w)
        F.linear(x, w_up)
        F.linear(h, w_down)

    return median_seconds(block, repeats)


def attention_seconds(
    shape: WanShape, dtype: torch.dtype, backend: AttentionBackend, repeats: int = 5
) -> float | None:
    """One block's self- plus cross-attention with `backend`; None if it cannot run this shape."""
    head_dim = shape.width // shape.heads
    q = torch.randn(shape.batch, shape.heads, shape.tokens, head_dim, device="cuda", dtype=dtype)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    kt = torch.randn(shape.batch, shape.heads, shape.text_tokens, head_dim, device="cuda", dtype=dtype)
    vt = torch.randn_like(kt)

    def attend() -> None:
        with backend.context():
            F.scaled_dot_product_attention(q, k, v)
            F.scaled_dot_product_attention(q, kt, vt)

    try:
        return median_seconds(attend, repeats)
    except RuntimeError:
        return None


def measure_floor(config: Any, tokens: int, dtype: torch.dtype, batch: int = 1, text_tokens: int = 512) -> dict[str, Any]:
    """The floor of one forward of batch `batch`, with the rates it implies and each backend's time."""
    shape = WanShape.of(config, tokens, text_tokens, batch)
    gemm_s = block_gemm_seconds(shape, dtype) * shape.layers
    # The exact GPU backends the runtime's "auto" chooses from (runtime/attention.py's registry).
    backends = {name: attention_seconds(shape, dtype, BACKENDS[name]) for name in AUTO_CANDIDATES}
    timed = {name: s * shape.layers for name, s in backends.items() if s is not None}
    best = min(timed, key=timed.__getitem__)
    attention_s = timed[best]
    torch.cuda.empty_cache()
    return {
        "shape": shape.__dict__,
        "linearFlops": shape.linear_flops(),
        "attentionFlops": shape.attention_flops(),
        "linearS": gemm_s,
        "attentionS": attention_s,
        "attentionBackend": best,
        "attentionByBackendS": {name: timed.get(name) for name in AUTO_CANDIDATES},
        "floorS": gemm_s + attention_s,
        "gemmTflops": shape.linear_flops() / gemm_s / 1e12,
        "attentionTflops": shape.attention_flops() / attention_s / 1e12,
    }
