"""kino's Wan 2.1 text-to-video loop: prompt -> T5 embeddings -> flow-matching denoise -> VAE -> frames.

`WanT2V` holds the components as public attributes (`transformer`, `vae`, `text_encoder`,
`tokenizer`, `scheduler_class`, `scheduler_config`) so benchmarks can drive them directly or hand
them to diffusers' WanPipeline for comparison. Its math matches diffusers' WanPipeline (same
prompt cleaning, T5 padding/trimming, CPU-seeded noise, scheduler, classifier-free guidance,
latent un-normalization and uint8 rounding), so for the same inputs the frames agree to within one
uint8 level; the parity tests hold it to that.

Shapes, with J jobs in one loop (1 alone, more in a batch), C latent channels, F/H/W
frames/height/width, L=512 text tokens, D text dim:
  noise/latents (J, C, (F-1)//st + 1, H//ss, W//ss) float32;  embeddings (1, L, D) per prompt;
  decoded video (1, 3, F, H, W) in [-1, 1] per job;  frames (F, H, W, 3) uint8.

The hot path (runtime/): `load(..., runtime=RuntimeOptions(...))` applies the exact optimizations
from outside the model (attention backend -> regional compile); `denoise` runs without host syncs
(CUDA events time the steps, the UniPC step is tabulated, guidance buffers are preallocated) and, by
default, with cond and uncond as one batch-2 forward. `denoise_batch` runs several jobs of one shape
(a batch) as one loop, each with its own embeddings and seeded noise; `encode_job`, `denoise_batch`
and `decode_video` are `generate`'s stages, for a caller that runs a batch. `prewarm(job)` runs one
forward at a job's shape so compile and the attention choice happen before the first request.

It knows nothing about the protocol's transport, output files or memory reporting: progress goes to
callbacks, cancellation comes from `is_cancelled()`, checked between steps.
"""

from __future__ import annotations

import contextlib
import html
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import ftfy
import numpy as np
import regex
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..checkpoint import inspect_checkpoint
from ..protocol import CheckpointSource, EngineFailure, JobSpec, ModelSpec, Phase, batch_mismatch
from ..runtime.attention import AttentionShape
from ..runtime.hotloop import GuidanceBuffers, StepTimer, make_stepper
from ..runtime.optimize import Runtime, optimize
from ..runtime.memory import free_device_memory, synchronize
from ..runtime.options import RuntimeOptions
from ..runtime.placement import COMPONENTS, MemoryPlan, Placer
from ..runtime.preview import LatentRgb, OnPreview, PreviewTap, fit_latent_rgb
from ..system import resolve_device, torch_dtype
from .wan_components import (
    TEXT_ENCODER_MAX_LENGTH,
    OnProgress,
    WanComponents,
    build_random_components,
    load_checkpoint_components,
)

#: Config keys that hold a flow-matching scheduler's shift, in order of preference
#: (UniPC/DPM-Solver: flow_shift; FlowMatchEulerDiscrete: shift).
SHIFT_KEYS = ("flow_shift", "shift")

OnPhase = Callable[[Phase, Literal["start", "end"], "float | None"], None]
OnStep = Callable[[int, int, float], None]
IsCancelled = Callable[[], bool]
OnFrames = Callable[[np.ndarray], None]


def _ready(host: torch.Tensor, copied: torch.cuda.Event) -> np.ndarray:
    """A pinned host chunk once its asynchronous copy has landed."""
    copied.synchronize()
    return host.numpy()


def _is_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` already holds kino's low-bit linears (a pre-quantized checkpoint)."""
    from ..quant import QuantLinear

    return any(isinstance(m, QuantLinear) for m in module.modules())


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


@dataclass
class WanVideo:
    """The frames of one generation and how long each phase took (ms)."""

    #: uint8 (F, H, W, 3); None when the frames were streamed to `generate`'s `on_frames` instead.
    frames: np.ndarray | None
    phase_ms: dict[str, float] = field(default_factory=dict)
    #: (F, H, W) of the video, streamed or not.
    shape: tuple[int, ...] = ()
    #: Peak device bytes allocated during each phase (torch's counter); empty off CUDA.
    phase_peak_vram: dict[str, int] = field(default_factory=dict)


class WanT2V:
    """A loaded Wan 2.1 T2V model and kino's loop over it."""

    family = "wan2.1-t2v"
    #: Wan 2.1's native frame rate.
    fps = 16.0
    max_sequence_length = TEXT_ENCODER_MAX_LENGTH

    def __init__(
        self,
        components: WanComponents,
        device: torch.device,
        dtype: torch.dtype,
        runtime: RuntimeOptions | None = None,
        memory: MemoryPlan | None = None,
    ):
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.scheduler_class = components.scheduler_class
        self.scheduler_config = dict(components.scheduler_config)
        self.device = device
        self.dtype = dtype
        options = runtime or RuntimeOptions()
        # Precision, then placement, then the runtime's optimizations: the placer lays out the
        # (quantized) bytes it streams, and compile wraps blocks the streamer leaves in place.
        self.quant_report = None
        if options.weights != "exact" and not _is_quantized(self.transformer):
            from ..quant import quantize_module

            self.quant_report = quantize_module(self.transformer, options.weights)
        # Where a transformer streamed from disk reads its blocks: the checkpoint's files when the
        # loader left them there, else a scratch file under the runtime's cache folder.
        self.transformer_weights = components.transformer_weights
        self.scratch_dir = options.cache_dir
        self.placer = Placer.apply(
            memory or MemoryPlan(),
            device,
            {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae},
            weights=self.transformer_weights,
            cache_dir=self.scratch_dir,
        )
        self.runtime: Runtime = optimize(self.transformer, device, dtype, options)
        #: The latent -> RGB map of previews, fitted from the VAE the first time a job asks for one.
        self._latent_rgb: LatentRgb | None = None

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        on_progress: OnProgress | None = None,
        runtime: RuntimeOptions | None = None,
        memory: MemoryPlan | None = None,
    ) -> WanT2V:
        """Build from a checkpoint folder (validated first) or a random-weight architecture, place
        the components as `memory` says (default: all resident) and apply `runtime` (default
        RuntimeOptions()) to the transformer. Components kept off the device load to the host."""
        device = resolve_device(spec.device)
        dtype = torch_dtype(spec.dtype)
        memory = memory or MemoryPlan()
        progress = on_progress or (lambda component, done, total: None)
        host = torch.device("cpu")
        targets = {name: device if getattr(memory, name).kind == "resident" else host for name in COMPONENTS}
        if isinstance(spec.source, CheckpointSource):
            checkpoint = inspect_checkpoint(spec.source.path)
            components = load_checkpoint_components(
                checkpoint, device, dtype, progress, targets,
                blocks_on_disk=memory.transformer.source == "disk", weights=(runtime or RuntimeOptions()).weights,
            )
        else:
            components = build_random_components(
                spec.source.architecture, spec.source.seed, device, dtype, progress, targets
            )
        return cls(components, device, dtype, runtime, memory)

    def replace(self, memory: MemoryPlan) -> None:
        """Undo the current memory plan and apply `memory`; the components stay loaded."""
        self.placer.release()
        free_device_memory()
        self.placer = Placer.apply(
            memory,
            self.device,
            {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae},
            weights=self.transformer_weights,
            cache_dir=self.scratch_dir,
        )

    # ---- geometry ----

    @property
    def vae_scale_spatial(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def vae_scale_temporal(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def latent_shape(self, job: JobSpec) -> tuple[int, int, int, int, int]:
        """(1, C, F', H', W') for the job's size."""
        return (
            1,
            self.latent_channels,
            (job.frames - 1) // self.vae_scale_temporal + 1,
            job.height // self.vae_scale_spatial,
            job.width // self.vae_scale_spatial,
        )

    def forward_batch(self, job: JobSpec) -> int:
        """The transformer's batch per forward: 2 when guidance runs batched, else 1."""
        batched = self.runtime.options.batched_cfg if job.cfg is None else job.cfg == "batched"
        return 2 if job.guidance > 1.0 and batched else 1

    def attention_shape(self, job: JobSpec, jobs: int = 1) -> AttentionShape:
        """Self-attention's (B, heads, N tokens, head dim) for `jobs` jobs of this shape in one forward:
        B = jobs * forward_batch, N = F'/pt * H'/ph * W'/pw."""
        _, _, frames, height, width = self.latent_shape(job)
        patch_t, patch_h, patch_w = self.transformer.config.patch_size
        tokens = (frames // patch_t) * (height // patch_h) * (width // patch_w)
        config = self.transformer.config
        batch = jobs * self.forward_batch(job)
        return (batch, int(config.num_attention_heads), tokens, int(config.attention_head_dim))

    def check_job(self, job: JobSpec) -> None:
        """Refuse sizes this model cannot produce exactly (never round them silently)."""
        _, patch_h, patch_w = self.transformer.config.patch_size
        for name, size, patch in (("width", job.width, patch_w), ("height", job.height, patch_h)):
            multiple = self.vae_scale_spatial * patch
            if size % multiple:
                raise EngineFailure(
                    "BAD_REQUEST", f"job.{name} must be a multiple of {multiple} for this model, got {size}",
                    field=f"job.{name}",
                )
        if (job.frames - 1) % self.vae_scale_temporal:
            raise EngineFailure(
                "BAD_REQUEST",
                f"job.frames must be {self.vae_scale_temporal}k+1 (1, 5, 9, ..., 81) for this model, got {job.frames}",
                field="job.frames",
            )

    def make_scheduler(self, shift: float | None) -> SchedulerMixin:
        """A fresh scheduler from the checkpoint's config, with `shift` overriding its flow shift."""
        config = dict(self.scheduler_config)
        if shift is not None:
            key = next((k for k in SHIFT_KEYS if k in config), None)
            if key is None:
                raise EngineFailure(
                    "BAD_REQUEST",
                    f"job.shift: the scheduler {self.scheduler_class.__name__} has no flow shift to override",
                    field="job.shift",
                )
            config[key] = shift
        return self.scheduler_class.from_config(config)

    # ---- the three stages ----

    def encode_prompt(self, text: str) -> torch.Tensor:
        """T5 embeddings (1, L, D) of the cleaned text, zero past its last token, in the model dtype."""
        return self.encode_prompts([text])[0]

    @torch.inference_mode()
    def encode_prompts(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """`encode_prompt` for several texts in one encoder forward: one (1, L, D) tensor per text.

        The encoder runs on the texts' own tokens, padded to the longest of the call (masked), not on
        all L = 512 positions as diffusers does: its attention is bidirectional with padded keys
        masked out, so the real tokens get the values a 512-long run gives them (up to the rounding of
        GEMMs of another size), and Wan zeroes every position past a text's length either way. A
        10-token prompt thus costs 10 tokens of UMT5-XXL, not 512 (the weights' read is then the
        floor: about 11 GB on the device, and a CPU-placed encoder saves the most)."""
        tokens = self.tokenizer(
            [clean_prompt(text) for text in texts],
            padding="longest",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        where = self.placer.device_of("text_encoder")  # the host when the plan runs it on the CPU
        ids = tokens.input_ids.to(where)  # (N, n), n <= L
        mask = tokens.attention_mask.to(where)  # (N, n), ones then zeros
        with self.placer.active("text_encoder"):
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, n, D)
        hidden = hidden.to(self.text_encoder.dtype)
        # Positions past each text's length become exact zeros (Wan trims and zero-pads; with a
        # right-padded mask this is the same, without a host sync to read the lengths).
        hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 0.0).to(self.device, self.dtype)
        count, length, width = hidden.shape
        out = []
        for k in range(count):
            row = torch.zeros((1, self.max_sequence_length, width), dtype=self.dtype, device=self.device)
            row[:, :length] = hidden[k]
            out.append(row)
        return out

    def encode_job(self, job: JobSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The job's prompt embeddings (1, L, D), and its negative prompt's when guidance runs, else None."""
        cond = self.encode_prompt(job.prompt)
        return cond, self.encode_prompt(job.negative_prompt) if job.guidance > 1.0 else None

    def initial_latents(self, job: JobSpec) -> torch.Tensor:
        """Seeded noise (1, C, F', H', W') drawn on the CPU in float32, so a seed means one video everywhere."""
        shape = self.latent_shape(job)
        generator = torch.Generator("cpu").manual_seed(job.seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def denoise(
        self,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        job: JobSpec,
        on_step: OnStep | None = None,
        is_cancelled: IsCancelled | None = None,
        on_preview: OnPreview | None = None,
    ) -> torch.Tensor:
        """The flow-matching loop: latents (1, C, F', H', W') float32 after `job.steps` steps.

        Classifier-free guidance runs when job.guidance > 1 and needs `negative_embeds`: one forward of
        batch 2 (RuntimeOptions.cfg "auto"/"batched") or two of batch 1 ("sequential"). Nothing in the
        loop reads a device value on the host; `on_step` gets each step's device time (ms) once the GPU
        has finished it; `on_preview` gets the previews `job.preview` asks for (row 0), once their copy to
        the host has landed. Raises EngineFailure(CANCELLED) between steps once is_cancelled().
        """
        negatives = None if negative_embeds is None else [negative_embeds]
        return self.denoise_batch([prompt_embeds], negatives, [job], on_step, is_cancelled, on_preview)

    @torch.inference_mode()
    def denoise_batch(
        self,
        prompt_embeds: Sequence[torch.Tensor],
        negative_embeds: Sequence[torch.Tensor] | None,
        jobs: Sequence[JobSpec],
        on_step: OnStep | None = None,
        is_cancelled: IsCancelled | None = None,
        on_preview: OnPreview | None = None,
    ) -> torch.Tensor:
        """`denoise` for J jobs of one shape (protocol.batch_mismatch finds nothing) as one loop:
        latents (J, C, F', H', W') float32, row k being job k's. Embeddings are (1, L, D) per job.

        Each job keeps its own seeded noise and embeddings; each forward carries J * forward_batch rows
        (every job's cond rows, then their uncond rows). One stepper steps the stacked latents: the
        scheduler's update is elementwise, with coefficients that depend only on the steps and the
        shift, which the jobs share, so row k follows the path job k takes alone, up to the float
        rounding of GEMMs at another batch size. `is_cancelled()` stops the whole loop; a caller that
        drops single jobs of a batch lets their rows run on. Previews go to `on_preview(row, preview)`
        for the rows whose job asks for them.
        """
        if not jobs or len(prompt_embeds) != len(jobs):
            raise ValueError(f"{len(jobs)} jobs need as many prompt embeddings, got {len(prompt_embeds)}")
        mismatch = batch_mismatch(jobs)
        if mismatch is not None:
            index, name = mismatch
            raise ValueError(f"job {index} of the batch differs from job 0 in {name}: one loop cannot run them")
        job = jobs[0]
        guided = job.guidance > 1.0
        if guided and (negative_embeds is None or len(negative_embeds) != len(jobs)):
            raise ValueError("guidance > 1 needs negative_embeds, one per job")
        scheduler = self.make_scheduler(job.shift)
        scheduler.set_timesteps(job.steps, device=self.device)
        # Starting at index 0 explicitly spares the scheduler a device->host lookup of t at step 1.
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps  # (n,) on the device; timesteps[i] is a view, not a host read
        n = len(timesteps)
        latents = _rows([self.initial_latents(j) for j in jobs])  # (J, C, F', H', W') float32
        self.runtime.prepare(self.attention_shape(job, len(jobs)))
        buffers = GuidanceBuffers(
            latents,
            _rows(prompt_embeds),  # (J, L, D)
            _rows(negative_embeds) if guided and negative_embeds is not None else None,
            self.forward_batch(job),
            self.transformer.dtype,
        )
        step, _ = make_stepper(scheduler, n)
        timer = StepTimer(self.device, n, on_step, self.runtime.options.max_steps_ahead)
        tap = self._preview_tap(jobs, scheduler, n, tuple(latents.shape), on_preview)
        with self.placer.active("transformer"):
            for i in range(n):
                if is_cancelled is not None and is_cancelled():
                    raise EngineFailure("CANCELLED", f"cancelled before step {i + 1} of {n}", phase="denoise")
                timer.begin(i)
                velocity = self._velocity(buffers, latents, timesteps[i], job.guidance if guided else None)
                if tap is not None:
                    tap.capture(i, latents, velocity)
                latents = step(velocity, latents)
                timer.end(i)
                if tap is not None:
                    tap.poll()
            timer.finish()
            if tap is not None:
                tap.finish()
        if is_cancelled is not None and is_cancelled():
            raise EngineFailure("CANCELLED", f"cancelled after step {n} of {n}", phase="denoise")
        return latents

    def _preview_tap(
        self,
        jobs: Sequence[JobSpec],
        scheduler: SchedulerMixin,
        steps: int,
        shape: tuple[int, ...],
        on_preview: OnPreview | None,
    ) -> PreviewTap | None:
        """The loop's previews, or None when no job asks for one (or nobody listens). Fits the latent
        -> RGB map first if this is the first preview of the model (the VAE on the device meanwhile)."""
        specs = [j.preview for j in jobs]
        if on_preview is None or all(spec is None for spec in specs):
            return None
        # sigma_t of each step, on the host before the loop (UniPC keeps them on the CPU already).
        sigmas = scheduler.sigmas[:steps].detach().to("cpu", torch.float64).tolist()
        return PreviewTap(self.latent_rgb(), specs, sigmas, shape, self.device, on_preview)

    def latent_rgb(self) -> LatentRgb:
        """The map previews project latents with, fitted from this model's VAE on first use (cached)."""
        if self._latent_rgb is None:
            with torch.inference_mode(), self.placer.active("vae"):
                self._latent_rgb = fit_latent_rgb(self._encode_normalized, self.vae_scale_spatial, self.vae_scale_temporal)
        return self._latent_rgb

    def _encode_normalized(self, video: torch.Tensor) -> torch.Tensor:
        """Clips (N, 3, F, H, W) in [-1, 1] -> their latents' means as the denoiser sees them
        (normalized: the inverse of `_denormalize`), float32 on the host."""
        z = self.vae.encode(video.to(self.device, self.vae.dtype)).latent_dist.mode()
        mean, std = self._latent_stats(torch.device("cpu"), torch.float32)
        return (z.float().cpu() - mean) / std

    def _velocity(
        self, buffers: GuidanceBuffers, latents: torch.Tensor, t: torch.Tensor, guidance: float | None
    ) -> torch.Tensor:
        """The (guided) model output (J, C, F', H', W') in the model dtype for latents at timestep t."""
        x = buffers.load(latents)  # (B, C, F', H', W')
        timestep = t.expand(buffers.batch)  # (B,)
        out = self.transformer(
            hidden_states=x, timestep=timestep, encoder_hidden_states=buffers.embeds, return_dict=False
        )[0]
        if guidance is None:
            return out
        if buffers.stacked:
            return buffers.guide(*buffers.halves(out), guidance)
        uncond = self.transformer(
            hidden_states=x, timestep=timestep, encoder_hidden_states=buffers.uncond, return_dict=False
        )[0]
        return buffers.guide(out, uncond, guidance)

    @torch.inference_mode()
    def prewarm(self, job: JobSpec, jobs: int = 1) -> float:
        """One transformer forward at the job's shape for `jobs` jobs of it (a batch's rows; batch 2 per
        job if guidance runs batched), so the attention choice, compilation and autotuning happen now
        rather than in the first request of that shape; with `job.preview`, the previews' colour map
        is fitted too. Uses zero embeddings and seeded noise (the values do not matter). Returns its
        wall ms."""
        self.check_job(job)
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        started = time.perf_counter()
        if job.preview is not None:
            self.latent_rgb()
        self.runtime.prepare(self.attention_shape(job, jobs))
        scheduler = self.make_scheduler(job.shift)
        scheduler.set_timesteps(job.steps, device=self.device)
        latents = _rows([self.initial_latents(job)] * jobs)
        config = self.transformer.config
        embeds = torch.zeros((jobs, self.max_sequence_length, int(config.text_dim)), device=self.device)
        guided = job.guidance > 1.0
        buffers = GuidanceBuffers(
            latents, embeds, embeds if guided else None, self.forward_batch(job), self.transformer.dtype
        )
        with self.placer.active("transformer"):
            self._velocity(buffers, latents, scheduler.timesteps[0], job.guidance if guided else None)
            synchronize(self.device)
        return (time.perf_counter() - started) * 1000.0

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """VAE-decode normalized latents (1, C, F', H', W') into uint8 frames (F, H, W, 3)."""
        with self.placer.active("vae"):
            video = self.vae.decode(self._denormalize(latents), return_dict=False)[0]  # (1, 3, F, H, W) in [-1, 1]
        frames = video[0].permute(1, 2, 3, 0)  # (F, H, W, 3)
        # Same rounding as diffusers' VideoProcessor + numpy_to_pil: [0, 1] in float32, *255, round half even.
        frames = (frames * 0.5 + 0.5).clamp(0, 1).float()
        return (frames * 255).round().to(torch.uint8).cpu().numpy()

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.vae.dtype)
        mean, std = self._latent_stats(latents.device, latents.dtype)
        return latents * std + mean

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and std, (1, C, 1, 1, 1) each: normalized = (z - mean) / std."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(device, dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(device, dtype)
        return mean, std

    @staticmethod
    def _to_uint8(video: torch.Tensor) -> torch.Tensor:
        """(1, 3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8 on the same device, rounded as `decode` does."""
        frames = (video[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1).float()
        return (frames * 255).round().to(torch.uint8).contiguous()

    def _streamable(self, latents: torch.Tensor) -> bool:
        """Whether the VAE decodes these latents frame by frame (not tiled, not patched, batch 1),
        the case `decode_stream` reproduces; anything else is decoded whole."""
        vae = self.vae
        if latents.shape[0] != 1 or getattr(vae.config, "patch_size", None) is not None:
            return False
        if getattr(vae, "use_tiling", False):
            height, width = latents.shape[-2:]
            ratio = vae.spatial_compression_ratio
            if width > vae.tile_sample_min_width // ratio or height > vae.tile_sample_min_height // ratio:
                return False
        return True

    @torch.inference_mode()
    def decode_stream(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """`decode`, chunk by chunk: uint8 frames (F_i, H, W, 3) as the VAE makes them (1 frame from
        the first latent frame, then `vae_scale_temporal` per latent frame); concatenated they are
        exactly `decode(latents)`.

        It drives the VAE's own causal decode from outside, making the calls AutoencoderKLWan._decode
        makes (diffusers 0.42.1): reset the feature cache, post_quant_conv over all latent frames, the
        decoder on one latent frame at a time through the cache (the first with first_chunk=True),
        clamp to [-1, 1]. Clamping and the uint8 conversion are elementwise, so doing them per chunk
        changes no value.

        On CUDA each chunk becomes uint8 on the GPU and is copied asynchronously into pinned host
        memory (an event recorded after the copy); a chunk is yielded only after the next latent
        frame's decode has been queued, so the GPU decodes chunk i+1 while the host waits for chunk
        i's copy and the consumer (the MP4 encoder) works on it. Each chunk has its own pinned buffer,
        so the arrays stay valid after the generator moves on. Tiled or patched VAEs (not Wan 2.1's
        default) are decoded whole and yielded as one chunk.
        """
        z = self._denormalize(latents)
        if not self._streamable(z):
            yield self.decode(latents)
            return
        vae = self.vae
        cuda = z.device.type == "cuda"
        vae.clear_cache()
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.placer.active("vae"))
            stack.callback(vae.clear_cache)
            yield from self._decode_chunks(vae, z, cuda)

    def _decode_chunks(self, vae: torch.nn.Module, z: torch.Tensor, cuda: bool) -> Iterator[np.ndarray]:
        """decode_stream's chunks for denormalized latents z, the VAE on the device and its cache reset."""
        pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
        x = vae.post_quant_conv(z)
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            kwargs = {"first_chunk": True} if i == 0 else {}
            out = vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **kwargs)
            chunk = self._to_uint8(torch.clamp(out, min=-1.0, max=1.0))
            del out
            if not cuda:
                yield chunk.numpy()
                continue
            host = torch.empty(chunk.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(chunk, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            if pending is not None:  # chunk i is queued; now wait for chunk i-1's copy and hand it on
                yield _ready(*pending)
            pending = (host, ready)
        if pending is not None:
            yield _ready(*pending)

    # ---- all of it ----

    def generate(
        self,
        job: JobSpec,
        on_phase: OnPhase | None = None,
        on_step: OnStep | None = None,
        is_cancelled: IsCancelled | None = None,
        on_frames: OnFrames | None = None,
        on_preview: OnPreview | None = None,
    ) -> WanVideo:
        """text_encode -> denoise -> decode, reporting each phase's start and end (ms), and the
        previews `job.preview` asks for to `on_preview` (row 0).

        With `on_frames`, decoding is streamed (`decode_stream`): each uint8 chunk (F_i, H, W, 3)
        goes to `on_frames` as soon as it is on the host (e.g. to an MP4 encoder running alongside),
        and the returned video has `frames=None`. The decode phase then ends when the last chunk has
        been handed over, so it includes any time `on_frames` blocks (a full encoder queue)."""
        self.check_job(job)
        phases = PhaseClock(self.device, on_phase)
        with phases.run("text_encode"):
            prompt_embeds, negative_embeds = self.encode_job(job)
        with phases.run("denoise"):
            latents = self.denoise(prompt_embeds, negative_embeds, job, on_step, is_cancelled, on_preview)
        del prompt_embeds, negative_embeds
        return self.decode_video(latents, job, phases, on_frames)

    def decode_video(
        self, latents: torch.Tensor, job: JobSpec, phases: PhaseClock, on_frames: OnFrames | None = None
    ) -> WanVideo:
        """`generate`'s decode phase for one job's latents (1, C, F', H', W'), timed by `phases`
        (which holds the phases before it): the frames, or, with `on_frames`, streamed chunk by chunk."""
        shape = (job.frames, job.height, job.width)
        with phases.run("decode"), self.vae_decode_mode(job):
            if on_frames is None:
                frames: np.ndarray | None = self.decode(latents)
                shape = frames.shape[:3]
            else:
                frames = None
                for chunk in self.decode_stream(latents):
                    on_frames(chunk)
        return WanVideo(
            frames=frames,
            phase_ms=dict(phases.ms),
            shape=tuple(int(n) for n in shape),
            phase_peak_vram=dict(phases.peak_vram),
        )

    @contextlib.contextmanager
    def vae_decode_mode(self, job: JobSpec) -> Iterator[None]:
        """Within the block the VAE decodes as the job's plan says: whole, or in overlapping spatial
        tiles of `tile` pixels (stride 3/4 of a tile; diffusers' AutoencoderKLWan tiling)."""
        mode = job.vae_decode
        if mode is None or mode.mode == "full":
            yield
            return
        vae = self.vae
        saved = (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width,
                 vae.tile_sample_stride_height, vae.tile_sample_stride_width)
        stride = mode.tile * 3 // 4
        vae.enable_tiling(mode.tile, mode.tile, stride, stride)
        try:
            yield
        finally:
            (vae.use_tiling, vae.tile_sample_min_height, vae.tile_sample_min_width,
             vae.tile_sample_stride_height, vae.tile_sample_stride_width) = saved


class PhaseClock:
    """Times phases (synchronizing the device at each end) and reports their start and end."""

    def __init__(self, device: torch.device, on_phase: OnPhase | None):
        self.device = device
        self.on_phase = on_phase
        self.ms: dict[str, float] = {}
        self.peak_vram: dict[str, int] = {}

    def fork(self, on_phase: OnPhase | None) -> PhaseClock:
        """A clock that holds this one's phases so far and reports the next ones to `on_phase`
        (a batch's shared phases, then one job's own decode)."""
        clock = PhaseClock(self.device, on_phase)
        clock.ms, clock.peak_vram = dict(self.ms), dict(self.peak_vram)
        return clock

    @contextlib.contextmanager
    def run(self, phase: Phase) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase(phase, "start", None)
        cuda = self.device.type == "cuda"
        if cuda:
            # Resets torch's peak counter: a job's overall peak is the max over its phases' peaks.
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        yield  # an exception here propagates: a failed phase has no end
        synchronize(self.device)
        self.ms[phase] = (time.perf_counter() - started) * 1000.0
        if cuda:
            self.peak_vram[phase] = int(torch.cuda.max_memory_allocated(self.device))
        if self.on_phase is not None:
            self.on_phase(phase, "end", self.ms[phase])


def _rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-job tensors (1, ...) as one (J, ...) tensor; a single job's as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))
