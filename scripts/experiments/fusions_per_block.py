"""Block-level timings of kino's fusions (runtime/fuse.py) at Wan shapes (batch 2 = batched CFG),
compiled per variant, plus the FFN GEMM with and without its GELU epilogue. The measurements behind
docs/benchmarks.md's third-session section (its profile record's `blockExperiment`).
Run on a CUDA machine: PYTHONPATH=engine python scripts/experiments/fusions_per_block.py > out.json"""
import json, os, statistics, sys, time
import torch, torch.nn.functional as F
torch.backends.cuda.matmul.allow_tf32 = False
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from kino_engine.runtime import fuse as fz

dev = torch.device("cuda")
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

def timeit(fn, warm=3, reps=10):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)

# 1. GEMM + GELU
for name, (m, k, n) in {"1.3b": (65520, 1536, 8960), "14b": (65520, 5120, 13824)}.items():
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    b = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02
    plain = timeit(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"))
    lin = timeit(lambda: F.linear(x, w, b))
    fused = timeit(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    r = F.gelu(F.linear(x, w, b), approximate="tanh").float(); f = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
    out[f"gemm_gelu_{name}"] = {"plain_ms": plain, "linear_only_ms": lin, "fused_ms": fused,
        "rel_l2": ((f - r).norm() / r.norm()).item(), "max_abs": (f - r).abs().max().item()}
    print(name, out[f"gemm_gelu_{name}"], file=sys.stderr, flush=True)
    del x, w, b, r, f

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    x = torch.randn(4096, 1536, device=dev, dtype=torch.bfloat16); w = torch.randn(8960, 1536, device=dev, dtype=torch.bfloat16); b = torch.zeros(8960, device=dev, dtype=torch.bfloat16)
    torch._addmm_activation(b, x, w.t(), use_gelu=True); torch.cuda.synchronize()
out["fused_kernels"] = [e.key for e in prof.key_averages()]

CFG = {
 "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, num_layers=1),
 "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, text_dim=4096, num_layers=1),
}
VARIANTS = [("plain", ()), ("gelu", ("ffn_gelu",)), ("gelu+rope", ("ffn_gelu", "rope")), ("all", ("ffn_gelu", "rope", "wide_rows")), ("plain2", ()), ("all2", ("ffn_gelu", "rope", "wide_rows"))]
for name, cfg in CFG.items():
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **cfg).to(dev, torch.bfloat16).eval()
    for p in model.parameters(): p.data.normal_(0, 0.02)
    d = cfg["num_attention_heads"] * 128
    latents = torch.randn(2, 16, 21, 60, 104, device=dev, dtype=torch.bfloat16)
    rope = model.rope(latents)
    N = 21 * 30 * 52
    h = torch.randn(2, N, d, device=dev, dtype=torch.bfloat16)
    enc = torch.randn(2, 512, d, device=dev, dtype=torch.bfloat16)
    temb = torch.randn(2, 6, d, device=dev, dtype=torch.float32) * 0.1
    block = model.blocks[0]
    ref = None
    res = {}
    for vname, kinds in VARIANTS:
        torch._dynamo.reset()
        torch._inductor.config.fx_graph_cache = False
        fz._use_choices(None)
        fus = fz.fuse(model, dev, kinds) if kinds else None
        if "wide_rows" not in kinds: fz._use_choices(None)
        compiled = torch.compile(block, fullgraph=True, dynamic=False)
        with torch.no_grad():
            t0 = time.perf_counter(); y = compiled(h, enc, temb, rope); torch.cuda.synchronize(); ct = time.perf_counter() - t0
            t = timeit(lambda: compiled(h, enc, temb, rope), warm=5, reps=30)
            eager = timeit(lambda: block(h, enc, temb, rope), warm=1, reps=3)
        y = y.float()
        if ref is None: ref = y
        res[vname] = {"compiled_ms": t, "eager_ms": eager, "compile_s": ct, "rel_l2_vs_plain": ((y - ref).norm() / ref.norm()).item()}
        print(name, vname, res[vname], file=sys.stderr, flush=True)
        if fus is not None: fus.unfuse()
    out[f"block_{name}_b2_480p"] = res
    del model, h, enc, temb, rope, latents, block
    torch.cuda.empty_cache()
print(json.dumps(out, indent=1))
