"""Video and PNG outputs: the formats promised, lossless PNGs, and all-or-nothing writes."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from kino_engine.protocol import EngineFailure, JobOutput
from kino_engine.video import check_outputs, write_outputs


@pytest.fixture
def frames() -> np.ndarray:
    # Smooth content (chroma subsampling keeps it): red across, green down, blue over time.
    f, y, x = np.meshgrid(np.arange(7), np.arange(48), np.arange(64), indexing="ij")
    return np.stack([x * 4, y * 5, f * 36], axis=-1).astype(np.uint8)  # (7, 48, 64, 3)


def _fails(code: str, field: str | None, call) -> EngineFailure:
    with pytest.raises(EngineFailure) as caught:
        call()
    assert (caught.value.code, caught.value.field) == (code, field), caught.value.to_json()
    return caught.value


def test_mp4_is_h264_yuv420p_with_all_frames(tmp_path: Path, frames: np.ndarray) -> None:
    video = tmp_path / "v.mp4"
    write_outputs(frames, JobOutput(str(video), None), fps=24.0)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert float(stream.average_rate) == 24.0
    assert len(decoded) == 7 and decoded[0].shape == (48, 64, 3)
    error = np.abs(np.stack(decoded).astype(int) - frames.astype(int)).mean()
    assert error < 4, f"decoded frames are far from the input (mean error {error:.1f}): channels or frames mixed up"
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"], "the temporary file was not renamed into place"


def test_png_sequence_is_lossless(tmp_path: Path, frames: np.ndarray) -> None:
    folder = tmp_path / "frames"
    write_outputs(frames, JobOutput(None, str(folder)), fps=16.0)
    names = sorted(os.listdir(folder))
    assert names == [f"frame_{i:05d}.png" for i in range(7)]
    for i, name in enumerate(names):
        assert np.array_equal(np.asarray(Image.open(folder / name)), frames[i]), f"{name} is not the exact frame"
    assert sorted(os.listdir(tmp_path)) == ["frames"], "the temporary folder was left behind"


def test_existing_frames_dir(tmp_path: Path, frames: np.ndarray) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_outputs(frames, JobOutput(None, str(empty)), fps=16.0)
    assert len(os.listdir(empty)) == 7, "an existing empty folder must be filled (replaced)"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _fails("OUTPUT_UNWRITABLE", "job.output.framesDir", lambda: check_outputs(JobOutput(None, str(full))))
    _fails("OUTPUT_UNWRITABLE", "job.output.framesDir", lambda: write_outputs(frames, JobOutput(None, str(full)), 16.0))
    assert os.listdir(full) == ["keep.txt"], "a non-empty folder must never be touched"
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"], "temporaries were left behind"


def test_unwritable_video_destinations(tmp_path: Path, frames: np.ndarray) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for target in (tmp_path / "missing" / "v.mp4", blocker / "v.mp4"):
        failure = _fails("OUTPUT_UNWRITABLE", "job.output.video", lambda: check_outputs(JobOutput(str(target), None)))
        assert str(target.parent) in failure.message
    _fails("OUTPUT_UNWRITABLE", "job.output.video", lambda: write_outputs(frames, JobOutput("/proc/kino.mp4", None), 16.0))
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_failure_after_staging_leaves_nothing(tmp_path: Path, frames: np.ndarray) -> None:
    occupied = tmp_path / "v.mp4"
    occupied.mkdir()
    (occupied / "x").write_text("x")  # os.replace cannot put a file over a non-empty folder
    _fails("OUTPUT_UNWRITABLE", "job.output.video", lambda: write_outputs(frames, JobOutput(str(occupied), None), 16.0))
    assert sorted(os.listdir(tmp_path)) == ["v.mp4"] and os.listdir(occupied) == ["x"], "temporaries were left behind"

    # The video is renamed into place first; if the frames then fail, the video goes too.
    video, frames_dir = tmp_path / "ok.mp4", tmp_path / "busy"
    frames_dir.mkdir()
    (frames_dir / "y").write_text("y")
    _fails("OUTPUT_UNWRITABLE", "job.output.framesDir",
           lambda: write_outputs(frames, JobOutput(str(video), str(frames_dir)), 16.0))
    assert not video.exists(), "a half-finished job left its video behind"
    assert sorted(os.listdir(tmp_path)) == ["busy", "v.mp4"], "temporaries were left behind"


def test_encoder_failure_is_classified(tmp_path: Path) -> None:
    odd = np.zeros((2, 47, 63, 3), dtype=np.uint8)  # yuv420p needs even sizes: libx264 refuses
    _fails("ENCODER_FAILED", None, lambda: write_outputs(odd, JobOutput(str(tmp_path / "odd.mp4"), None), 16.0))
    assert os.listdir(tmp_path) == [], "the failed encode left its temporary file"
