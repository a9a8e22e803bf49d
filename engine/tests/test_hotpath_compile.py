"""Regional compile: which modules get compiled, and the persistent inductor cache.

The wiring (which modules, the cache settings) and one real compile of the tiny model on the CPU
(~40 s cold on 2 cores), whose denoise must match eager (float32, atol 1e-4 + rtol 1e-4).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec
from kino_engine.runtime import compile as kcompile
from kino_engine.runtime.compile import INDUCTOR_CACHE_ENV, is_compiled
from kino_engine.runtime.options import RuntimeOptions

JOB = JobSpec(
    prompt="a cat", negative_prompt="bad", width=80, height=48, frames=9, steps=3, guidance=5.0,
    shift=None, seed=3, fps=None,
)


def _load(path: Path, **options: object) -> WanT2V:
    spec = ModelSpec("compile", CheckpointSource(str(path)), device="cpu", dtype="float32")
    return WanT2V.load(spec, runtime=RuntimeOptions(**options))  # type: ignore[arg-type]


def test_compile_wraps_exactly_the_repeated_blocks(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(INDUCTOR_CACHE_ENV, raising=False)
    model = _load(tiny_checkpoint, compile=True, cache_dir=tmp_path)
    transformer = model.transformer
    blocks = {name for name, m in transformer.named_modules() if type(m).__name__ == "WanTransformerBlock"}
    assert blocks and set(model.runtime.compiled) == blocks, (
        f"compiled {model.runtime.compiled}, expected the WanTransformerBlocks {sorted(blocks)}"
    )
    compiled = {name for name, m in transformer.named_modules() if is_compiled(m)}
    assert compiled == blocks, f"modules compiled besides/instead of the blocks: {sorted(compiled ^ blocks)}"
    assert os.environ[INDUCTOR_CACHE_ENV] == str((tmp_path / "inductor").resolve()), (
        "the inductor cache does not point into RuntimeOptions.cache_dir: a second process would recompile"
    )
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache, "the FX graph cache must be on for compiled artifacts to persist"


def test_no_compile_by_default(tiny_checkpoint: Path) -> None:
    model = _load(tiny_checkpoint)
    assert not model.runtime.compiled and not any(is_compiled(m) for m in model.transformer.modules()), (
        "RuntimeOptions() compiled something: compile must be opt-in on CPU"
    )


def test_a_model_without_repeated_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="declares no _repeated_blocks"):
        kcompile.repeated_block_names(torch.nn.Linear(2, 2))


def test_compiled_denoise_matches_eager(tiny_checkpoint: Path, tmp_path: Path) -> None:
    compiled, eager = _load(tiny_checkpoint, compile=True, cache_dir=tmp_path), _load(tiny_checkpoint)
    compiled.prewarm(JOB)
    assert any((tmp_path / "inductor").iterdir()), "prewarm compiled nothing into the cache dir"
    cond, uncond = eager.encode_prompt(JOB.prompt), eager.encode_prompt(JOB.negative_prompt)
    a, b = compiled.denoise(cond, uncond, JOB), eager.denoise(cond, uncond, JOB)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"compiled blocks drifted from eager by {(a - b).abs().max():.3g}"
