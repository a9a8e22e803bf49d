"""`optimize(transformer, device, options)`: apply the hot path's optimizations from outside the
model, in one visible order: attention backend -> low-bit attention (opt-in) -> fusions -> compile. Returns the `Runtime` that remembers what
was applied; the pipeline calls `runtime.prepare(shape)` before the first forward at a job's shape,
which resolves attention "auto" for that shape (measured once, cached on disk).

The model's code is not edited: the attention choice wraps its forward in an SDPA context, and the
compile goes through the blocks it declares in `_repeated_blocks`. This module knows nothing about
schedulers, jobs or the protocol.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from . import attention as attn
from .compile import compile_blocks, configure_cache
from .fuse import Fusions, fuse
from .options import RuntimeOptions

log = logging.getLogger("kino.optimize")


@dataclass
class Runtime:
    """What `optimize` applied to one transformer, and the per-shape attention choices made since."""

    options: RuntimeOptions
    device: torch.device
    dtype: torch.dtype
    policy: attn.AttentionPolicy
    compiled: list[str] = field(default_factory=list)
    fusions: Fusions | None = None
    choices: dict[attn.AttentionShape, attn.Resolution] = field(default_factory=dict)

    def prepare(self, shape: attn.AttentionShape) -> attn.Resolution:
        """Select the attention backend for `shape` (B, heads, N, head_dim); resolves "auto" once per shape."""
        if shape not in self.choices:
            self.choices[shape] = attn.resolve_backend(
                self.options.attention, shape, self.dtype, self.device, self.options.cache_dir
            )
        self.policy.backend = self.choices[shape].backend
        return self.choices[shape]


def optimize(
    transformer: torch.nn.Module, device: torch.device, dtype: torch.dtype, options: RuntimeOptions
) -> Runtime:
    """attention backend -> compile, applied to `transformer` in place; logged."""
    # 1. Attention. A named backend is checked against the device now (shape does not matter); "auto"
    #    starts as torch's default and is resolved per shape by Runtime.prepare.
    initial = "default" if options.attention == "auto" else options.attention
    policy = attn.AttentionPolicy(attn.resolve_backend(initial, (0, 0, 0, 0), dtype, device).backend)
    attn.install(transformer, policy)
    runtime = Runtime(options, device, dtype, policy)
    log.info("optimize: attention %s, cfg %s, compile %s", options.attention, options.cfg, options.compile)
    # 2. Low-bit self-attention (lossy, opt-in): a processor on each block's attn1, compiled with the block.
    if options.attention_precision == "fp8-cudnn":
        from ..quant import install_lowbit_attention
        from ..quant.cudnn_fp8 import require_cudnn_fp8, sdpa_cudnn_fp8

        require_cudnn_fp8(device)
        install_lowbit_attention(transformer, attend=sdpa_cudnn_fp8)
        log.info("optimize: FP8 self-attention through cuDNN")
    elif options.attention_precision != "exact":
        from ..quant import install_lowbit_attention

        qk, pv = options.attention_precision.split("-")
        install_lowbit_attention(transformer, qk, pv)  # type: ignore[arg-type]
        log.info("optimize: low-bit self-attention %s", options.attention_precision)
    # 3. Fusions of the small ops (exact up to rounding; undone by `runtime.fusions.disabled()`).
    if options.fuse:
        runtime.fusions = fuse(transformer, device)
    # 4. Compile, with its on-disk cache configured first.
    if options.compile:
        folder = configure_cache(options.cache_dir)
        runtime.compiled = compile_blocks(transformer, options.compile_fullgraph)
        log.info("optimize: inductor cache %s", folder or "torch's default (not persisted by kino)")
    return runtime
