"""Previews of a video while it denoises: what the model predicts the clean video to be, step by step.

Two parts:
- `fit_latent_rgb` fits, once per loaded model, an affine map from latent channels to RGB
  (C -> 3, plus a bias) out of the model's own VAE: it encodes static clips of known colours (the
  corners of the RGB cube, greys, smooth random colour fields), normalizes their latents as the
  denoiser sees them, and solves least squares between each latent pixel and the mean colour of the
  pixels it stands for. A linear map cannot reproduce the decoder's detail, but it shows layout and
  colour at the latents' resolution for the price of one tiny matrix product, instead of a VAE decode.
- `PreviewTap` runs inside the denoising loop. At a step where some job asks for a preview it takes
  the middle latent frame of the model's clean-sample estimate, x0 = x_t - sigma_t * v (the flow
  matching prediction every flow scheduler uses: v = noise - x0), projects it to uint8 RGB on the
  device, and copies it asynchronously into pinned host memory allocated before the loop, with a CUDA
  event behind the copy. `poll()` (called after each step) turns every preview whose event has
  completed into a PNG and hands it over; `finish()` waits for the rest by polling the events. The
  loop thus gains no host synchronization and, after the first preview, no device allocation.

Shapes: latents and velocity (J, C, F', H', W'); a preview (H', W', 3) uint8 per job row.
It knows nothing of the protocol: previews go to a callback as `Preview`s.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .hotloop import wait_polling

if TYPE_CHECKING:
    from ..protocol import PreviewSpec

#: Encodes a batch of clips (N, 3, F, H, W) in [-1, 1] to normalized latents (N, C, F', H', W').
Encode = Callable[[torch.Tensor], torch.Tensor]

#: Clips encoded to fit the map, and their side in latent pixels (16 x 2 latent frames x 4 x 4 =
#: 512 samples for C + 1 unknowns per colour; the VAE encodes 16 clips of 5 x 32 x 32 pixels).
FIT_CLIPS = 16
FIT_LATENT_SIDE = 4
#: Clips per VAE call while fitting (bounds the encoder's activations).
FIT_CHUNK = 8
#: zlib level of preview PNGs (lossless at every level; 1 is the fastest).
PNG_LEVEL = 1


@dataclass(frozen=True)
class LatentRgb:
    """An affine map from normalized latent channels to RGB in [0, 1]."""

    #: (C, 3) float32.
    weight: torch.Tensor
    #: (3,) float32.
    bias: torch.Tensor
    #: Root-mean-square error of the fit on its own samples, in [0, 1] RGB units.
    rms_error: float

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., 3) RGB in [0, 1] (not clamped)."""
        return latents @ self.weight.to(latents.device, latents.dtype) + self.bias.to(latents.device, latents.dtype)


def fit_clips(count: int, side: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Static clips (count, 3, frames, side, side) in [-1, 1]: the 8 corners of the RGB cube, 5 greys,
    then smooth random colour fields (a 3x3 grid of random colours, bilinearly upsampled)."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[(k >> b) & 1 for b in range(3)] for k in range(8)], dtype=torch.float32)
    greys = torch.linspace(0.1, 0.9, 5).unsqueeze(1).expand(5, 3)
    flat = torch.cat([corners, greys])[:count]  # (n, 3) in [0, 1]
    images = flat.view(-1, 3, 1, 1).expand(-1, 3, side, side)
    fields = max(count - flat.shape[0], 0)
    if fields:
        grid = torch.rand((fields, 3, 3, 3), generator=generator)
        smooth = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=True)
        images = torch.cat([images, smooth])
    clips = images.unsqueeze(2).expand(-1, -1, frames, -1, -1)
    return (clips * 2 - 1).contiguous()


def fit_latent_rgb(encode: Encode, scale_spatial: int, scale_temporal: int, clips: int = FIT_CLIPS) -> LatentRgb:
    """Least squares from the latents `encode` gives static clips of known colours to their colours.

    Each latent pixel stands for a scale_spatial^2 patch of scale_temporal frames (the first latent
    frame for the first frame alone); the clips are static, so its target is the patch's mean colour."""
    side = FIT_LATENT_SIDE * scale_spatial
    frames = scale_temporal + 1  # two latent frames: the first (one frame) and a regular one
    video = fit_clips(clips, side, frames)  # (N, 3, F, S, S)
    latents = torch.cat([encode(chunk).float().cpu() for chunk in video.split(FIT_CHUNK)])  # (N, C, F', h, w)
    colours = F.avg_pool2d(video[:, :, 0] * 0.5 + 0.5, scale_spatial)  # (N, 3, h, w) in [0, 1]
    count, channels, latent_frames, height, width = latents.shape
    x = latents.permute(0, 2, 3, 4, 1).reshape(-1, channels).double()
    y = colours.permute(0, 2, 3, 1).unsqueeze(1).expand(count, latent_frames, height, width, 3).reshape(-1, 3).double()
    design = torch.cat([x, torch.ones((x.shape[0], 1), dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (C + 1, 3)
    rms = float((design @ solution - y).pow(2).mean().sqrt())
    return LatentRgb(solution[:channels].float().contiguous(), solution[channels].float().contiguous(), rms)


@dataclass(frozen=True)
class Preview:
    """One job's preview: taken at the 1-based `step` of `steps`, a width x height RGB PNG."""

    step: int
    steps: int
    width: int
    height: int
    png: bytes


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=PNG_LEVEL)
    return out.getvalue()


#: Receives job row r's preview.
OnPreview = Callable[[int, Preview], None]


class PreviewTap:
    """The loop's previews for J job rows, each with its own `PreviewSpec` (None: no previews)."""

    def __init__(
        self,
        rgb: LatentRgb,
        specs: Sequence[PreviewSpec | None],
        sigmas: Sequence[float],
        latent_shape: tuple[int, ...],
        device: torch.device,
        on_preview: OnPreview,
    ):
        jobs, _, _, height, width = latent_shape
        if len(specs) != jobs:
            raise ValueError(f"{jobs} job rows need as many preview specs, got {len(specs)}")
        steps = len(sigmas)
        self.steps = steps
        self.sigmas = [float(s) for s in sigmas]
        self.device = device
        self.on_preview = on_preview
        self.size = (width, height)
        self.weight = rgb.weight.to(device)
        self.bias = rgb.bias.to(device)
        #: step index (0-based) -> the job rows that want a preview there.
        self.due: dict[int, list[int]] = {}
        for i in range(steps):
            rows = [r for r, spec in enumerate(specs) if spec is not None and spec.due(i + 1, steps)]
            if rows:
                self.due[i] = rows
        self._cuda = device.type == "cuda"
        # One pinned block for every preview of the loop: the loop allocates no host memory.
        self._host = torch.empty((len(self.due), jobs, height, width, 3), dtype=torch.uint8, pin_memory=self._cuda)
        self._slot = {i: k for k, i in enumerate(sorted(self.due))}
        self._pending: deque[tuple[int, list[int], torch.Tensor, torch.cuda.Event | None]] = deque()

    def capture(self, i: int, latents: torch.Tensor, velocity: torch.Tensor) -> None:
        """At step i (0-based), before the scheduler steps: queue the previews due there (no wait)."""
        rows = self.due.get(i)
        if rows is None:
            return
        mid = latents.shape[2] // 2
        x0 = latents[:, :, mid].float() - self.sigmas[i] * velocity[:, :, mid].float()  # (J, C, H', W')
        rgb = torch.einsum("jchw,ck->jhwk", x0, self.weight).add_(self.bias)  # (J, H', W', 3)
        pixels = rgb.mul_(255.0).clamp_(0.0, 255.0).round_().to(torch.uint8)
        host = self._host[self._slot[i]]
        host.copy_(pixels, non_blocking=self._cuda)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((i, rows, host, event))

    def poll(self) -> None:
        """Hand over every preview whose copy has landed, in order; never waits."""
        self._drain(wait=False)

    def finish(self) -> None:
        """Hand over the rest, waiting for their copies by polling (the loop is over)."""
        self._drain(wait=True)

    def _drain(self, wait: bool) -> None:
        while self._pending:
            i, rows, host, event = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                wait_polling(event)
            self._pending.popleft()
            width, height = self.size
            for r in rows:
                self.on_preview(r, Preview(i + 1, self.steps, width, height, encode_png(host[r].numpy())))
