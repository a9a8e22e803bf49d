"""Low-precision self-attention: `sdpa_lowbit(q, k, v)`, INT8 Q.K^T with K smoothing and FP8 P.V.

Method (SageAttention's recipe for Q.K^T, its second version's for P.V):

  1. K smoothing: subtract K's per-channel mean over tokens, per (batch, head). Each query's scores
     all shift by q . mean(K), which the softmax ignores, and K's large shared offset no longer eats
     the quantization range.
  2. Q and K quantized per token (one float32 scale per row) to INT8 (default) or FP8 e4m3. INT8 is
     the default because it is the more accurate of the two at the same tensor-core rate (Hopper and
     Ada run INT8 and FP8 mma equally fast): on Gaussian Q/K its error on the output is about a
     quarter of e4m3's, whose 3 mantissa bits cost ~2.4% per element where a per-token INT8 grid
     costs ~0.5%. The softmax scale 1/sqrt(D) and log2(e) are folded into Q's scale (exp2 softmax).
  3. S = Q . K^T accumulated exactly (int32) or in float32 (FP8), scaled in float32; online softmax in
     float32 (FlashAttention's recurrence).
  4. P.V, "fp8" (default): V smoothed the same way (its per-channel mean is added back at the end,
     exact because each row of P sums to 1) and quantized per channel in e4m3; P in [0, 1] is stored
     as P * 448 in e4m3; float32 accumulation per tile. "bf16": P in the value dtype against V as is.

Inputs (B, H, N, D), D in {64, 128}, non-causal, no mask; the output is (B, H, N, D) in q's dtype.
Steps 1-2 are plain torch (`quantize_attention_inputs`, fused by torch.compile, also padding the
tokens to a multiple of 128); steps 3-4 are one opaque op, `torch.ops.kino.lowbit_attention`, whose
CUDA implementation is the Triton kernel (attention_triton.py; compute capability 8.9+) and whose
implementation elsewhere, `attention_emulated`, is the same algorithm in torch, tile by tile with the
same online-softmax recurrence and the same roundings of P, so CPU tests check the real numerics.

`install_lowbit_attention(transformer)` routes the self-attention (attn1) of each block through
`sdpa_lowbit`, from outside the model, by giving it an attention processor (LowbitSelfAttnProcessor);
cross-attention (text, 512 keys: ~1% of attention's FLOPs at 720p) stays exact.

This module knows nothing about the denoising loop or which backend a plan asked for.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ..runtime.fuse import Attend, FusedSelfAttnProcessor
from .formats import FP8_DTYPE, FP8_MAX, quantize_rows_fp8, quantize_rows_int8

QK = Literal["int8", "fp8"]
PV = Literal["fp8", "bf16"]
HEAD_DIMS = (64, 128)
#: Tokens are padded to a multiple of this (the kernel's largest tile); kept equal to attention_triton.PAD_TOKENS.
PAD_TOKENS = 128
#: P in [0, 1] is stored as P * P_SCALE in e4m3; kept equal to the kernel's literal.
P_SCALE = FP8_MAX
#: The emulation's key tile (the kernel's is autotuned; the tile only moves where P is rounded).
EMULATION_BLOCK_N = 64
LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class LowbitInputs:
    """Quantized, padded attention inputs: every tensor (B, H, Np, ...) with Np a multiple of PAD_TOKENS."""

    q: torch.Tensor  # (B, H, Np, D) int8 or e4m3
    q_scale: torch.Tensor  # (B, H, Np) f32, times 1/sqrt(D) * log2(e)
    k: torch.Tensor  # (B, H, Np, D) like q, K smoothed
    k_scale: torch.Tensor  # (B, H, Np) f32
    v: torch.Tensor  # fp8: (B, H, D, Np) e4m3 (V^T, smoothed); bf16: (B, H, Np, D) in the value dtype
    v_scale: torch.Tensor  # fp8: (B, H, D) f32, per-channel scale / P_SCALE; bf16: (1,) unused
    v_mean: torch.Tensor  # fp8: (B, H, D) f32; bf16: (1,) unused
    n_ctx: int
    out_dtype: torch.dtype


def _pad_tokens(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, n_pad, D) contiguous, zeros after N."""
    return F.pad(x, (0, 0, 0, n_pad - x.shape[2])).contiguous()


_QK_QUANTIZERS = {"int8": quantize_rows_int8, "fp8": quantize_rows_fp8}


def quantize_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: QK = "int8", pv: PV = "fp8"
) -> LowbitInputs:
    """Steps 1-2 (and V's quantization for FP8 P.V) of the method; q, k, v (B, H, N, D)."""
    b, h, n, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"sdpa_lowbit: q, k, v must have one shape (self-attention), got {q.shape}, {k.shape}, {v.shape}")
    if d not in HEAD_DIMS:
        raise ValueError(f"sdpa_lowbit: head dim {d} is not one of {HEAD_DIMS}")
    if qk not in _QK_QUANTIZERS:
        raise ValueError(f"sdpa_lowbit: qk must be 'int8' or 'fp8', got {qk!r}")
    if pv not in ("fp8", "bf16"):
        raise ValueError(f"sdpa_lowbit: pv must be 'fp8' or 'bf16', got {pv!r}")
    n_pad = -(-n // PAD_TOKENS) * PAD_TOKENS
    k_smooth = k.float() - k.float().mean(dim=2, keepdim=True)  # (B, H, N, D)
    q8, q_scale = _QK_QUANTIZERS[qk](_pad_tokens(q, n_pad))  # (B, H, Np, D), (B, H, Np, 1)
    k8, k_scale = _QK_QUANTIZERS[qk](_pad_tokens(k_smooth, n_pad))
    q_scale = q_scale.squeeze(-1) * (LOG2E / math.sqrt(d))
    if pv == "fp8":
        v_mean = v.float().mean(dim=2, keepdim=True)  # (B, H, 1, D)
        v_t = (v.float() - v_mean).transpose(2, 3)  # (B, H, D, N): per channel = per row here
        v8, v_scale = quantize_rows_fp8(v_t)  # (B, H, D, N), (B, H, D, 1)
        v_out = F.pad(v8.view(torch.uint8), (0, n_pad - n)).view(FP8_DTYPE).contiguous()  # (B, H, D, Np)
        v_scale, v_mean = v_scale.squeeze(-1) / P_SCALE, v_mean.squeeze(2)
    else:
        dtype = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        v_out = _pad_tokens(v.to(dtype), n_pad)
        # Unused by the kernel, but a real allocation: Triton refuses null pointers as arguments.
        v_scale = v_mean = torch.zeros(1, device=q.device)
    return LowbitInputs(q8, q_scale.contiguous(), k8, k_scale.squeeze(-1).contiguous(), v_out, v_scale, v_mean, n, q.dtype)


def attention_emulated(x: LowbitInputs, block_n: int = EMULATION_BLOCK_N) -> torch.Tensor:
    """Steps 3-4 in torch, tile by tile, as the kernel computes them: (B, H, N, D) in x.out_dtype."""
    pv_fp8 = x.v.dtype == FP8_DTYPE
    n = x.n_ctx
    q = x.q[:, :, :n].float()  # INT8/FP8 values, exact in float32 (and so are D-long int8 dot products)
    q_scale = x.q_scale[:, :, :n, None]
    b, h, _, d = q.shape
    m_i = torch.full((b, h, n), float("-inf"), device=q.device)
    l_i = torch.zeros((b, h, n), device=q.device)
    acc = torch.zeros((b, h, n, d), device=q.device)
    for start in range(0, n, block_n):
        stop = min(start + block_n, n)
        k = x.k[:, :, start:stop].float()  # (B, H, bn, D)
        s = (q @ k.transpose(2, 3)) * q_scale * x.k_scale[:, :, None, start:stop]  # (B, H, N, bn)
        m_new = torch.maximum(m_i, s.amax(dim=-1))
        p = torch.exp2(s - m_new[..., None])
        alpha = torch.exp2(m_i - m_new)
        l_i = l_i * alpha + p.sum(dim=-1)
        if pv_fp8:
            p8 = (p * P_SCALE).to(FP8_DTYPE).float()
            pv = p8 @ x.v[:, :, :, start:stop].float().transpose(2, 3)  # (B, H, N, D)
        else:
            v = x.v[:, :, start:stop]
            pv = p.to(v.dtype).float() @ v.float()
        acc = acc * alpha[..., None] + pv
        m_i = m_new
    out = acc / l_i[..., None]
    if pv_fp8:
        out = out * x.v_scale[:, :, None, :] + x.v_mean[:, :, None, :]
    return out.to(x.out_dtype)


@functools.lru_cache(maxsize=None)
def kernel_supported(device: torch.device) -> bool:
    """Whether the Triton kernel runs on `device`: CUDA compute capability 8.9+ and Triton importable."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        from . import attention_triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention_triton(x: LowbitInputs, block: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Steps 3-4 with the Triton kernel: autotuned, or `block` = (BLOCK_M, BLOCK_N, warps, stages)."""
    from .attention_triton import lowbit_attention_kernel, lowbit_attention_tuned

    b, h, n_pad, d = x.q.shape
    out = torch.empty((b, h, x.n_ctx, d), dtype=x.out_dtype, device=x.q.device)
    args = (x.q, x.q_scale, x.k, x.k_scale, x.v, x.v_scale, x.v_mean, out, x.n_ctx, n_pad)
    flags = {"HEAD_DIM": d, "PV_FP8": x.v.dtype == FP8_DTYPE, "QK_INT8": x.q.dtype == torch.int8}
    # Triton launches on the current device: make it the tensors' (a no-op on the CPU interpreter).
    guard = torch.cuda.device(x.q.device) if x.q.is_cuda else contextlib.nullcontext()
    with guard:
        if block is None:
            grid = lambda meta: (-(-x.n_ctx // meta["BLOCK_M"]), b * h)  # noqa: E731
            lowbit_attention_tuned[grid](*args, **flags)
        else:
            block_m, block_n, warps, stages = block
            lowbit_attention_kernel[(-(-x.n_ctx // block_m), b * h)](
                *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages
            )
    return out


@torch.library.custom_op("kino::lowbit_attention", mutates_args=())
def lowbit_attention(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor,
    v: torch.Tensor,
    v_scale: torch.Tensor,
    v_mean: torch.Tensor,
    n_ctx: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Steps 3-4 as one op opaque to torch.compile: the Triton kernel where it runs, else the emulation."""
    x = LowbitInputs(q, q_scale, k, k_scale, v, v_scale, v_mean, n_ctx, out_dtype)
    if kernel_supported(q.device):
        return attention_triton(x)
    return attention_emulated(x)


@lowbit_attention.register_fake
def _(q, q_scale, k, k_scale, v, v_scale, v_mean, n_ctx, out_dtype):  # noqa: ANN001, ANN202
    return q.new_empty((q.shape[0], q.shape[1], n_ctx, q.shape[3]), dtype=out_dtype)


def sdpa_lowbit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: QK = "int8", pv: PV = "fp8") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with low-bit Q.K^T (`qk`) and P.V (`pv`); (B, H, N, D) -> (B, H, N, D)."""
    x = quantize_attention_inputs(q, k, v, qk, pv)
    return torch.ops.kino.lowbit_attention(
        x.q, x.q_scale, x.k, x.k_scale, x.v, x.v_scale, x.v_mean, x.n_ctx, x.out_dtype
    )


# ---- routing a model's self-attention through sdpa_lowbit ----


class LowbitSelfAttnProcessor(FusedSelfAttnProcessor):
    """runtime/fuse.py's self-attention processor (diffusers' projections, q/k norms and rotary
    embedding) with `sdpa_lowbit` as its attention.

    Why a processor and not a TorchFunctionMode around SDPA: dynamo cannot trace Tensor methods that
    call super() (Wan's `unflatten`) under a mode, so the block would not compile.
    """

    def __init__(self, original: Callable[..., torch.Tensor], qk: QK = "int8", pv: PV = "fp8", attend: Attend | None = None):
        self.qk, self.pv = qk, pv
        super().__init__(original, attend or (lambda q, k, v: sdpa_lowbit(q, k, v, self.qk, self.pv)))


def install_lowbit_attention(
    transformer: torch.nn.Module, qk: QK = "int8", pv: PV = "fp8", pattern: str = "attn1", attend: Attend | None = None
) -> list[str]:
    """Give every self-attention module (named `*.{pattern}`) of a Wan transformer a
    LowbitSelfAttnProcessor; idempotent (a second install replaces the first). Returns their names.
    Refuses modules whose head dim sdpa_lowbit does not compute."""
    names = []
    for name, module in transformer.named_modules():
        if name.rsplit(".", 1)[-1] != pattern:
            continue
        head_dim = module.inner_dim // module.heads
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"{name}: head dim {head_dim} is not one of {HEAD_DIMS}; low-bit attention does not apply")
        original = getattr(module.processor, "original", module.processor)
        module.set_processor(LowbitSelfAttnProcessor(original, qk, pv, attend))
        names.append(name)
    if not names:
        raise ValueError(f"{type(transformer).__name__} has no module named *.{pattern}")
    return names


def uninstall_lowbit_attention(transformer: torch.nn.Module) -> None:
    """Give every module install_lowbit_attention changed its original processor back."""
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, LowbitSelfAttnProcessor):
            module.set_processor(processor.original)
