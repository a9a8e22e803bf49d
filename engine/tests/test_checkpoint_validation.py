"""Broken checkpoints fail with BAD_CHECKPOINT naming the exact file, before any weight is loaded."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest

from kino_engine.checkpoint import inspect_checkpoint
from kino_engine.engine import Engine
from kino_engine.protocol import CheckpointSource, EngineFailure, ModelSpec
from kino_engine.safetensors_check import CorruptSafetensors, check_safetensors

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    def copy(source: Path) -> Path:
        target = tmp_path / source.name
        shutil.copytree(source, target)
        return target

    return copy


def _failure(folder: Path) -> EngineFailure:
    with pytest.raises(EngineFailure) as caught:
        inspect_checkpoint(str(folder))
    failure = caught.value
    assert failure.code == "BAD_CHECKPOINT" and failure.phase == "load" and failure.field == "model.source.path"
    return failure


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def test_the_intact_checkpoints_pass(tiny_checkpoint: Path, variant_checkpoint: Path) -> None:
    tiny = inspect_checkpoint(str(tiny_checkpoint))
    assert tiny.scheduler_class_name == "UniPCMultistepScheduler"
    variant = inspect_checkpoint(str(variant_checkpoint))
    assert len(variant.transformer.weight_files) > 1, "the sharded variant must be read through its index"
    assert variant.weight_bytes == sum(p.stat().st_size for p in variant_checkpoint.rglob("*.safetensors"))


def test_missing_model_index(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    folder = copy_of(tiny_checkpoint)
    (folder / "model_index.json").unlink()
    message = _failure(folder).message
    assert "not a diffusers checkpoint folder" in message and str(folder / "model_index.json") in message, message


def test_missing_folder_and_missing_component(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    assert "does not exist" in _failure(tiny_checkpoint.parent / "nowhere").message
    folder = copy_of(tiny_checkpoint)
    shutil.rmtree(folder / "vae")
    assert str(folder / "vae") in _failure(folder).message, "a missing component folder must be named"


@pytest.mark.parametrize(
    "relative", ["transformer/config.json", "scheduler/scheduler_config.json", "text_encoder/model.safetensors",
                 "tokenizer/tokenizer_config.json"]
)
def test_missing_file(copy_of: Callable[[Path], Path], tiny_checkpoint: Path, relative: str) -> None:
    folder = copy_of(tiny_checkpoint)
    (folder / relative).unlink()
    message = _failure(folder).message
    assert str(folder / relative.split("/")[0]) in message, f"the missing file's folder must be named: {message}"


def test_corrupt_config_json(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    folder = copy_of(tiny_checkpoint)
    (folder / "vae" / "config.json").write_text('{"base_dim": 3,')
    message = _failure(folder).message
    assert str(folder / "vae" / "config.json") in message and "not valid JSON" in message, message


def test_truncated_weights(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    folder = copy_of(tiny_checkpoint)
    weights = folder / TRANSFORMER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    message = _failure(folder).message
    assert str(weights) in message and "truncated" in message, f"a truncated file must be named as such: {message}"
    weights.write_bytes(data[:5])
    assert "truncated" in _failure(folder).message, "a file shorter than the 8-byte length prefix is truncated"
    weights.write_bytes(data[:100])
    assert "truncated" in _failure(folder).message, "a file cut inside its header is truncated"


def test_garbled_header(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    folder = copy_of(tiny_checkpoint)
    weights = folder / TRANSFORMER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe!!"
    weights.write_bytes(bytes(data))
    message = _failure(folder).message
    assert str(weights) in message and "garbled header" in message, message


def test_header_with_wrong_offsets(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    folder = copy_of(tiny_checkpoint)
    weights = folder / TRANSFORMER_WEIGHTS
    length, header = _header(weights)
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]  # one float short of its dtype x shape
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)  # same length: the file stays aligned
    assert len(raw) == length
    weights.write_bytes(weights.read_bytes()[:8] + raw + weights.read_bytes()[8 + length :])
    message = _failure(folder).message
    assert str(weights) in message and name in message, f"the tensor with bad offsets must be named: {message}"


def test_trailing_bytes_are_corruption(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes((tiny_checkpoint / TRANSFORMER_WEIGHTS).read_bytes() + b"\0" * 16)
    with pytest.raises(CorruptSafetensors, match="16 bytes after the last tensor"):
        check_safetensors(str(path))


def test_sharded_index_pointing_at_a_missing_shard(copy_of: Callable[[Path], Path], variant_checkpoint: Path) -> None:
    folder = copy_of(variant_checkpoint)
    index = json.loads(next(folder.glob("transformer/*.index.json")).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / "transformer" / shard).unlink()
    message = _failure(folder).message
    assert str(folder / "transformer" / shard) in message and "index" in message, message


def test_shard_from_another_download(copy_of: Callable[[Path], Path], variant_checkpoint: Path) -> None:
    folder = copy_of(variant_checkpoint)
    shards = sorted(set(json.loads(next(folder.glob("transformer/*.index.json")).read_text())["weight_map"].values()))
    first, second = folder / "transformer" / shards[0], folder / "transformer" / shards[1]
    first.write_bytes(second.read_bytes())  # a sound file, but not the tensors the index puts there
    message = _failure(folder).message
    assert str(first) in message and "different downloads" in message, message


def test_other_pipelines_are_refused(copy_of: Callable[[Path], Path], tiny_checkpoint: Path) -> None:
    folder = copy_of(tiny_checkpoint)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "WanImageToVideoPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    assert "WanImageToVideoPipeline" in _failure(folder).message


def test_engine_validates_before_loading_anything(
    copy_of: Callable[[Path], Path], tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = copy_of(tiny_checkpoint)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"  # the last component loaded
    weights.write_bytes(weights.read_bytes()[:-10])
    events: list[dict] = []
    with pytest.raises(EngineFailure) as caught:
        Engine().load(ModelSpec("t", CheckpointSource(str(folder)), "cpu", "float32"), events.append)
    assert caught.value.code == "BAD_CHECKPOINT" and str(weights) in caught.value.message
    assert not [e for e in events if e["kind"] == "load"], (
        "components were loaded before the corrupt VAE file was found: validation must come first"
    )
