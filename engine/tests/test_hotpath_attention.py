"""Attention backends: the registry resolves names (and refuses ones that cannot run here), "auto"
measures once and caches its choice on disk per (GPU, torch, shape, dtype), the chosen context
really wraps the transformer's forward, and "math" and "default" give the same denoised latents on
CPU (float32, atol 1e-4 + rtol 1e-4: both are exact attention, differing by rounding only).

GPU timings are not tested here (benchmarks do that); "auto" is exercised with an injected measure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec
from kino_engine.runtime import attention as attn
from kino_engine.runtime.options import RuntimeOptions

SHAPE: attn.AttentionShape = (2, 12, 32760, 128)
CUDA = torch.device("cuda", 0)


class FakeMeasure:
    """Returns set timings (ms) per backend name, raising for the ones listed as unsupported."""

    def __init__(self, timings: dict[str, float], unsupported: tuple[str, ...] = ()):
        self.timings = timings
        self.unsupported = unsupported
        self.calls: list[str] = []

    def __call__(
        self, backend: attn.AttentionBackend, shape: attn.AttentionShape, dtype: torch.dtype, device: torch.device
    ) -> float:
        self.calls.append(backend.name)
        if backend.name in self.unsupported:
            raise RuntimeError(f"No available kernel for {backend.name}")
        return self.timings[backend.name]


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")


def test_named_backends_resolve_and_refuse_wrong_devices() -> None:
    cpu = torch.device("cpu")
    assert attn.resolve_backend("math", SHAPE, torch.float32, cpu).backend.name == "math"
    assert attn.resolve_backend("auto", SHAPE, torch.float32, cpu).backend.name == "default", (
        "auto on CPU must mean torch's default: there is nothing to measure"
    )
    with pytest.raises(ValueError, match="RuntimeOptions.attention: 'cudnn' does not run on cpu"):
        attn.resolve_backend("cudnn", SHAPE, torch.float32, cpu)
    with pytest.raises(ValueError, match="unknown backend 'sage'"):
        attn.resolve_backend("sage", SHAPE, torch.float32, cpu)
    assert set(attn.available(cpu)) == {"default", "math"}, "only default and math run on a CPU"


def test_auto_measures_once_and_caches_per_shape(tmp_path: Path, fake_gpu: None) -> None:
    measure = FakeMeasure({"cudnn": 11.1, "flash": 18.3, "efficient": 37.2}, unsupported=("efficient",))
    first = attn.resolve_backend("auto", SHAPE, torch.bfloat16, CUDA, tmp_path, measure=measure)
    assert first.backend.name == "cudnn" and first.reason == "measured", f"auto picked {first}: not the fastest"
    assert sorted(measure.calls) == ["cudnn", "efficient", "flash"], f"auto measured {measure.calls}"
    assert first.timings_ms == {"cudnn": 11.1, "flash": 18.3}, "an unsupported backend must be skipped, not chosen"

    cache = json.loads((tmp_path / "attention.json").read_text())
    key = attn.cache_key(CUDA, SHAPE, torch.bfloat16)
    assert key.startswith("Fake H100|torch ") and "B2 H12 N32760 D128|bfloat16" in key, f"cache key {key!r}"
    assert cache[key]["backend"] == "cudnn", f"the choice was not cached: {cache}"

    again = FakeMeasure({})  # a second process: must not measure
    second = attn.resolve_backend("auto", SHAPE, torch.bfloat16, CUDA, tmp_path, measure=again)
    assert second.backend.name == "cudnn" and second.reason == "cache" and not again.calls, (
        "a second process measured again instead of reading attention.json"
    )

    other_shape = FakeMeasure({"cudnn": 5.0, "flash": 2.0, "efficient": 9.0})
    third = attn.resolve_backend("auto", (1, 12, 32760, 128), torch.bfloat16, CUDA, tmp_path, measure=other_shape)
    assert third.backend.name == "flash" and other_shape.calls, "a new shape must be measured, not served a stale choice"
    assert len(json.loads((tmp_path / "attention.json").read_text())) == 2, "the cache lost an entry on merge"


def test_registry_is_overridable(fake_gpu: None) -> None:
    registry = {
        "default": attn.BACKENDS["default"],
        "flash": attn.AttentionBackend("flash", (torch.nn.attention.SDPBackend.FLASH_ATTENTION,), frozenset({"cuda"})),
    }
    chosen = attn.resolve_backend("auto", SHAPE, torch.bfloat16, CUDA, None, registry, FakeMeasure({"flash": 1.0}))
    assert chosen.backend is registry["flash"], "auto must only consider the registry it was given"
    none_ran = attn.resolve_backend("auto", SHAPE, torch.bfloat16, CUDA, None, registry, FakeMeasure({}, ("flash",)))
    assert none_ran.backend.name == "default", "with no measurable backend auto must fall back to torch's default"


def test_install_wraps_the_forward_in_the_backend_context() -> None:
    seen: list[tuple[bool, bool]] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
            return x

    module = Probe()
    policy = attn.AttentionPolicy(attn.BACKENDS["math"])
    attn.install(module, policy)
    attn.install(module, policy)  # idempotent: no nested wrappers
    module(torch.zeros(1))
    policy.backend = attn.BACKENDS["default"]
    module(torch.zeros(1))
    assert seen[0] == (True, False), f"inside the forward under 'math' the SDPA flags were {seen[0]}"
    assert seen[1][1] is True, "after switching to 'default' flash must be allowed again"
    assert attn.installed_policy(module) is policy
    assert torch.backends.cuda.flash_sdp_enabled(), "the context leaked out of the forward"


def test_math_and_default_give_the_same_latents(tiny_checkpoint: Path) -> None:
    job = JobSpec(
        prompt="a dog", negative_prompt="bad", width=80, height=48, frames=9, steps=3, guidance=5.0,
        shift=None, seed=4, fps=None,
    )
    results = {}
    for name in ("math", "default"):
        model = WanT2V.load(
            ModelSpec("attn", CheckpointSource(str(tiny_checkpoint)), device="cpu", dtype="float32"),
            runtime=RuntimeOptions(attention=name),
        )
        cond, uncond = model.encode_prompt(job.prompt), model.encode_prompt(job.negative_prompt)
        results[name] = model.denoise(cond, uncond, job)
        assert model.runtime.policy.backend.name == name, f"the model ran under {model.runtime.policy.backend.name}"
    diff = (results["math"] - results["default"]).abs().max()
    assert torch.allclose(results["math"], results["default"], atol=1e-4, rtol=1e-4), (
        f"math and default attention differ by {diff:.3g}: a backend is not exact, or the wrapper changed inputs"
    )
