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

- `StreamingMp4Writer` writes the MP4 alone while its frames are still being decoded (encoding on a
  background thread), with the same staging, rename and errors; the engine uses it when a job asks
  for an MP4 only.

Frames are uint8 (F, H, W, 3) RGB. This module knows nothing about models or the protocol's transport.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
import queue
import threading
from types import TracebackType
from typing import Any, Callable

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


class _Mp4Encoder:
    """One H.264/yuv420p MP4 written frame by frame, with the settings both the whole-video and the
    streamed path use (so for the same frames they write the same bytes)."""

    def __init__(self, path: str, fps: float, crf: int = DEFAULT_CRF):
        self.path, self.fps, self.crf = path, fps, crf
        self.container: Any = None
        self.stream: Any = None

    def add(self, frame: np.ndarray) -> None:
        """One uint8 (H, W, 3) RGB frame; the first one fixes the video's size."""
        if self.container is None:
            height, width, _ = frame.shape
            self.container = av.open(self.path, mode="w", format="mp4", options={"movflags": "+faststart"})
            self.stream = self.container.add_stream("libx264", rate=_fps_fraction(self.fps))
            self.stream.width = width
            self.stream.height = height
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf)}
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        self.container.mux(self.stream.encode(video_frame))

    def finish(self) -> None:
        """Flush the encoder's delayed frames and close the file."""
        if self.container is None:
            raise EngineFailure("ENCODER_FAILED", f"no frames to encode into {self.path}", phase="encode")
        container, self.container = self.container, None
        try:
            container.mux(self.stream.encode(None))
        finally:
            container.close()

    def abandon(self) -> None:
        """Close the file without flushing (it is about to be removed)."""
        container, self.container = self.container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001 - the encode already failed or was aborted; the file goes
                pass


def encode_mp4(frames: np.ndarray, path: str, fps: float, crf: int = DEFAULT_CRF) -> None:
    """Encode uint8 frames (F, H, W, 3) to H.264/yuv420p MP4 at `path` (written directly)."""
    encoder = _Mp4Encoder(path, fps, crf)
    try:
        for frame in frames:
            encoder.add(frame)
        encoder.finish()
    except BaseException:
        encoder.abandon()
        raise


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
        _raise_classified(exc, final, field)
    return temporary


def _raise_classified(exc: BaseException, final: str, field: str) -> None:
    """Raise a failure while writing `final` as its protocol error (other exceptions unchanged)."""
    if isinstance(exc, av.FFmpegError):  # before OSError: some of PyAV's errors are both
        raise EngineFailure("ENCODER_FAILED", f"libx264 failed to encode {final}: {exc}", phase="encode") from exc
    if isinstance(exc, OSError):
        raise _unwritable(field, f"writing {final} failed: {exc}") from exc
    raise exc


def _stage_video(frames: np.ndarray, final: str, fps: float) -> str:
    return _stage(final, VIDEO_FIELD, _private_file, lambda path: encode_mp4(frames, path, fps))


def _stage_frames(frames: np.ndarray, final: str) -> str:
    return _stage(final, FRAMES_FIELD, _private_folder, lambda path: write_png_sequence(frames, path))


class StreamingMp4Writer:
    """An MP4 encoded on a background thread while its frames are still being made.

        with StreamingMp4Writer(path, fps) as writer:
            for chunk in chunks:          # uint8 (F_i, H, W, 3)
                writer.write(chunk)       # queued; blocks only while the queue is full
            writer.finish()               # waits for the encoder, then renames into place

    The same all-or-nothing contract as `write_outputs`: frames go to a private temporary sibling of
    `path`, which `finish()` renames into place; on any failure (the encoder's, the rename's, or an
    exception in the `with` body) the temporary is removed and nothing is left at `path`. Leaving
    the `with` body normally without `finish()` finishes. Errors: OUTPUT_UNWRITABLE
    (job.output.video) when the temporary cannot be created or written or the rename fails,
    ENCODER_FAILED when libx264 fails; an encoder thread's failure is re-raised in the caller, at
    the next `write()` or at `finish()`.
    """

    #: Chunks waiting for the encoder (a Wan chunk is 4 frames: at 832x480, ~4.8 MB each).
    QUEUE_CHUNKS = 8
    _END = object()

    def __init__(self, path: str, fps: float, crf: int = DEFAULT_CRF, field: str = VIDEO_FIELD):
        self.path, self.fps, self.crf, self.field = path, fps, crf, field
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.QUEUE_CHUNKS)
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._temporary: str | None = None
        self._done = False
        self.frames = 0

    def __enter__(self) -> StreamingMp4Writer:
        parent, name = os.path.split(os.path.abspath(self.path))
        try:
            self._temporary = _private_file(parent, name)
        except OSError as exc:
            raise _unwritable(self.field, f"cannot create a temporary output in {parent}: {exc}") from exc
        self._thread = threading.Thread(target=self._encode, name="kino-mp4-encoder", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            if not self._done:
                self.finish()
        else:
            self._discard()

    def write(self, frames: np.ndarray) -> None:
        """Queue uint8 frames (F, H, W, 3) or one frame (H, W, 3) for encoding."""
        if self._done or self._thread is None:
            raise RuntimeError("StreamingMp4Writer.write outside its `with` block or after finish()")
        chunk = frames[None] if frames.ndim == 3 else frames
        while True:
            self._raise_encoder_error()
            try:
                self._queue.put(chunk, timeout=0.05)
                break
            except queue.Full:
                continue
        self.frames += len(chunk)

    def finish(self) -> None:
        """Wait for the encoder to flush and close the file, then rename it into place."""
        if self._done:
            return
        if self._thread is None:
            raise RuntimeError("StreamingMp4Writer.finish outside its `with` block")
        try:
            self._put_end()
            self._thread.join()
            self._raise_encoder_error()
            try:
                os.replace(self._temporary, self.path)  # type: ignore[arg-type]
            except OSError as exc:
                raise _unwritable(self.field, f"cannot move the finished output into place at {self.path}: {exc}") from exc
            self._done = True
        except BaseException:
            self._discard()
            raise

    # ---- internals ----

    def _put_end(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            try:
                self._queue.put(self._END, timeout=0.05)
                return
            except queue.Full:
                continue

    def _raise_encoder_error(self) -> None:
        if self._error is not None:
            _raise_classified(self._error, self.path, self.field)

    def _discard(self) -> None:
        """Stop the encoder (without flushing) and remove the temporary."""
        self._done = True
        self._abort.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:  # unblock an encoder waiting for frames; a full queue means it is busy and sees the abort
                    self._queue.put_nowait(self._END)
                except queue.Full:
                    pass
                self._thread.join(timeout=0.05)
        if self._temporary is not None:
            _remove(self._temporary)

    def _encode(self) -> None:
        encoder = _Mp4Encoder(self._temporary, self.fps, self.crf)  # type: ignore[arg-type]
        try:
            while not self._abort.is_set():
                chunk = self._queue.get()
                if chunk is self._END:
                    if not self._abort.is_set():
                        encoder.finish()
                    return
                for frame in chunk:
                    if self._abort.is_set():
                        break
                    encoder.add(frame)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self._error = exc
        finally:
            encoder.abandon()  # no-op after finish()
            if self._error is not None or self._abort.is_set():
                self._drain()

    def _drain(self) -> None:
        """Empty the queue so a producer blocked on it wakes up and sees the error."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
