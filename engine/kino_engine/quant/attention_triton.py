"""The Triton kernel of low-bit attention (see attention.py for the method and the inputs' layout).

One program computes BLOCK_M query rows of one (batch, head): it streams the keys in BLOCK_N tiles,
S = (Q8 . K8^T) * q_scale * k_scale on INT8 (exact int32 accumulation) or FP8 (float32 accumulation)
tensor cores, whichever dtype Q and K come in (the softmax scale and log2(e) are folded into q_scale,
so the softmax uses exp2), an online softmax in float32, and P.V
either on FP8 tensor cores (P * 448 in e4m3 against V^T in e4m3, V smoothed and scaled per channel)
or in bf16 (P in the value dtype against unquantized V). Full key tiles run unmasked; the last,
partial tile masks the padding to -inf. Inputs are padded to a multiple of PAD_TOKENS tokens, so no
load needs a mask; the output store is masked to the real tokens.

INT8/FP8 operands on Hopper's wgmma must be K-major: Q (rows, D) and K^T (D, keys) tiles are contiguous
along D, and V is stored transposed (D, tokens) so the (keys, D) operand of P.V is contiguous along keys.

Needs CUDA compute capability 8.9+ (FP8 mma) and Triton; runs under TRITON_INTERPRET=1 on the CPU for
tests (slowly, with explicit block sizes: the autotuner times on a GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Every tensor handed to the kernel is padded to a multiple of this many tokens (>= any BLOCK_M/BLOCK_N).
PAD_TOKENS = 128
#: P in [0, 1] is stored as P * P_SCALE in e4m3 (448 is e4m3's largest finite value).
P_SCALE = 448.0


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, start_n, n_ctx, n_pad,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, MASK: tl.constexpr,
):
    cols = start_n + offs_n  # (BN,)
    k = tl.load(k_base + cols[None, :] * HEAD_DIM + offs_d[:, None])  # (D, BN) int8/e4m3 = K^T tile
    k_scale = tl.load(ks_base + cols)  # (BN,)
    s = tl.dot(q, k).to(tl.float32) * q_scale[:, None] * k_scale[None, :]  # (BM, BN), log2 domain
    if MASK:
        s = tl.where(cols[None, :] < n_ctx, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        v = tl.load(v_base + offs_d[:, None] * n_pad + cols[None, :])  # (D, BN) e4m3 from V^T
        pv = tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(v))  # (BM, D) float32
    else:
        v = tl.load(v_base + cols[:, None] * HEAD_DIM + offs_d[None, :])  # (BN, D) bf16/fp16
        pv = tl.dot(p.to(v.dtype), v)
    # The tile's product is added in float32 here, so FP8 mma's reduced-precision accumulator only
    # ever sums one tile (BLOCK_N or HEAD_DIM terms).
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def lowbit_attention_kernel(
    Q, QS, K, KS, V, VS, VM, Out,
    n_ctx, n_pad,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr,
    QK_INT8: tl.constexpr,  # noqa: ARG001 - only an autotune key (the dot follows Q's dtype)
):
    """Q, K (BH, n_pad, D) int8 or e4m3; QS, KS (BH, n_pad) f32; V (BH, D, n_pad) e4m3 or (BH, n_pad, D) bf16;
    VS, VM (BH, D) f32 (FP8 P.V only); Out (BH, n_ctx, D)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B*H*N*D passes 2**31 at CFG batch 2
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + bh * n_pad * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])  # (BM, D)
    q_scale = tl.load(QS + bh * n_pad + offs_m)  # (BM,)
    k_base = K + bh * n_pad * HEAD_DIM
    ks_base = KS + bh * n_pad
    v_base = V + bh * n_pad * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (n_ctx // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, start_n, n_ctx, n_pad, offs_n, offs_d,
            HEAD_DIM, PV_FP8, False,
        )
    if n_full < n_ctx:
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_scale, k_base, ks_base, v_base, n_full, n_ctx, n_pad, offs_n, offs_d,
            HEAD_DIM, PV_FP8, True,
        )
    acc = acc / l_i[:, None]
    if PV_FP8:
        v_scale = tl.load(VS + bh * HEAD_DIM + offs_d)  # V's per-channel scale / P_SCALE
        v_mean = tl.load(VM + bh * HEAD_DIM + offs_d)
        acc = acc * v_scale[None, :] + v_mean[None, :]
    out = Out + bh * n_ctx * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < n_ctx)


def _configs() -> list[triton.Config]:
    shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes
    ]


#: The kernel with its block sizes chosen by timing, once per (n_ctx, head dim, P.V precision, Q/K dtype).
lowbit_attention_tuned = triton.autotune(configs=_configs(), key=["n_ctx", "HEAD_DIM", "PV_FP8", "QK_INT8"])(
    lowbit_attention_kernel
)
