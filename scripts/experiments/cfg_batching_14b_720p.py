"""14B 1280x720x81: one batch-2 forward against two batch-1 forwards, kino's fused blocks against
diffusers' own, alternated over three rounds (the first pays the compiles). The measurement behind the
planner's batchedCfgFactor (src/planner/plan.ts) and docs/benchmarks.md.
Run on a CUDA machine with ~80 GB: PYTHONPATH=engine python scripts/experiments/cfg_batching_14b_720p.py"""
import json, statistics, sys, time, torch
from diffusers import WanTransformer3DModel
from kino_engine.random_weights import build_random
from kino_engine.runtime.optimize import optimize
from kino_engine.runtime.options import RuntimeOptions
dev = torch.device("cuda")
C = {"_class_name":"WanTransformer3DModel","patch_size":[1,2,2],"num_attention_heads":40,"attention_head_dim":128,"in_channels":16,"out_channels":16,"text_dim":4096,"freq_dim":256,"ffn_dim":13824,"num_layers":40,"cross_attn_norm":True,"qk_norm":"rms_norm_across_heads","eps":1e-6,"image_dim":None,"added_kv_proj_dim":None,"rope_max_seq_len":1024}
model = build_random(lambda: WanTransformer3DModel.from_config(C), device=dev, dtype=torch.bfloat16, seed=0)
rt = optimize(model, dev, torch.bfloat16, RuntimeOptions(compile=True, attention="cudnn"))
gen = torch.Generator(dev).manual_seed(0)
x2 = torch.randn((2, 16, 21, 90, 160), generator=gen, device=dev).to(torch.bfloat16)
e2 = torch.randn((2, 512, 4096), generator=gen, device=dev).to(torch.bfloat16)
t2 = torch.full((2,), 500.0, device=dev)
def fwd(x, e, t):
    with torch.inference_mode():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
def b2(): return fwd(x2, e2, t2)
def b1(): return torch.cat([fwd(x2[:1], e2[:1], t2[:1]), fwd(x2[1:], e2[1:], t2[1:])])
def timed(fn):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); out = fn(); b.record(); b.synchronize(); return a.elapsed_time(b) / 1000, out
res = {}
outs = {}
import contextlib
for rnd in range(3):
    for fused in (True, False):
        ctx = contextlib.nullcontext() if fused else rt.fusions.disabled()
        with ctx:
            for name, fn in (("batch2", b2), ("batch1x2", b1)):
                key = f"{'fused' if fused else 'diffusers-blocks'} {name}"
                s, out = timed(fn)
                res.setdefault(key, []).append(s)
                if rnd == 0: outs[key] = out.float()
                print(rnd, key, round(s, 3), file=sys.stderr, flush=True)
ref = outs["diffusers-blocks batch1x2"]
err = {k: float((v - ref).norm() / ref.norm()) for k, v in outs.items()}
print(json.dumps({"gpu": torch.cuda.get_device_name(), "secondsPerTwoForwards": res, "medianExcludingFirst": {k: statistics.median(v[1:]) for k, v in res.items()}, "relL2VsDiffusersBlocksBatch1": err}))
