"""Tensors in safetensors files, read by byte range into memory kino owns; and a streaming writer.

`WeightIndex.of_files(paths)` reads each file's header (validated by safetensors_check) and maps every
tensor name to its file, absolute byte offset, dtype and shape. `read_into(name, dest)` reads that
range straight into `dest`'s memory (a pinned staging buffer) with positional reads, converting the
dtype on the way where the file's differs from `dest`'s (a float32 checkpoint run in bf16), through a
small fixed chunk buffer rather than a tensor-sized temporary.

Why positional reads (pread) of the header's offsets and not a memory map: a mapping counts every page
it touches in the process's resident set (RssFile) and keeps them mapped while it is open, so reading
a 28 GB transformer through one would look like a 28 GB process and pin nothing useful; pread goes
through the page cache only, which the kernel reclaims under pressure. The bytes are the same ones
safetensors' own mmap would expose. A read releases the GIL while the kernel copies.

`write_safetensors(path, items)` writes named tensors (on any device) as one safetensors file, holding
one tensor at a time in host memory (the header is computed from shapes and dtypes first).

It knows nothing about models, plans or devices beyond `Tensor.to("cpu")`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from ..safetensors_check import check_safetensors, data_start

#: safetensors' dtype names for the torch dtypes kino stores.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

#: Bytes converted at a time when a file's dtype differs from the destination's.
CONVERT_CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: a file and the absolute byte range in it."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _flat_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pread_exactly(fd: int, into: memoryview, offset: int) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done} (the file shrank while open?)")
        done += n


class WeightIndex:
    """Tensor name -> location over a set of safetensors files; reads ranges into given tensors.

    File descriptors are opened on first use and kept until `close()`. Reads are positional, so
    several threads may read at once; `read_into` with a dtype conversion uses the caller's chunk
    buffer (one per thread) or a fresh one.
    """

    def __init__(self, locations: dict[str, TensorLocation]):
        self.locations = locations
        self._fds: dict[str, int] = {}

    @classmethod
    def of_files(cls, paths: list[str] | tuple[str, ...]) -> WeightIndex:
        """Every tensor of the files (a checkpoint component's shards). Raises ValueError for a dtype
        kino does not read and safetensors_check.CorruptSafetensors for a damaged file."""
        locations: dict[str, TensorLocation] = {}
        for path in paths:
            base = data_start(path)
            for name, entry in check_safetensors(path).items():
                dtype = TORCH_DTYPES.get(entry.dtype)
                if dtype is None:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {entry.dtype}, which kino does not read")
                locations[name] = TensorLocation(path, base + entry.begin, entry.end - entry.begin, dtype, entry.shape)
        return cls(locations)

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def __getitem__(self, name: str) -> TensorLocation:
        return self.locations[name]

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def open_all(self) -> None:
        """Open every file now (so that a scratch file can be unlinked at once and still be read)."""
        for location in self.locations.values():
            self._fd(location.path)

    def check(self, name: str, like: torch.Tensor) -> None:
        """Refuse (ValueError) a tensor `read_into` could not fill `like` from."""
        location = self.locations.get(name)
        if location is None:
            raise ValueError(f"tensor {name!r} is not in the weight files")
        if tuple(location.shape) != tuple(like.shape):
            raise ValueError(f"tensor {name!r}: the model expects shape {tuple(like.shape)}, the file has {location.shape}")
        if location.dtype != like.dtype and not (location.dtype.is_floating_point and like.dtype.is_floating_point):
            raise ValueError(f"tensor {name!r}: the file's {location.dtype} does not convert to the model's {like.dtype}")

    def read_into(self, name: str, dest: torch.Tensor, chunk: torch.Tensor | None = None) -> int:
        """Fill the contiguous CPU tensor `dest` with tensor `name`; returns the bytes read from disk."""
        location = self.locations[name]
        if dest.device.type != "cpu" or not dest.is_contiguous():
            raise ValueError(f"tensor {name!r}: reads go into contiguous host memory")
        fd = self._fd(location.path)
        if location.dtype == dest.dtype:
            _pread_exactly(fd, _flat_bytes(dest), location.offset)
            return location.nbytes
        # Convert through a fixed chunk buffer: element by element, as Tensor.to(dtype) rounds.
        if chunk is None:
            chunk = torch.empty(CONVERT_CHUNK, dtype=torch.uint8)
        size = location.dtype.itemsize
        per_chunk = chunk.numel() // size
        flat = dest.reshape(-1)
        raw = _flat_bytes(chunk)
        for start in range(0, flat.numel(), per_chunk):
            count = min(per_chunk, flat.numel() - start)
            _pread_exactly(fd, raw[: count * size], location.offset + start * size)
            flat[start : start + count].copy_(chunk[: count * size].view(location.dtype))
        return location.nbytes

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def write_safetensors(path: str, items: list[tuple[str, torch.Tensor]]) -> None:
    """Write `items` (name, tensor on any device) as a safetensors file, one tensor in host memory at
    a time. Raises ValueError for a dtype the format has no name for here."""
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name, t in items:
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: {t.dtype} has no safetensors name here")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            f.write(_flat_bytes(t.detach().to("cpu").contiguous()))
