"""The disk tier: transformer blocks streamed from safetensors files through a small pinned staging ring.

When host RAM cannot hold the streamed blocks (a "streamed" placement with source "disk"), their bytes
stay in files: the checkpoint's own shards (the loader leaves the blocks unloaded, see
pipelines/wan_components.py), or, for a model that exists only in memory (random weights, weights
quantized at load), a scratch safetensors file written once at placement (`disk_index`). Host memory
holds `STAGING_BUFFERS` block-sized pinned buffers (the ring), never the blocks; the OS page cache
may keep file pages, which it reclaims under pressure.

The schedule is BlockStreamer's (placement.py): streamed execution k uses device slot k mod S, and its
copy is queued S-1 executions early behind the event that ends the slot's last reader. `DiskBlocks` is
the streamer's source of those copies. Where the RAM source queues the host-to-device copy itself,
this one hands the request to a reader thread (one worker: requests run in the order issued). For
each request the reader waits until its staging buffer's previous host-to-device copy has finished
(a CUDA event waited on in the reader, never in the compute thread), reads the block's tensors from
the files into the buffer (positional reads, weight_files.py), queues the same host-to-device copy on
the copy stream behind the slot's last reader, and answers with the copy's event. The compute thread
waits for that answer only when the block is needed (`ready`): when the disk is slower than the
compute, the device has nothing else to do by then anyway. With two staging buffers the reader reads
one block while the previous one crosses the bus.

On a CPU "device" the copies are plain copies and there are no events; the structure is the same.

Between calls a streamed block's parameters point at placeholders: zero-stride views of one element,
shaped and typed like the weights (a parameter cannot point at the meta device and back).

It decides nothing: the plan says which blocks stream; the Placer says from which files.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .host_memory import HostBuffer, copy_on_stream, named_tensors, to_device
from .weight_files import CONVERT_CHUNK, WeightIndex, write_safetensors

log = logging.getLogger("kino.placement")

#: Block-sized pinned host buffers the reader fills in turn (the planner's DISK_STAGING_BUFFERS).
STAGING_BUFFERS = 2
#: Where scratch files go inside the runtime's cache folder.
SCRATCH_FOLDER = "disk-blocks"


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """A host tensor of `like`'s shape and dtype that holds one element (every stride 0)."""
    return torch.zeros((), dtype=like.dtype).expand(like.shape)


class DiskBlocks:
    """BlockStreamer's source for blocks read from files: block p is tensors `names[p]` of `index`."""

    kind = "disk"

    def __init__(
        self,
        names: list[list[str]],
        tensors: list[list[torch.Tensor]],
        offsets: list[int],
        block_bytes: int,
        device: torch.device,
        index: WeightIndex,
        staging: int = STAGING_BUFFERS,
    ):
        for block_names, block in zip(names, tensors):
            for name, t in zip(block_names, block):
                index.check(name, t)
        self.names, self.index, self.block_bytes = names, index, block_bytes
        like = tensors[0]
        self.ring = [HostBuffer(block_bytes, pin=device.type == "cuda") for _ in range(min(staging, len(names)))]
        self.ring_views = [[buffer.view(offset, t) for t, offset in zip(like, offsets)] for buffer in self.ring]
        # The event ending the last copy out of each staging buffer; read and written by the reader only.
        self.ring_copied: list[torch.cuda.Event | None] = [None] * len(self.ring)
        self.turn = 0  # the staging buffer of the next request (requests run in order)
        converts = any(index[n].dtype != t.dtype for n, t in zip(names[0], like))
        self.chunk = torch.empty(CONVERT_CHUNK, dtype=torch.uint8) if converts else None
        self.placeholders = [placeholder(t) for t in like]
        for block in tensors:
            for t, stand_in in zip(block, self.placeholders):
                t.data = stand_in  # releases whatever the tensor held (a scratch file has its bytes now)
        self.reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kino-disk-reader")
        self.bytes_read = 0
        self.reads = 0
        self._closer = weakref.finalize(self, _close, self.reader, index, self.ring, self.ring_copied)

    @property
    def pinned_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.ring if buffer.pinned)

    @property
    def host_bytes(self) -> int:
        """Host bytes this source holds: the ring and the conversion chunk (the page cache aside)."""
        return sum(buffer.nbytes for buffer in self.ring) + (self.chunk.numel() if self.chunk is not None else 0)

    def rest_views(self, p: int) -> list[torch.Tensor]:
        """What block p's tensors point at between calls."""
        return self.placeholders

    def copy(
        self, p: int, slot: torch.Tensor, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None
    ) -> Future[torch.cuda.Event | None]:
        """Queue block p into `slot` (behind `after` on `stream`); `ready` gives the copy's event."""
        j = self.turn
        self.turn = (j + 1) % len(self.ring)
        return self.reader.submit(self._read_and_copy, p, j, slot, stream, after)

    @staticmethod
    def ready(handle: Future[torch.cuda.Event | None]) -> torch.cuda.Event | None:
        # A host wait, but only for the disk: the reader is behind exactly when the disk is slower
        # than the compute, and the copy's event does not exist before the read is done.
        return handle.result()

    def _read_and_copy(
        self, p: int, j: int, slot: torch.Tensor, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None
    ) -> torch.cuda.Event | None:
        previous = self.ring_copied[j]
        if previous is not None:
            previous.synchronize()  # the last copy out of this buffer has left it (the reader waits, not the compute)
        self._read(p, self.ring_views[j])
        # The slots may be inference tensors (allocated inside the loop's inference_mode, which is
        # per thread): writing them from this thread needs the same mode.
        with torch.inference_mode():
            event = copy_on_stream(self.ring[j].buffer, slot, stream, after)
        self.ring_copied[j] = event
        return event

    def _read(self, p: int, views: list[torch.Tensor]) -> None:
        for name, view in zip(self.names[p], views):
            self.bytes_read += self.index.read_into(name, view, self.chunk)
        self.reads += 1

    def restore(self, tensors: list[list[torch.Tensor]], device: torch.device) -> None:
        """Every block's tensors onto `device` again (read once more from the files); then closed."""
        self.reader.shutdown(wait=True)
        _drain(self.ring_copied)  # the staging buffers are rewritten below: their queued copies must be done
        for p, block in enumerate(tensors):
            self._read(p, self.ring_views[0])
            to_device(block, self.ring_views[0], device)  # a synchronous copy: the buffer is free after it
        self.close()

    def close(self) -> None:
        self._closer()


def _drain(copied: list[torch.cuda.Event | None]) -> None:
    """Wait until the last copy out of each staging buffer has finished."""
    for event in copied:
        if event is not None:
            event.synchronize()


def _close(
    reader: ThreadPoolExecutor, index: WeightIndex, ring: list[HostBuffer], copied: list[torch.cuda.Event | None]
) -> None:
    reader.shutdown(wait=True)
    _drain(copied)  # no copy may still read a buffer about to be unregistered
    index.close()
    for buffer in ring:
        buffer.close()


def scratch_index(items: list[tuple[str, torch.Tensor]], folder: Path) -> WeightIndex:
    """Write `items` to a new safetensors file in `folder` and index it. The file is unlinked as soon
    as it is open: its space returns when the index closes, or when the process dies."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"blocks-{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors"
    try:
        write_safetensors(str(path), items)
        index = WeightIndex.of_files([str(path)])
        index.open_all()
    finally:
        path.unlink(missing_ok=True)
    return index


#: Filesystems whose files live in RAM: a scratch file there would hold the blocks in memory after all.
RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem holding `path` (the longest mount point over it in /proc/self/mounts);
    None where that cannot be read."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    longest, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(longest):
            longest, kind = mount, fields[2]
    return kind


def scratch_folder(cache_dir: Path | None) -> Path:
    """`<cache_dir>/disk-blocks`, or the system's temporary folder without a cache folder."""
    folder = (cache_dir / SCRATCH_FOLDER) if cache_dir is not None else Path(tempfile.gettempdir()) / f"kino-{SCRATCH_FOLDER}"
    kind = filesystem_type(folder.parent)
    if kind in RAM_FILESYSTEMS:
        log.warning("placement: the scratch folder %s is on %s, which holds files in RAM", folder, kind)
    return folder


def disk_index(
    owner: torch.nn.Module,
    attr: str,
    resident_blocks: int,
    weights: WeightIndex | None,
    cache_dir: Path | None,
    device: torch.device,
) -> WeightIndex:
    """The files `owner.<attr>[resident_blocks:]` stream from, the model made ready to stream them.

    Blocks left unloaded by the loader (on the meta device) are read from `weights` (the checkpoint's
    files): the resident ones onto `device`, the streamed ones become placeholders. Blocks in memory
    (random weights, quantized at load) are written to a scratch file first. Raises ValueError when
    neither applies.
    """
    blocks = getattr(owner, attr)
    named = [[(f"{attr}.{b}.{local}", t) for local, t in named_tensors(block)] for b, block in enumerate(blocks)]
    streamed = [item for block in named[resident_blocks:] for item in block]
    unloaded = [t.is_meta for _, t in streamed]
    if not any(unloaded):
        folder = scratch_folder(cache_dir)
        log.info("placement: writing %d streamed blocks to a scratch file in %s", len(blocks) - resident_blocks, folder)
        return scratch_index(streamed, folder)
    if not all(unloaded):
        raise ValueError("the streamed blocks are partly loaded: cannot tell where their weights are")
    if weights is None:
        raise ValueError("the transformer's blocks were not loaded and no weight files were given to read them from")
    from ..quant.skeleton import assign  # the loaders' primitive (imports the quant package: only here)

    for b, block in enumerate(named):
        for name, t in block:
            if not t.is_meta:
                continue
            weights.check(name, t)
            if b < resident_blocks:
                host = torch.empty(t.shape, dtype=t.dtype)
                weights.read_into(name, host)
                assign(owner, name, host.to(device))
            else:
                assign(owner, name, placeholder(t))
    return weights
