"""The components of a Wan 2.1 T2V model, from a checkpoint folder or built with random weights.

Both paths give a `WanComponents`: the diffusers/transformers model objects (kino uses their classes
and formats, never copies of them), the tokenizer, and the scheduler's class and config (the loop
makes a fresh scheduler per job). Precision policy: transformer and text encoder in the requested
dtype, the VAE in float32 (as diffusers' Wan examples run it), fp32-only modules as the classes
declare. `on_progress(component, loaded_bytes, total_bytes)` is called after each component.

A transformer whose blocks the memory plan streams from disk (`blocks_on_disk`) loads without them:
its other tensors are read from the shards, its blocks stay unloaded (meta, in their load dtypes) and
`WanComponents.transformer_weights` says where they are, for the placement (runtime/disk.py) to read
them block by block. Host memory never holds the whole transformer.

Failures: BAD_CHECKPOINT (via checkpoint.inspect_checkpoint, before anything loads; or a component
that fails to load), BAD_REQUEST naming the architecture field whose config does not build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ..checkpoint import WanCheckpoint, WeightedComponent
from ..protocol import EngineFailure, WanArchitecture
from ..random_weights import build_random, fp32_module_names, load_dtype, size_on_meta
from ..runtime.memory import module_bytes
from ..runtime.placement import BLOCKS_ATTR
from ..runtime.weight_files import WeightIndex
from ..synthetic_tokenizer import synthetic_t5_tokenizer

VAE_DTYPE = torch.float32
TEXT_ENCODER_MAX_LENGTH = 512

OnProgress = Callable[[str, int, int], None]
T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class WanComponents:
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    scheduler_class: type[SchedulerMixin]
    scheduler_config: Mapping[str, Any]
    #: The transformer's weight files, where its blocks were left on disk (else None: all in memory).
    transformer_weights: WeightIndex | None = None


def resolve_scheduler_class(name: str) -> type[SchedulerMixin] | None:
    """The diffusers scheduler class called `name`, or None if there is none."""
    candidate = getattr(diffusers, name, None)
    if isinstance(candidate, type) and issubclass(candidate, SchedulerMixin):
        return candidate
    return None


def json_numbers_as_config(config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with integers turned into floats where the config class defaults to a float.

    A config that crossed JSON from JavaScript has lost the difference between 1.0 and 1, and
    transformers' config classes validate field types strictly.
    """
    defaults = config_class()
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(getattr(defaults, key, None), float):
            out[key] = float(value)
    return out


def _ready(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def load_checkpoint_components(
    checkpoint: WanCheckpoint,
    device: torch.device,
    dtype: torch.dtype,
    on_progress: OnProgress,
    targets: Mapping[str, torch.device] | None = None,
    blocks_on_disk: bool = False,
    weights: str = "exact",
) -> WanComponents:
    """Load a validated checkpoint (see checkpoint.inspect_checkpoint) onto `device`, or, for the
    components named in `targets` (text_encoder / transformer / vae), onto the device given there
    (the host, for a component the memory plan keeps off the device). With `blocks_on_disk` the
    transformer's blocks stay in its files (the module docstring); `weights` is the runtime's
    precision, which such a transformer must keep exact."""
    where = {name: (targets or {}).get(name, device) for name in ("text_encoder", "transformer", "vae")}
    scheduler_class = resolve_scheduler_class(checkpoint.scheduler_class_name)
    if scheduler_class is None:
        raise EngineFailure(
            "BAD_CHECKPOINT",
            f"{checkpoint.root}/scheduler/scheduler_config.json names {checkpoint.scheduler_class_name!r}, "
            f"which is not a scheduler of diffusers {diffusers.__version__}",
            phase="load",
            field="model.source.path",
        )
    total = checkpoint.weight_bytes
    done = 0

    def loaded(name: str, size: int) -> None:
        nonlocal done
        done += size
        on_progress(name, done, total)

    text_encoder = _ready(
        pretrained(UMT5EncoderModel, checkpoint.text_encoder.folder, dtype, where["text_encoder"])
    )
    loaded("text_encoder", checkpoint.text_encoder.weight_bytes)
    transformer_weights = None
    if blocks_on_disk:
        _check_disk_streamable(checkpoint, weights)
        transformer, transformer_weights = _transformer_without_blocks(checkpoint.transformer, dtype, where["transformer"])
    else:
        transformer = _ready(_load_transformer(checkpoint, dtype, where["transformer"]))
    loaded("transformer", checkpoint.transformer.weight_bytes)
    vae = _ready(pretrained(AutoencoderKLWan, checkpoint.vae.folder, VAE_DTYPE, where["vae"]))
    loaded("vae", checkpoint.vae.weight_bytes)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.tokenizer_folder)
    loaded("tokenizer", 0)
    return WanComponents(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_class=scheduler_class,
        scheduler_config=dict(checkpoint.scheduler_config),
        transformer_weights=transformer_weights,
    )


def _check_disk_streamable(checkpoint: WanCheckpoint, weights: str) -> None:
    """Blocks streamed from the checkpoint's files are its exact tensors: refuse a precision change."""
    from ..quant import is_quantized

    field = "model.memory.transformer.source"
    if is_quantized(str(checkpoint.transformer.folder)):
        raise EngineFailure(
            "BAD_REQUEST",
            f"{checkpoint.transformer.folder} is a pre-quantized transformer, which kino cannot stream from disk yet; "
            "stream it from RAM, or stream the exact checkpoint",
            phase="load",
            field=field,
        )
    if weights != "exact":
        raise EngineFailure(
            "BAD_REQUEST",
            f"a transformer streamed from disk reads the checkpoint's exact tensors and cannot be quantized at load "
            f"(runtime weights {weights!r}); use weights \"exact\", or stream from RAM",
            phase="load",
            field=field,
        )


def _transformer_without_blocks(
    component: WeightedComponent, dtype: torch.dtype, target: torch.device
) -> tuple[torch.nn.Module, WeightIndex]:
    """The transformer with every tensor but its blocks' loaded onto `target` (cast as from_pretrained
    casts), the blocks unloaded (meta, in their load dtypes), and the index of its files. The shards
    are memory-mapped by safe_open and only the loaded tensors' pages are read."""
    from safetensors import safe_open

    from ..quant.skeleton import assign, empty_model, missing
    from ..quant.stream import bad_checkpoint

    model = empty_model(dict(component.config))  # parameters on meta, constructed buffers real
    fp32 = fp32_module_names(model, dtype)
    prefix = f"{BLOCKS_ATTR}."
    for name, t in list(model.named_parameters()):
        if name.startswith(prefix):
            assign(model, name, torch.empty(t.shape, dtype=load_dtype(name, t.dtype, dtype, fp32), device="meta"))
    try:
        for path in component.weight_files:
            with safe_open(path, framework="pt", device="cpu") as shard:
                for name in shard.keys():
                    if name.startswith(prefix):
                        continue
                    source = shard.get_tensor(name)
                    # copy=True: a kept view of the memory map would keep the shard's pages resident.
                    assign(model, name, source.to(device=target, dtype=load_dtype(name, source.dtype, dtype, fp32), copy=True))
        index = WeightIndex.of_files(component.weight_files)
        for name, t in model.named_parameters():
            if name.startswith(prefix):
                index.check(name, t)
    except (KeyError, ValueError) as exc:
        raise bad_checkpoint(f"{component.folder}: {exc}") from None
    absent = [name for name in missing(model) if not name.startswith(prefix)]
    if absent:
        raise bad_checkpoint(f"{component.folder}: {len(absent)} tensor(s) are in no weight file, e.g. {absent[:3]}")
    return _ready(model), index


def _has_room(device: torch.device, nbytes: int) -> bool:
    """Whether `device` is a GPU with `nbytes` free plus a margin."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return free > nbytes * 1.1 + 2**30


def _load_transformer(checkpoint: WanCheckpoint, dtype: torch.dtype, target: torch.device) -> torch.nn.Module:
    """The transformer: kino's pre-quantized format as written (quant/store.py), else from_pretrained."""
    from ..quant import is_quantized, load_quantized_transformer

    if is_quantized(str(checkpoint.transformer.folder)):
        return load_quantized_transformer(str(checkpoint.transformer.folder), target)
    return pretrained(WanTransformer3DModel, checkpoint.transformer.folder, dtype, target)


def pretrained(cls: type[M], folder: Path | str, dtype: torch.dtype, target: torch.device) -> M:
    """`cls.from_pretrained(folder)` in `dtype` onto `target`. On a GPU the weights go shard by shard
    straight to the device (accelerate's device map with one entry: no dispatch hooks), so host RAM
    holds about one memory-mapped shard at a time instead of the whole component; on the host they
    load as before."""
    if target.type == "cuda":
        return cls.from_pretrained(folder, dtype=dtype, device_map={"": target})  # type: ignore[attr-defined]
    return cls.from_pretrained(folder, dtype=dtype).to(target)  # type: ignore[attr-defined]


def _maker(field: str, make: Callable[[], T]) -> Callable[[], T]:
    """`make`, with a config that does not build reported as BAD_REQUEST naming `field`."""

    def checked() -> T:
        try:
            return make()
        except (TypeError, ValueError, KeyError, AssertionError) as exc:
            raise EngineFailure(
                "BAD_REQUEST", f"{field}: the config does not build: {exc}", phase="load", field=field
            ) from exc

    return checked


def build_random_components(
    arch: WanArchitecture,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    on_progress: OnProgress,
    targets: Mapping[str, torch.device] | None = None,
) -> WanComponents:
    """The architecture's full-size components with random weights ~ N(0, 0.02), built on `device`
    (or on the device `targets` names for a component). A component headed for the host is still
    drawn on the GPU when it has room (random init is ~100x faster there); the memory plan moves it."""
    prefix = "model.source.architecture"
    scheduler_class = resolve_scheduler_class(arch.scheduler.class_name)
    if scheduler_class is None:
        raise EngineFailure(
            "BAD_REQUEST",
            f"{arch.scheduler.class_name!r} is not a scheduler of diffusers {diffusers.__version__}",
            phase="load",
            field=f"{prefix}.scheduler.className",
        )
    text_config = _maker(f"{prefix}.textEncoder", lambda: UMT5Config.from_dict(json_numbers_as_config(UMT5Config, arch.text_encoder)))()
    if arch.tokenizer_vocab_size > text_config.vocab_size:
        raise EngineFailure(
            "BAD_REQUEST",
            f"tokenizerVocabSize {arch.tokenizer_vocab_size} exceeds the text encoder's vocab_size "
            f"{text_config.vocab_size}: token ids would index past its embedding",
            phase="load",
            field=f"{prefix}.tokenizerVocabSize",
        )
    makers: list[tuple[str, Callable[[], torch.nn.Module], torch.dtype]] = [
        ("text_encoder", _maker(f"{prefix}.textEncoder", lambda: UMT5EncoderModel(text_config)), dtype),
        (
            "transformer",
            _maker(f"{prefix}.transformer", lambda: WanTransformer3DModel.from_config(dict(arch.transformer))),
            dtype,
        ),
        ("vae", _maker(f"{prefix}.vae", lambda: AutoencoderKLWan.from_config(dict(arch.vae))), VAE_DTYPE),
    ]
    total = sum(size_on_meta(make, component_dtype) for _, make, component_dtype in makers)
    built: dict[str, torch.nn.Module] = {}
    done = 0
    for index, (name, make, component_dtype) in enumerate(makers):
        target = (targets or {}).get(name, device)
        size = size_on_meta(make, component_dtype)
        draw_on = device if target != device and _has_room(device, size) else target
        # Each component gets its own stream of random numbers: changing one config leaves the others.
        # Drawn on the GPU, it stays there until the memory plan moves it (runtime/placement.py).
        built[name] = build_random(make, device=draw_on, dtype=component_dtype, seed=seed + index)
        done += module_bytes(built[name])
        on_progress(name, done, total)
    tokenizer = synthetic_t5_tokenizer(arch.tokenizer_vocab_size, TEXT_ENCODER_MAX_LENGTH)
    on_progress("tokenizer", done, total)
    return WanComponents(
        transformer=built["transformer"],  # type: ignore[arg-type]
        vae=built["vae"],  # type: ignore[arg-type]
        text_encoder=built["text_encoder"],  # type: ignore[arg-type]
        tokenizer=tokenizer,
        scheduler_class=scheduler_class,
        scheduler_config=dict(arch.scheduler.config),
    )
