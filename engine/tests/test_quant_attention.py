"""Low-bit attention: the torch emulation's error against exact SDPA is bounded, the Triton kernel
computes exactly the emulation's math (run under Triton's CPU interpreter), and the installer routes
only a transformer's self-attention through it, from outside the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import engine_env
from kino_engine.quant import attention as attention_module
from kino_engine.quant import install_lowbit_attention, sdpa_lowbit, uninstall_lowbit_attention
from kino_engine.quant.attention import attention_emulated, quantize_attention_inputs
from kino_engine.quant.formats import relative_l2
from kino_engine.quant.selfcheck import ATTENTION_BOUNDS, attention_inputs
from quant_helpers import QUANT_TINY, forward, tiny_inputs, tiny_transformer

INTERPRETER = Path(__file__).with_name("quant_triton_interpreter.py")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("qk", "pv"), list(ATTENTION_BOUNDS))
def test_error_against_exact_sdpa_is_bounded(qk: str, pv: str, head_dim: int) -> None:
    """Measured (N=300, temperature 2): int8/fp8 1.5%, int8/bf16 0.65%, fp8/fp8 3.0%, fp8/bf16 2.7%."""
    q, k, v = attention_inputs((1, 3, 300, head_dim), seed=head_dim)
    exact = F.scaled_dot_product_attention(q, k, v)
    out = sdpa_lowbit(q, k, v, qk, pv)  # type: ignore[arg-type]
    assert out.shape == exact.shape and out.dtype == q.dtype
    error = relative_l2(out, exact)
    assert error < ATTENTION_BOUNDS[(qk, pv)], f"qk={qk} pv={pv} D={head_dim}: relative L2 {error:.4f}"
    assert error > 1e-4, "no error at all: is anything quantized?"


def test_int8_scores_beat_fp8_scores() -> None:
    """Why INT8 is the default for Q.K^T: on the same inputs its error is well below e4m3's."""
    q, k, v = attention_inputs((1, 4, 256, 64), seed=5)
    exact = F.scaled_dot_product_attention(q, k, v)
    int8 = relative_l2(sdpa_lowbit(q, k, v, "int8", "bf16"), exact)
    fp8 = relative_l2(sdpa_lowbit(q, k, v, "fp8", "bf16"), exact)
    assert int8 < 0.5 * fp8, f"int8 {int8:.4f} vs fp8 {fp8:.4f}"


@pytest.mark.parametrize("qk", ["int8", "fp8"])
def test_k_smoothing_makes_a_key_offset_free(qk: str) -> None:
    """A per-channel offset shared by all keys leaves softmax unchanged; with K smoothing it also leaves
    the quantization unchanged, so the output must not move (without smoothing it would eat the range)."""
    q, k, v = attention_inputs((1, 2, 200, 64), seed=7)
    offset = 30.0 * torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(8))
    base = sdpa_lowbit(q, k, v, qk)  # type: ignore[arg-type]
    shifted = sdpa_lowbit(q, k + offset, v, qk)  # type: ignore[arg-type]
    assert relative_l2(shifted, base) < 2e-3, "K smoothing is not removing the keys' shared offset"


@pytest.mark.parametrize("n", [1, 127, 128, 129])
def test_token_counts_around_the_padding(n: int) -> None:
    q, k, v = attention_inputs((1, 2, n, 64), seed=n)
    out = sdpa_lowbit(q, k, v)
    assert out.shape == (1, 2, n, 64) and torch.isfinite(out).all()
    assert relative_l2(out, F.scaled_dot_product_attention(q, k, v)) < ATTENTION_BOUNDS[("int8", "fp8")]


def test_the_emulation_does_not_depend_on_its_tile() -> None:
    """The online softmax is exact math; only where P is rounded (to bf16 or FP8) moves with the tile."""
    q, k, v = attention_inputs((1, 2, 300, 64), seed=9)
    x = quantize_attention_inputs(q, k, v, "int8", "bf16")
    assert relative_l2(attention_emulated(x, block_n=32), attention_emulated(x, block_n=300)) < 2e-3
    x8 = quantize_attention_inputs(q, k, v, "int8", "fp8")
    assert relative_l2(attention_emulated(x8, block_n=32), attention_emulated(x8, block_n=128)) < 0.02


def test_triton_kernel_equals_the_emulation_under_the_interpreter() -> None:
    """The real kernel (indexing, masking of the partial tile, the online softmax, the FP8 and INT8 dots)
    run on the CPU by Triton's interpreter, against the torch emulation the error bounds are proven on."""
    cases = [f"{qk},{pv},200,64" for qk, pv in ATTENTION_BOUNDS] + ["int8,fp8,50,128", "int8,fp8,128,64"]
    done = subprocess.run(
        [sys.executable, str(INTERPRETER), *cases],
        env=engine_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stderr[-3000:]}"
    for result in json.loads(done.stdout.strip().splitlines()[-1]):
        assert result["finite"] and result["shape"] == [1, 2, result["n"], result["d"]]
        assert result["kernel_vs_emulation"] < 1e-4, f"kernel and emulation differ: {result}"
        assert result["kernel_vs_exact"] < ATTENTION_BOUNDS[(result["qk"], result["pv"])], result


def test_refuses_what_it_does_not_compute() -> None:
    q = torch.randn(1, 2, 16, 64)
    with pytest.raises(ValueError, match="head dim 48"):
        sdpa_lowbit(torch.randn(1, 2, 16, 48), torch.randn(1, 2, 16, 48), torch.randn(1, 2, 16, 48))
    with pytest.raises(ValueError, match="one shape"):
        sdpa_lowbit(q, torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64))
    with pytest.raises(ValueError, match="qk must be"):
        sdpa_lowbit(q, q, q, "int4")  # type: ignore[arg-type]


def test_the_processor_is_diffusers_math_with_exact_attention() -> None:
    """With exact SDPA as its attention, the low-bit processor must reproduce diffusers' own processor
    bit for bit: it re-implements only the projections/norms/rotary plumbing, and this is its guard."""
    model, inputs = tiny_transformer(), tiny_inputs()
    exact = forward(model, inputs)
    install_lowbit_attention(model, attend=lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(forward(model, inputs), exact), "LowbitSelfAttnProcessor drifted from WanAttnProcessor"


def test_install_routes_only_self_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = tiny_transformer(), tiny_inputs()
    exact = forward(model, inputs)
    calls: list[tuple[int, ...]] = []
    real = attention_module.sdpa_lowbit

    def spy(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(q.shape))
        return real(q, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(attention_module, "sdpa_lowbit", spy)
    names = install_lowbit_attention(model)
    assert names == ["blocks.0.attn1", "blocks.1.attn1"]
    assert install_lowbit_attention(model) == names, "a second install replaces the first"
    out = forward(model, inputs)
    tokens = 3 * 4 * 4
    assert calls == [(1, 2, tokens, 64)] * 2, "one low-bit call per block's self-attention, none for attn2"
    error = relative_l2(out, exact)
    assert 1e-5 < error < 0.01, f"output relative L2 {error:.4f} with low-bit self-attention"
    uninstall_lowbit_attention(model)
    assert torch.equal(forward(model, inputs), exact), "uninstall must restore the exact path"
    with pytest.raises(ValueError, match="head dim 12"):
        install_lowbit_attention(tiny_transformer(config={**QUANT_TINY, "attention_head_dim": 12}))


def test_compiles_as_one_graph() -> None:
    """The quantization prologue traces (no host syncs), the kernel is one opaque op with a fake, and a
    Wan block with the low-bit processor compiles whole."""
    q, k, v = attention_inputs((1, 2, 100, 64), seed=11)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: sdpa_lowbit(a, b, c), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(q, k, v), sdpa_lowbit(q, k, v))
    model, inputs = tiny_transformer(), tiny_inputs()
    install_lowbit_attention(model)
    block = model.blocks[0]
    dim = QUANT_TINY["num_attention_heads"] * QUANT_TINY["attention_head_dim"]
    generator = torch.Generator().manual_seed(12)
    hidden, text = torch.randn(1, 48, dim, generator=generator), torch.randn(1, 16, dim, generator=generator)
    temb = torch.randn(1, 6, dim, generator=generator)
    rotary = model.rope(inputs["hidden_states"])
    with torch.no_grad():
        eager = block(hidden, text, temb, rotary)
        assert torch.equal(torch.compile(block, fullgraph=True, backend="aot_eager")(hidden, text, temb, rotary), eager)


def test_the_gpu_selfcheck_runs_end_to_end_on_small_cpu_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check the lead runs on the GPU, driven through its code paths on the CPU at toy shapes
    (wall-clock timing in place of CUDA events; the Triton cross-check needs a GPU), so a mistake in the
    script costs no GPU time. Its error bounds must hold here too."""
    import time

    from kino_engine.quant import selfcheck

    def wall_ms(fn: object, repeats: int, warmup: int = 1) -> dict[str, float]:
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        ms = (time.perf_counter() - started) * 1000.0
        return {"ms": ms, "min_ms": ms, "max_ms": ms}

    monkeypatch.setattr(selfcheck, "time_ms", wall_ms)
    cpu = torch.device("cpu")
    gemms = selfcheck.check_gemms(cpu, tokens=64, repeats=1, compile_=False, dim=128, ffn=256)
    assert {e["mode"] for e in gemms} == {"bf16", *selfcheck.LINEAR_BOUNDS}
    assert all(e["ok"] for e in gemms if "ok" in e), [e for e in gemms if not e.get("ok", True)]
    cross = selfcheck.cross_check_scaled_mm(cpu, rows=64, dim=128, ffn=256)
    assert cross["ok"] and cross["kernel"] == "torch" and cross["relL2"] == 0.0
    attention = selfcheck.check_attention(cpu, heads=2, tokens=192, repeats=1, compile_=False, head_dim=64)
    checked = [e for e in attention if "ok" in e]
    assert len(checked) == len(selfcheck.ATTENTION_BOUNDS) and all(e["ok"] for e in checked), checked
    assert json.dumps(gemms + [cross] + attention), "the report must be JSON"
