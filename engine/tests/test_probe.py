"""The probe: the planner's hardware profile measured on this machine. On a CPU-only machine it still
answers (GPU fields null), valid under the checked-in schema; the GPU tests run where there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import engine_env
from jsonschema import Draft202012Validator
from worker_client import WorkerProcess

from kino_engine import probe
from kino_engine.protocol import EngineFailure, ProbeRequest, parse_request
from kino_engine.runtime.attention import BACKENDS, AttentionBackend
from kino_engine.runtime.disk import RAM_FILESYSTEMS, filesystem_type

GPU_FIELDS = ("index", "capability", "vramTotalBytes", "vramFreeBytes", "h2dBytesPerS", "d2hBytesPerS", "h2dPageableBytesPerS", "transferBytes")


@pytest.fixture(scope="module")
def quick() -> dict:
    return probe.measure(quick=True)


def _assert_valid(schema: dict, result: dict) -> None:
    errors = list(Draft202012Validator(schema["results"]["probe"]).iter_errors(result))
    assert not errors, f"the probe result breaks its schema ({errors[0].message} at {list(errors[0].path)}): {result}"


def test_quick_probe_is_valid_positive_and_fast(schema: dict, quick: dict) -> None:
    _assert_valid(schema, quick)
    assert quick["quick"] is True
    assert quick["hostRamBytes"] > 0 and 0 < quick["hostRamAvailableBytes"] <= quick["hostRamBytes"]
    assert 0 < quick["pinnedLimitBytes"] <= quick["hostRamBytes"], "kino can never pin more than the host has"
    cpu = quick["cpuGemm"]
    assert cpu["flopsPerS"] > 0 and cpu["seconds"] > 0
    assert cpu["flopsPerS"] == pytest.approx(2 * cpu["m"] * cpu["n"] * cpu["k"] / cpu["seconds"]), "rate = 2·M·N·K / seconds"
    assert quick["cpuThreads"] >= 1
    # The measuring itself (imports and CUDA's start-up aside) is what quick keeps short.
    limit_ms = 5_000 if quick["device"] == "cpu" else 10_000
    assert quick["ms"] < limit_ms, f"a quick probe took {quick['ms']:.0f} ms"


def test_the_gpu_fields_match_the_machine(quick: dict) -> None:
    """Without a GPU (CI) the GPU fields are null; with one, they are measured and plausible. The full
    GPU measurement was recorded on an H100 (docs/benchmarks/*-probe-*.json)."""
    if not torch.cuda.is_available():
        assert quick["device"] == "cpu"
        for name in GPU_FIELDS:
            assert quick[name] is None, f"{name} must be null without a GPU, got {quick[name]!r}"
        assert quick["gemm"] == [] and quick["attention"] == []
        assert quick["name"], "the CPU's name stands in for the GPU's"
        return
    assert quick["device"] == "cuda" and quick["vramTotalBytes"] >= quick["vramFreeBytes"] > 0
    for name in ("h2dBytesPerS", "d2hBytesPerS", "h2dPageableBytesPerS"):
        assert quick[name] > 1e8, f"{name} = {quick[name]}: a copy slower than 0.1 GB/s is a timing bug"
    for a in quick["attention"]:
        assert a["byBackend"][a["backend"]] == max(r for r in a["byBackend"].values() if r is not None), "the fastest is kept"


def test_the_disk_read_comes_from_the_disk(tmp_path, quick: dict) -> None:
    """The read of a file written, synced and dropped from the page cache (what the disk tier streams at);
    nothing left behind; no rate for a folder whose files live in RAM."""
    disk = quick["diskReadBytesPerS"]
    assert disk is None or disk > 1e7, f"a disk read of {disk} bytes/s is a timing bug"
    assert (disk is None) == (filesystem_type(tempfile.gettempdir()) in RAM_FILESYSTEMS)
    rate = probe.disk_read_measure(str(tmp_path), 64 * probe.MiB)
    assert rate is not None and rate > 1e7
    assert list(tmp_path.iterdir()) == [], "the probe's file must be removed"
    ram_backed = [m.split()[1] for m in Path("/proc/self/mounts").read_text().splitlines() if m.split()[2] == "tmpfs"]
    for folder in ram_backed:
        if os.access(folder, os.W_OK):
            assert filesystem_type(folder) == "tmpfs"
            assert probe.disk_read_measure(folder, 64 * probe.MiB) is None, f"{folder} is RAM: there is no disk to time"
            break


def test_pinned_limit_is_half_the_ram_or_of_a_lower_cgroup_limit() -> None:
    GiB = 1 << 30
    assert probe.pinned_limit(256 * GiB, None) == 128 * GiB, "the presets' rule: half of the host RAM"
    assert probe.pinned_limit(256 * GiB, 64 * GiB) == 32 * GiB, "in a container the cgroup limit is the RAM there is"
    assert probe.pinned_limit(64 * GiB, 512 * GiB) == 32 * GiB


def test_median_stops_at_its_budget_but_keeps_the_minimum() -> None:
    calls = []
    spent = probe.ProbeSizes(transfer_bytes=1, gemms=(), attention=(), cpu_gemm=(1, 1, 1), repeats=50, budget_s=0.0)
    seconds = probe.median_seconds(lambda: calls.append(time.sleep(0.01)), spent, cuda=False, warmup=1)
    # A 10 ms call is one per sample: the warm-up, the estimate, then MIN_REPEATS samples.
    assert len(calls) == 2 + probe.MIN_REPEATS, "a spent budget stops the samples at the minimum"
    assert 0.01 <= seconds < 0.05


def test_short_calls_are_repeated_inside_a_sample() -> None:
    calls = []
    sizes = probe.ProbeSizes(transfer_bytes=1, gemms=(), attention=(), cpu_gemm=(1, 1, 1), repeats=3, budget_s=10.0)
    seconds = probe.median_seconds(lambda: calls.append(time.sleep(0.001)), sizes, cuda=False, warmup=1)
    assert len(calls) > 2 + 3 * 2, f"1 ms calls must be batched into samples of >= {probe.SAMPLE_S * 1000:.0f} ms ({len(calls)} calls)"
    assert 0.001 <= seconds < 0.005, "the median is per call, not per sample"


class _Unavailable(AttentionBackend):
    """A backend whose kernel does not exist here: SDPA raises under it, as torch does."""

    def context(self):  # type: ignore[override]
        raise RuntimeError("No available kernel")


SMALL = probe.ProbeSizes(transfer_bytes=1, gemms=(), attention=(), cpu_gemm=(1, 1, 1), repeats=3, budget_s=0.1)


def test_attention_keeps_the_fastest_backend_and_each_rate() -> None:
    registry = {**BACKENDS, "gone": _Unavailable("gone", None, frozenset({"cpu"}))}
    measured = probe.attention_measure(2, 64, 32, torch.device("cpu"), SMALL, ("math", "gone", "default"), registry)
    assert set(measured["byBackend"]) == {"math", "gone", "default"}
    assert measured["byBackend"]["gone"] is None, "a backend that cannot run has no rate"
    assert measured["byBackend"][measured["backend"]] == max(measured["byBackend"]["math"], measured["byBackend"]["default"])
    assert measured["flopsPerS"] == pytest.approx(4 * 2 * 64 * 64 * 32 / measured["seconds"]), "rate = 4·heads·N²·d / seconds"


def test_attention_falls_back_to_the_default_backend_where_no_candidate_runs() -> None:
    registry = {**BACKENDS, "gone": _Unavailable("gone", None, frozenset({"cpu"}))}
    measured = probe.attention_measure(2, 64, 32, torch.device("cpu"), SMALL, ("gone",), registry)
    assert measured["backend"] == "default", "with no candidate kernel, torch's own choice must stand in"
    assert measured["byBackend"]["gone"] is None and measured["byBackend"]["default"] > 0


def test_probe_requests_parse_and_name_the_bad_field() -> None:
    assert parse_request({"type": "probe", "id": "p", "quick": True}) == ProbeRequest(id="p", quick=True)
    for obj, field in (({"type": "probe", "id": "p"}, "quick"), ({"type": "probe", "id": "p", "quick": "yes"}, "quick")):
        with pytest.raises(EngineFailure) as info:
            parse_request(obj)
        assert (info.value.code, info.value.field) == ("BAD_REQUEST", field)


def test_the_worker_answers_probe_with_a_valid_result_and_debug_events(schema: dict) -> None:
    process = WorkerProcess(schema)  # validates every message and the probe result against the schema
    try:
        answer, events = process.request({"type": "probe", "id": "p1", "quick": True}, timeout=120)
        assert answer["type"] == "result", f"probe failed: {answer}"
        assert answer["result"]["quick"] is True
        assert events and all(e["kind"] == "log" and e["level"] == "debug" for e in events), (
            f"the probe reports each measurement as a debug log event: {events}"
        )
        hello, _ = process.request({"type": "hello", "id": "h", "protocol": 1})
        assert "driver" in hello["result"], "hello names the driver (null without one): the probe cache keys on it"
    finally:
        process.close()


def test_the_module_prints_one_json_answer_line(schema: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kino_engine.probe", "--quick"], env=engine_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must hold the answer line alone: {done.stdout!r}"
    answer = json.loads(lines[0])
    assert answer["ok"] is True
    _assert_valid(schema, answer["result"])
