"""Flat host byte buffers holding a module's tensors, and the copies from them onto the device.

The placements (placement.py) and the disk tier (disk.py) keep weights off the device in flat byte
buffers: every tensor of a module at an aligned offset (`layout`), viewed with its dtype and shape
(`view_as`). `HostBuffer` is such a buffer, page-locked where CUDA is available so that copies from
it are asynchronous DMA. `copy_on_stream` queues one host→device copy on a side stream behind an
event, the one primitive both streaming sources use.

It knows nothing about plans, models or files.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("kino.placement")

#: Byte alignment of each tensor inside a flat buffer (covers every dtype's alignment and vector loads).
ALIGN = 512


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's parameters and buffers (state-dict names), each once, in a fixed order."""
    seen: set[int] = set()
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, each once, in `named_tensors`' order."""
    return [t for _, t in named_tensors(module)]


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Offsets of each tensor in a flat byte buffer, and the buffer's size."""
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += aligned(t.numel() * t.element_size())
    return offsets, size


def view_as(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped and typed like `like` over buffer[offset:] (buffer is flat uint8)."""
    nbytes = like.numel() * like.element_size()
    return buffer[offset : offset + nbytes].view(like.dtype).view(like.shape)


class HostBuffer:
    """One flat host byte buffer, page-locked where CUDA is available so copies from it are async DMA.

    It is allocated at its exact size and registered with cudaHostRegister, rather than taken from
    torch's pinned allocator, which rounds each allocation up to a power of two (a 1.1 GiB block would
    pin 2 GiB). If registering fails, it falls back to torch's pinned allocator and says so.
    """

    def __init__(self, nbytes: int, pin: bool):
        self.nbytes = nbytes
        self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self.registered = False
        self.pinned = False
        if pin:
            if _host_register(self.buffer):
                self.registered = self.pinned = True
            else:
                log.warning("placement: cudaHostRegister failed; using torch's pinned allocator (rounds up to 2^k)")
                self.buffer = self.buffer.pin_memory()
                self.pinned = True

    def view(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        return view_as(self.buffer, offset, like)

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False


def _host_register(buffer: torch.Tensor) -> bool:
    try:
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    except Exception:  # noqa: BLE001 - any failure means "not registered"; the caller falls back
        return False
    return int(err) == 0


def adopt(host: HostBuffer, base: int, tensors: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Copy `tensors` into `host` at base + their offsets and point them there; returns the views.
    Each tensor's original storage (device or pageable host) is released as it moves."""
    views = []
    for t, offset in zip(tensors, offsets):
        view = host.view(base + offset, t)
        view.copy_(t.data)
        t.data = view
        views.append(view)
    return views


def to_device(tensors: list[torch.Tensor], views: list[torch.Tensor], device: torch.device) -> None:
    """Point `tensors` at fresh device copies of their host views (a placement undone)."""
    for t, view in zip(tensors, views):
        t.data = view.to(device, copy=True)


def copy_on_stream(
    src: torch.Tensor, dst: torch.Tensor, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None
) -> torch.cuda.Event | None:
    """Copy host bytes `src` into `dst`. With a stream (CUDA): queued there behind `after` (the end of
    the last compute reading `dst`), returning the event that marks the copy's end; without one (the
    CPU), a plain copy, done on return (None)."""
    if stream is None:
        dst.copy_(src)
        return None
    if after is not None:
        stream.wait_event(after)
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event
