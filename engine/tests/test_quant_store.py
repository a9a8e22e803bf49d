"""kino's pre-quantized checkpoint: quantize -> save -> load is bit-identical, the folder is one the rest
of kino recognizes, writes are all-or-nothing, and a damaged folder is refused with BAD_CHECKPOINT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open

from kino_engine.checkpoint import inspect_checkpoint
from kino_engine.protocol import EngineFailure
from kino_engine.quant import (
    MODES,
    QuantLinear,
    is_quantized,
    load_quantized_transformer,
    quantize_checkpoint,
    quantize_module,
    read_manifest,
    save_quantized,
    stream_quantize,
)
from kino_engine.quant import store
from kino_engine.quant.store import MANIFEST_NAME, sha256_file
from kino_engine.tiny import save_checkpoint, tiny_components
from quant_helpers import assert_same_state, bits, forward, save_sharded, tiny_inputs


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded(tmp_path_factory.mktemp("quant-store") / "transformer", torch.bfloat16, "300KB")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kino's tiny Wan 2.1 pipeline (diffusers layout), as make-tiny writes it."""
    folder = tmp_path_factory.mktemp("quant-pipeline") / "wan-tiny"
    save_checkpoint(tiny_components(3), str(folder))
    return folder


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip_is_bit_identical(source: Path, tmp_path: Path, mode: str) -> None:
    expected, _ = stream_quantize(str(source), mode, "cpu")
    out = tmp_path / "quantized"
    manifest = quantize_checkpoint(str(source), str(out), mode, max_shard_bytes=200_000)
    assert len(manifest.files) >= 2, "the written checkpoint should be sharded at this shard size"
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()

    # The stored tensors are exactly the quantized model's.
    state = expected.state_dict()
    stored: dict[str, torch.Tensor] = {}
    for record in manifest.files:
        with safe_open(str(out / record.name), framework="pt") as f:
            stored.update({name: f.get_tensor(name) for name in f.keys()})
    assert stored.keys() == state.keys()
    for name, tensor in stored.items():
        assert tensor.dtype == state[name].dtype and torch.equal(bits(tensor), bits(state[name])), f"{name} differs on disk"

    loaded = load_quantized_transformer(str(out), "cpu", verify=True)
    assert_same_state(loaded, expected, f"load_quantized_transformer({mode})")
    assert torch.equal(forward(loaded, tiny_inputs()), forward(expected, tiny_inputs())), "outputs must be identical"
    assert sum(isinstance(m, QuantLinear) and m.mode == mode for m in loaded.modules()) == len(manifest.modules)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_a_model_quantized_in_memory_saves_and_loads_back(source: Path, tmp_path: Path) -> None:
    model = WanTransformer3DModel.from_pretrained(str(source), dtype=torch.bfloat16).eval()
    quantize_module(model, "int8-dynamic")
    manifest = save_quantized(model, str(tmp_path / "saved"), max_shard_bytes=300_000)
    assert manifest.mode == "int8-dynamic" and manifest.dtype == "bfloat16" and len(manifest.files) >= 2
    loaded = load_quantized_transformer(str(tmp_path / "saved"), "cpu", verify=True)
    assert_same_state(loaded, model, "save_quantized -> load_quantized_transformer")
    assert torch.equal(forward(loaded, tiny_inputs()), forward(model, tiny_inputs()))
    with pytest.raises(ValueError, match="exactly one mode"):
        save_quantized(WanTransformer3DModel.from_pretrained(str(source)), str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists()


def test_manifest_records_what_a_loader_and_an_auditor_need(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    quantize_checkpoint(str(source), str(out), "fp8")
    data = json.loads((out / MANIFEST_NAME).read_text())
    assert data["format"] == "kino-quant" and data["version"] == 1 and data["mode"] == "fp8"
    assert data["dtype"] == "bfloat16" and data["policy"]["architecture"] == "WanTransformer3DModel"
    assert len(data["modules"]) == 20 and set(data["modules"].values()) == {"fp8"}
    assert data["tensors"]["blocks.0.attn1.to_q.qweight"]["dtype"] == "F8_E4M3"
    assert data["tensors"]["blocks.0.attn1.to_q.scale"]["dtype"] == "F32"
    assert data["tensors"]["blocks.0.attn1.to_q.bias"]["dtype"] == "BF16"
    assert data["tensors"]["proj_out.weight"]["dtype"] == "BF16", "proj_out stays in the model dtype"
    assert data["tensors"]["blocks.0.scale_shift_table"]["dtype"] == "F32", "fp32-kept modules stay float32"
    assert len(data["files"]) == 1 and data["files"][0]["name"] == "diffusion_pytorch_model.safetensors"
    assert data["files"][0]["sha256"] == sha256_file(str(out / data["files"][0]["name"]))
    sources = {f["name"]: f for f in data["source"]["files"]}
    assert sources.keys() == {p.name for p in source.glob("*.safetensors")}
    for name, record in sources.items():
        assert record["bytes"] == (source / name).stat().st_size and record["sha256"] == sha256_file(str(source / name))
    assert data["source"]["config_sha256"] == sha256_file(str(source / "config.json"))
    assert read_manifest(str(out)).modules == data["modules"]


def test_a_quantized_pipeline_is_a_checkpoint_kino_recognizes(pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "wan-tiny-int8"
    quantize_checkpoint(str(pipeline), str(out), "int8")
    checkpoint = inspect_checkpoint(str(out))  # the engine's own validation of a diffusers folder
    assert checkpoint.transformer.folder == str(out / "transformer")
    assert is_quantized(str(out)) and is_quantized(str(out / "transformer")) and not is_quantized(str(pipeline))
    for component in ("vae", "text_encoder"):
        for original in (pipeline / component).glob("*.safetensors"):
            copy = out / component / original.name
            assert copy.read_bytes() == original.read_bytes(), f"{component} must be carried over unchanged"
    assert (out / "model_index.json").read_bytes() == (pipeline / "model_index.json").read_bytes()
    model = load_quantized_transformer(str(out), "cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 20


def test_writes_are_all_or_nothing(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = store.save_file

    def fail_on_second_shard(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(store, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        quantize_checkpoint(str(source), str(tmp_path / "q"), "fp8", max_shard_bytes=200_000)
    assert os.listdir(tmp_path) == [], "a failed write must leave nothing behind (no folder, no staging)"
    monkeypatch.undo()
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="does not overwrite"):
        quantize_checkpoint(str(source), str(tmp_path / "taken"), "fp8")


def _quantized(source: Path, folder: Path) -> Path:
    quantize_checkpoint(str(source), str(folder), "fp8", max_shard_bytes=200_000, hash_source=False)
    return folder


def _expect_bad(folder: Path, match: str, verify: bool = False) -> None:
    with pytest.raises(EngineFailure, match=match) as failure:
        load_quantized_transformer(str(folder), "cpu", verify=verify)
    assert failure.value.code == "BAD_CHECKPOINT"


def test_damaged_folders_are_refused(source: Path, tmp_path: Path) -> None:
    folder = _quantized(source, tmp_path / "flipped")
    shard = sorted(folder.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # same size, valid header, one weight byte flipped
    shard.write_bytes(bytes(raw))
    load_quantized_transformer(str(folder), "cpu")  # sizes and headers are fine: only the hash can tell
    _expect_bad(folder, "does not match the sha256", verify=True)

    folder = _quantized(source, tmp_path / "version")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**manifest, "version": 99}))
    _expect_bad(folder, "format version 99")

    folder = _quantized(source, tmp_path / "mismatch")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["tensors"]["proj_out.weight"]["dtype"] = "F32"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    _expect_bad(folder, "does not match")

    folder = _quantized(source, tmp_path / "garbled")
    (folder / MANIFEST_NAME).write_text("{not json")
    _expect_bad(folder, "not valid JSON")
    with pytest.raises(EngineFailure, match="missing: not a kino-quantized"):
        read_manifest(str(source))


def test_the_tools_write_random_quantize_and_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command lines the GPU measurement uses: write-random -> quantize -> measure-load."""
    from kino_engine.quant.__main__ import main
    from quant_helpers import QUANT_TINY

    def run(*argv: str) -> dict:
        status = main(list(argv))
        answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert status == 0 and answer["ok"], answer
        return answer["result"]

    config = json.dumps({"_class_name": "WanTransformer3DModel", **QUANT_TINY})
    written = run("write-random", str(tmp_path / "src"), "--config", config, "--shard-gib", "0.0003")
    assert len(written["files"]) >= 2
    quantized = run("quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--mode", "fp8-weight", "--shard-gib", "0.0002")
    assert quantized["modules"] == 20 and len(quantized["files"]) >= 2
    loaded = run("measure-load", str(tmp_path / "q"))
    assert loaded["how"] == "load_quantized_transformer" and loaded["checkpointBytes"] == quantized["bytes"]
    status = main(["quantize", str(tmp_path / "src"), str(tmp_path / "q"), "--mode", "fp8"])
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 1 and answer["error"]["code"] == "OUTPUT_UNWRITABLE" and "does not overwrite" in answer["error"]["message"]
