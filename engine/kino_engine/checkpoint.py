"""Validates a diffusers-format Wan 2.1 T2V checkpoint folder before anything is loaded.

`inspect_checkpoint(path)` checks the layout diffusers writes (model_index.json; transformer/, vae/,
text_encoder/ with a config and safetensors weights, single-file or sharded with an index;
tokenizer/; scheduler/scheduler_config.json) and the structure of every weight file it will load
(see safetensors_check), and returns where everything is. Any problem raises
EngineFailure("BAD_CHECKPOINT") naming the exact file and what to do about it.

It knows nothing about torch or model classes: it reads JSON and safetensors headers only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .protocol import EngineFailure
from .safetensors_check import CorruptSafetensors, check_safetensors

PIPELINE_CLASS = "WanPipeline"
FIELD = "model.source.path"
REDOWNLOAD = "re-download the checkpoint (or this file)"


@dataclass(frozen=True)
class WeightedComponent:
    """A component folder with a config and safetensors weights."""

    name: str
    folder: str
    config: Mapping[str, Any]
    weight_files: tuple[str, ...]
    weight_bytes: int


@dataclass(frozen=True)
class WanCheckpoint:
    """Where each part of a validated checkpoint lives."""

    root: str
    transformer: WeightedComponent
    vae: WeightedComponent
    text_encoder: WeightedComponent
    tokenizer_folder: str
    scheduler_class_name: str
    scheduler_config: Mapping[str, Any]

    @property
    def weight_bytes(self) -> int:
        return self.transformer.weight_bytes + self.vae.weight_bytes + self.text_encoder.weight_bytes


def _fail(message: str) -> EngineFailure:
    return EngineFailure("BAD_CHECKPOINT", message, phase="load", field=FIELD)


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise _fail(f"{path} is missing: the checkpoint is incomplete; {REDOWNLOAD}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{path} is not valid JSON ({exc}); {REDOWNLOAD}") from None


def _read_json_object(path: str) -> dict[str, Any]:
    value = _read_json(path)
    if not isinstance(value, dict):
        raise _fail(f"{path} is not a JSON object; {REDOWNLOAD}")
    return value


def _component_folder(root: str, name: str) -> str:
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise _fail(f"{folder}{os.sep} is missing: the checkpoint has no {name}; {REDOWNLOAD}")
    return folder


def _check_weight_file(path: str) -> int:
    try:
        check_safetensors(path)
    except CorruptSafetensors as exc:
        raise _fail(f"{path} {exc}; {REDOWNLOAD}") from None
    return os.path.getsize(path)


def _weights(folder: str, stem: str) -> tuple[tuple[str, ...], int]:
    """The safetensors files of a component (single file or index + shards), each checked."""
    single = os.path.join(folder, f"{stem}.safetensors")
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.isfile(single):
        return (single,), _check_weight_file(single)
    if not os.path.isfile(index):
        raise _fail(
            f"{folder}{os.sep} has no weights: expected {stem}.safetensors or {stem}.safetensors.index.json "
            f"(kino loads safetensors only); {REDOWNLOAD}"
        )
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _fail(f"{index} has no weight_map; {REDOWNLOAD}")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or os.sep in shard or shard in ("", ".", ".."):
            raise _fail(f"{index} maps {tensor!r} to an invalid shard name {shard!r}; {REDOWNLOAD}")
        shards.setdefault(shard, []).append(tensor)
    files, total = [], 0
    for shard, tensors in sorted(shards.items()):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise _fail(f"{path} is missing (named as a shard by {index}); {REDOWNLOAD}")
        try:
            entries = check_safetensors(path)
        except CorruptSafetensors as exc:
            raise _fail(f"{path} {exc}; {REDOWNLOAD}") from None
        absent = [t for t in tensors if t not in entries]
        if absent:
            raise _fail(
                f"{path} lacks {len(absent)} tensor(s) that {index} places in it (e.g. {absent[0]!r}): "
                f"the shard and the index come from different downloads; {REDOWNLOAD}"
            )
        files.append(path)
        total += os.path.getsize(path)
    return tuple(files), total


def _weighted(root: str, name: str, stem: str) -> WeightedComponent:
    folder = _component_folder(root, name)
    config = _read_json_object(os.path.join(folder, "config.json"))
    files, size = _weights(folder, stem)
    return WeightedComponent(name=name, folder=folder, config=config, weight_files=files, weight_bytes=size)


def inspect_checkpoint(path: str) -> WanCheckpoint:
    """Validate a diffusers Wan 2.1 T2V folder; raise EngineFailure(BAD_CHECKPOINT) naming the file."""
    root = os.path.abspath(path)
    if not os.path.isdir(root):
        raise _fail(f"checkpoint folder {root} does not exist (check the model path, or pull the model first)")
    index_path = os.path.join(root, "model_index.json")
    if not os.path.isfile(index_path):
        raise _fail(
            f"{root} is not a diffusers checkpoint folder: {index_path} is missing "
            "(point kino at the folder that holds model_index.json, e.g. a download of "
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers; original non-diffusers Wan releases are not supported)"
        )
    model_index = _read_json_object(index_path)
    pipeline_class = model_index.get("_class_name")
    if pipeline_class != PIPELINE_CLASS:
        raise _fail(
            f"{index_path} describes a {pipeline_class!r} pipeline; kino runs Wan 2.1 text-to-video "
            f"checkpoints ({PIPELINE_CLASS}) only"
        )
    if model_index.get("transformer_2") not in (None, [None, None]) or model_index.get("expand_timesteps"):
        raise _fail(f"{index_path} is a Wan 2.2 checkpoint (two transformers or expanded timesteps); kino runs Wan 2.1 only for now")

    transformer = _weighted(root, "transformer", "diffusion_pytorch_model")
    vae = _weighted(root, "vae", "diffusion_pytorch_model")
    text_encoder = _weighted(root, "text_encoder", "model")

    tokenizer_folder = _component_folder(root, "tokenizer")
    _read_json_object(os.path.join(tokenizer_folder, "tokenizer_config.json"))
    if not any(os.path.isfile(os.path.join(tokenizer_folder, f)) for f in ("tokenizer.json", "spiece.model")):
        raise _fail(f"{tokenizer_folder}{os.sep} has neither tokenizer.json nor spiece.model; {REDOWNLOAD}")

    scheduler_path = os.path.join(_component_folder(root, "scheduler"), "scheduler_config.json")
    scheduler_config = _read_json_object(scheduler_path)
    scheduler_class = scheduler_config.get("_class_name")
    if not isinstance(scheduler_class, str) or not scheduler_class:
        raise _fail(f"{scheduler_path} has no _class_name naming the scheduler; {REDOWNLOAD}")

    return WanCheckpoint(
        root=root,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer_folder=tokenizer_folder,
        scheduler_class_name=scheduler_class,
        scheduler_config=scheduler_config,
    )
