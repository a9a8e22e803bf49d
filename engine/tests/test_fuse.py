"""Fusions of the Wan block's small ops (runtime/fuse.py): each is exact up to float rounding, and undoable.

- RoPE as one stacked expression: bit-identical to diffusers' processor in eager mode (tiny model).
- The GELU epilogue: the fused FFN, with `_addmm_activation` given its CUDA meaning (tanh GELU), equals
  diffusers' FFN within bf16 rounding; on a CPU it is not applied (there `_addmm_activation` is erf GELU).
- `Fusions.disabled()` gives diffusers' own modules back and inductor's own heuristics, then refuses.
- Wide rows: inner reductions up to WIDE_ROW_LIMIT become persistent, wider ones keep inductor's rule.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformer3DModel
from torch._inductor.runtime.hints import ReductionHint

from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import CheckpointSource, JobSpec, ModelSpec
from kino_engine.runtime import fuse as fz
from kino_engine.runtime.options import RuntimeOptions

JOB = JobSpec(
    prompt="a cat", negative_prompt="bad", width=80, height=48, frames=9, steps=3, guidance=5.0,
    shift=None, seed=3, fps=None,
)


def _tiny_transformer(dtype: torch.dtype = torch.bfloat16) -> WanTransformer3DModel:
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    )
    return model.to(dtype).eval()


def _inputs(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen).to(dtype)
    text = torch.randn(2, 16, 32, generator=gen).to(dtype)
    return x, torch.tensor([500, 500]), text


def _forward(model: torch.nn.Module) -> torch.Tensor:
    x, t, text = _inputs(next(model.parameters()).dtype)
    with torch.no_grad():
        return model(x, t, text, return_dict=False)[0]


def test_fused_rope_is_bit_identical_to_diffusers() -> None:
    model = _tiny_transformer()
    plain = _forward(model)
    fusions = fz.fuse(model, torch.device("cpu"), ("rope",))
    assert len(fusions.attn) == 2 and all(
        isinstance(b.attn1.processor, fz.FusedSelfAttnProcessor) for b in model.blocks
    ), "every self-attention gets the fused processor"
    assert all(type(b.attn2.processor) is WanAttnProcessor for b in model.blocks), "cross-attention is left as it is"
    fused = _forward(model)
    assert torch.equal(plain, fused), f"fused RoPE differs from diffusers by {(plain - fused).abs().max():.3g}"


def test_rotate_matches_diffusers_formula_on_random_tensors() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, 3, 8, generator=gen).to(torch.bfloat16)
    cos = torch.randn(1, 10, 1, 8, generator=gen)
    sin = torch.randn(1, 10, 1, 8, generator=gen)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    expected = torch.empty_like(x)
    expected[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    expected[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    assert torch.equal(fz.rotate(x, cos, sin), expected)


def _cuda_addmm_gelu(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, use_gelu: bool) -> torch.Tensor:
    """`torch._addmm_activation` as it computes on CUDA (torch/_decomp: addmm, then tanh GELU), in float32."""
    out = torch.addmm(bias.float(), mat1.float(), mat2.float())
    return (F.gelu(out, approximate="tanh") if use_gelu else out).to(mat1.dtype)


def test_gelu_epilogue_ffn_matches_diffusers_within_bf16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    ffn = FeedForward(64, inner_dim=256, activation_fn="gelu-approximate").to(torch.bfloat16).eval()
    x = torch.randn(2, 50, 64).to(torch.bfloat16)
    with torch.no_grad():
        plain = ffn(x).float()
        keys, params = list(ffn.state_dict()), [id(p) for p in ffn.parameters()]
        fz._fuse_ffn(ffn)
        assert list(ffn.state_dict()) == keys and [id(p) for p in ffn.parameters()] == params, (
            "fusing must keep the module's parameters and their names (streaming and checkpoints rely on them)"
        )
        monkeypatch.setattr(torch, "_addmm_activation", _cuda_addmm_gelu)
        fused = ffn(x).float()
        fz._unfuse_ffn(ffn)
        assert type(ffn) is FeedForward
    rel = ((fused - plain).norm() / plain.norm()).item()
    # GELU on the float32 accumulator before one bf16 rounding, against GELU after a rounding: a few ulps.
    assert rel < 5e-3, f"the GELU-epilogue FFN differs from diffusers' by {rel:.3g} (relative L2)"
    assert rel > 0 or torch.equal(fused, plain)


def test_gelu_epilogue_is_cuda_only() -> None:
    model = _tiny_transformer()
    fusions = fz.fuse(model, torch.device("cpu"))
    assert fusions.ffn == [] and all(type(b.ffn) is FeedForward for b in model.blocks), (
        "on a CPU _addmm_activation applies erf GELU, not Wan's tanh GELU: the FFN must stay plain"
    )
    assert fz._gelu_epilogue_ok(model.blocks[0].ffn), "Wan's FFN is the shape the epilogue fuses"
    erf = FeedForward(8, inner_dim=16, activation_fn="gelu")  # exact GELU: no tanh epilogue applies
    assert not fz._gelu_epilogue_ok(erf)


def test_disabled_gives_diffusers_modules_back_then_refuses() -> None:
    model = _tiny_transformer()
    fusions = fz.fuse(model, torch.device("cpu"), ("rope",))
    for block in model.blocks:  # as on CUDA: the FFNs too
        fz._fuse_ffn(block.ffn)
        fusions.ffn.append(block.ffn)
    previous = torch._inductor.config.inductor_choices_class
    fz.install_wide_rows()
    try:
        with fusions.disabled():
            assert all(type(b.attn1.processor) is WanAttnProcessor for b in model.blocks)
            assert all(type(b.ffn) is FeedForward for b in model.blocks)
            assert torch._inductor.config.inductor_choices_class is None, "the reference compiles with inductor's own rules"
        assert all(isinstance(b.attn1.processor, fz.FusedSelfAttnProcessor) for b in model.blocks)
        assert all(type(b.ffn) is not FeedForward for b in model.blocks)
        assert torch._inductor.config.inductor_choices_class is fz.WideRowChoices
    finally:
        fz._use_choices(previous)


@pytest.mark.parametrize(("width", "persistent"), [(1536, True), (5120, True), (fz.WIDE_ROW_LIMIT, True)])
def test_wide_rows_are_persistent_reductions(width: int, persistent: bool) -> None:
    features = SimpleNamespace(reduction_numel=width, get_reduction_hint=lambda: ReductionHint.INNER)
    assert fz.WideRowChoices.should_use_persistent_reduction(features, False) is persistent


def test_wider_rows_keep_inductors_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.choices import InductorChoices

    asked = []
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda f, c: asked.append(f) or False))
    wide = SimpleNamespace(reduction_numel=4 * fz.WIDE_ROW_LIMIT, get_reduction_hint=lambda: ReductionHint.INNER)
    outer = SimpleNamespace(reduction_numel=512, get_reduction_hint=lambda: ReductionHint.OUTER)
    assert fz.WideRowChoices.should_use_persistent_reduction(wide, False) is False
    assert fz.WideRowChoices.should_use_persistent_reduction(outer, False) is False
    assert asked == [wide, outer], "rows wider than the limit, and outer reductions, go to inductor's own rule"


def test_unknown_fusion_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fusions"):
        fz.fuse(_tiny_transformer(), torch.device("cpu"), ("gelu",))


def test_pipeline_applies_fusions_by_default_and_output_is_unchanged(tiny_checkpoint: Path) -> None:
    def load(**options: object) -> WanT2V:
        spec = ModelSpec("fuse", CheckpointSource(str(tiny_checkpoint)), device="cpu", dtype="float32")
        return WanT2V.load(spec, runtime=RuntimeOptions(**options))  # type: ignore[arg-type]

    fused, plain = load(), load(fuse=False)
    assert fused.runtime.fusions is not None and fused.runtime.fusions.attn, "RuntimeOptions() fuses RoPE"
    assert plain.runtime.fusions is None
    cond, uncond = plain.encode_prompt(JOB.prompt), plain.encode_prompt(JOB.negative_prompt)
    a, b = fused.denoise(cond, uncond, JOB), plain.denoise(cond, uncond, JOB)
    assert torch.equal(a, b), f"fusions changed the CPU denoise by {(a - b).abs().max():.3g}"
