/**
 * The native HTTP API's schemas: request bodies, parameters and answers of every /api route, and
 * the job events the SSE stream carries. They are the source of truth for validation, for the
 * TypeScript types (z.infer) and for the OpenAPI document at /openapi.json.
 */
import { z } from "zod";
import { Phase, Timings } from "../protocol/engine.ts";

/** Job ids are lowercase UUIDs: nothing else can reach the data folder through a URL. */
export const JOB_ID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const JobId = z.string().regex(JOB_ID_PATTERN, "must be a job id (a lowercase UUID, as POST /api/jobs answers)");
export const JobIdParams = z.strictObject({ id: JobId });

/** Longer than any prompt Wan's text encoder reads (512 tokens), short enough to bound the work. */
export const MAX_PROMPT_CHARS = 8000;

const promptText = (what: string) =>
  z.string().max(MAX_PROMPT_CHARS, `is longer than ${MAX_PROMPT_CHARS} characters (the text encoder reads 512 tokens); shorten the ${what}`);

/**
 * A job as a client asks for it. Numbers are checked against the model's rules after parsing (size
 * a multiple of 16, frames 4k+1 …), with messages that name the nearest legal value.
 */
export const JobRequest = z
  .strictObject({
    model: z.string().min(1).max(200).default("auto").meta({ description: "A catalog id (GET /api/models) or auto." }),
    prompt: promptText("prompt"),
    negativePrompt: promptText("negative prompt").optional(),
    size: z.string().max(32).optional().meta({ description: "WIDTHxHEIGHT, multiples of 16; default the model's.", examples: ["832x480"] }),
    frames: z.number().optional().meta({ description: "4k+1; default the model's (81, tiny 17)." }),
    steps: z.number().optional().meta({ description: "Whole number ≥ 1; default the model's (50, tiny 10)." }),
    guidance: z.number().optional().meta({ description: "Classifier-free guidance scale ≥ 0; 0 turns it off. Default 5." }),
    shift: z.number().optional().meta({ description: "Flow shift > 0 of the scheduler." }),
    seed: z.number().optional().meta({ description: "0 to 2^32-1; default random (and reported in the job)." }),
    fps: z.number().optional().meta({ description: "Frames per second of the video; default the model's (16)." }),
    dtype: z.enum(["bf16", "fp16", "fp32"]).optional().meta({ description: "Default bf16 on a GPU, fp32 on the CPU." }),
    randomWeights: z.boolean().default(false).meta({ description: "The catalog architecture with random weights (timings only; the video is noise)." }),
    keepAlive: z
      .union([z.string().max(32), z.number()])
      .optional()
      .meta({ description: "How long the model stays loaded after this job: 5m, 30s, 0 (unload), -1 (keep). Default the server's." }),
    previewEvery: z.number().optional().meta({
      description:
        "Whole number ≥ 0: a `preview` event (an image of what the video is becoming) every N denoising steps and at the last; 0: none. " +
        "Default max(1, round(steps / 10)): about ten per job.",
    }),
  })
  .meta({ id: "JobRequest" });
export type JobRequest = z.input<typeof JobRequest>;
export type ParsedJobRequest = z.output<typeof JobRequest>;

export const JobStatus = z.enum(["queued", "running", "completed", "failed", "cancelled"]);
export type JobStatus = z.infer<typeof JobStatus>;
export const TERMINAL_STATUSES: readonly JobStatus[] = ["completed", "failed", "cancelled"];

export const ErrorInfo = z.object({
  code: z.string(),
  message: z.string(),
  field: z.string().nullable(),
});
export type ErrorInfo = z.infer<typeof ErrorInfo>;

/** Every error answer: `{error: {code, message, field}}`, never a stack trace. */
export const ErrorBody = z.object({ error: ErrorInfo }).meta({ id: "Error" });

/** The job's parameters as they run: the request with the model's defaults filled in. */
export const JobParams = z.object({
  prompt: z.string(),
  negativePrompt: z.string(),
  width: z.number().int(),
  height: z.number().int(),
  frames: z.number().int(),
  steps: z.number().int(),
  guidance: z.number(),
  shift: z.number().nullable(),
  seed: z.number().int(),
  fps: z.number().nullable(),
});
export type JobParams = z.infer<typeof JobParams>;

export const Artifact = z.object({
  id: z.string(),
  kind: z.literal("video"),
  contentType: z.string(),
  bytes: z.number().int().nonnegative(),
  url: z.string(),
});
export type Artifact = z.infer<typeof Artifact>;

export const JobResult = z.object({
  frames: z.number().int(),
  width: z.number().int(),
  height: z.number().int(),
  fps: z.number(),
  secondsPerStep: z.number(),
  timings: Timings,
  peakVramBytes: z.number().int().nullable(),
  peakRamBytes: z.number().int(),
  /** The jobs that shared this job's denoising loop (1: it ran alone); absent from jobs of older servers. */
  batchSize: z.number().int().positive().optional(),
});
export type JobResult = z.infer<typeof JobResult>;

const Timestamp = z.iso.datetime();

export const Job = z
  .object({
    id: JobId,
    status: JobStatus,
    model: z.string(),
    /** Random weights or kino's tiny model: the video is noise. */
    noise: z.boolean(),
    params: JobParams,
    createdAt: Timestamp,
    startedAt: Timestamp.nullable(),
    finishedAt: Timestamp.nullable(),
    /** Times the job was started (a requeue after an interruption starts it again). */
    attempts: z.number().int(),
    /** 1 for the next job to run; null unless queued. */
    queuePosition: z.number().int().nullable(),
    cancelRequested: z.boolean(),
    error: ErrorInfo.nullable(),
    result: JobResult.nullable(),
    artifacts: z.array(Artifact),
    /** Denoising steps between the job's previews (0: none); each is announced by a `preview` event with its url. */
    previewEvery: z.number().int().nonnegative(),
    links: z.object({ self: z.string(), events: z.string(), cancel: z.string(), video: z.string() }),
  })
  .meta({ id: "Job" });
export type Job = z.infer<typeof Job>;

export const JobListQuery = z.strictObject({
  status: JobStatus.optional(),
  limit: z.coerce.number().int().min(1).max(100).default(20),
  /** `nextCursor` of the previous page. */
  cursor: z.string().regex(/^\d{1,15}$/, "must be the nextCursor of a previous page").optional(),
});
export const JobList = z.object({ jobs: z.array(Job), nextCursor: z.string().nullable() }).meta({ id: "JobList" });
export type JobList = z.infer<typeof JobList>;

// ---- job events (SSE) ----

export const JobEventData = z
  .discriminatedUnion("type", [
    z.object({ type: z.literal("queued"), position: z.number().int() }),
    z.object({ type: z.literal("started"), attempt: z.number().int(), engine: z.number().int() }),
    z.object({ type: z.literal("model.loading"), model: z.string() }),
    z.object({
      type: z.literal("progress"),
      phase: Phase,
      step: z.number().int().nullable(),
      total: z.number().int().nullable(),
      /** Mean seconds per denoising step so far. */
      s_per_step: z.number().nullable(),
      /** Seconds left in the denoising loop at that pace. */
      eta: z.number().nullable(),
      /** Device memory allocated after the step, as the engine measured it; null on the CPU and at phase starts. */
      vram_bytes: z.number().int().nullable().default(null),
      /** The engine process's resident memory after the step; null at phase starts. */
      ram_bytes: z.number().int().nullable().default(null),
    }),
    /**
     * What the video looks like at a denoising step: the middle frame of the clean video the model
     * predicts there, at the latents' resolution (width/8 x height/8), as a PNG at `url` (GET
     * /api/jobs/{id}/previews/{step}). Sent every `previewEvery` steps and at the last; the files of
     * a job that does not complete are removed with its folder (the url then answers 404).
     */
    z.object({
      type: z.literal("preview"),
      /** The 1-based denoising step it was taken at. */
      step: z.number().int().positive(),
      total: z.number().int().positive(),
      /** The image's size in pixels. */
      width: z.number().int().positive(),
      height: z.number().int().positive(),
      url: z.string(),
    }),
    z.object({ type: z.literal("output"), artifact: Artifact }),
    /** A decision taken for the job, with its reason (a retry after OOM, a requeue after a restart …). */
    z.object({ type: z.literal("notice"), message: z.string() }),
    z.object({ type: z.literal("completed"), result: JobResult }),
    z.object({ type: z.literal("failed"), error: ErrorInfo }),
    z.object({ type: z.literal("cancelled"), reason: z.string() }),
  ])
  .meta({ id: "JobEventData" });
export type JobEventData = z.infer<typeof JobEventData>;
export const TERMINAL_EVENTS: ReadonlySet<JobEventData["type"]> = new Set(["completed", "failed", "cancelled"]);

/** A stored event: `seq` is its SSE id (1, 2, … per job), the Last-Event-ID to resume after. */
export const JobEvent = z.object({ seq: z.number().int().positive(), jobId: JobId, at: Timestamp, data: JobEventData }).meta({ id: "JobEvent" });
export type JobEvent = z.infer<typeof JobEvent>;

/** A preview's address: the job and the denoising step it was taken at. */
export const PreviewParams = z.strictObject({
  id: JobId,
  step: z.string().regex(/^[1-9]\d{0,8}$/, "must be a denoising step: a whole number ≥ 1, as the job's preview events name it"),
});

export const LastEventId = z.string().regex(/^\d{1,15}$/, "must be the id of an event this stream sent (a whole number)");

// ---- the planner's estimate ----

/** A request to estimate before submitting it: the job fields that decide its memory and time. */
export const PlanBody = z
  .strictObject({
    model: JobRequest.shape.model,
    size: JobRequest.shape.size,
    frames: JobRequest.shape.frames,
    steps: JobRequest.shape.steps,
    guidance: JobRequest.shape.guidance,
  })
  .meta({ id: "PlanRequest" });

export const PlanEstimate = z
  .object({
    /** The catalog id (auto resolved). */
    model: z.string(),
    width: z.number().int(),
    height: z.number().int(),
    frames: z.number().int(),
    steps: z.number().int(),
    /** What the estimate is for: the server's largest GPU, or a named profile where the server has none; null when not planned. */
    hardware: z.string().nullable(),
    /** Whether `hardware` is one of this server's GPUs. */
    serverGpu: z.boolean(),
    estimate: z
      .object({
        peakVramBytes: z.number(),
        peakRamBytes: z.number(),
        seconds: z.number(),
        secondsPerStep: z.number(),
        /** Where the transformer's weights live during denoising (resident, block-streamed …). */
        transformer: z.string(),
        decode: z.string(),
      })
      .nullable(),
    /** Why there is no estimate, or what it is for. */
    note: z.string(),
  })
  .meta({ id: "PlanEstimate" });
export type PlanEstimate = z.infer<typeof PlanEstimate>;

// ---- models, engines, health ----

export const ModelList = z
  .object({
    models: z.array(
      z.object({
        id: z.string(),
        description: z.string(),
        origin: z.enum(["hub", "kino"]),
        present: z.boolean(),
        randomWeights: z.boolean(),
        /** Engines that hold it loaded now. */
        loadedOn: z.array(z.number().int()),
      }),
    ),
  })
  .meta({ id: "ModelList" });
export type ModelList = z.infer<typeof ModelList>;

export const EngineState = z.enum(["starting", "idle", "loading", "ready", "busy", "failed", "closed"]);
export type EngineState = z.infer<typeof EngineState>;

export const EngineStatus = z.object({
  engine: z.number().int(),
  state: EngineState,
  device: z.object({ kind: z.enum(["cuda", "cpu"]), name: z.string(), totalBytes: z.number().int().nullable() }).nullable(),
  model: z.string().nullable(),
  /** The job it runs (a batch's first). */
  jobId: JobId.nullable(),
  /** Every job it runs: one, or the jobs of a batch (one forward per step for all of them). */
  jobIds: z.array(JobId),
  /** Device bytes the loaded model's weights hold, as the engine reported after loading; null on the CPU, or with nothing loaded. */
  vramBytes: z.number().int().nullable(),
  /** Peak device memory of the last job on this engine (the protocol has no live query); null on the CPU. */
  lastJobPeakVramBytes: z.number().int().nullable(),
  /** Device memory allocated at the running job's last denoising step (from the engine's step events); null when idle, before the first step, or on the CPU. */
  vramInUseBytes: z.number().int().nullable(),
  keepAliveExpiresAt: Timestamp.nullable(),
  restarts: z.number().int(),
  error: z.string().nullable(),
});
export type EngineStatus = z.infer<typeof EngineStatus>;
export const ProcessList = z.object({ engines: z.array(EngineStatus) }).meta({ id: "ProcessList" });

export const Health = z
  .object({
    /** ok: every engine usable; degraded: some failed (jobs still run); unavailable: none can run jobs. */
    status: z.enum(["ok", "degraded", "unavailable"]),
    engines: z.array(z.object({ engine: z.number().int(), state: EngineState, error: z.string().nullable() })),
    queue: z.object({ queued: z.number().int(), running: z.number().int(), capacity: z.number().int() }),
  })
  .meta({ id: "Health" });
export type Health = z.infer<typeof Health>;
