"""FP8 self-attention through cuDNN's FP8 flash attention (cudnn-frontend's `sdpa_fp8`): the
`attention_precision` "fp8-cudnn" mode. A well-kept vendor kernel at FP8 tensor-core rates, for what
kino's Triton kernel (attention.py) cannot reach on Hopper.

Method (exact except the FP8 roundings):
  1. K smoothed (its mean over the tokens, per batch, head and channel, subtracted: every logit of a
     query shifts by the same amount, which the softmax ignores) and V smoothed (its mean subtracted
     and added back to the output: each row of P sums to 1).
  2. Q, K, V each scaled per tensor to e4m3's range (448 / amax) — cuDNN takes one descale per
     tensor, as a device tensor, so no scale ever reaches the host — and cast to e4m3, keeping the
     input's strides (Wan's (B, N, H, D) storage seen as (B, H, N, D)).
  3. cuDNN: S = Q.K^T (FP8 mma, float32 accumulation), softmax in float32, P stored as P * 448 in e4m3,
     O = P.V (FP8 mma) written in the query's dtype (bf16).
One cudnn-frontend graph per (shape, strides, dtype), built on first use and cached for the process.

Where cuDNN's FP8 attention cannot run (the CPU, a GPU without the frontend package) the op computes
the same quantities in torch (`attention_emulated`): the same smoothing, per-tensor scales and P
rounding, with one exact softmax instead of the kernel's online one, so CPU tests check kino's side
of the method (scales, smoothing, layouts). On a CUDA device without the package, installing the
mode fails at once with the fix (`require_cudnn_fp8`).

Needs `nvidia-cudnn-frontend` (pip; it binds to the cuDNN torch ships) and a GPU with FP8 tensor
cores (compute capability 8.9+). Its speed and error are measured by
scripts/experiments/cudnn_fp8_attention.py before this mode is offered by any plan.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .formats import FP8_DTYPE, FP8_MAX

#: P in [0, 1] is stored as P * P_SCALE in e4m3 (cuDNN's scale_s).
P_SCALE = FP8_MAX
FIX = "pip install nvidia-cudnn-frontend (the engine's Python environment), on a GPU with compute capability 8.9+"


@functools.cache
def frontend_available() -> bool:
    """Whether the nvidia-cudnn-frontend package imports (tried once per process)."""
    try:
        import cudnn  # noqa: F401
    except Exception:
        return False
    return True


def _why_not(device: torch.device) -> str | None:
    """Why cuDNN's FP8 attention cannot run on a CUDA `device`; None when it can."""
    if not frontend_available():
        return f"attention_precision 'fp8-cudnn' needs the nvidia-cudnn-frontend package: {FIX}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"attention_precision 'fp8-cudnn' needs FP8 tensor cores (compute capability 8.9+); {name} has none"
    return None


def runs_on(device: torch.device) -> bool:
    """Whether cuDNN's FP8 attention can run on `device` (else the op emulates it)."""
    return device.type == "cuda" and _why_not(device) is None


def require_cudnn_fp8(device: torch.device) -> None:
    """Raises ValueError naming the fix when the mode cannot run on this CUDA device (the CPU emulates)."""
    reason = None if device.type != "cuda" else _why_not(device)
    if reason is not None:
        raise ValueError(reason)


@dataclass(frozen=True)
class Fp8Inputs:
    """Step 1-2's output: e4m3 Q, K, V (strided like the inputs), their (1, 1, 1, 1) float32 descales,
    and V's mean (B, H, 1, D) float32 to add back."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor
    v_mean: torch.Tensor


def _per_tensor_e4m3(x: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled to e4m3's range as one tensor, in `like`'s strides; and its descale (float32). The
    scaling runs in x's dtype (a bf16 rounding is ~1/30 of e4m3's step), so the temporaries are half
    the size of float32 ones: at the 14B's 720p shape each input is 0.77 GB."""
    amax = x.abs().amax().float().clamp(min=1e-12)
    scale = FP8_MAX / amax
    out = torch.empty_strided(like.shape, like.stride(), dtype=FP8_DTYPE, device=like.device)
    out.copy_((x * scale.to(x.dtype)).clamp(-FP8_MAX, FP8_MAX))
    return out, (1.0 / scale).reshape(1, 1, 1, 1)


def quantize_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Fp8Inputs:
    """Steps 1-2 for (B, H, N, D) query, key, value (any strides); the means in float32."""
    k_mean = k.float().mean(dim=2, keepdim=True)
    v_mean = v.float().mean(dim=2, keepdim=True)
    q8, dq = _per_tensor_e4m3(q, q)
    k8, dk = _per_tensor_e4m3(k - k_mean.to(k.dtype), k)
    v8, dv = _per_tensor_e4m3(v - v_mean.to(v.dtype), v)
    return Fp8Inputs(q8, k8, v8, dq, dk, dv, v_mean)


def attention_emulated(x: Fp8Inputs, out_dtype: torch.dtype) -> torch.Tensor:
    """What cuDNN computes from `x`, in torch (one exact softmax; P rounded as cuDNN stores it)."""
    q = x.q.float() * x.q_descale
    k = x.k.float() * x.k_descale
    v = x.v.float() * x.v_descale
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores, dim=-1)
    p = (p * P_SCALE).to(FP8_DTYPE).float() / P_SCALE
    return ((p @ v) + x.v_mean).to(out_dtype)


class _Graph:
    """One built cudnn-frontend graph: e4m3 Q, K, V of one shape and strides → O in one dtype."""

    def __init__(self, like: torch.Tensor, out_dtype: torch.dtype):
        import cudnn

        self.cudnn = cudnn
        b, h, n, d = like.shape
        stride = list(like.stride())
        self.handle = cudnn.create_handle()
        graph = cudnn.pygraph(
            io_data_type=cudnn.data_type.FP8_E4M3,
            intermediate_data_type=cudnn.data_type.FLOAT,
            compute_data_type=cudnn.data_type.FLOAT,
            handle=self.handle,
        )
        fp8 = cudnn.data_type.FP8_E4M3
        self.inputs = {name: graph.tensor(name=name, dim=[b, h, n, d], stride=stride, data_type=fp8) for name in "qkv"}
        scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": cudnn.data_type.FLOAT}
        self.scalars = {name: graph.tensor(name=name, **scalar) for name in ("dq", "dk", "dv", "ds", "ss", "so")}
        o, _stats, *amax = graph.sdpa_fp8(
            q=self.inputs["q"], k=self.inputs["k"], v=self.inputs["v"],
            descale_q=self.scalars["dq"], descale_k=self.scalars["dk"], descale_v=self.scalars["dv"],
            descale_s=self.scalars["ds"], scale_s=self.scalars["ss"], scale_o=self.scalars["so"],
            generate_stats=False, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="kino_fp8_attention",
        )
        out_type = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[out_dtype]
        o.set_output(True).set_dim([b, h, n, d]).set_stride(stride).set_data_type(out_type)
        self.o = o
        self.amax = [t for t in amax if t is not None]
        for t in self.amax:
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        device = like.device
        self.workspace = torch.empty(graph.get_workspace_size(), device=device, dtype=torch.uint8)
        self.amax_out = [torch.empty((1, 1, 1, 1), device=device) for _ in self.amax]
        const = lambda value: torch.full((1, 1, 1, 1), value, device=device)  # noqa: E731
        self.constants = {"ss": const(P_SCALE), "ds": const(1.0 / P_SCALE), "so": const(1.0)}

    def __call__(self, x: Fp8Inputs, out: torch.Tensor) -> torch.Tensor:
        pack: dict[Any, torch.Tensor] = {self.inputs["q"]: x.q, self.inputs["k"]: x.k, self.inputs["v"]: x.v, self.o: out}
        pack.update({self.scalars["dq"]: x.q_descale, self.scalars["dk"]: x.k_descale, self.scalars["dv"]: x.v_descale})
        pack.update({self.scalars[name]: value for name, value in self.constants.items()})
        pack.update(dict(zip(self.amax, self.amax_out)))
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(out.device).cuda_stream)
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return out


_graphs: dict[tuple[Any, ...], _Graph] = {}
_graphs_lock = threading.Lock()


def _graph_for(like: torch.Tensor, out_dtype: torch.dtype) -> _Graph:
    key = (like.device, tuple(like.shape), tuple(like.stride()), out_dtype)
    with _graphs_lock:
        graph = _graphs.get(key)
        if graph is None:
            graph = _graphs[key] = _Graph(like, out_dtype)
        return graph


@torch.library.custom_op("kino::cudnn_fp8_attention", mutates_args=())
def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with FP8 Q, K, V and P (the module's method); (B, H, N, D) in, out in
    q's strides and dtype. One op opaque to torch.compile: cuDNN where it runs, else the emulation."""
    x = quantize_inputs(q, k, v)
    # The output keeps q's strides, as the fake below says (compiled graphs check them).
    out = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    if not runs_on(q.device):
        return out.copy_(attention_emulated(x, q.dtype))
    _graph_for(x.q, q.dtype)(x, out)
    return out.add_(x.v_mean.to(q.dtype))


@cudnn_fp8_attention.register_fake
def _(q, k, v):  # noqa: ANN001, ANN202
    return torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)


def sdpa_cudnn_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The `Attend` the self-attention processor calls in the "fp8-cudnn" mode."""
    return torch.ops.kino.cudnn_fp8_attention(q, k, v)
