"""cuDNN SDPA at Wan's self-attention shapes (batch 2): q/k/v contiguous (B, H, N, D) against the
(B, N, H, D) views Wan's processor passes, and the output layout. Behind docs/benchmarks.md's note that
in-model attention runs at its stand-alone speed whatever the layout.
Run on a CUDA machine: python scripts/experiments/attention_layout.py"""
import json, statistics, sys, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = torch.device("cuda")
def timeit(fn, warm=3, reps=15):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return round(statistics.median(ts), 3), round(min(ts), 3)
out = {}
for name, H in {"1.3b": 12, "14b": 40}.items():
    B, N, D = 2, 32760, 128
    bnhd = [torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    bhnd = [t.transpose(1, 2).contiguous() for t in bnhd]
    views = [t.transpose(1, 2) for t in bnhd]
    res = {}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        res["bhnd_contig"] = timeit(lambda: F.scaled_dot_product_attention(*bhnd))
        res["bnhd_views"] = timeit(lambda: F.scaled_dot_product_attention(*views))
        res["qk_contig_v_view"] = timeit(lambda: F.scaled_dot_product_attention(bhnd[0], bhnd[1], views[2]))
        o1 = F.scaled_dot_product_attention(*bhnd); o2 = F.scaled_dot_product_attention(*views)
        res["out_strides"] = {"contig_in": list(o1.stride()), "view_in": list(o2.stride())}
        res["view_then_flatten"] = timeit(lambda: F.scaled_dot_product_attention(*views).transpose(1, 2).flatten(2, 3))
        res["contig_then_flatten"] = timeit(lambda: F.scaled_dot_product_attention(*bhnd).transpose(1, 2).flatten(2, 3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        res["flash_views"] = timeit(lambda: F.scaled_dot_product_attention(*views))
    out[name] = res
    print(name, res, file=sys.stderr, flush=True)
    del bnhd, bhnd, views
print(json.dumps(out))
