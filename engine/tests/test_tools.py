"""`python -m kino_engine.tools`: make-tiny writes diffusers' exact layout; every outcome ends with one
JSON line on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_tool

EXPECTED_FILES = {
    "kino_tiny.json",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def test_make_tiny_layout(tiny_checkpoint: Path) -> None:
    files = {str(p.relative_to(tiny_checkpoint)) for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert files == EXPECTED_FILES, f"make-tiny's layout differs from diffusers': {sorted(files ^ EXPECTED_FILES)}"
    assert json.loads((tiny_checkpoint / "kino_tiny.json").read_text()) == {
        "kind": "kino-tiny", "note": "random weights: videos are noise",
    }
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
    scheduler = json.loads((tiny_checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["use_flow_sigmas"], scheduler["flow_shift"]) == (
        "flow_prediction", True, 3.0,
    ), "the tiny scheduler must be configured like Wan 2.1's"
    transformer = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    assert (transformer["num_layers"], transformer["num_attention_heads"], transformer["attention_head_dim"]) == (2, 2, 12)


def test_make_tiny_is_seeded_and_replaces_only_its_own(tmp_path: Path, tiny_checkpoint: Path) -> None:
    target = tmp_path / "tiny"
    status, answer, _ = run_tool("make-tiny", str(target), "--seed", "7")
    assert status == 0 and answer["ok"] and answer["path"] == str(target) and answer["bytes"] > 0
    same = (target / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert same == (tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes(), (
        "the same seed must write the same weights"
    )
    status, answer, _ = run_tool("make-tiny", str(target), "--seed", "8")
    assert status == 0 and answer["ok"], f"an existing tiny checkpoint must be replaced: {answer}"
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != same
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"], "temporaries were left behind"

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    status, answer, _ = run_tool("make-tiny", str(foreign))
    assert (status, answer["ok"], answer["error"]["code"]) == (1, False, "OUTPUT_UNWRITABLE")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"], "a folder that is not ours must not be touched"


def test_pull_without_network_answers_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "wan"
    status, answer, _ = run_tool("pull", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", str(target), HF_HUB_OFFLINE="1")
    assert (status, answer["ok"], answer["error"]["code"]) == (1, False, "NETWORK"), answer
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in answer["error"]["message"]
    assert not target.exists()


def test_bad_arguments() -> None:
    status, answer, _ = run_tool("make-tiny")
    assert (status, answer["ok"], answer["error"]["code"]) == (1, False, "BAD_ARGS"), answer
    status, answer, _ = run_tool("frobnicate", "x")
    assert (status, answer["error"]["code"]) == (1, "BAD_ARGS")
