"""Tiny Wan 2.1 T2V models with random weights, written as real diffusers checkpoints.

For tests and for trying kino without downloading anything: the architecture is Wan's, scaled down
(2 transformer layers of 2 heads x 12 dims, a 32-wide UMT5, a VAE of base width 3), so every code path
of a real checkpoint runs in seconds on a CPU. Videos made with it are noise.

`tiny_components(seed, ...)` builds the components (float32, CPU; constructor initialization, seeded);
`save_checkpoint(components, folder)` writes them exactly as diffusers does (WanPipeline.save_pretrained,
safetensors) through a temporary sibling folder renamed into place; `make_tiny_checkpoint` does both
and adds the `kino_tiny.json` marker.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .pipelines.wan_components import TEXT_ENCODER_MAX_LENGTH, WanComponents, resolve_scheduler_class
from .synthetic_tokenizer import synthetic_t5_tokenizer

MARKER = "kino_tiny.json"
MARKER_CONTENT = {"kind": "kino-tiny", "note": "random weights: videos are noise"}

TINY_VOCAB_SIZE = 384

TINY_TRANSFORMER: Mapping[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    # Rotary embeddings split a head into t/h/w parts of 2*(d//6) for h and w: 12 -> 4 + 4 + 4.
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

TINY_VAE: Mapping[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}

TINY_TEXT_ENCODER: Mapping[str, Any] = {
    "vocab_size": TINY_VOCAB_SIZE,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

#: The scheduler of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (UniPC over flow sigmas, shift 3.0 for 480p);
#: unlisted keys take UniPCMultistepScheduler's defaults, which match that checkpoint's.
WAN21_SCHEDULER_CLASS = "UniPCMultistepScheduler"
WAN21_SCHEDULER_CONFIG: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}


def tiny_components(
    seed: int = 0,
    *,
    transformer: Mapping[str, Any] = TINY_TRANSFORMER,
    vae: Mapping[str, Any] = TINY_VAE,
    text_encoder: Mapping[str, Any] = TINY_TEXT_ENCODER,
    scheduler_class: str = WAN21_SCHEDULER_CLASS,
    scheduler_config: Mapping[str, Any] = WAN21_SCHEDULER_CONFIG,
    vocab_size: int = TINY_VOCAB_SIZE,
) -> WanComponents:
    """Tiny components in float32 on the CPU; the same seed gives the same weights."""
    resolved = resolve_scheduler_class(scheduler_class)
    if resolved is None:
        raise ValueError(f"{scheduler_class!r} is not a diffusers scheduler")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = WanComponents(
            transformer=WanTransformer3DModel.from_config(dict(transformer)).eval(),
            vae=AutoencoderKLWan.from_config(dict(vae)).eval(),
            text_encoder=UMT5EncoderModel(UMT5Config.from_dict(dict(text_encoder))).eval(),
            tokenizer=synthetic_t5_tokenizer(vocab_size, TEXT_ENCODER_MAX_LENGTH),
            scheduler_class=resolved,
            scheduler_config=dict(resolved.from_config(dict(scheduler_config)).config),
        )
    return components


def save_checkpoint(components: WanComponents, folder: str, marker: Mapping[str, Any] | None = None) -> None:
    """Write a diffusers-format checkpoint to `folder` (which must not exist) all-or-nothing."""
    parent, name = os.path.split(os.path.abspath(folder))
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    try:
        pipeline = WanPipeline(
            tokenizer=components.tokenizer,
            text_encoder=components.text_encoder,
            vae=components.vae,
            scheduler=components.scheduler_class.from_config(dict(components.scheduler_config)),
            transformer=components.transformer,
        )
        pipeline.save_pretrained(staging, safe_serialization=True)
        if marker is not None:
            with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as f:
                json.dump(dict(marker), f, indent=2)
                f.write("\n")
        os.chmod(staging, 0o755)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_tiny_checkpoint(folder: str, seed: int = 0) -> None:
    """The tiny Wan 2.1 T2V checkpoint, with the kino_tiny.json marker, at `folder`."""
    save_checkpoint(tiny_components(seed), folder, MARKER_CONTENT)
