"""stream_quantize: a sharded bf16/fp32 checkpoint loaded straight into quantized form equals
load-then-quantize bit for bit, and never holds the unquantized model in host memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import weakref
from pathlib import Path
from typing import Iterator

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from kino_engine.protocol import EngineFailure
from kino_engine.quant import MODES, quantize_module, stream_quantize
from kino_engine.quant import stream as stream_module
from kino_engine.quant.__main__ import main as tool_main
from quant_helpers import QUANT_TINY, assert_same_state, forward, save_sharded, tiny_inputs


@pytest.fixture(scope="module")
def bf16_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded(tmp_path_factory.mktemp("quant-src") / "transformer", torch.bfloat16, "300KB")


@pytest.fixture(scope="module")
def fp32_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wan-AI's diffusers checkpoints store the transformer in float32: the loader casts while streaming."""
    return save_sharded(tmp_path_factory.mktemp("quant-src32") / "transformer", torch.float32, "600KB")


@pytest.mark.parametrize(
    ("source", "mode"), [("bf16_shards", mode) for mode in MODES] + [("fp32_shards", "fp8"), ("fp32_shards", "int8")]
)
def test_stream_equals_quantize_after_full_load(mode: str, source: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(source)
    streamed, report = stream_quantize(str(folder), mode, "cpu")
    loaded = WanTransformer3DModel.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    full_report = quantize_module(loaded, mode)
    assert_same_state(streamed, loaded, f"stream_quantize({mode}) vs from_pretrained + quantize_module")
    assert dict(streamed.named_buffers()).keys() == dict(loaded.named_buffers()).keys()
    for name, buffer in loaded.named_buffers():  # the rotary tables, which no checkpoint holds
        assert torch.equal(dict(streamed.named_buffers())[name], buffer), f"{name} differs"
    assert torch.equal(forward(streamed, tiny_inputs()), forward(loaded, tiny_inputs()))
    assert report.layers == full_report.layers and report.quantized == full_report.quantized
    assert report.bytes_before == full_report.bytes_before and report.bytes_after == full_report.bytes_after
    assert not streamed.training and not any(p.requires_grad for p in streamed.parameters())


def test_never_holds_more_than_one_source_tensor(bf16_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts the tensors safe_open hands out that are still alive: the loader must drop each one before
    reading the next, and keep none (a kept CPU tensor is a view that pins its shard's memory map)."""
    alive: set[int] = set()
    peak = {"tensors": 0, "reads": 0}
    real_safe_open = stream_module.safe_open

    class Spy:
        def __init__(self, *args: object, **kwargs: object):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self) -> "Spy":
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            tensor = self.inner.get_tensor(name)
            key = id(tensor)
            alive.add(key)
            weakref.finalize(tensor, alive.discard, key)
            peak["tensors"] = max(peak["tensors"], len(alive))
            peak["reads"] += 1
            return tensor

    monkeypatch.setattr(stream_module, "safe_open", Spy)
    model, _ = stream_quantize(str(bf16_shards), "fp8", "cpu")
    total = sum(len(load_file(str(p))) for p in bf16_shards.glob("*.safetensors"))
    assert peak["reads"] == total, "every tensor is read exactly once"
    assert peak["tensors"] == 1, f"{peak['tensors']} source tensors were alive at once (the loader must drop each)"
    assert not alive, f"{len(alive)} source tensors are still referenced by the model: they pin the shards' mmaps"
    assert model is not None


@contextlib.contextmanager
def static_mmap_threshold(nbytes: int = 64 * 1024) -> Iterator[None]:
    """glibc serves every allocation >= `nbytes` with its own mmap while this lasts. By default the
    threshold grows to the largest block freed so far (up to 32 MiB), so this toy's temporaries of
    ~1 MiB come from a heap they fragment and read as growth; real tensors (tens of MB and more) are
    mmapped anyway. Restored to glibc's default threshold afterwards."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_mmap_threshold = -3
    assert libc.mallopt(m_mmap_threshold, nbytes) == 1, "mallopt refused M_MMAP_THRESHOLD"
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 128 * 1024)


@pytest.fixture(scope="module")
def large_bf16_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = {**QUANT_TINY, "num_layers": 24, "ffn_dim": 1024, "num_attention_heads": 4}
    return save_sharded(tmp_path_factory.mktemp("quant-large") / "transformer", torch.bfloat16, "10MB", config=config)


def test_peak_host_memory_is_bounded(large_bf16_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Peak RSS growth over a streamed load <= 1.2 x the quantized model + the largest shard, as the
    measure-load tool reports it. The source is bf16: the case where keeping one safe_open view would
    pin whole shards, and where holding every source tensor at once would break the bound."""
    with static_mmap_threshold():
        status = tool_main(["measure-load", str(large_bf16_shards), "--mode", "fp8"])
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["ok"], f"measure-load failed: {answer}"
    result = answer["result"]
    mib = {k: round(v / 2**20, 1) for k, v in result.items() if k.endswith("Bytes")}
    assert result["checkpointBytes"] > result["boundBytes"], "holding the whole source must break the bound"
    assert result["withinBound"] and status == 0, f"peak host RSS over the bound: {mib}"


def test_progress_reaches_the_total(bf16_shards: Path) -> None:
    seen: list[tuple[int, int]] = []
    stream_quantize(str(bf16_shards), "int8", "cpu", on_progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1], "the last progress event reports every byte"
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(bf16_shards: Path, tmp_path: Path) -> None:
    index = json.loads((bf16_shards / "diffusion_pytorch_model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]

    extra = _copy_folder(bf16_shards, tmp_path / "extra")
    tensors = load_file(str(extra / last))
    tensors["blocks.0.surplus.weight"] = torch.zeros(2)
    save_file(tensors, str(extra / last))
    with pytest.raises(EngineFailure, match="surplus") as failure:
        stream_quantize(str(extra), "fp8", "cpu")
    assert failure.value.code == "BAD_CHECKPOINT"

    short = _copy_folder(bf16_shards, tmp_path / "short")
    tensors = load_file(str(short / last))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(short / last))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != dropped}
    (short / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(EngineFailure, match="not in the checkpoint") as failure:
        stream_quantize(str(short), "fp8", "cpu")
    assert failure.value.code == "BAD_CHECKPOINT"
