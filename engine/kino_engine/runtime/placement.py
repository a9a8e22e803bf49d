"""Executes the planner's placements: where each component's weights live during a generation.

The control plane's planner (src/planner/plan.ts) decides; this module carries the decision out.
A `MemoryPlan` names, for the text encoder, the transformer and the VAE, one `Placement`:

- "resident": on the device for the whole generation (what `load` does by default);
- "swapped": in one host buffer (pinned where CUDA is available) and copied onto the device only
  while its phase runs (`Placer.active(name)`); nothing is copied back, the weights do not change;
- "streamed" (transformer only): the model's non-block modules and its first `resident_blocks`
  blocks stay on the device; the other blocks live in one pinned host buffer and are copied, a
  block at a time, into `prefetch + 1` device slots on a side CUDA stream, `prefetch` blocks ahead
  of the one computing. The host holds one copy of the streamed weights, not two; the slots exist
  only during the transformer's phase (text encode and decode get their memory). With `source`
  "disk" the streamed blocks stay in safetensors files instead and pass through a pinned staging
  ring of two blocks on their way (disk.py): for hosts whose RAM is smaller than the weights;
- "cpu" (text encoder only): stays on the host and runs there; its output moves to the device.

`vram_budget` caps the bytes the engine process may hold on the device (torch's per-process memory
fraction), so a small card can be tested on a big one.

How the streaming works. Every streamed block has the same tensors (shapes, dtypes, order), so one
byte layout serves all of them: block b's bytes are `host[b]` in the pinned buffer, and device slot s
is a flat buffer with the same layout. A block's parameters point (`.data`) at its host bytes between
calls and at its slot's bytes during its forward. The streamed blocks run in a fixed cyclic order
(one forward runs them all, the next forward starts over), so the k-th streamed block execution since
the start (its ticket) uses slot k mod S, and its copy can be issued S-1 executions early: when ticket
k starts computing, the copy of ticket k+S-1 is queued on the copy stream behind an event marking the
end of ticket k-1's compute (the slot's previous user). The compute stream waits on the copy's event
only, so copies overlap compute and the host never blocks. A forward interrupted midway (an exception,
a cancellation) breaks the cyclic order; the next block call notices and starts the cycle again.

Where a streamed block's bytes come from is the streamer's source: `RamBlocks` (one pinned host
buffer holding every streamed block, its copies queued inline) or disk.DiskBlocks (files read by a
reader thread into a staging ring, then the same copy). The schedule above is the same for both.

The transformer's own forward iterates `self.blocks`; the streamer replaces that ModuleList with a
subclass whose iteration yields callables doing before/forward/after, so the blocks (and their
compiled forms) are untouched and state-dict names stay the same.

Nothing here decides anything; `validate` checks that a plan is executable for a model.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

import torch

from .disk import DiskBlocks, disk_index
from .host_memory import HostBuffer, adopt, copy_on_stream, layout, module_tensors, named_tensors, to_device, view_as
from .weight_files import WeightIndex

log = logging.getLogger("kino.placement")

PlacementKind = Literal["resident", "swapped", "streamed", "cpu"]
PLACEMENT_KINDS: tuple[str, ...] = ("resident", "swapped", "streamed", "cpu")
COMPONENTS: tuple[str, ...] = ("text_encoder", "transformer", "vae")
#: Which kinds each component accepts.
ALLOWED: dict[str, tuple[str, ...]] = {
    "text_encoder": ("resident", "swapped", "cpu"),
    "transformer": ("resident", "swapped", "streamed"),
    "vae": ("resident", "swapped"),
}
#: Where a streamed placement's blocks live off the device: pinned host RAM, or files on disk.
SOURCES: tuple[str, ...] = ("ram", "disk")
#: The transformer's ModuleList of repeated blocks, the ones a "streamed" placement streams.
BLOCKS_ATTR = "blocks"


@dataclass(frozen=True)
class Placement:
    kind: str = "resident"
    #: "streamed": how many of the transformer's blocks stay on the device (the first ones).
    resident_blocks: int = 0
    #: "streamed": how many blocks are copied ahead of the one computing (device slots = prefetch + 1).
    prefetch: int = 1
    #: "streamed": where the streamed blocks live, "ram" (one pinned host buffer) or "disk" (files).
    source: str = "ram"

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENT_KINDS:
            raise ValueError(f"kind must be one of {PLACEMENT_KINDS}, got {self.kind!r}")
        if not isinstance(self.resident_blocks, int) or self.resident_blocks < 0:
            raise ValueError(f"residentBlocks must be an int >= 0, got {self.resident_blocks!r}")
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {self.prefetch!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source != "ram" and self.kind != "streamed":
            raise ValueError(f"source {self.source!r} applies to a streamed placement only, not {self.kind!r}")


RESIDENT = Placement()


@dataclass(frozen=True)
class MemoryPlan:
    """Where each component lives, and the device bytes the engine may use (None: no cap)."""

    text_encoder: Placement = RESIDENT
    transformer: Placement = RESIDENT
    vae: Placement = RESIDENT
    vram_budget: int | None = None

    def __post_init__(self) -> None:
        for name in COMPONENTS:
            placement = getattr(self, name)
            if not isinstance(placement, Placement):
                raise ValueError(f"{name}: expected a Placement")
            if placement.kind not in ALLOWED[name]:
                raise ValueError(f"{name}: {placement.kind!r} is not a placement for it; use one of {ALLOWED[name]}")
        if self.vram_budget is not None and (not isinstance(self.vram_budget, int) or self.vram_budget <= 0):
            raise ValueError(f"vramBudget must be a positive number of bytes, got {self.vram_budget!r}")

    @property
    def all_resident(self) -> bool:
        return all(getattr(self, name).kind == "resident" for name in COMPONENTS)


# ---- swapped components ----------------------------------------------------------------------


class SwappedComponent:
    """A module whose weights live in one host buffer and visit the device while `enter`ed."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module
        self.device = device
        self.tensors = module_tensors(module)
        offsets, size = layout(self.tensors)
        self.host = HostBuffer(size, pin=device.type == "cuda")
        self.host_views = adopt(self.host, 0, self.tensors, offsets)
        self.inside = False

    @property
    def pinned_bytes(self) -> int:
        return self.host.nbytes if self.host.pinned else 0

    def enter(self) -> None:
        if self.inside:
            return
        for t, host in zip(self.tensors, self.host_views):
            t.data = host.to(self.device, non_blocking=True)
        self.inside = True

    def leave(self) -> None:
        if not self.inside:
            return
        for t, host in zip(self.tensors, self.host_views):
            t.data = host
        self.inside = False

    def restore(self) -> None:
        """Back to an ordinary resident module on the device (copies its weights there)."""
        to_device(self.tensors, self.host_views, self.device)
        self.host.close()


# ---- block streaming -------------------------------------------------------------------------


class BlockSource(Protocol):
    """Where the streamer's copies come from; block p is the p-th streamed block."""

    kind: str

    @property
    def pinned_bytes(self) -> int: ...

    def rest_views(self, p: int) -> list[torch.Tensor]:
        """What block p's tensors point at between calls."""
        ...

    def copy(self, p: int, slot: torch.Tensor, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None) -> Any:
        """Queue block p's bytes into `slot` behind `after` on `stream`; returns a handle for `ready`."""
        ...

    def ready(self, handle: Any) -> torch.cuda.Event | None:
        """The event ending the copy (None: done already, on the CPU)."""
        ...

    def restore(self, tensors: list[list[torch.Tensor]], device: torch.device) -> None:
        """Every block's tensors onto `device` again; the source is closed."""
        ...


class RamBlocks:
    """Every streamed block in one registered host buffer, one identical layout per block."""

    kind = "ram"

    def __init__(self, tensors: list[list[torch.Tensor]], offsets: list[int], block_bytes: int, device: torch.device):
        self.block_bytes = block_bytes
        self.host = HostBuffer(block_bytes * len(tensors), pin=device.type == "cuda")
        self.host_views = [adopt(self.host, p * block_bytes, ts, offsets) for p, ts in enumerate(tensors)]

    @property
    def pinned_bytes(self) -> int:
        return self.host.nbytes if self.host.pinned else 0

    def rest_views(self, p: int) -> list[torch.Tensor]:
        return self.host_views[p]

    def copy(self, p: int, slot: torch.Tensor, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None) -> Any:
        return copy_on_stream(self.host.buffer[p * self.block_bytes : (p + 1) * self.block_bytes], slot, stream, after)

    def ready(self, handle: Any) -> torch.cuda.Event | None:
        return handle

    def restore(self, tensors: list[list[torch.Tensor]], device: torch.device) -> None:
        for ts, views in zip(tensors, self.host_views):
            to_device(ts, views, device)
        self.host.close()


class _StreamedBlocks(torch.nn.ModuleList):
    """The transformer's ModuleList of blocks, iterating through the streamer's before/after."""

    _kino_streamer: BlockStreamer

    def __iter__(self) -> Iterator[Any]:
        streamer = self._kino_streamer
        for index, block in enumerate(super().__iter__()):
            yield streamer.call(index, block) if index in streamer.position else block


class _Call:
    __slots__ = ("streamer", "index", "block")

    def __init__(self, streamer: BlockStreamer, index: int, block: torch.nn.Module):
        self.streamer, self.index, self.block = streamer, index, block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.streamer.before(self.index)
        try:
            return self.block(*args, **kwargs)
        finally:
            self.streamer.after(self.index)


class BlockStreamer:
    """Streams the transformer blocks `blocks[resident_blocks:]` through `prefetch + 1` device slots,
    from pinned host RAM, or from the files of `disk` (a WeightIndex holding every streamed tensor
    under its state-dict name relative to `owner`)."""

    def __init__(
        self,
        owner: torch.nn.Module,
        attr: str,
        resident_blocks: int,
        prefetch: int,
        device: torch.device,
        disk: WeightIndex | None = None,
    ):
        blocks = getattr(owner, attr)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise ValueError(f"{type(owner).__name__}.{attr} is not a ModuleList of blocks")
        if resident_blocks >= len(blocks):
            raise ValueError(f"residentBlocks {resident_blocks} leaves no block of {len(blocks)} to stream")
        self.owner, self.attr, self.device = owner, attr, device
        self.cuda = device.type == "cuda"
        self.streamed = list(range(resident_blocks, len(blocks)))
        self.position = {b: p for p, b in enumerate(self.streamed)}
        named = [named_tensors(blocks[b]) for b in self.streamed]
        self.tensors = [[t for _, t in block] for block in named]
        first = self.tensors[0]
        for b, ts in zip(self.streamed, self.tensors):
            if [(t.shape, t.dtype) for t in ts] != [(t.shape, t.dtype) for t in first]:
                raise ValueError(f"block {b} differs in layout from block {self.streamed[0]}: cannot share slots")
        self.offsets, self.block_bytes = layout(first)
        count = len(self.streamed)
        self.source: BlockSource
        if disk is None:
            self.source = RamBlocks(self.tensors, self.offsets, self.block_bytes, device)
        else:
            names = [[f"{attr}.{b}.{local}" for local, _ in block] for b, block in zip(self.streamed, named)]
            self.source = DiskBlocks(names, self.tensors, self.offsets, self.block_bytes, device, disk)
        self.slots_count = min(prefetch + 1, count)
        self.slots: list[torch.Tensor] = []
        self.slot_views: list[list[torch.Tensor]] = []
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # Per slot: the ticket whose bytes it holds (or is receiving), the handle of that copy (the
        # source's `ready` turns it into the copy's event), and the event marking the end of the last
        # compute that read it.
        self.slot_ticket: list[int | None] = [None] * self.slots_count
        self.copied: list[Any] = [None] * self.slots_count
        self.freed: list[torch.cuda.Event | None] = [None] * self.slots_count
        self.ticket = 0  # the next streamed execution
        self.issued = -1  # the last ticket whose copy was queued
        self.copies = 0
        self.resyncs = 0
        blocks.__class__ = _StreamedBlocks
        blocks._kino_streamer = self  # type: ignore[attr-defined]

    @property
    def pinned_bytes(self) -> int:
        return self.source.pinned_bytes

    @property
    def device_bytes(self) -> int:
        """Device bytes of the slots while the transformer's phase runs (none outside it)."""
        return self.block_bytes * self.slots_count

    def enter(self) -> None:
        """Allocate the device slots (the transformer's phase begins); the cycle starts over."""
        if self.slots:
            return
        first = self.tensors[0]
        self.slots = [torch.empty(self.block_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.slots_count)]
        self.slot_views = [[view_as(slot, offset, t) for t, offset in zip(first, self.offsets)] for slot in self.slots]
        self.slot_ticket = [None] * self.slots_count
        self.copied = [None] * self.slots_count
        self.freed = [None] * self.slots_count
        self.issued = self.ticket - 1

    def leave(self) -> None:
        """Free the device slots (the transformer's phase ends), so decode has their memory."""
        if not self.slots:
            return
        for handle in self.copied:
            if handle is not None:
                # A disk read still under way writes into a slot: let it finish. Its failure, if it
                # failed, belongs to the forward that needed the block, which has already seen it.
                try:
                    self.source.ready(handle)
                except Exception as exc:  # noqa: BLE001
                    log.debug("placement: a prefetch failed as the phase ended: %s", exc)
        if self.cuda:
            # Copies still in flight (the next forward's prefetch) write into the slots: order the
            # free after them, since the allocator reuses freed memory in the compute stream's order.
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)  # type: ignore[arg-type]
        self.slots = []
        self.slot_views = []
        self.slot_ticket = [None] * self.slots_count
        self.copied = [None] * self.slots_count

    def call(self, index: int, block: torch.nn.Module) -> _Call:
        return _Call(self, index, block)

    def _block_of(self, ticket: int) -> int:
        return ticket % len(self.streamed)

    def _issue(self, ticket: int) -> None:
        """Queue the copy of ticket's block into its slot, after the slot's last reader finished."""
        slot = ticket % self.slots_count
        self.copied[slot] = self.source.copy(self._block_of(ticket), self.slots[slot], self.copy_stream, self.freed[slot])
        self.slot_ticket[slot] = ticket
        self.copies += 1

    def _resync(self, p: int) -> None:
        """Start the cycle again at streamed position p: every slot's content is forgotten."""
        self.resyncs += 1
        if self.cuda:
            # Copies issued from now on must not overwrite a slot a queued compute still reads.
            barrier = torch.cuda.Event()
            barrier.record(torch.cuda.current_stream(self.device))
            self.freed = [barrier] * self.slots_count
        self.slot_ticket = [None] * self.slots_count
        self.ticket = p
        self.issued = p - 1

    def before(self, index: int) -> None:
        self.enter()  # a forward outside Placer.active (a benchmark calling the model) allocates them too
        p = self.position[index]
        if self._block_of(self.ticket) != p:
            self._resync(p)
        ticket = self.ticket
        slot = ticket % self.slots_count
        if self.slot_ticket[slot] != ticket:  # not prefetched (first call, new slots, or after a resync)
            self.issued = ticket - 1
        # Queue this ticket (if needed) and up to slots_count - 1 ahead: their slots' previous
        # readers are tickets < this one, already queued on the compute stream.
        for ahead in range(self.issued + 1, ticket + self.slots_count):
            self._issue(ahead)
        self.issued = max(self.issued, ticket + self.slots_count - 1)
        try:
            event = self.source.ready(self.copied[slot])
        except BaseException:
            self.slot_ticket[slot] = None  # a failed read: the next call issues it again
            raise
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for t, view in zip(self.tensors[p], self.slot_views[slot]):
            t.data = view

    def after(self, index: int) -> None:
        p = self.position[index]
        slot = self.ticket % self.slots_count
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.freed[slot] = event
        for t, view in zip(self.tensors[p], self.source.rest_views(p)):
            t.data = view
        self.ticket += 1

    def restore(self) -> None:
        """Every block resident again; the ModuleList back to a plain one."""
        self.leave()
        self.source.restore(self.tensors, self.device)
        blocks = getattr(self.owner, self.attr)
        blocks.__class__ = torch.nn.ModuleList
        del blocks._kino_streamer


# ---- the placer ------------------------------------------------------------------------------


def _set_budget(device: torch.device, budget: int | None) -> float | None:
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if budget is None else min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


class Placer:
    """Applies a MemoryPlan to a model's components; `active(name)` brings a component in for a phase."""

    def __init__(self, plan: MemoryPlan, device: torch.device, components: dict[str, torch.nn.Module]):
        self.plan = plan
        self.device = device
        self.components = components
        self.swapped: dict[str, SwappedComponent] = {}
        self.streamer: BlockStreamer | None = None
        self.fraction: float | None = None

    @classmethod
    def apply(
        cls,
        plan: MemoryPlan,
        device: torch.device,
        components: dict[str, torch.nn.Module],
        *,
        weights: WeightIndex | None = None,
        cache_dir: Path | None = None,
    ) -> Placer:
        """Place `components` (name -> module, each on the device or the host) as `plan` says.

        A transformer streamed from disk reads its blocks from `weights` (the checkpoint's files) where
        the loader left them unloaded, else from a scratch file written under `cache_dir`."""
        placer = cls(plan, device, components)
        for name in COMPONENTS:
            module = components[name]
            placement: Placement = getattr(plan, name)
            if placement.kind == "resident":
                module.to(device)
            elif placement.kind == "cpu":
                module.to("cpu")
            elif placement.kind == "swapped":
                placer.swapped[name] = SwappedComponent(module, device)
            elif placement.kind == "streamed":
                blocks = getattr(module, BLOCKS_ATTR, None)
                if not isinstance(blocks, torch.nn.ModuleList):
                    raise ValueError(f"{name}: {type(module).__name__} has no `{BLOCKS_ATTR}` to stream")
                disk = None
                if placement.source == "disk":
                    disk = disk_index(module, BLOCKS_ATTR, placement.resident_blocks, weights, cache_dir, device)
                placer.streamer = BlockStreamer(
                    module, BLOCKS_ATTR, placement.resident_blocks, placement.prefetch, device, disk
                )
                # The rest (embeddings, norms, output projection, resident blocks) goes to the device;
                # module.to() would take the streamed blocks' host copies along, so move tensor by tensor.
                streamed = {id(t) for ts in placer.streamer.tensors for t in ts}
                for t in module_tensors(module):
                    if id(t) not in streamed:
                        t.data = t.data.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        placer.fraction = _set_budget(device, plan.vram_budget)
        log.info(
            "placement: text encoder %s, transformer %s%s, vae %s; pinned %d bytes; budget %s",
            plan.text_encoder.kind, plan.transformer.kind,
            " from disk" if plan.transformer.source == "disk" else "",
            plan.vae.kind, placer.pinned_bytes, plan.vram_budget,
        )
        return placer

    @property
    def pinned_bytes(self) -> int:
        total = sum(s.pinned_bytes for s in self.swapped.values())
        return total + (self.streamer.pinned_bytes if self.streamer is not None else 0)

    def device_of(self, name: str) -> torch.device:
        """Where `name` computes: the host for a "cpu" placement, else the device."""
        return torch.device("cpu") if getattr(self.plan, name).kind == "cpu" else self.device

    @contextlib.contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Within the block, component `name` is on the device (a swapped one is copied in, then out)."""
        swapped = self.swapped.get(name)
        streamer = self.streamer if name == "transformer" else None
        if streamer is not None:
            fresh = not streamer.slots
            streamer.enter()
            try:
                yield
            finally:
                if fresh:
                    streamer.leave()
            return
        if swapped is None or swapped.inside:
            yield
            return
        swapped.enter()
        try:
            yield
        finally:
            swapped.leave()

    def release(self) -> None:
        """Undo the plan: every component resident on the device again, no budget (lifted first: the
        components coming back would not fit under it)."""
        _set_budget(self.device, None)
        for swapped in self.swapped.values():
            swapped.restore()
        self.swapped = {}
        if self.streamer is not None:
            self.streamer.restore()
            self.streamer = None
        for name in COMPONENTS:
            if getattr(self.plan, name).kind == "cpu":
                self.components[name].to(self.device)
        self.plan = MemoryPlan()
