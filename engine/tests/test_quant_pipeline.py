"""Low-bit modes wired into the pipeline, on the tiny model (CPU, float32 activations; the FP8 GEMM
runs as its exact-math emulation off CUDA):

- `RuntimeOptions(weights=...)` quantizes the transformer's policy linears at load and the whole
  generation stays close to the exact one: relative L2 of the final latents (6 steps, CFG 5)
  measured when written at fp8 1.2%, fp8-weight 0.34%, int8 0.06%, int8-dynamic 0.34% (asserted
  below 3%, 1%, 0.5%, 1%);
- low-bit self-attention (`attention_precision="int8-fp8"`, on a head-dim-64 variant) measured 0.002%
  (asserted below 1% and above 0): the tiny random transformer's attention contributes little to its
  output; the kernel's own error against exact SDPA is held by test_quant_attention.py;
- a checkpoint written by `quantize_checkpoint` loads as it was written (no second quantization)
  and gives the same latents as quantizing at load;
- bad names are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec
from kino_engine.quant import QuantLinear, quantize_checkpoint
from kino_engine.runtime.options import RuntimeOptions

JOB = JobSpec(
    prompt="a red car on the beach", negative_prompt="blurry", width=80, height=48, frames=9,
    steps=6, guidance=5.0, shift=None, seed=5, fps=None,
)


def _latents(path: Path, **runtime: str) -> tuple[WanT2V, torch.Tensor]:
    spec = ModelSpec("q", CheckpointSource(str(path)), device="cpu", dtype="float32")
    model = WanT2V.load(spec, runtime=RuntimeOptions(**runtime))  # type: ignore[arg-type]
    cond, uncond = model.encode_prompt(JOB.prompt), model.encode_prompt(JOB.negative_prompt)
    return model, model.denoise(cond, uncond, JOB)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


_exact: dict[str, torch.Tensor] = {}


def _exact_latents(path: Path) -> torch.Tensor:
    if "x" not in _exact:
        _exact["x"] = _latents(path)[1]
    return _exact["x"]


@pytest.mark.parametrize("mode,bound", [("fp8", 0.03), ("fp8-weight", 0.01), ("int8", 0.005), ("int8-dynamic", 0.01)])
def test_low_bit_weights_stay_close(tiny_checkpoint: Path, mode: str, bound: float) -> None:
    exact = _exact_latents(tiny_checkpoint)
    model, latents = _latents(tiny_checkpoint, weights=mode)
    quantized = [m for m in model.transformer.modules() if isinstance(m, QuantLinear)]
    assert quantized and model.quant_report is not None, f"{mode}: nothing was quantized"
    assert not isinstance(model.transformer.proj_out, QuantLinear), "the output projection stays exact"
    error = _rel(latents, exact)
    assert 0 < error < bound, f"{mode}: latents {error:.4f} from exact (bound {bound})"


@pytest.fixture(scope="module")
def head64_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a transformer of head dim 64 (the low-bit kernel takes 64 or 128)."""
    from diffusers import WanTransformer3DModel

    from kino_engine.random_weights import build_random

    folder = tmp_path_factory.mktemp("head64") / "wan-tiny-64"
    shutil.copytree(tiny_checkpoint, folder)
    config = dict(WanTransformer3DModel.load_config(str(folder / "transformer")))
    config.update(num_attention_heads=2, attention_head_dim=64)
    shutil.rmtree(folder / "transformer")
    model = build_random(lambda: WanTransformer3DModel.from_config(config), device=torch.device("cpu"), dtype=torch.float32, seed=3)
    model.save_pretrained(str(folder / "transformer"))
    return folder


def test_low_bit_attention_stays_close(head64_checkpoint: Path) -> None:
    _, exact = _latents(head64_checkpoint)
    _, latents = _latents(head64_checkpoint, attention_precision="int8-fp8")
    error = _rel(latents, exact)
    assert 0 < error < 0.01, f"low-bit attention: latents {error:.4f} from exact"


def test_a_prequantized_checkpoint_loads_as_written(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-int8"
    quantize_checkpoint(str(tiny_checkpoint), str(folder), "int8", torch.device("cpu"), dtype=torch.float32, hash_source=False)
    loaded, from_disk = _latents(folder)
    assert loaded.quant_report is None, "a pre-quantized transformer must not be quantized again"
    assert any(isinstance(m, QuantLinear) for m in loaded.transformer.modules())
    _, at_load = _latents(tiny_checkpoint, weights="int8")
    assert torch.allclose(from_disk, at_load, atol=1e-5, rtol=1e-5), (from_disk - at_load).abs().max()


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        RuntimeOptions(weights="fp4")
    with pytest.raises(ValueError, match="attention_precision"):
        RuntimeOptions(attention_precision="int4-fp8")


def test_the_protocol_carries_the_modes() -> None:
    from kino_engine.protocol import parse_model_spec

    raw = {
        "name": "m", "source": {"kind": "checkpoint", "path": "/x"}, "device": "cpu", "dtype": "float32",
        "runtime": {"cfg": "auto", "attention": "auto", "compile": False, "cacheDir": None, "weights": "int8", "attentionPrecision": "int8-fp8"},
    }
    spec = parse_model_spec(raw)
    assert spec.runtime is not None and spec.runtime.weights == "int8" and spec.runtime.attention_precision == "int8-fp8"
    raw["runtime"]["weights"] = "fp4"  # type: ignore[index]
    with pytest.raises(Exception, match="weights"):
        parse_model_spec(raw)
