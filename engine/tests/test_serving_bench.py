"""`python -m kino_engine.serving_bench` on the tiny model, on the CPU: the real worker over its real
protocol; the figures it reports are consistent with each other (the GPU run is what they are for),
a bad spec is refused before any worker starts, and a failing worker is shut down and its code kept."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import engine_env
from kino_engine.protocol import EngineFailure
from kino_engine.serving_bench import parse_spec

JOB = {
    "prompt": "a cat", "negativePrompt": "bad", "width": 80, "height": 48, "frames": 9, "steps": 3,
    "guidance": 5.0, "shift": None, "seed": 3, "fps": None,
}
PROVENANCE = {"command": "test", "commit": None, "dirty": None}


def _model(path: Path) -> dict[str, Any]:
    return {"name": "tiny", "source": {"kind": "checkpoint", "path": str(path)}, "device": "cpu", "dtype": "float32"}


def _run(spec: dict[str, Any], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "kino_engine.serving_bench", "--spec", str(path)],
        env=engine_env(), capture_output=True, text=True, timeout=600,
    )
    return done, json.loads(done.stdout.strip().splitlines()[-1])


def _worker_pid(stderr: str) -> int:
    match = re.search(r"\[serving-bench\] worker (\d+) exited with status 0", stderr)
    assert match, f"the tool must shut its worker down through the protocol (exit 0) and say so:\n{stderr[-3000:]}"
    return int(match.group(1))


def test_serving_bench_measures_a_warm_engine(tiny_checkpoint: Path, tmp_path: Path) -> None:
    spec = {
        "model": _model(tiny_checkpoint),
        "warmupSteps": None,
        "ttfs": {"job": JOB, "runs": 2},
        "throughput": [{"job": {**JOB, "steps": 2}, "rounds": 1, "batch": 2}],
        "provenance": PROVENANCE,
    }
    done, answer = _run(spec, tmp_path)
    assert done.returncode == 0 and answer["ok"], f"{answer}\n{done.stderr[-3000:]}"
    result = answer["result"]
    assert result["spec"] == spec, "the spec is echoed back: a result measured elsewhere carries its job"
    assert result["worker"]["exitStatus"] == 0, "the worker must end through shutdown, not be killed"
    for kind in ("newPrompt", "cachedPrompt"):
        figures = result["timeToFirstStep"][kind]
        assert len(figures["ttfsMs"]["values"]) == 2
        for ttfs, denoise, total in zip(figures["ttfsMs"]["values"], figures["toDenoiseStartMs"]["values"], figures["requestMs"]["values"]):
            assert 0 < denoise < total and 0 < ttfs < total, f"the first step starts inside its request: {figures}"
        stats = figures["ttfsMs"]
        assert stats["min"] <= stats["median"] <= stats["max"]
    # Each request has two prompts; a new prompt misses once (its negative prompt is cached since the
    # warm-up), a repeated one never: otherwise "new" and "cached" would not measure what they say.
    assert result["timeToFirstStep"]["newPrompt"]["promptCache"] == {"hits": 2, "misses": 2}
    assert result["timeToFirstStep"]["cachedPrompt"]["promptCache"] == {"hits": 4, "misses": 0}
    case = result["throughput"][0]
    assert case["jobs"] == 2 and case["job"]["steps"] == 2
    assert case["batchedS"]["median"] > 0 and case["sequentialS"]["median"] > 0
    assert abs(case["throughputRatio"] - case["sequentialS"]["median"] / case["batchedS"]["median"]) < 1e-9
    assert abs(case["batchedJobsPerS"] / case["sequentialJobsPerS"] - case["throughputRatio"]) < 1e-9
    steps = case["stepMs"]
    assert len(steps["batched"]["values"]) == 2, "one batched loop per round: its steps once, not once per job"
    assert len(steps["sequential"]["values"]) == 2 * 2, "two jobs of two steps each per round"
    assert all(ms > 0 for form in steps.values() for ms in form["values"])
    assert steps["batched"]["median"] * 2 < case["batchedS"]["median"] * 1000, "the steps lie within the round's wall time"
    assert result["environment"]["torch"], "the record must say which torch measured it"
    pid = _worker_pid(done.stderr)
    assert result["worker"]["pid"] == pid
    assert not os.path.exists(f"/proc/{pid}"), "the worker process must be gone"


def test_a_failing_worker_is_shut_down_and_its_code_kept(tmp_path: Path) -> None:
    spec = {"model": _model(tmp_path / "missing"), "ttfs": {"job": JOB, "runs": 1}, "provenance": PROVENANCE}
    done, answer = _run(spec, tmp_path)
    assert done.returncode == 1 and not answer["ok"]
    assert answer["error"]["code"] == "BAD_CHECKPOINT", f"the worker's code must reach the answer: {answer}"
    assert not os.path.exists(f"/proc/{_worker_pid(done.stderr)}"), "the worker process must be gone after a failure"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ttfs": {"job": JOB, "runs": 0}}, "ttfs.runs"),
        ({"ttfs": {"job": {**JOB, "frames": 0}, "runs": 1}}, "ttfs.job.frames"),
        ({"throughput": [{"job": JOB, "rounds": 1, "batch": 1}]}, "throughput.0.batch"),
        ({"throughput": [{"job": JOB, "rounds": True, "batch": 2}]}, "throughput.0.rounds"),
        ({"warmupSteps": 0}, "warmupSteps"),
        ({"model": {"name": "tiny"}}, "model.source"),
    ],
)
def test_a_bad_spec_names_its_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    spec = {"model": _model(tmp_path), "ttfs": {"job": JOB, "runs": 1}, **change}
    with pytest.raises(EngineFailure) as refused:
        parse_spec(spec)
    assert (refused.value.code, refused.value.field) == ("BAD_REQUEST", field), refused.value.message
