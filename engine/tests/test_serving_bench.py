"""`python -m kino_engine.serving_bench` on the tiny model, on the CPU: the real worker over its real
protocol; the figures it reports are consistent with each other (the GPU run is what they are for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import engine_env

JOB = {
    "prompt": "a cat", "negativePrompt": "bad", "width": 80, "height": 48, "frames": 9, "steps": 3,
    "guidance": 5.0, "shift": None, "seed": 3, "fps": None,
}


def test_serving_bench_measures_a_warm_engine(tiny_checkpoint: Path, tmp_path: Path) -> None:
    spec = {
        "model": {"name": "tiny", "source": {"kind": "checkpoint", "path": str(tiny_checkpoint)}, "device": "cpu", "dtype": "float32"},
        "ttfs": {"job": JOB, "runs": 2},
        "throughput": [{"job": {**JOB, "steps": 2}, "rounds": 1, "batch": 2}],
        "provenance": {"command": "test", "commit": None, "dirty": None},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "kino_engine.serving_bench", "--spec", str(path)],
        env=engine_env(), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["ok"], answer
    result = answer["result"]
    for kind in ("newPrompt", "cachedPrompt"):
        figures = result["timeToFirstStep"][kind]
        assert len(figures["ttfsMs"]["values"]) == 2
        for ttfs, denoise, total in zip(figures["ttfsMs"]["values"], figures["toDenoiseStartMs"]["values"], figures["requestMs"]["values"]):
            assert 0 < ttfs < total and 0 < denoise < total, figures
    case = result["throughput"][0]
    assert case["jobs"] == 2 and case["batchedS"]["median"] > 0 and case["sequentialS"]["median"] > 0
    assert abs(case["throughputRatio"] - case["sequentialS"]["median"] / case["batchedS"]["median"]) < 1e-9
    assert result["environment"]["torch"], "the record must say which torch measured it"
