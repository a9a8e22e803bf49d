"""Shared fixtures: the engine on sys.path (it is never pip-installed), the protocol's JSON Schema,
and tiny checkpoints: one made by `python -m kino_engine.tools make-tiny`, one written by diffusers'
own save_pretrained from components built here with other dimensions, another scheduler and sharded
weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = ENGINE_DIR.parent
SCHEMA_PATH = REPO_DIR / "src" / "protocol" / "engine.schema.json"
if str(ENGINE_DIR) not in sys.path:
    sys.path.insert(0, str(ENGINE_DIR))


def engine_env(**extra: str) -> dict[str, str]:
    """The environment for engine subprocesses: the engine importable, output unbuffered."""
    inherited = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=f"{ENGINE_DIR}{os.pathsep}{inherited}" if inherited else str(ENGINE_DIR))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_tool(*args: str, **env: str) -> tuple[int, dict, str]:
    """Run `python -m kino_engine.tools ARGS`; returns (exit status, last stdout line as JSON, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "kino_engine.tools", *args],
        env=engine_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, f"the tool printed nothing on stdout; stderr:\n{done.stderr[-3000:]}"
    return done.returncode, json.loads(lines[-1]), done.stderr


@pytest.fixture(scope="session")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kino's tiny checkpoint, made the way the control plane makes it (the make-tiny tool)."""
    folder = tmp_path_factory.mktemp("tiny") / "wan-tiny"
    status, answer, stderr = run_tool("make-tiny", str(folder), "--seed", "7")
    assert status == 0 and answer["ok"], f"make-tiny failed: {answer}\n{stderr[-3000:]}"
    return folder


#: How the variant checkpoint applies a job's shift on the diffusers side.
VARIANT_SHIFT_KEY = "shift"


@pytest.fixture(scope="session")
def variant_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A differently shaped Wan checkpoint written by diffusers' WanPipeline.save_pretrained (sharded)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(1234)
    z_dim = 8
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=3,
        attention_head_dim=16,  # rope: 8 (t) + 4 (h) + 4 (w)
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=24,
        freq_dim=64,
        ffn_dim=40,
        num_layers=3,
        cross_attn_norm=False,
        eps=1e-5,
        rope_max_seq_len=256,
    )
    generator = torch.Generator().manual_seed(5)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=(torch.randn(z_dim, generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(z_dim, generator=generator) * 2 + 0.5).tolist(),
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=256, d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3,
            relative_attention_num_buckets=16, relative_attention_max_distance=64,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    ).eval()
    words = ["cat", "dog", "on", "the", "beach", "a", "red", "car", "at", "night", "bad", "blurry"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in words] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz&;,."]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    folder = tmp_path_factory.mktemp("variant") / "wan-variant"
    WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    ).save_pretrained(str(folder), safe_serialization=True, max_shard_size="40KB")
    assert list(folder.glob("transformer/*.safetensors.index.json")), "the variant should have sharded weights"
    return folder
