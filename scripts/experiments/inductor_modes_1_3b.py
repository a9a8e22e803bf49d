"""The 1.3B forward (832x480x81, batch 2 = batched CFG) under inductor's GEMM modes, against the floor
measured in the same process: does max-autotune with Triton GEMM templates (and their prologue and
epilogue fusion of the LayerNorm + modulation and residual + gate around each linear) close issue 3's
gap (1.206x the floor, target 1.10x)?

One variant per process (inductor's config and caches are process-wide):
  PYTHONPATH=engine python scripts/experiments/inductor_modes_1_3b.py VARIANT
prints one JSON line: {variant, forwardMs: [..], medianMs, floorMs, overFloor, relL2VsEager, compileS}.
Variants:
  default          kino today: fusions (GELU epilogue via cuBLASLt, fused RoPE, wide rows) + compile
  cdt              + coordinate-descent tuning of the Triton kernels' launch parameters
  autotune         + max_autotune (GEMMs: ATen or Triton templates, the faster per shape; prologue and
                   epilogue fusion into the templates where they win)
  autotune-nogelu  max_autotune without kino's cuBLASLt GELU epilogue (a Triton template may take it)
  autotune-tma     max_autotune with Triton's persistent TMA matmul templates (Hopper)
Run them all (about 10 minutes of an H100/H200):
  for v in default cdt autotune autotune-nogelu autotune-tma; do
    timeout 540 env PYTHONPATH=engine python scripts/experiments/inductor_modes_1_3b.py $v >> $OUT/modes.jsonl
  done
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor
from diffusers import WanTransformer3DModel

from kino_engine.floor import measure_floor
from kino_engine.random_weights import build_random
from kino_engine.runtime import fuse as fusions_module
from kino_engine.runtime.compile import compile_blocks, configure_cache
from kino_engine.runtime.optimize import optimize
from kino_engine.runtime.options import RuntimeOptions

CONFIG_1_3B = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
LATENT = (2, 16, 21, 60, 104)  # 832x480x81 -> 21 x 60 x 104 latents; 21 * 30 * 52 = 32760 tokens
TOKENS = 21 * 30 * 52
WARM, REPS = 3, 10


def configure(variant: str) -> tuple[str, ...]:
    """Sets inductor's config for the variant; returns kino's fusion kinds to apply."""
    kinds = fusions_module.KINDS
    if variant == "default":
        return kinds
    if variant == "cdt":
        inductor.coordinate_descent_tuning = True
        return kinds
    if not variant.startswith("autotune"):
        raise SystemExit(f"unknown variant {variant!r}")
    inductor.max_autotune = True
    inductor.max_autotune_gemm = True
    inductor.max_autotune_gemm_backends = "ATEN,TRITON"
    inductor.prologue_fusion = True
    inductor.epilogue_fusion = True
    inductor.benchmark_epilogue_fusion = True
    if variant == "autotune-nogelu":
        return tuple(k for k in kinds if k != "ffn_gelu")
    if variant == "autotune-tma":
        inductor.triton.enable_persistent_tma_matmul = True
    return kinds


def main() -> None:
    variant = sys.argv[1]
    device = torch.device("cuda")
    kinds = configure(variant)
    model = build_random(lambda: WanTransformer3DModel.from_config(CONFIG_1_3B), device=device, dtype=torch.bfloat16, seed=0)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(LATENT, generator=generator, device=device).to(torch.bfloat16)
    text = torch.randn((2, 512, 4096), generator=generator, device=device).to(torch.bfloat16)
    t = torch.full((2,), 500.0, device=device)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    optimize(model, device, torch.bfloat16, RuntimeOptions(compile=False, attention="cudnn", fuse=False))
    reference = forward().float()  # eager, unfused: what the compiled variants must reproduce
    # Then what optimize(compile=True, fuse=...) applies after the attention backend: fusions, then
    # regional compile with a fresh cache (so every variant compiles and autotunes from nothing).
    fusions_module.fuse(model, device, kinds)
    configure_cache(Path(tempfile.mkdtemp(prefix=f"kino-{variant}-")))
    compile_blocks(model, False)
    started = time.perf_counter()
    out = forward().float()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    times = []
    for k in range(WARM + REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        forward()
        b.record()
        b.synchronize()
        if k >= WARM:
            times.append(a.elapsed_time(b))
    error = float((out - reference).norm() / reference.norm())
    del out, reference
    torch.cuda.empty_cache()
    floor = measure_floor(model.config, TOKENS, torch.bfloat16, batch=2)
    median = statistics.median(times)
    print(json.dumps({
        "variant": variant, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "fusions": list(kinds), "forwardMs": [round(v, 2) for v in times], "medianMs": round(median, 2),
        "floorMs": round(floor["floorS"] * 1000, 2), "overFloor": round(median / (floor["floorS"] * 1000), 4),
        "floor": floor, "relL2VsEager": error, "compileS": round(compile_s, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
