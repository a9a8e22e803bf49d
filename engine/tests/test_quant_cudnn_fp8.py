"""The "fp8-cudnn" attention mode on the CPU: kino's side of it (smoothing, per-tensor scales kept on
the device, strides, the op as torch.compile sees it, the runtime option) through the emulation of
what cuDNN computes. cuDNN's kernel itself needs a GPU: scripts/experiments/cudnn_fp8_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kino_engine.quant import install_lowbit_attention, uninstall_lowbit_attention
from kino_engine.quant.cudnn_fp8 import (
    FIX,
    Fp8Inputs,
    P_SCALE,
    attention_emulated,
    quantize_inputs,
    require_cudnn_fp8,
    runs_on,
    sdpa_cudnn_fp8,
)
from kino_engine.quant.formats import FP8_DTYPE, FP8_MAX, relative_l2
from kino_engine.quant.selfcheck import attention_inputs
from kino_engine.runtime.options import RuntimeOptions
from kino_engine.runtime.optimize import optimize
from quant_helpers import forward, tiny_inputs, tiny_transformer


def _bnhd_views(shape: tuple[int, int, int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, N, D) views of (B, N, H, D) storage, as Wan's processor hands them over, in bf16."""
    q, k, v = attention_inputs(shape, seed=seed)
    return tuple(t.transpose(1, 2).contiguous().transpose(1, 2).to(torch.bfloat16) for t in (q, k, v))  # type: ignore[return-value]


def test_inputs_are_per_tensor_e4m3_in_the_input_strides_with_device_scales() -> None:
    q, k, v = _bnhd_views((1, 3, 200, 64), seed=1)
    x = quantize_inputs(q, k, v)
    for name, t, src in (("q", x.q, q), ("k", x.k, k), ("v", x.v, v)):
        assert t.dtype == FP8_DTYPE and t.shape == src.shape and t.stride() == src.stride(), f"{name}: layout changed"
        assert float(t.float().abs().amax()) == FP8_MAX, f"{name}: one per-tensor scale must map its amax to e4m3's 448"
    for descale in (x.q_descale, x.k_descale, x.v_descale):
        assert descale.shape == (1, 1, 1, 1) and descale.dtype == torch.float32 and descale.device == q.device
    # Smoothing: K and V lose their mean over the tokens (kept for V, dropped for K).
    assert float((x.k.float() * x.k_descale).mean(dim=2).abs().max()) < 0.05
    assert torch.allclose(x.v_mean, v.float().mean(dim=2, keepdim=True))


def test_smoothing_is_exact_and_the_error_is_fp8s() -> None:
    """Without the FP8 roundings the method is exact attention; with them the error stays near what
    e4m3 costs. A large key offset (what smoothing removes) must not change it."""
    q, k, v = _bnhd_views((1, 2, 300, 64), seed=2)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = sdpa_cudnn_fp8(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape and out.stride() == q.stride()
    error = relative_l2(out.float(), exact)
    assert 1e-4 < error < 0.05, f"relative L2 {error:.4f} against exact attention"
    offset = sdpa_cudnn_fp8(q, (k.float() + 30.0).to(torch.bfloat16), v)
    shifted = relative_l2(offset.float(), exact)
    assert shifted < 1.5 * error + 0.01, f"a key offset raised the error from {error:.4f} to {shifted:.4f}: K is not smoothed"


def test_p_is_rounded_as_cudnn_stores_it() -> None:
    """Equal scores give every P = 1/N; the emulation must store it as cuDNN does, P * 448 in e4m3."""
    n, d = 6, 64
    one = torch.ones((1, 1, 1, 1))
    identity = torch.eye(n, d).reshape(1, 1, n, d).to(FP8_DTYPE)  # V's rows e_0 .. e_5: O = P
    zeros = torch.zeros((1, 1, n, d), dtype=FP8_DTYPE)
    x = Fp8Inputs(zeros, zeros, identity, one, one, one, torch.zeros((1, 1, 1, d)))
    out = attention_emulated(x, torch.float32)[0, 0, :, :n]
    stored = float((torch.tensor(1.0 / n) * P_SCALE).to(FP8_DTYPE).float() / P_SCALE)
    assert abs(stored - 1.0 / n) > 1e-4, "the case must exercise P's rounding"
    assert torch.equal(out, torch.full((n, n), stored)), f"P was not rounded as e4m3 stores P * 448: {out[0]}"


def test_the_op_compiles_with_a_block_and_keeps_strides() -> None:
    q, k, v = _bnhd_views((1, 2, 64, 64), seed=3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: sdpa_cudnn_fp8(a, b, c) * 2, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(q, k, v), sdpa_cudnn_fp8(q, k, v) * 2)


def test_installed_as_the_models_self_attention() -> None:
    model, inputs = tiny_transformer(), tiny_inputs()
    exact = forward(model, inputs)
    install_lowbit_attention(model, attend=sdpa_cudnn_fp8)
    error = relative_l2(forward(model, inputs), exact)
    assert 1e-5 < error < 0.05, f"output relative L2 {error:.4f} with FP8 self-attention"
    uninstall_lowbit_attention(model)
    assert torch.equal(forward(model, inputs), exact)


def test_the_runtime_option_installs_it_and_cuda_without_the_frontend_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = tiny_transformer(), tiny_inputs()
    exact = forward(model, inputs)
    optimize(model, torch.device("cpu"), torch.float32, RuntimeOptions(attention_precision="fp8-cudnn"))
    assert 1e-5 < relative_l2(forward(model, inputs), exact) < 0.05, "the option did not route attention through it"
    assert not runs_on(torch.device("cpu")), "the CPU runs the emulation"
    import kino_engine.quant.cudnn_fp8 as module

    monkeypatch.setattr(module, "frontend_available", lambda: False)
    with pytest.raises(ValueError, match="nvidia-cudnn-frontend") as refused:
        require_cudnn_fp8(torch.device("cuda"))
    assert FIX in str(refused.value)
    with pytest.raises(ValueError, match="attention_precision"):
        RuntimeOptions(attention_precision="fp8-cudnnn")


def test_the_forward_bench_runs_its_cudnn_modes_on_small_cpu_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    """The forward bench the GPU session runs (`--modes cudnn,fp8+cudnn`), through its code paths on the
    CPU (eager, emulated attention), so a mistake in it costs no GPU time."""
    import json

    from kino_engine.quant import forward_bench
    from quant_helpers import QUANT_TINY

    config = json.dumps({"_class_name": "WanTransformer3DModel", **QUANT_TINY})
    status = forward_bench.main(
        ["--config", config, "--size", "64x64", "--frames", "5", "--warmup", "1", "--repeats", "1",
         "--device", "cpu", "--no-compile", "--modes", "fp8+cudnn,cudnn"]
    )
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0 and answer["ok"], answer
    modes = answer["result"]["modes"]
    assert [m["mode"] for m in modes] == ["bf16", "bf16 linears + fp8 attention (cuDNN)", "fp8 linears + fp8 attention (cuDNN)"], (
        "bf16 first, then the bf16-linear modes, then the quantized ones"
    )
    assert answer["result"]["quantized"] is not None
    assert 0 < modes[1]["relL2VsBf16"] < modes[2]["relL2VsBf16"] < 0.2, [m.get("relL2VsBf16") for m in modes]
