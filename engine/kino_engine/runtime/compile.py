"""Regional compile: torch.compile each of the transformer's repeated blocks, with a persistent cache.

Contract: `configure_cache(cache_dir)` points inductor's on-disk caches (FX graph cache, autotune
cache, generated kernels) at `<cache_dir>/inductor` before anything compiles, so a second process
loads compiled artifacts instead of compiling again. `compile_blocks(model, fullgraph)` compiles the
blocks the model declares as data (`_repeated_blocks`, e.g. ["WanTransformerBlock"] on diffusers'
WanTransformer3DModel) with `dynamic=False`, through diffusers' own `compile_repeated_blocks` when the
model has it, and returns the qualified names of the compiled modules. Compilation itself is lazy
(first call at a shape); `WanT2V.prewarm` triggers it before the first request.

CUDA graphs are not used: the blocks are compiled without "reduce-overhead" because the Wan loop's
step already launches few enough kernels per block at video shapes, and graph capture would pin the
CFG buffers' and rotary tables' addresses per shape (a later addition if small shapes need it).

This module knows nothing about jobs or attention backends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("kino.compile")

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def configure_cache(cache_dir: Path | None) -> Path | None:
    """Persist inductor's caches under `cache_dir/inductor`; returns that folder (None: leave torch's default).

    Must run before the first compile: inductor reads TORCHINDUCTOR_CACHE_DIR whenever it opens its cache.
    """
    import torch._inductor.config as inductor_config

    # The FX graph cache and the autotune cache are what make a second process skip compile/autotune.
    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    if cache_dir is None:
        return None
    folder = (cache_dir / "inductor").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(INDUCTOR_CACHE_ENV)
    if previous and Path(previous).resolve() != folder:
        log.info("compile: inductor cache moves from %s to %s (RuntimeOptions.cache_dir)", previous, folder)
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    return folder


def repeated_block_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the submodules whose class the model declares in `_repeated_blocks`."""
    classes = set(getattr(model, "_repeated_blocks", None) or ())
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no _repeated_blocks: nothing to compile regionally")
    names = [name for name, module in model.named_modules() if type(module).__name__ in classes]
    if not names:
        raise ValueError(f"{type(model).__name__}: none of its modules is a {sorted(classes)}")
    return names


def compile_blocks(model: torch.nn.Module, fullgraph: bool) -> list[str]:
    """Compile each repeated block in place (dynamic=False); returns the compiled modules' names."""
    names = repeated_block_names(model)
    kwargs = {"fullgraph": fullgraph, "dynamic": False}
    if hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(**kwargs)  # diffusers' ModelMixin: submodule.compile(**kwargs) per block
    else:
        modules = dict(model.named_modules())
        for name in names:
            modules[name].compile(**kwargs)
    log.info("compile: %d x %s (fullgraph=%s, dynamic=False)", len(names), model._repeated_blocks, fullgraph)
    return names


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` has been applied (nn.Module keeps the compiled call in _compiled_call_impl)."""
    return getattr(module, "_compiled_call_impl", None) is not None
