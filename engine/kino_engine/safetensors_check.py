"""Checks a .safetensors file's structure from its header alone, without loading any tensor.

Format: 8 bytes little-endian header length N, N bytes of JSON header, then the data section.
Each header entry (except "__metadata__") is {dtype, shape, data_offsets: [begin, end]} relative to
the data section. A sound file has every tensor's byte range matching its dtype and shape, the ranges
tiling the data section without gaps or overlaps, and a size of exactly 8 + N + the last offset.

`check_safetensors(path)` returns the header's tensor table or raises `CorruptSafetensors` saying
what is wrong. It reads at most 8 + N bytes; `data_start(path)` is where the data section begins
(8 + N). It knows nothing about checkpoints or models.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

#: Generous cap on the JSON header (the format's reference implementation refuses > 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


class CorruptSafetensors(Exception):
    """The file is truncated or its header is garbled; the message says which and how."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def check_safetensors(path: str) -> dict[str, TensorEntry]:
    """Tensor name -> entry for a structurally sound file; raises CorruptSafetensors otherwise."""
    size = os.path.getsize(path)
    if size < 8:
        raise CorruptSafetensors(f"is {size} bytes long, too short to hold a safetensors header (truncated)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise CorruptSafetensors(f"declares a {header_len}-byte header (garbled header)")
        if 8 + header_len > size:
            raise CorruptSafetensors(
                f"declares a {header_len}-byte header but the file is {size} bytes long (truncated)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSafetensors(f"has a header that is not valid JSON ({exc}) (garbled header)") from None
    if not isinstance(header, dict):
        raise CorruptSafetensors("has a header that is not a JSON object (garbled header)")

    entries = {name: _entry(name, value) for name, value in header.items() if name != "__metadata__"}
    data_size = size - 8 - header_len
    spans = sorted((entry.begin, entry.end, name) for name, entry in entries.items())
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise CorruptSafetensors(f"tensor {name!r} {what} (garbled header)")
        position = end
    if position > data_size:
        raise CorruptSafetensors(
            f"header says {position} bytes of tensor data, the file has {data_size} (truncated)"
        )
    if position < data_size:
        raise CorruptSafetensors(
            f"has {data_size - position} bytes after the last tensor (garbled header or a corrupt file)"
        )
    return entries


def data_start(path: str) -> int:
    """Byte offset in the file of its data section (the entries' offsets count from there)."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len


def _entry(name: str, value: object) -> TensorEntry:
    if not isinstance(value, dict):
        raise CorruptSafetensors(f"tensor {name!r} has no entry object (garbled header)")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CorruptSafetensors(f"tensor {name!r} has unknown dtype {dtype!r} (garbled header)")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptSafetensors(f"tensor {name!r} has an invalid shape {shape!r} (garbled header)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptSafetensors(f"tensor {name!r} has invalid data_offsets {offsets!r} (garbled header)")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    expected = (bits + 7) // 8
    if offsets[1] - offsets[0] != expected:
        raise CorruptSafetensors(
            f"tensor {name!r} ({dtype} {shape}) should take {expected} bytes, its offsets span "
            f"{offsets[1] - offsets[0]} (garbled header)"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
