"""Do CUDA graphs pay at serving's small shapes? The 1.3B forward (batch 2 = batched CFG) at sizes where
one request leaves the GPU underused (issue 5's 320x192x17 and 480x272x33, and 832x480x81 for
contrast), two ways, the blocks compiled regionally with kino's fusions as kino runs them:
  launched   kino today: every kernel launched from Python each forward
  graph      the whole forward captured once into one CUDA graph (static inputs, as kino's guidance
             buffers already are, plus a static timestep), replayed per forward
Reports ms per forward (median of 20 after warm-up), the capture time, and the largest difference
of the graph's output from the launched one (they must agree to rounding). A capture that fails (a
host copy or sync inside the forward) is reported with its error: that is what kino would have to
patch before graphs can be used.
At 832x480x81 the profile showed the GPU idle only 1.2% of a step, so graphs should not matter there;
at 1 200 tokens the per-forward launch cost is what batching amortized (1.37x for two jobs).

Run on a CUDA machine: PYTHONPATH=engine python scripts/experiments/cuda_graphs_small_shapes.py > out.json
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch
from diffusers import WanTransformer3DModel

from kino_engine.floor import median_seconds
from kino_engine.random_weights import build_random
from kino_engine.runtime.compile import compile_blocks
from kino_engine.runtime.fuse import fuse

CONFIG_1_3B = {
    "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 12,
    "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
#: (width, height, frames) → latents (2, 16, (F-1)/4+1, H/8, W/8).
SHAPES = [(320, 192, 17), (480, 272, 33), (832, 480, 81)]


def timed(fn) -> float:
    """Median ms of `fn` over 20 runs after 3 warm-up runs (CUDA events; kino's floor timer)."""
    return median_seconds(fn, repeats=20, warmup=3) * 1000.0


def main() -> None:
    device = torch.device("cuda")
    model = build_random(lambda: WanTransformer3DModel.from_config(CONFIG_1_3B), device=device, dtype=torch.bfloat16, seed=0)
    fuse(model, device)
    compile_blocks(model, True)
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    gen = torch.Generator(device).manual_seed(0)
    for width, height, frames in SHAPES:
        key = f"{width}x{height}x{frames}"
        res: dict = {}
        try:
            latents = (2, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
            x = torch.randn(latents, generator=gen, device=device).to(torch.bfloat16)
            e = torch.randn((2, 512, 4096), generator=gen, device=device).to(torch.bfloat16)
            t = torch.full((2,), 500.0, device=device)

            def forward() -> torch.Tensor:
                with torch.inference_mode(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                    return model(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]

            reference = forward()
            res["launchedMs"] = round(timed(forward), 3)
            # One graph for the whole forward: warm-up on a side stream, capture, replay.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    forward()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            started = time.perf_counter()
            with torch.cuda.graph(graph):
                static_out = forward()
            torch.cuda.synchronize()
            res["captureS"] = round(time.perf_counter() - started, 2)
            graph.replay()
            torch.cuda.synchronize()
            res["graphMaxAbsDiff"] = float((static_out.float() - reference.float()).abs().max())
            res["graphMs"] = round(timed(graph.replay), 3)
            res["graphSpeedup"] = round(res["launchedMs"] / res["graphMs"], 3)
            tokens = latents[2] * (latents[3] // 2) * (latents[4] // 2)
            res["tokens"] = tokens
            del graph, static_out
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
            res["trace"] = traceback.format_exc()[-1500:]
        out["shapes"][key] = res
        print(key, res, file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
