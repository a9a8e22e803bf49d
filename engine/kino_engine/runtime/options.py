"""`RuntimeOptions`: the knobs of kino's hot path, typed and frozen (exact by default; `weights` and
`attention_precision` opt into lossy low-bit modes).

One value is passed to `WanT2V.load(spec, on_progress, runtime=RuntimeOptions(...))` and applied by
`runtime.optimize.optimize` in one order (attention backend -> compile). Defaults reproduce the plain
path's numbers: every option here changes speed, never the math beyond float rounding.

This module decides nothing about hardware; it only validates names and types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CfgMode = Literal["auto", "batched", "sequential"]
CFG_MODES: tuple[str, ...] = ("auto", "batched", "sequential")
#: Attention backend names; "auto" measures the exact ones and keeps the fastest (see runtime.attention).
ATTENTION_NAMES: tuple[str, ...] = ("auto", "default", "cudnn", "flash", "efficient", "math")
#: The transformer's linear layers: "exact" (the model dtype) or a low-bit mode of kino_engine.quant.
WEIGHT_MODES: tuple[str, ...] = ("exact", "fp8", "fp8-weight", "int8", "int8-dynamic")
#: Self-attention: "exact" (SDPA) or kino's low-bit kernel as "<QK>-<PV>" (quant/attention.py).
LOWBIT_ATTENTION: tuple[str, ...] = ("exact", "int8-fp8", "int8-bf16", "fp8-fp8", "fp8-bf16", "fp8-cudnn")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the denoising hot path runs. All choices are exact (bf16 in, bf16 math, no approximation)."""

    cfg: CfgMode = "auto"
    """Classifier-free guidance: "batched" = one forward of batch 2 (cond and uncond stacked);
    "sequential" = two forwards of batch 1 (the plain path); "auto" = batched."""

    attention: str = "auto"
    """Scaled-dot-product attention backend by name: "default" (torch chooses per call), "cudnn",
    "flash", "efficient", "math", or "auto" (measure the exact GPU backends once on the model's real
    attention shape and keep the fastest; on CPU "auto" means "default")."""

    compile: bool = False
    """torch.compile the transformer's repeated blocks (regional compile, dynamic=False)."""

    compile_fullgraph: bool = True
    """Ask torch.compile for one graph per block (fails loudly on a graph break instead of slowing down)."""

    cache_dir: Path | None = None
    """Where the attention choice (attention.json) and the inductor cache (inductor/) persist across
    processes; None keeps nothing on disk (every process measures and compiles again)."""

    weights: str = "exact"
    """The transformer's linear layers: "exact", or a lossy low-bit mode ("fp8": FP8 weights and
    per-token FP8 activations on FP8 tensor cores; "fp8-weight"/"int8": weight-only, dequantized on
    use; "int8-dynamic": INT8 weights and activations). Norms, embeddings, modulation and the output
    projection stay exact (quant/policy.py). A pre-quantized checkpoint is loaded as it was written."""

    attention_precision: str = "exact"
    """Self-attention: "exact", kino's lossy low-bit kernel "<QK>-<PV>" (e.g. "int8-fp8"), or "fp8-cudnn"
    (cuDNN's FP8 flash attention through nvidia-cudnn-frontend, quant/cudnn_fp8.py)."""

    fuse: bool = True
    """Fuse Wan's small ops into their neighbours (runtime/fuse.py: the FFN's GELU into its GEMM's
    epilogue on CUDA, RoPE with the q/k norm, norm rows as one-pass reductions). Exact up to float
    rounding (the GELU is applied before the bf16 rounding instead of after it)."""

    max_steps_ahead: int = 2
    """How many denoising steps the host may queue ahead of the GPU before it waits for the oldest
    one's end event (bounds the lag of progress events and cancellation; never stalls the GPU)."""

    def __post_init__(self) -> None:
        if self.cfg not in CFG_MODES:
            raise ValueError(f"RuntimeOptions.cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"RuntimeOptions.attention must be one of {ATTENTION_NAMES}, got {self.attention!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"RuntimeOptions.compile must be a bool, got {self.compile!r}")
        if not isinstance(self.compile_fullgraph, bool):
            raise ValueError(f"RuntimeOptions.compile_fullgraph must be a bool, got {self.compile_fullgraph!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            raise ValueError(f"RuntimeOptions.cache_dir must be a pathlib.Path or None, got {self.cache_dir!r}")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"RuntimeOptions.weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        if self.attention_precision not in LOWBIT_ATTENTION:
            raise ValueError(
                f"RuntimeOptions.attention_precision must be one of {LOWBIT_ATTENTION}, got {self.attention_precision!r}"
            )
        if not isinstance(self.fuse, bool):
            raise ValueError(f"RuntimeOptions.fuse must be a bool, got {self.fuse!r}")
        if not isinstance(self.max_steps_ahead, int) or self.max_steps_ahead < 1:
            raise ValueError(f"RuntimeOptions.max_steps_ahead must be an int >= 1, got {self.max_steps_ahead!r}")

    @property
    def batched_cfg(self) -> bool:
        """Whether guided jobs run cond and uncond as one batch-2 forward."""
        return self.cfg in ("auto", "batched")
