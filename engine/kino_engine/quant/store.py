"""kino's pre-quantized checkpoint format: write it, recognize it, load it.

A quantized transformer is a diffusers-like component folder:

  transformer/
    config.json                                     the model's diffusers config, unchanged
    diffusion_pytorch_model.safetensors             or -0000i-of-0000n shards + .safetensors.index.json
    kino_quant.json                                 the manifest (MANIFEST_NAME)

The safetensors files hold, per quantized linear `L`: `L.qweight` (F8_E4M3 or I8, (out, in)),
`L.scale` (F32, (out,)) and `L.bias` (model dtype); every other tensor as the model holds it (bf16,
or F32 where the class keeps modules in float32). The layout and file names are diffusers', so
`checkpoint.inspect_checkpoint` validates a quantized pipeline folder like any other; the manifest is
what tells a loader to build QuantLinears (`is_quantized`). It records: format and version, mode,
model dtype, the policy, the quantized modules and their modes, every tensor's dtype/shape/file, the
written files' sizes and sha256, and the source checkpoint's files (sizes, sha256) and config hash.

Writes are all-or-nothing: everything goes to a hidden staging folder next to the destination,
renamed into place at the end; a failure removes it. `quantize_checkpoint` (the `quantize` tool)
writes a whole pipeline folder: the other components are hard-linked (copied across filesystems).

`load_quantized_transformer(folder, device)` builds the skeleton on meta, swaps in the manifest's
QuantLinears, and loads every tensor with `safe_open` straight onto the device into its slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__ as ENGINE_VERSION
from .formats import check_mode
from .linear import QuantLinear
from .policy import QuantPolicy, policy_for
from .skeleton import assign, empty_model, finish, model_class, swap_in_quantized
from .stream import (
    TRANSFORMER,
    WEIGHTS_STEM,
    OnProgress,
    Progress,
    bad_checkpoint,
    inspect_transformer,
    stream_quantize,
    transformer_folder,
)

MANIFEST_NAME = "kino_quant.json"
FORMAT = "kino-quant"
FORMAT_VERSION = 1
#: Default shard size of written checkpoints (diffusers writes 10 GB; smaller shards bound the loader's
#: host memory, which includes one open shard).
DEFAULT_SHARD_BYTES = 2 * 2**30

_DTYPE_NAMES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int8: "I8",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
    torch.uint8: "U8",
}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FileRecord:
    """A file by name (relative to its folder), size and sha256 (None when not hashed)."""

    name: str
    bytes: int
    sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class QuantManifest:
    mode: str
    #: The dtype of the unquantized tensors ("bfloat16", ...), as torch names it without "torch.".
    dtype: str
    policy: QuantPolicy
    #: Quantized linear name -> its mode.
    modules: dict[str, str]
    #: Tensor name -> {"dtype": safetensors dtype, "shape": [...], "file": name}.
    tensors: dict[str, dict[str, Any]]
    files: tuple[FileRecord, ...]
    #: {"folder", "files": [FileRecord...], "config_sha256"} of the checkpoint it was made from.
    source: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "mode": self.mode,
            "dtype": self.dtype,
            "policy": self.policy.to_json(),
            "modules": self.modules,
            "files": [f.to_json() for f in self.files],
            "tensors": self.tensors,
            "source": self.source,
            "writer": {"kino_engine": ENGINE_VERSION, "torch": torch.__version__},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> QuantManifest:
        if data.get("format") != FORMAT:
            raise bad_checkpoint(f"{where} is not a kino quantization manifest (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise bad_checkpoint(
                f"{where} has format version {data.get('version')!r}; this kino reads version {FORMAT_VERSION} "
                "(re-run the quantize tool with this kino)"
            )
        try:
            modules = {str(k): check_mode(str(v)) for k, v in dict(data["modules"]).items()}
            files = tuple(FileRecord(str(f["name"]), int(f["bytes"]), f.get("sha256")) for f in data["files"])
            return cls(
                mode=check_mode(str(data["mode"])),
                dtype=str(data["dtype"]),
                policy=QuantPolicy.from_json(data["policy"]),
                modules=modules,
                tensors={str(k): dict(v) for k, v in dict(data["tensors"]).items()},
                files=files,
                source=dict(data.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad_checkpoint(f"{where} is malformed ({type(exc).__name__}: {exc}); re-run the quantize tool") from None


def is_quantized(path: str) -> bool:
    """Whether `path` (pipeline root or transformer folder) holds a kino-quantized transformer."""
    return os.path.isfile(os.path.join(transformer_folder(path), MANIFEST_NAME))


def read_manifest(path: str) -> QuantManifest:
    where = os.path.join(transformer_folder(path), MANIFEST_NAME)
    try:
        with open(where, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise bad_checkpoint(f"{where} is missing: not a kino-quantized checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_checkpoint(f"{where} is not valid JSON ({exc}); re-run the quantize tool") from None
    if not isinstance(data, dict):
        raise bad_checkpoint(f"{where} is not a JSON object; re-run the quantize tool")
    return QuantManifest.from_json(data, where)


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(paths: list[str] | tuple[str, ...], hashed: bool) -> list[FileRecord]:
    return [
        FileRecord(os.path.basename(p), os.path.getsize(p), sha256_file(p) if hashed else None) for p in paths
    ]


@contextlib.contextmanager
def staged_folder(folder: str) -> Iterator[str]:
    """A hidden sibling folder to write into, renamed to `folder` (which must not exist) on success."""
    folder = os.path.abspath(folder)
    if os.path.lexists(folder):
        raise FileExistsError(f"{folder} already exists; kino does not overwrite checkpoints (remove it first)")
    parent, name = os.path.split(folder)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    try:
        yield staging
        os.chmod(staging, 0o755)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [f"{WEIGHTS_STEM}.safetensors"]
    return [f"{WEIGHTS_STEM}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_quantized(
    model: torch.nn.Module,
    staging: str,
    *,
    mode: str,
    dtype: torch.dtype,
    policy: QuantPolicy,
    source: Mapping[str, Any],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> QuantManifest:
    """Write a quantized model's config, weights (sharded) and manifest into the folder `staging`."""
    modules = {name: m.mode for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        raise ValueError("the model has no QuantLinear: quantize it first (quantize_module or stream_quantize)")
    model.save_config(staging)  # type: ignore[attr-defined]  # diffusers' config.json
    state = model.state_dict()
    groups = _shards(state, max_shard_bytes)
    names = _shard_names(len(groups))
    tensors: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, groups):
        # One shard at a time on the host (the model may live on a GPU).
        shard = {name: state[name].detach().to("cpu").contiguous() for name in group}
        save_file(shard, os.path.join(staging, file_name), metadata={"format": "pt"})
        for name, tensor in shard.items():
            tensors[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "file": file_name}
            weight_map[name] = file_name
        del shard
    if len(names) > 1:
        total = sum(os.path.getsize(os.path.join(staging, n)) for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(os.path.join(staging, f"{WEIGHTS_STEM}.safetensors.index.json"), index)
    manifest = QuantManifest(
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        policy=policy,
        modules=modules,
        tensors=tensors,
        files=tuple(file_records([os.path.join(staging, n) for n in names], hashed=True)),
        source=dict(source),
    )
    _write_json(os.path.join(staging, MANIFEST_NAME), manifest.to_json())
    return manifest


def save_quantized(
    model: torch.nn.Module,
    folder: str,
    *,
    policy: QuantPolicy | None = None,
    source: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> QuantManifest:
    """Write a model quantized in memory (quantize_module or stream_quantize) as a transformer folder
    at `folder` (which must not exist), all-or-nothing. The mode is its QuantLinears' (one mode only)."""
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    if len(modes) != 1:
        raise ValueError(f"the model must hold QuantLinears of exactly one mode, found {sorted(modes) or 'none'}")
    with staged_folder(folder) as staging:
        return write_quantized(
            model,
            staging,
            mode=modes.pop(),
            dtype=model.dtype,  # type: ignore[arg-type]  # diffusers' ModelMixin.dtype
            policy=policy or policy_for(model),
            source=source or {},
            max_shard_bytes=max_shard_bytes,
        )


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links refused
        shutil.copy2(src, dst)
    return dst


def quantize_checkpoint(
    src: str,
    dst: str,
    mode: str,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.bfloat16,
    policy: QuantPolicy | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    hash_source: bool = True,
    on_progress: OnProgress | None = None,
) -> QuantManifest:
    """The `quantize` tool: `src` (a pipeline root, or a transformer folder) -> `dst`, all-or-nothing.

    A pipeline root gives a pipeline root (other components linked or copied, transformer quantized);
    a transformer folder gives a transformer folder. The transformer is streamed (stream_quantize):
    on `device`, never whole in host memory unquantized.
    """
    component = inspect_transformer(src)
    try:
        policy = policy or policy_for(model_class(component.config))
    except ValueError as exc:
        raise bad_checkpoint(f"{component.folder}/config.json: {exc}") from None
    is_root = os.path.abspath(transformer_folder(src)) != os.path.abspath(src)
    source = {
        "folder": os.path.abspath(src),
        "files": [r.to_json() for r in file_records(component.weight_files, hashed=hash_source)],
        "config_sha256": sha256_file(os.path.join(component.folder, "config.json")),
    }
    streamed = stream_quantize(src, mode, device, dtype=dtype, policy=policy, on_progress=on_progress)
    with staged_folder(dst) as staging:
        out = staging
        if is_root:
            for entry in sorted(os.listdir(src)):
                if entry == TRANSFORMER:
                    continue
                path = os.path.join(src, entry)
                if os.path.isdir(path):
                    shutil.copytree(path, os.path.join(staging, entry), copy_function=_link_or_copy)
                else:
                    _link_or_copy(path, os.path.join(staging, entry))
            out = os.path.join(staging, TRANSFORMER)
            os.mkdir(out)
        manifest = write_quantized(
            streamed.model,
            out,
            mode=mode,
            dtype=dtype,
            policy=policy,
            source=source,
            max_shard_bytes=max_shard_bytes,
        )
    return manifest


def load_quantized_transformer(
    folder: str, device: torch.device | str, *, verify: bool = False, on_progress: OnProgress | None = None
) -> torch.nn.Module:
    """The quantized transformer at `folder` (pipeline root or transformer folder) on `device`, eval mode.

    Every tensor is checked against the manifest (dtype, shape, file); `verify` also checks the files'
    sha256 (reads them once more). Raises EngineFailure(BAD_CHECKPOINT) naming what is wrong.
    """
    device = torch.device(device)
    component = inspect_transformer(folder)
    manifest = read_manifest(folder)
    where = os.path.join(component.folder, MANIFEST_NAME)
    present = {os.path.basename(p): p for p in component.weight_files}
    for record in manifest.files:
        path = present.get(record.name)
        if path is None or os.path.getsize(path) != record.bytes:
            raise bad_checkpoint(f"{where} lists {record.name} ({record.bytes} bytes), which is missing or has another size")
        if verify and record.sha256 != sha256_file(path):
            raise bad_checkpoint(f"{path} does not match the sha256 in {where}: the file is corrupt; re-run the quantize tool")
    model = empty_model(component.config)
    try:
        swap_in_quantized(model, manifest.modules, _TORCH_DTYPES.get(manifest.dtype, torch.bfloat16))
    except (AttributeError, ValueError) as exc:
        raise bad_checkpoint(f"{where} does not fit {component.folder}/config.json: {exc}") from None
    progress = Progress(component.weight_bytes, on_progress)
    seen: set[str] = set()
    for record in manifest.files:
        path = present[record.name]
        with safe_open(path, framework="pt", device=str(device)) as shard:
            for name in shard.keys():
                tensor = shard.get_tensor(name)
                expected = manifest.tensors.get(name)
                if expected is None or expected["dtype"] != _DTYPE_NAMES.get(tensor.dtype) or expected["shape"] != list(tensor.shape):
                    raise bad_checkpoint(f"{path}: tensor {name!r} does not match {where}: {expected}")
                try:
                    assign(model, name, tensor)
                except (KeyError, ValueError) as exc:
                    raise bad_checkpoint(f"{path}: tensor {name!r}: {exc}") from None
                seen.add(name)
                progress.tensor(tensor)
        progress.file(path)
    if seen != set(manifest.tensors):
        raise bad_checkpoint(f"{where} lists {len(set(manifest.tensors) - seen)} tensor(s) no file holds")
    try:
        return finish(model, device)
    except ValueError as exc:
        raise bad_checkpoint(f"{component.folder}: {exc}") from None
