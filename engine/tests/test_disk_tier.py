"""The disk tier on the CPU: transformer blocks streamed from safetensors files through a staging ring.

- The files: kino's streaming writer makes files safetensors itself reads; positional reads return
  the stored bytes, and a dtype conversion through a chunk smaller than the tensor rounds exactly as
  Tensor.to does.
- The ring on toy blocks read from a file: outputs equal to the resident run for every (resident
  blocks, prefetch); reads in ticket order, the two staging buffers taken in turn; one read per
  streamed execution (as the RAM source copies); a forward cut off midway resynchronizes; restore
  gives an ordinary module; a model in memory is written to a scratch file that leaves nothing behind.
- Host memory: streaming 256 MiB of blocks from a file grows the process by the ring and the slots,
  while loading the same blocks into RAM grows it by all of them (the measurement works).
- The tiny Wan checkpoint with its transformer streamed from its own files: frames and latents
  bit-identical to the resident run in float32 and in bfloat16 (the file's float32 converted on the
  way, the modules Wan keeps in float32 kept); the streamed blocks never loaded. A random-weight model
  goes through a scratch file, equally exact. The memory bench runs a disk case.
- What cannot stream from disk is refused by name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kino_engine import memory_bench
from kino_engine.pipelines.wan import WanT2V
from kino_engine.protocol import EngineFailure, JobSpec, ModelSpec, RandomSource, parse_model_spec
from kino_engine.quant.peak import measure_peak_rss
from kino_engine.quant.skeleton import assign
from kino_engine.runtime.disk import STAGING_BUFFERS, DiskBlocks, disk_index, placeholder
from kino_engine.runtime.host_memory import named_tensors
from kino_engine.runtime.options import RuntimeOptions
from kino_engine.runtime.placement import BlockStreamer, MemoryPlan, Placement
from kino_engine.runtime.weight_files import WeightIndex, write_safetensors

from conftest import engine_env
from test_placement import Stack
from test_random_build import JOB as RANDOM_JOB
from test_random_build import SMALL

CPU = torch.device("cpu")


def _file_of(model: torch.nn.Module, path: Path) -> WeightIndex:
    write_safetensors(str(path), list(model.state_dict().items()))
    return WeightIndex.of_files([str(path)])


def _skeleton(index: WeightIndex, layers: int, width: int) -> Stack:
    """A Stack with its parameters and buffers on meta, everything outside the blocks read from `index`."""
    with torch.device("meta"):
        model = Stack(layers, width)
    for name, t in named_tensors(model):
        if not name.startswith("blocks."):
            host = torch.empty(t.shape, dtype=t.dtype)
            index.read_into(name, host)
            assign(model, name, host)
    return model


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() <= 1 or all(s == 0 for s in t.stride())


# ---- the files ----


def test_written_files_read_back_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    items = [
        ("a.weight", torch.randn(7, 5)),
        ("a.bf16", torch.randn(3, 33).to(torch.bfloat16)),
        ("b.fp8", torch.randn(16, 4).to(torch.float8_e4m3fn)),
        ("c.count", torch.arange(9, dtype=torch.int64).reshape(3, 3)),
        ("d.scalar", torch.tensor(2.5)),
        ("e.empty", torch.empty(0, 4)),
    ]
    path = tmp_path / "w.safetensors"
    write_safetensors(str(path), items)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in items), "safetensors must read kino's file"
        for name, t in items:
            assert torch.equal(_raw(f.get_tensor(name)), _raw(t)), name
    index = WeightIndex.of_files([str(path)])
    for name, t in items:
        out = torch.empty(t.shape, dtype=t.dtype)
        assert index.read_into(name, out) == t.numel() * t.element_size()
        assert torch.equal(_raw(out), _raw(t)), f"{name}: the bytes read differ"
    # float32 in the file, bfloat16 in the model: converted chunk by chunk (a 64-byte chunk holds 16
    # floats; the tensor has 35), rounding exactly as Tensor.to does.
    bf16 = torch.empty(7, 5, dtype=torch.bfloat16)
    index.read_into("a.weight", bf16, chunk=torch.empty(64, dtype=torch.uint8))
    assert torch.equal(bf16, items[0][1].to(torch.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        index.check("a.weight", torch.empty(5, 7))
    with pytest.raises(ValueError, match="does not convert"):
        index.check("c.count", torch.empty(3, 3))
    with pytest.raises(ValueError, match="not in the weight files"):
        index.check("z", torch.empty(1))
    index.close()


# ---- the staging ring on toy blocks ----


def _disk_streamer(tmp_path: Path, resident: int, prefetch: int, layers: int = 5) -> tuple[Stack, BlockStreamer, torch.Tensor]:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    reference = Stack(layers)
    expected = reference(x)
    index = _file_of(reference, tmp_path / "stack.safetensors")
    model = _skeleton(index, layers, 16)
    disk_index(model, "blocks", resident, index, None, CPU)
    streamer = BlockStreamer(model, "blocks", resident, prefetch, CPU, index)
    return model, streamer, expected


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (0, 2), (2, 1), (1, 3), (4, 1), (0, 7)])
def test_disk_streamed_blocks_give_the_resident_output(tmp_path: Path, resident: int, prefetch: int) -> None:
    model, streamer, expected = _disk_streamer(tmp_path, resident, prefetch)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    source = streamer.source
    assert isinstance(source, DiskBlocks)
    assert len(source.ring) == min(STAGING_BUFFERS, len(streamer.streamed))
    for forward in range(3):
        assert torch.equal(model(x), expected), f"forward {forward}: streaming from disk changed the output"
    for b in range(len(model.blocks)):
        weight = model.blocks[b].a.weight
        assert _is_placeholder(weight) == (b >= resident), f"block {b}: resident blocks are loaded, streamed ones are not"
    # One read per streamed execution, as the RAM source makes one copy (the first forward primes S
    # slots). The phase's end waits for the reads still under way (the next forward's prefetch).
    streamer.leave()
    streamed = len(streamer.streamed)
    assert streamer.copies == source.reads == 3 * streamed + (streamer.slots_count - 1)
    assert source.bytes_read == source.reads * sum(p.numel() * 4 for p in Stack(1).blocks[0].state_dict().values())
    assert streamer.resyncs == 0


def test_reads_follow_the_tickets_and_take_the_buffers_in_turn(tmp_path: Path) -> None:
    model, streamer, expected = _disk_streamer(tmp_path, resident=1, prefetch=2)
    source = streamer.source
    assert isinstance(source, DiskBlocks)
    order: list[tuple[int, int]] = []
    read = source._read

    def spy(p: int, views: list[torch.Tensor]) -> None:
        buffer = next(j for j, ring in enumerate(source.ring_views) if ring[0].data_ptr() == views[0].data_ptr())
        order.append((p, buffer))
        read(p, views)

    source._read = spy  # type: ignore[method-assign]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        assert torch.equal(model(x), expected)
    streamer.leave()  # the prefetch still being read
    positions = [p for p, _ in order]
    streamed = len(streamer.streamed)
    assert positions == [t % streamed for t in range(len(order))], f"reads out of ticket order: {positions}"
    assert [j for _, j in order] == [t % STAGING_BUFFERS for t in range(len(order))], "the staging buffers alternate"


def test_a_cut_off_forward_resyncs_from_disk(tmp_path: Path) -> None:
    model, streamer, expected = _disk_streamer(tmp_path, resident=0, prefetch=2)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}
    original = type(model.blocks[0]).forward

    def failing(self: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("cancelled mid-forward")
        return original(self, inp)

    type(model.blocks[0]).forward = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="cancelled"):
            model(x)
    finally:
        type(model.blocks[0]).forward = original  # type: ignore[method-assign]
    assert torch.equal(model(x), expected), "the forward after a cut-off one must be exact"
    assert streamer.resyncs == 1
    assert torch.equal(model(x), expected)


def test_a_failed_read_is_retried_by_the_next_call(tmp_path: Path) -> None:
    model, streamer, expected = _disk_streamer(tmp_path, resident=0, prefetch=1)
    source = streamer.source
    assert isinstance(source, DiskBlocks)
    read = source._read
    failures = {"left": 1}

    def flaky(p: int, views: list[torch.Tensor]) -> None:
        if failures["left"] and p == 2:
            failures["left"] -= 1
            raise OSError("read error")
        read(p, views)

    source._read = flaky  # type: ignore[method-assign]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(OSError, match="read error"):
        model(x)
    assert torch.equal(model(x), expected), "a read that failed once must be issued again, not awaited forever"


def test_restore_reads_the_blocks_back(tmp_path: Path) -> None:
    model, streamer, expected = _disk_streamer(tmp_path, resident=1, prefetch=1)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    model(x)
    streamer.restore()
    assert type(model.blocks) is torch.nn.ModuleList
    assert not any(_is_placeholder(p) for p in model.parameters() if p.numel() > 1)
    assert torch.equal(model(x), expected)


def test_a_model_in_memory_streams_through_a_scratch_file(tmp_path: Path) -> None:
    x = torch.randn(2, 16)
    model = Stack()
    expected = model(x)
    folder = tmp_path / "cache"
    index = disk_index(model, "blocks", 2, None, folder, CPU)
    assert sorted(index.locations) == sorted(
        f"blocks.{b}.{name}" for b in range(2, 5) for name, _ in named_tensors(model.blocks[b])
    ), "the scratch file holds the streamed blocks, nothing else"
    assert list((folder / "disk-blocks").iterdir()) == [], "the scratch file is unlinked once open"
    streamer = BlockStreamer(model, "blocks", 2, 1, CPU, index)
    assert all(_is_placeholder(t) for ts in streamer.tensors for t in ts), "the blocks' memory is released"
    for _ in range(2):
        assert torch.equal(model(x), expected)
    streamer.restore()
    assert torch.equal(model(x), expected)


def test_what_cannot_stream_from_disk_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    skeleton = _skeleton(_file_of(Stack(), tmp_path / "s.safetensors"), 5, 16)
    with pytest.raises(ValueError, match="no weight files"):
        disk_index(skeleton, "blocks", 0, None, tmp_path, CPU)
    with pytest.raises(ValueError, match="source"):
        Placement("resident", source="disk")
    with pytest.raises(ValueError, match="source must be one of"):
        Placement("streamed", source="tape")
    spec = _checkpoint_spec(tiny_checkpoint, "float32", _DISK)
    with pytest.raises(EngineFailure) as caught:
        WanT2V.load(spec, memory=spec.memory, runtime=RuntimeOptions(weights="int8"))
    assert caught.value.code == "BAD_REQUEST" and caught.value.field == "model.memory.transformer.source"


# ---- host memory ----


LAYERS, WIDTH = 16, 2048  # 16 MiB per float32 block, 256 MiB streamed
BLOCK_BYTES = WIDTH * WIDTH * 4


def measure_in_child(mode: str, weights: str, out: str) -> int:
    """Run in a fresh process (`python -c`): two forwards of the big Stack with its blocks streamed
    from `weights` ("disk") or read into RAM first ("ram"); saves the output to `out` and returns the
    process's RSS growth. A fresh process: freed memory the allocator keeps would hide growth here."""
    index = WeightIndex.of_files([weights])
    x = torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(2))

    def run() -> torch.Tensor:
        model = _skeleton(index, LAYERS, WIDTH)
        if mode == "disk":
            disk_index(model, "blocks", 0, index, None, CPU)
            BlockStreamer(model, "blocks", 0, 1, CPU, index)
        else:
            for name, t in named_tensors(model):
                if name.startswith("blocks."):
                    host = torch.empty(t.shape, dtype=t.dtype)
                    index.read_into(name, host)
                    assign(model, name, host)
        model(x)
        return model(x)

    result, peak = measure_peak_rss(run)
    torch.save(result, out)
    return peak.increase_bytes


def test_host_memory_holds_the_ring_not_the_blocks(tmp_path: Path) -> None:
    with torch.device("meta"):
        shape_only = Stack(LAYERS, WIDTH)
    generator = torch.Generator().manual_seed(0)
    items = [
        (name, torch.randn(t.shape, generator=generator) * 0.02 if t.dim() > 1 else torch.ones(t.shape))
        for name, t in shape_only.state_dict().items()
    ]
    weights = tmp_path / "big.safetensors"
    write_safetensors(str(weights), items)
    del items
    growth = {}
    for mode in ("disk", "ram"):
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import test_disk_tier as t; "
            "print(t.measure_in_child(sys.argv[2], sys.argv[3], sys.argv[4]))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent), mode, str(weights), str(tmp_path / f"{mode}.pt")],
            env=engine_env(), capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        growth[mode] = int(done.stdout.split()[-1])
    # Slots (prefetch + 1 = 2 blocks) and the staging ring (2 blocks) on the CPU, the resident input
    # layer (a block's size) and allocator slack: measured 88 MiB when written. The page cache the
    # reads go through is not the process's.
    ring_and_slots = (STAGING_BUFFERS + 2) * BLOCK_BYTES
    assert growth["disk"] < ring_and_slots + BLOCK_BYTES + 16 * 2**20, (
        f"streaming grew the process by {growth['disk'] / 2**20:.0f} MiB; the ring and slots are "
        f"{ring_and_slots / 2**20:.0f} MiB: something holds the blocks"
    )
    assert growth["ram"] > 0.9 * LAYERS * BLOCK_BYTES, "the measurement must see blocks held in RAM"
    assert torch.equal(torch.load(tmp_path / "disk.pt"), torch.load(tmp_path / "ram.pt"))


# ---- the tiny Wan model ----

_DISK = {"kind": "streamed", "residentBlocks": 0, "prefetch": 1, "source": "disk"}
_R = {"kind": "resident"}


def _checkpoint_spec(path: Path, dtype: str, transformer: dict | None) -> ModelSpec:
    raw: dict = {"name": "disk", "source": {"kind": "checkpoint", "path": str(path)}, "device": "cpu", "dtype": dtype}
    if transformer is not None:
        raw["memory"] = {"textEncoder": _R, "transformer": transformer, "vae": _R, "vramBudget": None}
    return parse_model_spec(raw)


def _job(**extra: object) -> JobSpec:
    base = dict(prompt="a red car on the beach", negative_prompt="blurry", width=80, height=48, frames=9,
                steps=3, guidance=5.0, shift=None, seed=11, fps=None)
    base.update(extra)
    return JobSpec(**base)  # type: ignore[arg-type]


def _run(model: WanT2V) -> tuple[torch.Tensor, np.ndarray]:
    frames = model.generate(_job()).frames
    latents = model.denoise(model.encode_prompt("a red car on the beach"), model.encode_prompt("blurry"), _job())
    assert frames is not None
    return latents, frames


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("resident", [0, 1])
def test_the_checkpoint_streams_from_its_files_exactly(tiny_checkpoint: Path, dtype: str, resident: int) -> None:
    latents, frames = _run(WanT2V.load(_checkpoint_spec(tiny_checkpoint, dtype, None)))
    spec = _checkpoint_spec(tiny_checkpoint, dtype, {**_DISK, "residentBlocks": resident})
    model = WanT2V.load(spec, memory=spec.memory)
    streamer = model.placer.streamer
    assert streamer is not None and isinstance(streamer.source, DiskBlocks)
    assert model.transformer_weights is not None and streamer.source.index is model.transformer_weights, (
        "the blocks must be read from the checkpoint's own files, not a scratch copy"
    )
    assert all(_is_placeholder(t) for ts in streamer.tensors for t in ts), "streamed blocks were loaded into memory"
    assert any(t.dtype == torch.float32 for t in streamer.tensors[0]) and (
        dtype == "float32" or any(t.dtype == torch.bfloat16 for t in streamer.tensors[0])
    ), "Wan keeps some block modules in float32; the rest take the model's dtype"
    disk_latents, disk_frames = _run(model)
    assert np.array_equal(disk_frames, frames), f"{dtype}: frames differ from the resident run"
    assert torch.equal(disk_latents, latents), f"{dtype}: latents differ from the resident run"
    assert streamer.source.reads == streamer.copies > 0
    model.placer.release()
    assert torch.equal(_run(model)[0], latents), "undoing the plan reads the blocks back exactly"


def test_a_random_model_streams_through_a_scratch_file(tmp_path: Path) -> None:
    spec = ModelSpec("small-random", RandomSource(SMALL, 0), device="cpu", dtype="float32")
    model = WanT2V.load(spec, runtime=RuntimeOptions(cache_dir=tmp_path))
    job = RANDOM_JOB
    expected = model.generate(job).frames
    model.replace(MemoryPlan(transformer=Placement("streamed", 1, 1, "disk")))
    streamer = model.placer.streamer
    assert streamer is not None and isinstance(streamer.source, DiskBlocks)
    assert list((tmp_path / "disk-blocks").iterdir()) == [], "the scratch file is unlinked once open"
    assert np.array_equal(model.generate(job).frames, expected)
    model.placer.release()


def test_the_memory_bench_runs_a_disk_case(tiny_checkpoint: Path, tmp_path: Path) -> None:
    job = {"prompt": "a red car", "negativePrompt": "blurry", "width": 80, "height": 48, "frames": 9, "steps": 3,
           "guidance": 5.0, "shift": None, "seed": 3, "fps": None}
    memory = {"textEncoder": _R, "vae": _R, "vramBudget": None}
    spec = {
        "model": {"name": "tiny", "source": {"kind": "checkpoint", "path": str(tiny_checkpoint)}, "device": "cpu",
                  "dtype": "float32", "runtime": {"cfg": "auto", "attention": "auto", "compile": False, "cacheDir": str(tmp_path)}},
        "job": job,
        "warmupSteps": 1,
        "timedSteps": 1,
        "cases": [
            {"label": "resident", "memory": {**memory, "transformer": _R}},
            {"label": "disk", "memory": {**memory, "transformer": _DISK}},
        ],
    }
    result = memory_bench.run(spec)
    disk = result["cases"][1]
    assert disk["oom"] is None and disk["latentsMaxAbsDiffVsFirst"] == 0.0
    assert disk["streamer"]["source"] == "disk" and disk["streamer"]["bytesRead"] > 0
    assert disk["streamer"]["stagingBytes"] == STAGING_BUFFERS * disk["streamer"]["blockBytes"]


def test_placeholders_hold_one_element() -> None:
    like = torch.empty(1024, 1024, dtype=torch.bfloat16)
    stand_in = placeholder(like)
    assert stand_in.shape == like.shape and stand_in.dtype == like.dtype
    assert stand_in.untyped_storage().nbytes() == 2
