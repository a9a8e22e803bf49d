/**
 * The engine protocol: the one seam between the TypeScript control plane and the Python engine.
 *
 * Transport: newline-delimited JSON over a dedicated bidirectional pipe (file descriptor 3 of the
 * engine process), never stdout, which libraries print to. The control plane sends requests; the
 * engine answers each with exactly one `result` or `error` carrying the request's id, and may send
 * any number of `event`s with that id before it. These zod schemas are the source of truth; the
 * JSON Schema export (`engine.schema.json`, see export-schema.ts) is checked in and the engine's
 * tests validate every message they see against it.
 */
import { z } from "zod";

/** Bumped on any incompatible change; `hello` refuses a mismatch. */
export const PROTOCOL_VERSION = 1;

/** Error codes the engine may answer with. Each has one meaning; see src/errors.ts for the fixes. */
export const EngineErrorCode = z.enum([
  "BAD_REQUEST", // the message failed validation on the engine side (a bug in the control plane)
  "UNSUPPORTED_PROTOCOL", // hello with a protocol version this engine does not speak
  "BAD_CHECKPOINT", // a checkpoint folder or file is missing, truncated or corrupt
  "MODEL_NOT_LOADED", // generate before load
  "DEVICE_UNAVAILABLE", // asked for cuda where there is none
  "OOM", // out of device (or host) memory; the engine freed what it could
  "CANCELLED", // the job was cancelled between steps
  "OUTPUT_UNWRITABLE", // the output path cannot be written
  "ENCODER_FAILED", // the video encoder failed
  "INTERNAL", // anything else: a bug; the message carries the exception
]);
export type EngineErrorCode = z.infer<typeof EngineErrorCode>;

export const Phase = z.enum(["load", "text_encode", "denoise", "decode", "encode"]);
export type Phase = z.infer<typeof Phase>;

export const EngineError = z.object({
  code: EngineErrorCode,
  message: z.string(),
  phase: Phase.nullable().optional(),
  /** The request field at fault, where there is one (e.g. "job.output.video"). */
  field: z.string().nullable().optional(),
});
export type EngineError = z.infer<typeof EngineError>;

export const Device = z.enum(["cuda", "cpu"]);
export type Device = z.infer<typeof Device>;
export const DType = z.enum(["bfloat16", "float16", "float32"]);
export type DType = z.infer<typeof DType>;

const Id = z.string().min(1).max(128);
const Bytes = z.number().int().nonnegative();
const Config = z.record(z.string(), z.unknown());

/**
 * A full-size architecture built with random weights (for benchmarks: timings don't depend on the
 * values). Configs are the diffusers/transformers config dicts of each component.
 */
export const WanArchitecture = z.object({
  family: z.literal("wan2.1-t2v"),
  transformer: Config,
  vae: Config,
  textEncoder: Config,
  scheduler: z.object({ className: z.string(), config: Config }),
  /** Vocabulary size of the synthetic tokenizer built for random-weight runs. */
  tokenizerVocabSize: z.number().int().positive(),
});
export type WanArchitecture = z.infer<typeof WanArchitecture>;

export const ModelSource = z.discriminatedUnion("kind", [
  /** A diffusers-format checkpoint folder (model_index.json, transformer/, vae/, …). */
  z.object({ kind: z.literal("checkpoint"), path: z.string().min(1) }),
  /** A catalog architecture with random weights ~ N(0, 0.02). */
  z.object({ kind: z.literal("random"), architecture: WanArchitecture, seed: z.number().int().nonnegative() }),
]);
export type ModelSource = z.infer<typeof ModelSource>;

/** How the engine runs the denoising hot path (all exact: no approximation). */
export const RuntimeSpec = z.object({
  /** Classifier-free guidance as one batch-2 forward ("auto" = batched) or two forwards. */
  cfg: z.enum(["auto", "batched", "sequential"]),
  /** Exact SDPA backend; "auto" measures the GPU's backends once per shape and keeps the fastest. */
  attention: z.enum(["auto", "default", "cudnn", "flash", "efficient", "math"]),
  /** Regional torch.compile of the transformer's repeated blocks. */
  compile: z.boolean(),
  /** Where the attention choice and the compiled kernels persist across processes; null keeps nothing. */
  cacheDir: z.string().min(1).nullable(),
  /** The transformer's block linears: exact, or a lossy low-bit mode (kino_engine/quant). @default "exact" */
  weights: z.enum(["exact", "fp8", "fp8-weight", "int8", "int8-dynamic"]).optional(),
  /** Self-attention: exact, kino's lossy low-bit kernel "<QK>-<PV>", or cuDNN's FP8 flash attention ("fp8-cudnn", needs nvidia-cudnn-frontend). @default "exact" */
  attentionPrecision: z.enum(["exact", "int8-fp8", "int8-bf16", "fp8-fp8", "fp8-bf16", "fp8-cudnn"]).optional(),
  /** Fuse the blocks' small ops (GELU into its GEMM, RoPE with the q/k norm); exact up to float rounding. @default true */
  fuse: z.boolean().optional(),
});
export type RuntimeSpec = z.infer<typeof RuntimeSpec>;

/** Where one component's weights live during a generation (the planner's decision; runtime/placement.py executes it). */
export const PlacementSpec = z.discriminatedUnion("kind", [
  /** On the device for the whole generation. */
  z.object({ kind: z.literal("resident") }),
  /** In pinned host memory; copied onto the device only while its phase runs. */
  z.object({ kind: z.literal("swapped") }),
  /**
   * Transformer only: its first `residentBlocks` blocks stay, the rest stream `prefetch` blocks ahead from pinned host
   * memory ("ram"), or from safetensors files through a two-block pinned staging ring ("disk": the checkpoint's own
   * files, a scratch file for a model only in memory), for hosts whose RAM cannot hold them.
   */
  z.object({
    kind: z.literal("streamed"),
    residentBlocks: z.number().int().nonnegative(),
    prefetch: z.number().int().positive(),
    /** Where the streamed blocks live off the device. @default "ram" */
    source: z.enum(["ram", "disk"]).optional(),
  }),
  /** Text encoder only: runs on the host CPU. */
  z.object({ kind: z.literal("cpu") }),
]);
export type PlacementSpec = z.infer<typeof PlacementSpec>;

/** A memory plan the engine executes at load. */
export const MemorySpec = z.object({
  textEncoder: PlacementSpec,
  transformer: PlacementSpec,
  vae: PlacementSpec,
  /** Device bytes the engine process may allocate (enforced in-process); null: no cap. */
  vramBudget: Bytes.nullable(),
});
export type MemorySpec = z.infer<typeof MemorySpec>;

export const ModelSpec = z.object({
  /** A display name: the catalog id or the folder. */
  name: z.string().min(1),
  source: ModelSource,
  device: Device,
  /** Precision of the transformer and the text encoder; the VAE stays float32 (as diffusers' Wan examples run it). */
  dtype: DType,
  /** The hot path's options; absent: batched CFG, measured attention, no compile, nothing persisted. */
  runtime: RuntimeSpec.optional(),
  /** Where each component lives and the VRAM cap; absent: everything resident, no cap. */
  memory: MemorySpec.optional(),
});
export type ModelSpec = z.infer<typeof ModelSpec>;

export const JobSpec = z.object({
  prompt: z.string(),
  negativePrompt: z.string(),
  width: z.number().int().positive(),
  height: z.number().int().positive(),
  frames: z.number().int().positive(),
  steps: z.number().int().positive(),
  guidance: z.number().nonnegative(),
  /** Flow shift; null keeps the checkpoint scheduler's own. */
  shift: z.number().positive().nullable(),
  seed: z.number().int().nonnegative(),
  /** Frames per second of the video; null takes the model's. */
  fps: z.number().positive().nullable(),
  output: z.object({
    /** MP4 (H.264, yuv420p) path, written to a temporary name and renamed; null for none. */
    video: z.string().min(1).nullable(),
    /** Folder for a lossless PNG sequence (frame_00000.png, …); null for none. */
    framesDir: z.string().min(1).nullable(),
  }),
  /** How the VAE decodes (the plan's); absent: whole. Tiles overlap by a quarter. */
  vaeDecode: z
    .discriminatedUnion("mode", [
      z.object({ mode: z.literal("full") }),
      z.object({ mode: z.literal("tiled"), tile: z.number().int().min(64).multipleOf(32) }),
    ])
    .optional(),
  /** Guidance as one batch-2 forward or two forwards (the plan's); absent: the model's runtime option. */
  cfg: z.enum(["batched", "sequential"]).optional(),
  /**
   * Previews while it denoises: every `every` steps (and at the last), a `preview` event with the
   * middle frame of the clean video the model predicts at that step, at the latents' resolution.
   * Absent: none. Not a batch shape field: jobs of one batch may differ.
   */
  preview: z.object({ every: z.number().int().positive() }).optional(),
});
export type JobSpec = z.infer<typeof JobSpec>;

// ---- requests (control plane → engine) ----

export const HelloRequest = z.object({ type: z.literal("hello"), id: Id, protocol: z.number().int() });
export const LoadRequest = z.object({ type: z.literal("load"), id: Id, model: ModelSpec });
export const GenerateRequest = z.object({ type: z.literal("generate"), id: Id, job: JobSpec });

/** The JobSpec fields every job of a batch shares: one denoising loop runs them together. */
export const BATCH_SHAPE_FIELDS = ["width", "height", "frames", "steps", "guidance", "shift", "cfg"] as const;

/** One job of a batch: its own id (its events, its answer and a cancel's target) and its spec. */
export const BatchJob = z.object({ id: Id, job: JobSpec });
export type BatchJob = z.infer<typeof BatchJob>;

/**
 * Several jobs of one shape (BATCH_SHAPE_FIELDS) run as one denoising loop: each forward carries
 * every job's rows (jobs × 2 with batched CFG). Prompts, seeds, outputs, fps and decode stay each
 * job's. Each job is answered under its own id as a `generate` is (events, then its result or error;
 * a cancelled one as soon as the engine stops it, while its rows may compute until the loop ends),
 * then the batch itself with a GenerateBatchResult. Engines that predate it answer BAD_REQUEST on
 * "type" (the client's ENGINE_TOO_OLD).
 */
export const GenerateBatchRequest = z
  .object({ type: z.literal("generate_batch"), id: Id, jobs: z.array(BatchJob).min(1) })
  .superRefine((request, ctx) => {
    const ids = new Set([request.id]);
    request.jobs.forEach((member, k) => {
      if (ids.has(member.id)) {
        ctx.addIssue({ code: "custom", path: ["jobs", k, "id"], message: `"${member.id}" is used twice: the batch and each of its jobs need distinct ids` });
      }
      ids.add(member.id);
      const first = request.jobs[0]!.job;
      const field = BATCH_SHAPE_FIELDS.find((f) => member.job[f] !== first[f]);
      if (field !== undefined) {
        ctx.addIssue({
          code: "custom",
          path: ["jobs", k, "job", field],
          message: `must equal jobs.0.job.${field} (${String(first[field])}) for the jobs to share one denoising loop, got ${String(member.job[field])}`,
        });
      }
    });
  });
export type GenerateBatchRequest = z.infer<typeof GenerateBatchRequest>;

export const CancelRequest = z.object({ type: z.literal("cancel"), id: Id, target: Id });
/** Drops the engine's cached prompt embeddings (e.g. to give their device memory back). */
export const ClearCacheRequest = z.object({ type: z.literal("clear_cache"), id: Id });
export const ShutdownRequest = z.object({ type: z.literal("shutdown"), id: Id });
/**
 * Measures this machine's hardware profile (ProbeResult) on the engine's device; queued behind jobs.
 * Engines that predate it answer BAD_REQUEST on the field "type" (the client reports ENGINE_TOO_OLD).
 */
export const ProbeRequest = z.object({
  type: z.literal("probe"),
  id: Id,
  /** Fewer repeats, a smaller copy and one attention shape (about 2 s) instead of the full set (about 10 s). */
  quick: z.boolean(),
});

/**
 * One transformer forward at a job's shape for `jobs` jobs of it (a batch's rows), so compile,
 * autotuning and the attention choice are paid before the first request of that shape; with
 * `job.preview`, the previews' colour map is fitted too. The job's prompts and outputs are not used.
 * Engines that predate it answer BAD_REQUEST on "type" (the client's ENGINE_TOO_OLD).
 */
export const PrewarmRequest = z.object({
  type: z.literal("prewarm"),
  id: Id,
  job: JobSpec,
  /** Jobs of the shape one forward carries (a batch of that many). @default 1 */
  jobs: z.number().int().positive().optional(),
});

export const EngineRequest = z.discriminatedUnion("type", [
  HelloRequest,
  LoadRequest,
  GenerateRequest,
  GenerateBatchRequest,
  CancelRequest,
  ClearCacheRequest,
  ShutdownRequest,
  ProbeRequest,
  PrewarmRequest,
]);
export type EngineRequest = z.infer<typeof EngineRequest>;
export type RequestType = EngineRequest["type"];

// ---- results ----

export const DeviceInfo = z.object({
  index: z.number().int().nonnegative(),
  name: z.string(),
  totalBytes: Bytes,
  freeBytes: Bytes,
  /** CUDA compute capability, e.g. "9.0". */
  capability: z.string(),
});
export type DeviceInfo = z.infer<typeof DeviceInfo>;

export const HelloResult = z.object({
  protocol: z.number().int(),
  engineVersion: z.string(),
  python: z.string(),
  torch: z.string(),
  /** CUDA runtime torch was built with, null for a CPU-only build. */
  cuda: z.string().nullable(),
  diffusers: z.string(),
  transformers: z.string(),
  encoder: z.object({ name: z.string(), version: z.string(), h264: z.boolean() }),
  devices: z.array(DeviceInfo),
  hostRamBytes: Bytes,
  hostRamAvailableBytes: Bytes,
  /** The NVIDIA driver's version, null without one; absent from engines that predate it. */
  driver: z.string().nullable().optional(),
});
export type HelloResult = z.infer<typeof HelloResult>;

export const ComponentInfo = z.object({
  name: z.string(),
  className: z.string(),
  parameters: z.number().int().nonnegative(),
  bytes: Bytes,
});

export const LoadResult = z.object({
  name: z.string(),
  device: Device,
  dtype: DType,
  /** The model's native frame rate. */
  fps: z.number().positive(),
  /** Spatial and temporal VAE compression and the transformer patch: what sizes are legal. */
  vaeScaleSpatial: z.number().int().positive(),
  vaeScaleTemporal: z.number().int().positive(),
  components: z.array(ComponentInfo),
  loadMs: z.number().nonnegative(),
  /** What the memory plan did: pinned host bytes held, the VRAM cap, device bytes after load (null on CPU). */
  memory: z
    .object({ pinnedBytes: Bytes, vramBudget: Bytes.nullable(), deviceWeightBytes: Bytes.nullable() })
    .optional(),
});
export type LoadResult = z.infer<typeof LoadResult>;

export const Timings = z.object({
  textEncodeMs: z.number().nonnegative(),
  denoiseMs: z.number().nonnegative(),
  decodeMs: z.number().nonnegative(),
  encodeMs: z.number().nonnegative(),
  totalMs: z.number().nonnegative(),
});

export const GenerateResult = z.object({
  frames: z.number().int().positive(),
  width: z.number().int().positive(),
  height: z.number().int().positive(),
  fps: z.number().positive(),
  output: z.object({ video: z.string().nullable(), framesDir: z.string().nullable() }),
  timings: Timings,
  secondsPerStep: z.number().nonnegative(),
  /** Peak device memory allocated during the job (torch's counter), null on CPU. */
  peakVramBytes: Bytes.nullable(),
  /** Peak resident set size of the engine process. */
  peakRamBytes: Bytes,
  /** Peak device memory per phase (what the planner learns from); null on CPU. */
  phasePeakVramBytes: z
    .object({ textEncode: Bytes.optional(), denoise: Bytes.optional(), decode: Bytes.optional() })
    .nullable()
    .optional(),
  /**
   * The engine's caches during this job: prompt embeddings served from the cache (hits) or encoded
   * (misses), counting the negative prompt when guidance runs. Absent from engines that predate it.
   */
  cache: z
    .object({ promptHits: z.number().int().nonnegative(), promptMisses: z.number().int().nonnegative() })
    .optional(),
  /** The jobs that shared this job's denoising loop (1: it ran alone). Absent from engines that predate batches. */
  batchSize: z.number().int().positive().optional(),
});
export type GenerateResult = z.infer<typeof GenerateResult>;

/** How each job of a generate_batch ended (each was answered under its own id first). */
export const GenerateBatchResult = z.object({
  jobs: z.array(z.object({ id: Id, status: z.enum(["completed", "failed", "cancelled"]) })),
});
export type GenerateBatchResult = z.infer<typeof GenerateBatchResult>;

export const CancelResult = z.object({ cancelled: z.boolean() });
/** Bytes the dropped cache entries held (device memory where the model runs on a GPU). */
export const ClearCacheResult = z.object({ freedBytes: Bytes });
export type ClearCacheResult = z.infer<typeof ClearCacheResult>;
export const ShutdownResult = z.object({});

const Rate = z.number().positive();

/** One matrix product timed alone: (M×K activations) · (K×N weight), 2·M·N·K FLOP. */
export const GemmMeasure = z.object({
  m: z.number().int().positive(),
  n: z.number().int().positive(),
  k: z.number().int().positive(),
  dtype: DType,
  /** Median seconds of one product. */
  seconds: Rate,
  flopsPerS: Rate,
});
export type GemmMeasure = z.infer<typeof GemmMeasure>;

/** Exact self-attention (SDPA) at one shape, 4·heads·tokens²·headDim FLOP per call, with each backend. */
export const AttentionMeasure = z.object({
  heads: z.number().int().positive(),
  tokens: z.number().int().positive(),
  headDim: z.number().int().positive(),
  dtype: DType,
  /** The fastest backend and its median seconds and rate. */
  backend: z.string(),
  seconds: Rate,
  flopsPerS: Rate,
  /** The rate of each backend tried; null where it cannot run this shape. */
  byBackend: z.record(z.string(), Rate.nullable()),
});
export type AttentionMeasure = z.infer<typeof AttentionMeasure>;

/**
 * The measured inputs of the planner's HardwareProfile for the engine's device (planner/probe-cache.ts
 * maps and caches them). CUDA events, a warm-up, the median of repeats. Without a GPU the GPU fields
 * are null (or empty) and only the host is measured.
 */
export const ProbeResult = z.object({
  device: Device,
  /** The CUDA device index; null on the CPU. */
  index: z.number().int().nonnegative().nullable(),
  /** The GPU's name, or the CPU's where there is no GPU. */
  name: z.string(),
  capability: z.string().nullable(),
  driver: z.string().nullable(),
  torch: z.string(),
  cuda: z.string().nullable(),
  vramTotalBytes: Bytes.nullable(),
  vramFreeBytes: Bytes.nullable(),
  hostRamBytes: Bytes,
  hostRamAvailableBytes: Bytes,
  /** The memory limit of the engine's cgroup (a container), where it is below the host's RAM; else null. */
  memoryLimitBytes: Bytes.nullable(),
  /** RLIMIT_MEMLOCK (soft); null: unlimited. Reported, not applied: CUDA's pinning is not charged to it. */
  memlockBytes: Bytes.nullable(),
  /** Host bytes kino may pin: half of the host RAM or of the cgroup limit (kino_engine/probe.py says why). */
  pinnedLimitBytes: Bytes,
  /** Copy rates in bytes/s: from and to page-locked host memory, and from ordinary (pageable) memory. */
  h2dBytesPerS: Rate.nullable(),
  d2hBytesPerS: Rate.nullable(),
  h2dPageableBytesPerS: Rate.nullable(),
  /** Bytes of each timed copy. */
  transferBytes: Bytes.nullable(),
  /**
   * Sequential read rate, bytes/s, of a file written in the engine's temporary folder and dropped from the page cache
   * (what the disk tier streams at); null where it could not be measured (a RAM-backed folder, no room), absent from
   * engines and cached measurements that predate it.
   */
  diskReadBytesPerS: Rate.nullable().optional(),
  /** bf16 GEMMs at Wan shapes (tokens × width × width), smallest width first; empty without a GPU. */
  gemm: z.array(GemmMeasure),
  /** SDPA at Wan shapes (heads × tokens × 128), fewest heads first; empty without a GPU. */
  attention: z.array(AttentionMeasure),
  /** The host's GEMM at a text-encoder shape (bf16, or float32 where bf16 cannot run). */
  cpuGemm: GemmMeasure,
  cpuThreads: z.number().int().positive(),
  quick: z.boolean(),
  /** Wall time of the whole measurement. */
  ms: z.number().nonnegative(),
});
export type ProbeResult = z.infer<typeof ProbeResult>;

export const PrewarmResult = z.object({
  /** Wall time of the forward, compile and autotuning included. */
  ms: z.number().nonnegative(),
  jobs: z.number().int().positive(),
});
export type PrewarmResult = z.infer<typeof PrewarmResult>;

/** Which result schema answers which request. */
export const ResultFor = {
  hello: HelloResult,
  load: LoadResult,
  generate: GenerateResult,
  generate_batch: GenerateBatchResult,
  cancel: CancelResult,
  clear_cache: ClearCacheResult,
  shutdown: ShutdownResult,
  probe: ProbeResult,
  prewarm: PrewarmResult,
} as const;
export type ResultFor = { [K in RequestType]: z.infer<(typeof ResultFor)[K]> };

// ---- events (engine → control plane, streamed before the result) ----

export const PhaseEvent = z.object({
  kind: z.literal("phase"),
  phase: Phase,
  state: z.enum(["start", "end"]),
  /** Duration, on "end". */
  ms: z.number().nonnegative().nullable(),
});
export const StepEvent = z.object({
  kind: z.literal("step"),
  /** 1-based index of the step just finished. */
  i: z.number().int().positive(),
  n: z.number().int().positive(),
  ms: z.number().nonnegative(),
  vramBytes: Bytes.nullable(),
  ramBytes: Bytes,
});
/**
 * What the video looks like at step `i`: the middle frame of the clean video the model predicts from
 * the latents at that step (x0 = x_t - sigma_t * v), projected from latent channels to RGB with a map
 * fitted once per model from its own VAE, at the latents' resolution (width/8 x height/8 for Wan 2.1).
 */
export const PreviewEvent = z.object({
  kind: z.literal("preview"),
  /** 1-based index of the step it was taken at. */
  i: z.number().int().positive(),
  n: z.number().int().positive(),
  width: z.number().int().positive(),
  height: z.number().int().positive(),
  /** The image as a PNG (8-bit RGB), base64. */
  png: z.string().min(1),
});
export const LoadProgressEvent = z.object({
  kind: z.literal("load"),
  component: z.string(),
  bytes: Bytes,
  totalBytes: Bytes,
});
export const LogEvent = z.object({
  kind: z.literal("log"),
  level: z.enum(["debug", "info", "warn"]),
  message: z.string(),
});
export const EngineEvent = z.discriminatedUnion("kind", [PhaseEvent, StepEvent, PreviewEvent, LoadProgressEvent, LogEvent]);
export type EngineEvent = z.infer<typeof EngineEvent>;

// ---- messages (engine → control plane) ----

export const ResultMessage = z.object({ type: z.literal("result"), id: Id, result: z.record(z.string(), z.unknown()) });
export const ErrorMessage = z.object({ type: z.literal("error"), id: Id, error: EngineError });
export const EventMessage = z.object({ type: z.literal("event"), id: Id, event: EngineEvent });
export const EngineMessage = z.discriminatedUnion("type", [ResultMessage, ErrorMessage, EventMessage]);
export type EngineMessage = z.infer<typeof EngineMessage>;
