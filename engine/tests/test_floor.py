"""The floor's FLOP counts: a wrong count would make every "× the floor" claim wrong."""

from __future__ import annotations

import math
from types import SimpleNamespace

from kino_engine.floor import WanShape

# Wan2.1 1.3B at 832x480x81: 21 latent frames of 30x52 patches.
WAN_13B = SimpleNamespace(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
WAN_14B = SimpleNamespace(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)


def test_13b_flops_match_the_targets_estimate() -> None:
    shape = WanShape.of(WAN_13B, tokens=32760)
    # TARGETS.md: linear ≈ 0.107 s at ~790 TFLOP/s and attention ≈ 0.338 s at 595 TFLOP/s.
    assert math.isclose(shape.linear_flops(), 82.07e12, rel_tol=1e-3), "linear FLOPs per block formula drifted"
    assert math.isclose(shape.attention_flops(), 200.9e12, rel_tol=1e-3), "attention FLOPs (4·N²·d + 4·N·L·d) drifted"
    assert math.isclose(shape.attention_flops() / 595e12, 0.338, rel_tol=0.01)


def test_batch_and_depth_scale_linearly() -> None:
    one = WanShape.of(WAN_14B, tokens=75600)
    two = WanShape.of(WAN_14B, tokens=75600, batch=2)
    assert two.linear_flops() == 2 * one.linear_flops() and two.attention_flops() == 2 * one.attention_flops(), (
        "a batch-2 (CFG-batched) forward must count as two forwards of batch 1"
    )
    assert one.width == 5120 and one.layers == 40
