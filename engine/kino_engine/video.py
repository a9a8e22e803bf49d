"""Writes a job's frames: an MP4 (H.264, yuv420p, via PyAV/libx264) and/or a lossless PNG sequence.

Contract:
- `check_outputs(output)` runs before any work, so a job with an impossible destination fails in
  milliseconds, not after minutes of denoising.
- `write_outputs(frames, output, fps)` stages everything under temporary names in the destination's
  own folder, then renames into place (`os.replace`), so readers never see a half-written file. On
  any failure every temporary (and anything this call already renamed into place) is removed.
- The PNG folder must not exist, or be an empty folder (which is replaced); a non-empty folder or a
  file there is refused.
- Errors: OUTPUT_UNWRITABLE naming the field (job.output.video / job.output.framesDir),
  ENCODER_FAILED when the encoder itself fails.

Frames are uint8 (F, H, W, 3) RGB. This module knows nothing about models or the protocol's transport.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
from typing import Callable

import av
import numpy as np
from PIL import Image

from .protocol import EngineFailure, JobOutput

VIDEO_FIELD = "job.output.video"
FRAMES_FIELD = "job.output.framesDir"
#: x264 constant rate factor: 18 is visually lossless for most content.
DEFAULT_CRF = 18
#: zlib level for PNGs: every level is lossless; 1 is several times faster than the default 6.
PNG_COMPRESS_LEVEL = 1

# Temporaries are created private (0600/0700); finished outputs get the modes the umask gives new files.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _unwritable(field: str, message: str) -> EngineFailure:
    return EngineFailure("OUTPUT_UNWRITABLE", f"{field}: {message}", phase="encode", field=field)


def _check_parent(path: str, field: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise _unwritable(field, f"folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _unwritable(field, f"folder {parent} is not writable by this process")


def check_outputs(output: JobOutput) -> None:
    """Fail fast (OUTPUT_UNWRITABLE) on destinations that cannot be written."""
    if output.video is not None:
        _check_parent(output.video, VIDEO_FIELD)
        if os.path.isdir(output.video):
            raise _unwritable(VIDEO_FIELD, f"{output.video} is a folder")
    if output.frames_dir is not None:
        _check_parent(output.frames_dir, FRAMES_FIELD)
        _check_frames_target(output.frames_dir)


def _check_frames_target(path: str) -> None:
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise _unwritable(FRAMES_FIELD, f"{path} exists and is not a folder")
        if os.listdir(path):
            raise _unwritable(FRAMES_FIELD, f"{path} exists and is not empty (choose a new folder or empty it)")


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(10_000)


def encode_mp4(frames: np.ndarray, path: str, fps: float, crf: int = DEFAULT_CRF) -> None:
    """Encode uint8 frames (F, H, W, 3) to H.264/yuv420p MP4 at `path` (written directly)."""
    count, height, width, _ = frames.shape
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=_fps_fraction(fps))
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def write_png_sequence(frames: np.ndarray, folder: str) -> None:
    """frame_00000.png, frame_00001.png, ... in an existing folder."""
    for index, frame in enumerate(frames):
        Image.fromarray(frame, mode="RGB").save(
            os.path.join(folder, f"frame_{index:05d}.png"), format="PNG", compress_level=PNG_COMPRESS_LEVEL
        )


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def write_outputs(frames: np.ndarray, output: JobOutput, fps: float) -> None:
    """Write the requested outputs all-or-nothing (see the module docstring)."""
    staged: list[tuple[str, str, str]] = []  # (temporary, final, field)
    committed: list[str] = []
    try:
        if output.video is not None:
            staged.append((_stage_video(frames, output.video, fps), output.video, VIDEO_FIELD))
        if output.frames_dir is not None:
            staged.append((_stage_frames(frames, output.frames_dir), output.frames_dir, FRAMES_FIELD))
        for temporary, final, field in staged:
            if field == FRAMES_FIELD:
                _check_frames_target(final)
            try:
                os.replace(temporary, final)
            except OSError as exc:
                raise _unwritable(field, f"cannot move the finished output into place at {final}: {exc}") from exc
            committed.append(final)
    except BaseException:
        for temporary, _, _ in staged:
            _remove(temporary)
        for final in committed:
            _remove(final)
        raise


def _private_file(parent: str, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial.mp4", dir=parent)
    os.close(fd)
    os.chmod(path, 0o666 & ~_UMASK)
    return path


def _private_folder(parent: str, name: str) -> str:
    path = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    os.chmod(path, 0o777 & ~_UMASK)
    return path


def _stage(final: str, field: str, create: Callable[[str, str], str], write: Callable[[str], None]) -> str:
    """A temporary sibling of `final`, created and written; removed again if writing fails."""
    parent, name = os.path.split(os.path.abspath(final))
    try:
        temporary = create(parent, name)
    except OSError as exc:
        raise _unwritable(field, f"cannot create a temporary output in {parent}: {exc}") from exc
    try:
        write(temporary)
    except BaseException as exc:
        _remove(temporary)
        if isinstance(exc, av.FFmpegError):  # before OSError: some of PyAV's errors are both
            raise EngineFailure("ENCODER_FAILED", f"libx264 failed to encode {final}: {exc}", phase="encode") from exc
        if isinstance(exc, OSError):
            raise _unwritable(field, f"writing {final} failed: {exc}") from exc
        raise
    return temporary


def _stage_video(frames: np.ndarray, final: str, fps: float) -> str:
    return _stage(final, VIDEO_FIELD, _private_file, lambda path: encode_mp4(frames, path, fps))


def _stage_frames(frames: np.ndarray, final: str) -> str:
    return _stage(final, FRAMES_FIELD, _private_folder, lambda path: write_png_sequence(frames, path))
