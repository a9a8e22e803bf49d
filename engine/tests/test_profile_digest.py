"""The profile digest on a synthetic trace: categories, top kernels, and per-step host syncs and
scalar reads counted where they happen (and only there)."""

from __future__ import annotations

import pytest

from kino_engine.profile import digest


def X(cat: str, name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def trace() -> list[dict]:
    """A generation 0..1000 us: text encode, three 200 us steps, decode; kernels on the device."""
    return [
        X("user_annotation", "kino/generate", 0, 1000),
        X("user_annotation", "kino/text_encode", 0, 100),
        X("user_annotation", "kino/denoise", 100, 600),
        X("user_annotation", "kino/step 1", 100, 200),
        X("user_annotation", "kino/step 2", 300, 200),
        X("user_annotation", "kino/step 3", 500, 200),
        X("user_annotation", "kino/decode", 700, 300),
        X("gpu_user_annotation", "kino/step 2", 300, 200, tid=7),  # the GPU-side copy: not a range
        # step 1: a sync that must not be counted (the first step is left out)
        X("cuda_runtime", "cudaStreamSynchronize", 150, 5),
        # step 2: an .item() (async copy + stream sync, one scalar read) and the step-end device sync
        X("cpu_op", "aten::item", 320, 30),
        X("cpu_op", "aten::_local_scalar_dense", 322, 25),
        X("cuda_runtime", "cudaMemcpyAsync", 325, 5),
        X("cuda_runtime", "cudaStreamSynchronize", 331, 10),
        X("cuda_runtime", "cudaDeviceSynchronize", 480, 15),
        X("cuda_runtime", "cudaLaunchKernel", 400, 2),
        # step 3: a synchronous cudaMemcpy and nothing else
        X("cuda_runtime", "cudaMemcpy", 600, 10),
        # device work
        X("kernel", "gemm", 110, 100, tid=7),
        X("kernel", "gemm", 310, 100, tid=7),
        X("kernel", "softmax", 420, 50, tid=7),
        X("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 200, 20, tid=7),
        X("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 340, 10, tid=7),  # inside the gemm: overlap
        X("gpu_memset", "Memset (Device)", 800, 30, tid=7),
        # outside the generation (the warm-up's last kernel): ignored
        X("kernel", "gemm", 2000, 500, tid=7),
    ]


def test_categories_and_top_kernels() -> None:
    d = digest(trace(), cuda=True, allocations={2: {"requests": 4, "cudaMallocs": 0, "retries": 0}})
    c = d["categories"]
    assert c["wallMs"] == pytest.approx(1.0)
    assert c["gpuKernelMs"] == pytest.approx(0.25), "kernels outside kino/generate must not count"
    assert c["memcpyMs"] == {"h2d": pytest.approx(0.02), "d2h": pytest.approx(0.01), "d2d": 0.0}
    assert c["memsetMs"] == pytest.approx(0.03)
    # busy: 110-220 (gemm + H2D, overlapping), 310-410 (gemm, D2H inside), 420-470, 800-830 = 290 us
    assert c["gpuIdleMs"] == pytest.approx(0.71), "idle is wall minus the union of device activity"
    assert c["cpuOpsMs"] == pytest.approx(0.03), "nested ops are counted once (top level only)"
    assert [(k["name"], k["calls"]) for k in d["topKernels"]] == [("gemm", 2), ("softmax", 1)]
    assert d["topKernels"][0]["percent"] == pytest.approx(80.0)
    assert d["phasesMs"] == {"text_encode": pytest.approx(0.1), "denoise": pytest.approx(0.6), "decode": pytest.approx(0.3)}


def test_host_syncs_per_step_after_the_first() -> None:
    d = digest(trace(), cuda=True, allocations={2: {"requests": 4, "cudaMallocs": 0, "retries": 0}})
    assert d["stepsProfiled"] == 3
    steps = {s["step"]: s for s in d["steps"]}
    assert sorted(steps) == [2, 3], "step 1 carries one-time work and is left out"
    assert steps[2]["hostSyncs"] == 2, "the .item()'s stream sync and the step-end device sync; async copies are not syncs"
    assert steps[2]["syncsByName"] == {"cudaDeviceSynchronize": 1, "cudaStreamSynchronize": 1}
    assert steps[2]["scalarReads"] == 1, "aten::item and the _local_scalar_dense inside it are one read"
    assert steps[2]["allocations"] == {"requests": 4, "cudaMallocs": 0, "retries": 0}
    assert steps[3]["hostSyncs"] == 1 and steps[3]["syncsByName"] == {"cudaMemcpy": 1}
    assert steps[3]["scalarReads"] == 0
    assert steps[3]["allocations"] is None


def test_on_the_cpu_gpu_fields_are_null() -> None:
    cpu_events = [e for e in trace() if e["cat"] in ("user_annotation", "cpu_op")]
    d = digest(cpu_events, cuda=False)
    c = d["categories"]
    assert (c["gpuKernelMs"], c["memcpyMs"], c["memsetMs"], c["gpuIdleMs"]) == (None, None, None, None)
    assert d["topKernels"] is None
    assert [(s["hostSyncs"], s["scalarReads"], s["allocations"]) for s in d["steps"]] == [(None, 1, None), (None, 0, None)]


def test_a_trace_without_the_generation_range_is_refused() -> None:
    with pytest.raises(ValueError, match="kino/generate"):
        digest([X("kernel", "gemm", 0, 10)], cuda=True)


@pytest.mark.parametrize("check_after_last", [True, False])
def test_step_ranges_follow_the_loops_checks(check_after_last: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop calls is_cancelled before each step (and, today, once after the last); each call
    moves the step range on, and the end of denoising closes whatever is still open."""
    import torch

    from kino_engine.profile import _Ranges

    ranges = _Ranges(torch.device("cpu"), steps=3)
    log: list[str] = []
    monkeypatch.setattr(ranges, "push", lambda name: log.append(f"+{name}"))
    monkeypatch.setattr(ranges, "pop", lambda: log.append("-"))
    ranges.on_phase("text_encode", "start", None)
    ranges.on_phase("text_encode", "end", 1.0)
    ranges.on_phase("denoise", "start", None)
    for _ in range(3):
        assert ranges.is_cancelled() is False, "profiling must never cancel the job"
    if check_after_last:
        ranges.is_cancelled()
    ranges.on_phase("denoise", "end", 1.0)
    ranges.on_phase("decode", "start", None)
    assert ranges.is_cancelled() is False
    ranges.on_phase("decode", "end", 1.0)
    assert log == [
        "+kino/text_encode", "-", "+kino/denoise", "+kino/step 1", "-", "+kino/step 2", "-", "+kino/step 3", "-", "-",
        "+kino/decode", "-",
    ]
