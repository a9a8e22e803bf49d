"""ModelSpec.runtime: the control plane's hot-path options reach the model, and bad ones are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from kino_engine.engine import Engine
from kino_engine.protocol import EngineFailure, parse_model_spec


def _spec(checkpoint: Path, runtime: object) -> dict:
    return {
        "name": "tiny",
        "source": {"kind": "checkpoint", "path": str(checkpoint)},
        "device": "cpu",
        "dtype": "float32",
        "runtime": runtime,
    }


def test_runtime_options_reach_the_loaded_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    runtime = {"cfg": "sequential", "attention": "math", "compile": False, "cacheDir": str(tmp_path)}
    spec = parse_model_spec(_spec(tiny_checkpoint, runtime))
    assert spec.runtime is not None and spec.runtime.cache_dir == tmp_path
    engine = Engine()
    engine.load(spec, lambda event: None)
    options = engine.model.runtime.options
    assert (options.cfg, options.attention, options.compile) == ("sequential", "math", False), (
        "the load request's runtime options were dropped: the engine ran its defaults instead"
    )


def test_absent_runtime_means_the_defaults(tiny_checkpoint: Path) -> None:
    spec = dict(_spec(tiny_checkpoint, None))
    del spec["runtime"]
    assert parse_model_spec(spec).runtime is None


@pytest.mark.parametrize(
    "runtime, field",
    [
        ({"cfg": "sideways", "attention": "auto", "compile": False, "cacheDir": None}, "model.runtime"),
        ({"cfg": "auto", "attention": "auto", "compile": False}, "model.runtime.cacheDir"),
        ({"cfg": "auto", "attention": "auto", "compile": False, "cacheDir": ""}, "model.runtime.cacheDir"),
    ],
)
def test_bad_runtime_is_refused_naming_the_field(tiny_checkpoint: Path, runtime: dict, field: str) -> None:
    with pytest.raises(EngineFailure) as caught:
        parse_model_spec(_spec(tiny_checkpoint, runtime))
    assert caught.value.code == "BAD_REQUEST" and caught.value.field == field, (
        f"expected BAD_REQUEST naming {field}, got {caught.value.code} naming {caught.value.field}"
    )
